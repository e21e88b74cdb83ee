"""The multilayer perceptron and its backward pass, written once for every backend.

A network of l layers is the composition x_{k+1} = L_k(x_k, theta_k) with
theta_k = (W_k, b_k) and

    z_k     = x_k W_k + b_k                       (gemm, then bias_act_forward)
    x_{k+1} = f_k(z_k)                            plain layer
    x_{k+1} = x_k + f_k(z_k)                      residual layer (equal widths)

Reverse mode (backprop) starts with D = dLoss/dx_{l+1} and for k = l..1:

    D'    = D * f_k'(.)                           act_backward_bias_grad (one pass:
    db_k  = sum over rows of D'                   act_backward, then bias_grad)
    dW_k  = x_k^T D'                              gemm, x_k transposed in place
    D     = D' W_k^T  (+ D for a residual layer)  gemm

Gradients come out in "denominator layout": dW_k has W_k's shape (see docs/backprop.md).
Parameters and gradients each live in one flat buffer; W_k and b_k are views into it.

Mixed precision (dtype bf16/fp16, gpubp/precision.py): parameters, gradients and the
optimizer state stay float32; each forward pass first rounds the weights into a 16-bit
copy (params_low) that the GEMMs read, and x_k, z_k, D, D' are stored in 16 bits. fp16
scales the loss gradient by a dynamic loss scale S (loss_scale, a device scalar), so
the gradients come out as S times the true ones; the trainer's guard unscales them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .activations import SAVES_INPUT, SAVES_OUTPUT, Activation, make_activation
from .backend import get_backend
from .backend.numpy_ops import relu_mask_bytes
from .init import init_weight
from .losses import Loss, make_loss
from .precision import LOSS_SCALE_INIT, get_precision

DTYPES = ("float32", "float64")  # the storage dtypes of the stacked models (gpubp.stack)

# train.gemm_epilogues = "auto": the backward product with a ReLU layer's ReLU' and bias
# gradient in its epilogue (cuBLASLt DRELU_BGRAD) only for layers of at most this many
# outputs. On an H100 in bf16 (docs/benchmarks.md): at width 64 (narrow, 262144 rows) it
# pays (the fused step 1.18x the unfused); at 4096 (wide, 8192 rows) it took 753 us a layer
# where the same plain GEMM takes 392 and the separate ReLU' 163. Widths in between are
# not measured yet: tests/epilogue_timing.py times each bench shape both ways on a GPU.
DRELU_BGRAD_MAX_WIDTH = 2048


@dataclass
class _Workspace:
    """Buffers for one batch size n, allocated once and reused by every step.

    z[k]:  (n, n_{k+1}) pre-activation, kept only when f_k' needs it, else None
    a[k]:  (n, n_{k+1}) f_k(z_k)
    x[k]:  (n, n_k) layer inputs; x[0] is the batch itself, x[k+1] is a[k] unless residual
    dx[k]: (n, n_k) dLoss/dx_k; dx[l] is the loss gradient
    dz[k]: (n, n_{k+1}) D' = D * f_k'(.); the same buffer as dx[k+1] unless residual
    mask[k]: (n, relu_mask_bytes(n_{k+1})) uint8, the bits [z_k > 0] of a ReLU layer whose
             products are fused (MLP.gemm_epilogues), else None
    fused[k]: the last forward pass wrote mask[k] (its fused product ran)
    done[k]:  this backward pass already has D'_k and db_k (the layer above's fused product)
    """

    z: list
    a: list
    x: list
    dx: list
    dz: list
    x0: object = None  # (n, n_0) the batch rounded to 16 bits (mixed precision), else None
    mask: list = None
    fused: list = None
    done: list = None
    shares: object = None  # (S, P): every layer's gradient shares, where the step's guard sums them


def gradient_passes_through(act, residual: bool) -> bool:
    """Whether a layer's D' = D * f'(.) is D itself: an identity layer (f' = 1) not under
    a skip connection, whose D' buffer is D's own (the workspaces' dz[k] is dx[k+1]), so
    the backward pass makes no pass over D for it."""
    return act.name == "identity" and not residual


IDENTITY = make_activation("identity")  # (a layer whose D' came with the layer above's kernel)


def param_layout(sizes) -> tuple[list, int]:
    """([(offset of W_k, offset of b_k, n_k, n_{k+1}), ...], P): the flat buffer's layout,
    W_k (n_k x n_{k+1}, row-major) then b_k, layer after layer; P parameters in all."""
    layout, offset = [], 0
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layout.append((offset, offset + fan_in * fan_out, fan_in, fan_out))
        offset += fan_in * fan_out + fan_out
    return layout, offset


def layer_views(flat, layout) -> list:
    """[W1, b1, W2, b2, ...] as views into a flat buffer (P,) or stacked (M, P):
    W_k (..., n_k, n_{k+1}), b_k (..., n_{k+1})."""
    lead = flat.shape[:-1]
    views = []
    for w_off, b_off, fan_in, fan_out in layout:
        views.append(flat[..., w_off:b_off].reshape(*lead, fan_in, fan_out))
        views.append(flat[..., b_off : b_off + fan_out])
    return views


class MLP:
    """A multilayer perceptron with explicit forward and backward passes.

    sizes: [n_in, n_hidden..., n_out]. `activation` is used on every hidden layer,
    `output_activation` on the last. The loss is part of the model so that
    `loss_and_grads` is one call.
    """

    def __init__(
        self,
        sizes,
        activation: str = "relu",
        output_activation: str = "identity",
        loss: str = "mse",
        *,
        dtype: str = "float32",
        device: str = "cpu",
        seed: int = 0,
        init: str = "he_normal",
        leaky_relu_slope: float = 0.01,
        label_smoothing: float = 0.0,
        huber_delta: float = 1.0,
        residual: bool = False,
        backend=None,
        gemm_epilogues: bool | None = None,
        fused_mlp: bool | str = False,
    ):
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"sizes must list at least two positive widths, got {sizes}")
        self.precision = get_precision(dtype)  # float32, float64, tf32, bf16, fp16
        self.backend = backend if backend is not None else get_backend(device)
        self.xp = self.backend.xp
        self.dtype = self.precision.param_dtype  # parameters, gradients, inputs, targets
        self.store_dtype = self.precision.store_dtype  # activations and GEMM inputs
        self.sizes = sizes
        self.seed = int(seed)
        self.init = init
        self.residual = bool(residual)
        self.leaky_relu_slope = float(leaky_relu_slope)
        hidden = make_activation(activation, leaky_relu_slope)
        self.activations: list[Activation] = [hidden] * (len(sizes) - 2) + [
            make_activation(output_activation, leaky_relu_slope)
        ]
        self.hidden_activation = hidden
        # fused products (bias and ReLU in the forward GEMM; ReLU' and db in the backward
        # ones): unless asked, the backend's default (on for the GPU) where they pay, the
        # 16-bit precisions: on an H100 float32's fused products were never faster than
        # the separate kernels (0.82x to 1.00x of the step, docs/benchmarks.md); not float64
        # (the default, "auto", also keeps the backward's DRELU_BGRAD to the widths where it pays)
        self.drelu_bgrad_max_width = DRELU_BGRAD_MAX_WIDTH if gemm_epilogues is None else None
        # a narrow layer's forward and backward as one kernel each of our own where the
        # backend has them (the GPU's kernels/layer.cu, float32, and layer_tc.cu, bf16), under
        # "auto" (gemm_epilogues None; True asks for cuBLASLt's fused products, False for
        # none); the NumPy backend has none (the same arithmetic)
        self.layer_kernels = gemm_epilogues is None
        if gemm_epilogues is None:
            gemm_epilogues = bool(getattr(self.backend, "gemm_epilogues", False)) and self.precision.low
        self.gemm_epilogues = bool(gemm_epilogues)
        self.loss: Loss = make_loss(loss, label_smoothing, huber_delta)
        # the whole forward and backward pass as one op (be.mlp_forward_backward: one kernel
        # on the GPU where the network is narrow enough), when asked (True), or "auto": where
        # the backend says it pays (train.fused_mlp's default); see runs_fused_mlp
        if fused_mlp != "auto" and not isinstance(fused_mlp, bool):
            raise ValueError(f'fused_mlp must be True, False or "auto", got {fused_mlp!r}')
        self.fused_mlp = fused_mlp
        self.grad_shares = None  # the last forward_backward's gradient, still in shares (S, P), or None
        # a layer is residual when asked for, hidden, and width-preserving
        self.is_residual = [
            self.residual and k < self.n_layers - 1 and sizes[k] == sizes[k + 1] for k in range(self.n_layers)
        ]
        # accuracy for a one-unit output: logits are split at 0, probabilities at 0.5
        self.decision_threshold = 0.0 if self.loss.name == "binary_cross_entropy" else 0.5

        # one flat buffer each for parameters and gradients; W_k, b_k are views
        self.layout, self.n_params = param_layout(sizes)
        rng = np.random.default_rng(self.seed)
        host = np.zeros(self.n_params, dtype=np.float64)
        for w_off, b_off, fan_in, fan_out in self.layout:
            host[w_off:b_off] = init_weight(rng, fan_in, fan_out, init).ravel()
        self.flat_params = self.backend.asarray(host.astype(self.dtype))
        self.flat_grads = self.backend.zeros(self.n_params, self.dtype)
        self.params = self._views(self.flat_params)
        self.grads = self._views(self.flat_grads)
        self._workspaces: dict[int, _Workspace] = {}
        # bf16/fp16: the weights' 16-bit copy the GEMMs read (refreshed by _round_params)
        low = self.precision.low
        self.flat_params_low = self.backend.empty(self.n_params, self.store_dtype) if low else None
        self.params_low = self._views(self.flat_params_low) if low else self.params
        # bf16: a bias gradient as the fused backward product gives it (cuBLASLt writes a bf16
        # out's bias gradient in bf16 only), widened into grads at once; one layer at a time
        self._db_low = self.backend.empty(max(sizes[1:]), self.store_dtype) if low else None
        # fp16: the dynamic loss scale S on the device (the trainer's guard updates it)
        self.loss_scale = None
        if self.precision.loss_scaling:
            self.loss_scale = self.backend.zeros((), np.float32)
            self.loss_scale[...] = LOSS_SCALE_INIT

    # ---------------------------------------------------------------- structure

    @property
    def n_layers(self) -> int:
        return len(self.sizes) - 1

    def _views(self, flat):
        """[W1, b1, W2, b2, ...] as views into a flat buffer."""
        return layer_views(flat, self.layout)

    def layer_params(self, k: int):
        """(W_k, b_k) of layer k, 0-based."""
        return self.params[2 * k], self.params[2 * k + 1]

    def set_params(self, arrays) -> None:
        """Copy values into the parameters, in `params` order (NumPy arrays accepted)."""
        arrays = list(arrays)
        if len(arrays) != len(self.params):
            raise ValueError(f"set_params: expected {len(self.params)} arrays, got {len(arrays)}")
        for k, (dst, src) in enumerate(zip(self.params, arrays)):
            src = np.asarray(self.backend.to_numpy(src)) if not isinstance(src, np.ndarray) else src
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"set_params: array {k} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
            dst[...] = self.backend.asarray(src, dtype=self.dtype)

    def set_flat_params(self, flat) -> None:
        flat = np.asarray(flat)
        if flat.shape != (self.n_params,):
            raise ValueError(f"expected a flat vector of {self.n_params} parameters, got shape {flat.shape}")
        self.flat_params[...] = self.backend.asarray(flat, dtype=self.dtype)

    def config_dict(self) -> dict:
        """What it takes to build this model again (stored in checkpoints)."""
        return {
            "sizes": list(self.sizes),
            "activation": self.hidden_activation.name,
            "output_activation": self.activations[-1].name,
            "loss": self.loss.name,
            "dtype": self.precision.name,
            "seed": self.seed,
            "init": self.init,
            "leaky_relu_slope": self.leaky_relu_slope,
            "label_smoothing": self.loss.label_smoothing,
            "huber_delta": self.loss.huber_delta,
            "residual": self.residual,
        }

    # ---------------------------------------------------------------- buffers

    def _workspace(self, n: int) -> _Workspace:
        ws = self._workspaces.get(n)
        if ws is not None:
            return ws
        if len(self._workspaces) >= 4:  # a few batch sizes at most (train, last partial, eval)
            self._workspaces.pop(next(iter(self._workspaces)))
        be, dt, sizes = self.backend, self.store_dtype, self.sizes
        z, a, x, dx, dz = [], [], [None], [], []
        for k, act in enumerate(self.activations):
            width = sizes[k + 1]
            z.append(be.empty((n, width), dt) if act.saves == SAVES_INPUT else None)
            a.append(be.empty((n, width), dt))
            x.append(be.empty((n, width), dt) if self.is_residual[k] else a[k])
        for k in range(self.n_layers + 1):
            if k > 0 and self.is_residual[k - 1]:
                dx.append(dx[k - 1])  # D_prev = D' W^T + D accumulates into D's own buffer
            else:
                dx.append(be.empty((n, sizes[k]), dt))
        for k in range(self.n_layers):
            dz.append(be.empty((n, sizes[k + 1]), dt) if self.is_residual[k] else dx[k + 1])
        mask = [be.empty((n, relu_mask_bytes(sizes[k + 1])), np.uint8) if self._fusable(k) else None
                for k in range(self.n_layers)]  # fmt: skip
        x0 = be.empty((n, sizes[0]), dt) if self.precision.low else None
        ws = _Workspace(z, a, x, dx, dz, x0, mask, [False] * self.n_layers, [False] * self.n_layers)
        self._workspaces[n] = ws
        return ws

    @property
    def _epilogues(self) -> bool:
        """Products with a fused epilogue are asked for, and this precision has them:
        float32 or 16-bit storage (float64 has no cuBLASLt epilogues)."""
        return self.gemm_epilogues and np.dtype(self.store_dtype) != np.float64

    def _lt(self, k: int) -> bool:
        """Layer k runs in cuBLASLt's fused products (_epilogues), where it does not run in
        the backend's layer kernels (_layer_kernel: a narrow layer under "auto", bf16 among
        them)."""
        return self._epilogues and not self._layer_kernel(k)

    def _fusable(self, k: int) -> bool:
        """Layer k's ReLU runs in its products (forward, and the backward one of the layer
        above): a ReLU layer in cuBLASLt's products (_lt) without a skip connection (a
        residual layer's D' is not its output's gradient alone)."""
        return self._lt(k) and self.activations[k].name == "relu" and not self.is_residual[k]

    def _drelu_bgrad(self, k: int) -> bool:
        """Whether ReLU layer k's backward (ReLU' and db_k) may ride the product of the layer
        above (DRELU_BGRAD, where layer k's forward was fused): not in fp16, whose db_k would
        be fp16 (a scaled sum over the batch overflows its range long before float32's);
        under "auto" only up to DRELU_BGRAD_MAX_WIDTH outputs."""
        limit = self.drelu_bgrad_max_width
        return not self.precision.loss_scaling and (limit is None or self.sizes[k + 1] <= limit)

    def _layer_kernel(self, k: int) -> bool:
        """Layer k's forward (product, bias, activation) and backward (D', dW, db, D' W^T)
        may each run as one kernel of the backend's own (be.gemm_bias_act,
        be.layer_backward; under "auto", where its layer_fits takes the layer)."""
        fits = getattr(self.backend, "layer_fits", None)
        return self.layer_kernels and fits is not None and fits(self.sizes[k], self.sizes[k + 1], self.store_dtype,
                                                                 self.precision.tf32)  # fmt: skip

    def _unskipped_layer_kernel(self, k: int) -> bool:
        """Layer k runs in the backend's layer kernels (_layer_kernel) and not under a skip
        connection: its x is the layer below's output as it is, and its backward carries
        no D of its own past the kernel (a residual layer's adds to D' W_k^T)."""
        return self._layer_kernel(k) and not self.is_residual[k]

    def takes_input_window(self) -> bool:
        """Whether forward_backward can read its batch's x where it lies in a split
        (x_window): the first layer runs in the backend's layer kernels, which read x's
        rows through the window, forward and backward (_layer_kernel; not a residual layer,
        whose skip adds x itself). A 16-bit layer's kernels round the split's float32 rows
        as they load them: no gather and no cast first."""
        return self._unskipped_layer_kernel(0)

    def _primes_below(self, k: int) -> bool:
        """Layer k's backward kernel writes the layer below's D' = (D' W_k^T) * f_{k-1}'(x_k)
        (layer_backward's e_act): both layers run in the layer kernels, neither under a skip
        connection (so x_k is a_{k-1}, f_{k-1}'s saved output), and f_{k-1}' reads the
        output (relu, tanh, ...; not gelu's z). Layer k-1's kernel then reads no saved
        output: a read of an (n, n_k) matrix less."""
        return (k > 0 and self._unskipped_layer_kernel(k) and self._unskipped_layer_kernel(k - 1)
                and self.activations[k - 1].saves == SAVES_OUTPUT)  # fmt: skip

    def _layer_shares(self, ws: _Workspace, n: int):
        """The (S, P) buffer into which every layer's backward kernel writes its blocks'
        gradient shares, unsummed (layer_backward's shares; the step's guard sums them in
        its norm's launch, one pass for the model where each layer's own sum was a launch),
        or None where a layer runs another way (so its gradient goes to self.grads). Of the
        gradient's dtype (float32 for the 16-bit storage too)."""
        if not all(map(self._unskipped_layer_kernel, range(self.n_layers))):
            return None
        if ws.shares is None:
            rows = getattr(self.backend, "layer_share_rows", lambda n: 1)(n)
            ws.shares = self.backend.empty((rows, self.flat_grads.size), self.dtype)
        return ws.shares

    def _layer_grads(self, k: int):
        """Layer k's dW_k and db_k as one vector (W_k's gradient, then b_k's, adjacent in
        the gradient buffer: param_layout)."""
        w_off, b_off, _, fan_out = self.layout[k]
        return self.flat_grads[w_off : b_off + fan_out]

    @property
    def fuses_products(self) -> bool:
        """Whether any product runs with a fused epilogue: every layer's weight gradient
        takes its bias gradient along, a ReLU layer its bias and ReLU, an identity layer
        its bias (cuBLASLt); or a narrow layer's forward and backward are one kernel each
        (_layer_kernel)."""
        return self._epilogues or any(self._layer_kernel(k) for k in range(self.n_layers))

    def as_input(self, x):
        """A (N, n_in) contiguous backend array of the model's dtype."""
        x = self.backend.asarray(x, dtype=self.dtype)
        if x.ndim != 2 or x.shape[1] != self.sizes[0]:
            raise ValueError(f"input must have shape (batch, {self.sizes[0]}), got {tuple(x.shape)}")
        return x

    def as_target(self, y, n: int):
        """Targets as the loss wants them: int32 labels (N,) or values (N, n_out)."""
        if self.loss.info.target == "labels":
            if isinstance(y, (np.ndarray, list, tuple)):  # host labels: check the range here, once
                host = np.asarray(y)
                if host.size and (host.min() < 0 or host.max() >= self.sizes[-1]):
                    raise ValueError(f"labels must lie in [0, {self.sizes[-1]}), got {host.min()}..{host.max()}")
            y = self.backend.asarray(y, dtype=np.int32)
            if y.shape != (n,):
                raise ValueError(f"labels must have shape ({n},), got {tuple(y.shape)}")
            return y
        y = self.backend.asarray(y, dtype=self.dtype)
        if y.ndim == 1 and self.sizes[-1] == 1:
            y = y.reshape(n, 1)
        if tuple(y.shape) != (n, self.sizes[-1]):
            raise ValueError(f"targets must have shape ({n}, {self.sizes[-1]}), got {tuple(y.shape)}")
        return y

    # ---------------------------------------------------------------- forward

    def _round_params(self) -> None:
        """bf16/fp16: params_low = the weights rounded to 16 bits (one op over the flat
        buffer), before a forward pass reads them; nothing to do otherwise."""
        if self.flat_params_low is not None:
            self.backend.cast(self.flat_params, self.flat_params_low)

    def _gemm(self, a, b, out, **kw):
        """be.gemm, TF32 inputs when the precision asks for them (only then the keyword)."""
        if self.precision.tf32:
            kw["tf32"] = True
        return self.backend.gemm(a, b, out=out, **kw)

    def _forward(self, x, ws: _Workspace, window=None):
        """x_{k+1} = f_k(x_k W_k + b_k) (+ x_k), saving what the backward pass reads.
        Mixed precision: x is rounded to 16 bits first; W_k is read from params_low
        (call _round_params before), b_k in float32 (a fused product's b_k: 16-bit too,
        from params_low, the only bias type cuBLASLt takes with a 16-bit out).
        window (perm, start): x is a whole split's, the batch its rows perm[start + i],
        read (and rounded to 16 bits) by the first layer's kernel (takes_input_window);
        ws.x[0] is then the split. A 16-bit x (the step's batch, rounded as gathered) is
        the rounded x already."""
        be = self.backend
        rounded = ws.x0 is None or window is not None or x.dtype == self.store_dtype
        ws.x[0] = x if rounded else be.cast(x, ws.x0)
        tf32 = self.precision.tf32
        for k, act in enumerate(self.activations):
            W, b, b_out = self.params_low[2 * k], self.params[2 * k + 1], self.params_low[2 * k + 1]
            # ReLU: a_k = max(x_k W_k + b_k, 0) and mask_k = [a_k > 0] in one product;
            # identity: a_k = x_k W_k + b_k in one product (each False where it did not run)
            ws.fused[k] = ws.mask[k] is not None and be.gemm_bias_relu(ws.x[k], W, b_out, ws.a[k], ws.mask[k],
                                                                        tf32=tf32)  # fmt: skip
            one_product = ws.fused[k] or (
                act.name == "identity" and self._lt(k) and be.gemm_bias(ws.x[k], W, b_out, ws.a[k], tf32=tf32)
            )
            # a narrow layer: z_k = x_k W_k + b_k (kept where f' reads it), a_k = f_k(z_k) in
            # one kernel (False where the backend has none for it; b_k float32 in bf16 too)
            one_product = one_product or (
                self._layer_kernel(k)
                and be.gemm_bias_act(ws.x[k], W, b, act, ws.a[k], ws.z[k], tf32=tf32, window=window if k == 0 else None)
            )
            if not one_product and k == 0 and window is not None:  # (takes_input_window said it would run)
                raise RuntimeError("the first layer's kernel refused a window of the split")
            if not one_product:
                z = ws.z[k] if ws.z[k] is not None else ws.a[k]
                self._gemm(ws.x[k], W, z)  # z_k = x_k W_k          (n, n_{k+1})
                be.bias_act_forward(z, b, act, out=ws.a[k])  # a_k = f_k(z_k + b_k)
            if self.is_residual[k]:
                self._add(ws.x[k], ws.a[k], ws.x[k + 1])  # x_{k+1} = x_k + a_k
        return ws.x[-1]

    def _add(self, a, b, out):
        if self.precision.low:
            return self.backend.add(a, b, out)
        return self.xp.add(a, b, out=out)

    def _to_param_dtype(self, a):
        """A new backend array of the parameter dtype holding a's values (16-bit: widened)."""
        if a.dtype == self.dtype:
            return a.copy()
        return self.backend.cast(a, self.backend.empty(a.shape, self.dtype))

    def forward(self, x):
        """The network output (N, n_out) before the loss, as a new backend array of the
        parameter dtype (float32 for the 16-bit precisions)."""
        x = self.as_input(x)
        self._round_params()
        return self._to_param_dtype(self._forward(x, self._workspace(x.shape[0])))

    # ---------------------------------------------------------------- backward

    def _backward(self, ws: _Workspace, input_grad: bool = False, on_layer=None, window=None, shares=None) -> None:
        """Reverse mode from D = ws.dx[l]: fills self.grads (overwriting), and
        ws.dx[0] = dLoss/dx_0 when input_grad. `on_layer(k)`, if given, is called as
        soon as dW_k and db_k are issued (data parallel: their all-reduce can start).
        window: _forward's (x_0 the rows perm[start + i] of the split ws.x[0]). shares
        (_layer_shares'): the gradient goes there instead, unsummed."""
        be, tf32 = self.backend, self.precision.tf32
        ws.done[:] = [False] * self.n_layers
        primed = [False] * self.n_layers  # D' came with the layer above's kernel (_primes_below)
        for k in reversed(range(self.n_layers)):
            act = IDENTITY if primed[k] else self.activations[k]
            W = self.params_low[2 * k]
            dW, db = self.grads[2 * k], self.grads[2 * k + 1]
            saved = ws.z[k] if ws.z[k] is not None else ws.a[k]
            D, Dz = ws.dx[k + 1], ws.dz[k]
            identity = primed[k] or gradient_passes_through(act, self.is_residual[k])  # D' is D: no pass over it
            # D' W_k^T, the gradient carried down, is wanted (a layer below, or the input's
            # gradient); carried: layer_backward wrote it (else a product below does)
            carry = k > 0 or input_grad
            carried = kernel = False  # (kernel: layer_backward ran: D' never left it)
            e, w = (ws.dx[k] if carry else None), (window if k == 0 else None)  # (layer_backward's E, window)
            e_act = self.activations[k - 1] if self._primes_below(k) else None  # E = the layer below's D' then
            into = None if shares is None else (shares, self.layout[k][0])  # (its dW_k, db_k columns)
            if ws.done[k]:  # D' and db_k came with the layer above's product
                self._gemm(ws.x[k], Dz, dW, trans_a=True)  # dW_k = x_k^T D'      (n_k, n_{k+1})
            elif self._lt(k):
                if not identity:
                    be.act_backward(D, saved, act, out=Dz)  # D' = D * f_k'(.)      (n, n_{k+1})
                # dW_k = x_k^T D' and db_k = sum_rows D' in one product (False: not run)
                if not be.gemm_bias_grad(ws.x[k], Dz, dW, db, trans_a=True, tf32=tf32):
                    be.bias_grad(Dz, out=db)  # db_k = sum_rows D'                  (n_{k+1},)
                    self._gemm(ws.x[k], Dz, dW, trans_a=True)  # dW_k = x_k^T D'  (n_k, n_{k+1})
            elif self._unskipped_layer_kernel(k) and be.layer_backward(
                D, saved, ws.x[k], W, act, self._layer_grads(k), e, tf32=tf32, window=w, e_act=e_act, shares=into
            ):
                # D' = D * f_k'(.), dW_k = x_k^T D', db_k = sum_rows D' and D' W_k^T in one
                # kernel (D' kept in shared memory), plus the sum of its blocks' shares;
                # with e_act, D' W_k^T * f_{k-1}'(x_k): the layer below's D'
                carried, kernel = carry, True
                if k > 0:
                    primed[k - 1] = e_act is not None
            else:
                if (k == 0 and window is not None) or shares is not None:  # (the caller was told it would run)
                    raise RuntimeError(f"layer {k}'s backward kernel refused its batch")
                if identity:
                    be.bias_grad(Dz, out=db)  # db_k = sum_rows D'                  (n_{k+1},)
                else:
                    # D' = D * f_k'(.) and db_k = sum_rows D' in one pass  (n, n_{k+1}), (n_{k+1},)
                    be.act_backward_bias_grad(D, saved, act, Dz, db)
                self._gemm(ws.x[k], Dz, dW, trans_a=True)  # dW_k = x_k^T D'      (n_k, n_{k+1})
            if on_layer is not None:
                on_layer(k)
            if k > 0 and ws.fused[k - 1] and not self.is_residual[k] and not kernel and self._drelu_bgrad(k - 1):
                # the ReLU layer below, in one product: D'_{k-1} = (D' W_k^T) * mask_{k-1}
                # and db_{k-1} = sum_rows D'_{k-1} (its act_backward and bias_grad); not
                # under a skip connection, whose D adds to D' W_k^T before the ReLU's f
                db = self.grads[2 * k - 1]
                low_db = self._db_low[: db.shape[0]] if self._db_low is not None else db
                ws.done[k - 1] = be.gemm_drelu_bias_grad(
                    Dz, W, ws.mask[k - 1], ws.dz[k - 1], low_db, trans_b=True, tf32=tf32
                )
                if ws.done[k - 1] and low_db is not db:
                    be.cast(low_db, db)  # db_{k-1} widened to float32
            if carry and not carried and not (k > 0 and ws.done[k - 1]):
                # D <- D' W_k^T, plus D itself through a residual layer's skip (dx[k] is D's buffer)
                beta = 1.0 if self.is_residual[k] else 0.0
                self._gemm(Dz, W, ws.dx[k], trans_b=True, beta=beta)  # (n, n_k)

    def forward_backward(self, x, target, input_grad: bool = False, on_layer=None, scaled: bool = True,
                         loss_out=None, params_rounded: bool = False, target_window=None,
                         x_window=None, keep_shares: bool = False):  # fmt: skip
        """Loss (a 0-d backend array: no host sync) and gradients into self.grads.

        x: (N, n_in) backend array of the model's dtype (bf16, fp16: or of the 16-bit
        storage, already rounded: the step's gather); target as from as_target.
        on_layer(k): called once layer k's gradients are issued (see _backward).
        fp16 (loss_scale set) and `scaled`: the gradients are S times the true ones, S =
        loss_scale (the trainer unscales them in the update); scaled=False: S = 1.
        loss_out: a 0-d buffer the loss is written to (a captured step allocates nothing).
        fused_mlp: the whole pass as one op where it runs (runs_fused_mlp, _fused_forward_backward).
        params_rounded: params_low already holds the parameters in 16 bits (the trainer's
        step, whose update writes it: numpy_stacked.rounded), so no cast first.
        target_window (perm, start): target is a whole split's, the batch's rows of it
        perm[start : start + N] (the training step's: the loss reads them where they lie).
        x_window (perm, start, N): x is a whole split's too, read where it lies by the first
        layer's kernels (only where takes_input_window; not with input_grad).
        keep_shares: where every layer runs in the layer kernels, the gradient is left in
        their blocks' shares (self.grad_shares, (S, P)) for the caller to sum (the step's
        guard, as forward_backward_rows' fused MLP); else in self.grads as always.
        """
        self.grad_shares = None
        # (a window's fused MLP is forward_backward_rows': this target is no batch)
        if self.fused_mlp and not input_grad and on_layer is None and target_window is None:
            loss = self._fused_forward_backward(x, target, loss_out)
            if loss is not None:
                return loss
        window = None
        if x_window is not None:
            if input_grad or not self.takes_input_window():
                raise ValueError("x_window: the first layer must run in the layer kernels, without input_grad")
            *window, n = x_window
        ws = self._workspace(x.shape[0] if window is None else n)
        if not params_rounded:
            self._round_params()
        out = self._forward(x, ws, window)
        kw = {} if target_window is None else {"window": target_window}
        if self.loss_scale is not None:
            kw["loss_scale"] = self.loss_scale if scaled else self._unit_scale()
        loss = self.backend.loss_forward_backward(out, target, self.loss, grad=ws.dx[-1], out=loss_out, **kw)
        keep = keep_shares and not input_grad and on_layer is None
        shares = self._layer_shares(ws, ws.a[0].shape[0]) if keep else None
        self._backward(ws, input_grad=input_grad, on_layer=on_layer, window=window, shares=shares)
        self.grad_shares = shares
        return loss

    def fused_mlp_fits(self, n: int) -> bool:
        """Whether the fused MLP (fused_mlp) would run for a batch of n rows: a network
        without residual layers in float32 or float64, that the backend's op takes."""
        return (not any(self.is_residual) and self.precision.name in DTYPES
                and self.backend.mlp_fits(self.sizes, self.activations, self.dtype, n))  # fmt: skip

    def runs_fused_mlp(self, n: int) -> bool:
        """Whether a training pass of n rows runs the fused MLP: the network fits it
        (fused_mlp_fits) and it was asked for (fused_mlp True), or fused_mlp is "auto" and the
        backend says it pays for this network and batch (the GPU's mlp_pays: float32, small
        batches of narrow networks; the NumPy backend has none, so "auto" is off there)."""
        if not self.fused_mlp or not self.fused_mlp_fits(n):
            return False
        if self.fused_mlp is True:
            return True
        pays = getattr(self.backend, "mlp_pays", None)
        return pays is not None and bool(pays(self.sizes, self.activations, self.dtype, n))

    def step_workspace(self, n: int):
        """The buffers a captured step of n rows uses, kept alive for its graph: the
        workspace, or None where the fused MLP runs (it has none)."""
        if self.runs_fused_mlp(n):
            return None
        return self._workspace(n)

    def _fused_forward_backward(self, x, target, loss_out, window=None):
        """The fused MLP (fused_mlp): the loss (0-d, loss_out when given), and the gradient
        in self.grads or, with a window, left in shares (self.grad_shares); None where it
        does not run (runs_fused_mlp, the one place that decides): not asked, "auto" where it
        does not pay, a residual layer, a precision other than float32 and float64 (tf32 and
        the 16-bit ones keep their GEMMs), or a network the backend's op does not take (the
        GPU kernel's widths, layers, shared memory)."""
        if not self.runs_fused_mlp(x.shape[0] if window is None else window[2]):
            return None
        out = loss_out if loss_out is not None else self.backend.zeros((), self.dtype)
        shares = self.backend.mlp_forward_backward(x, target, self.flat_params, self.flat_grads, self.sizes,
                                                   self.activations, self.loss, out, window=window)  # fmt: skip
        if shares is None:
            return None
        if window is None:
            self.backend.sum_shares(shares, self.flat_grads)
        else:
            self.grad_shares = shares
        return out

    def forward_backward_rows(self, x, target, perm, start, n: int, loss_out=None):
        """The training step's pass on rows perm[start : start + n] of a resident split (x
        its inputs, target as from as_target; perm int64 and start 0-d int64 on the
        device, read when it runs), with the fused MLP: the batch is read where it lies
        (no gather before), and the gradient is left in shares (self.grad_shares, (S, P),
        one per block of the kernel; one share may be self.grads itself) for the caller to
        sum: the step's guard does, in its norm's launch. Returns the loss (0-d), or None
        where the fused MLP does not run (runs_fused_mlp: not asked, "auto" where it does not
        pay, or a network it does not take): the caller then reads the rows another way."""
        self.grad_shares = None
        if not self.fused_mlp:
            return None
        return self._fused_forward_backward(x, target, loss_out, window=(perm, start, int(n)))

    def _unit_scale(self):
        one = self.__dict__.get("_one")
        if one is None:
            one = self._one = self.backend.zeros((), np.float32)
            one[...] = 1.0
        return one

    def use_grad_buffer(self, flat) -> None:
        """Keep the gradients in `flat[:n_params]` (a longer buffer whose tail carries
        other numbers through the same all-reduce, data parallel)."""
        if flat.ndim != 1 or flat.shape[0] < self.n_params or flat.dtype != self.dtype:
            raise ValueError(f"a gradient buffer needs >= {self.n_params} elements of {self.dtype}")
        self.flat_grads = flat[: self.n_params]
        self.grads = self._views(self.flat_grads)

    def loss_and_grads(self, x, y):
        """(loss as a Python float, gradients in params order).

        The gradients are views into the model's gradient buffer: the next call
        overwrites them, as PyTorch's .grad is overwritten after zero_grad().
        """
        x = self.as_input(x)
        loss = self.forward_backward(x, self.as_target(y, x.shape[0]), scaled=False)
        return self.backend.to_float(loss), self.grads

    def input_grad(self, x, y):
        """dLoss/dx (N, n_in) as a new backend array."""
        x = self.as_input(x)
        self.forward_backward(x, self.as_target(y, x.shape[0]), input_grad=True, scaled=False)
        return self._to_param_dtype(self._workspace(x.shape[0]).dx[0])

    # ---------------------------------------------------------------- evaluation

    def evaluate(self, x, y, labels=None, batch_size: int = 4096, outputs=None):
        """(mean loss, correct count or None) over a dataset already on the device,
        in chunks; nothing is copied to the host but the two numbers, and the outputs
        when `outputs` (a host array (N, n_out)) is given: filled from the same forward
        pass (the metrics that need whole outputs: R^2, the confusion matrix)."""
        n = x.shape[0]
        xp = self.xp
        total = xp.zeros((), dtype=np.float64)
        correct = xp.zeros((), dtype=np.int64) if labels is not None else None
        self._round_params()
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            ws = self._workspace(stop - start)
            out = self._forward(x[start:stop], ws)
            value = self.backend.loss_forward_backward(out, y[start:stop], self.loss, grad=None)
            total += value.astype(np.float64) * (stop - start)
            if outputs is not None:
                outputs[start:stop] = self.backend.to_numpy(out)  # a copy: the workspace is reused
            if labels is not None:
                correct += self.backend.accuracy_count(out, labels[start:stop], self.decision_threshold)
        loss = self.backend.to_float(total) / max(n, 1)
        return loss, (int(self.backend.to_float(correct)) if correct is not None else None)
