"""M multilayer perceptrons of one shape, trained together: a leading model axis.

    stack = gpubp.MLPStack([64, 128, 10], count=16, loss="softmax_cross_entropy", seed=list(range(16)))
    opt = gpubp.StackAdamW(stack, lr=[1e-3, 3e-3, ...], weight_decay=1e-4)   # scalars or one value per model
    losses, grads = stack.loss_and_grads(x, y)      # x (N, n_in) shared or (M, N, n_in); losses (M,)
    opt.step(grads)

Model i is exactly `MLP(sizes, seed=seeds[i], init=inits[i], ...)`: the same initial
weights, and each step the same arithmetic (the backend's *_batched ops run model i's
slice with the single model's formulas and BLAS calls), so on the CPU model i of a
stack holds the bits a single run would hold. The recursion is MLP's:

    z_k = x_k W_k + b_k,  x_{k+1} = f_k(z_k) (+ x_k)        gemm_batched, bias_act_forward_batched
    D' = D * f_k'(.);  dW_k = x_k^T D';  db_k = 1^T D';  D = D' W_k^T (+ D)

Buffers: parameters and gradients are (M, P), one row per model; W_k (M, n_k, n_{k+1})
and b_k (M, n_{k+1}) are views into them.
"""

from __future__ import annotations

import numpy as np

from .activations import SAVES_INPUT, make_activation
from .backend import get_backend
from .backend.threads import blas_one_thread, num_threads, run_blocks
from .init import init_weight
from .losses import make_loss
from .model import DTYPES, MLP, _Workspace, gradient_passes_through, layer_views, param_layout

# A CPU step's block of models: at most about this many bytes of buffers. Measured (two
# threads, steps back to back, the update inside each block): fewer, larger blocks pay,
# 64 tiny models 4.6 ms in 4 MiB blocks, 3.9 ms in one block per thread; 16 mnist models
# 35.8 and 31.1 ms. Below ~1 MiB the per-call cost of each op (the loss most) dominates.
BLOCK_BYTES = 1 << 26


def initial_params(sizes, seed: int, init: str) -> np.ndarray:
    """The float64 initial flat parameters MLP(sizes, seed=seed, init=init) starts from."""
    rng = np.random.default_rng(int(seed))
    out = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        out += [init_weight(rng, fan_in, fan_out, init).ravel(), np.zeros(fan_out)]
    return np.concatenate(out)


def _per_model(value, count: int, name: str) -> list:
    """A scalar repeated, or a sequence of exactly `count` values."""
    if isinstance(value, (list, tuple, np.ndarray)):
        values = list(value)
        if len(values) != count:
            raise ValueError(f"{name}: expected {count} values (one per model), got {len(values)}")
        return values
    return [value] * count


class MLPStack:
    """`count` MLPs of the same sizes in stacked buffers; see the module docstring.

    seed: one int (model i gets seed + i) or one per model; init: a name or one per
    model. Everything else is shared by the models, as MLP takes it."""

    def __init__(self, sizes, count: int, activation="relu", output_activation="identity", loss="mse", *,
                 dtype="float32", device="cpu", seed=0, init="he_normal", leaky_relu_slope=0.01,
                 label_smoothing=0.0, huber_delta=1.0, residual=False, backend=None):  # fmt: skip
        count = int(count)
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"sizes must list at least two positive widths, got {sizes}")
        if str(dtype) not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.count = count
        self.backend = backend if backend is not None else get_backend(device)
        self.xp = self.backend.xp
        self.dtype = np.dtype(str(dtype))
        self.sizes = sizes
        seeds = list(seed) if isinstance(seed, (list, tuple, np.ndarray)) else [int(seed) + i for i in range(count)]
        self.seeds = [int(s) for s in _per_model(seeds, count, "seed")]
        self.inits = [str(i) for i in _per_model(init, count, "init")]
        self.residual = bool(residual)
        self.leaky_relu_slope = float(leaky_relu_slope)
        hidden = make_activation(activation, leaky_relu_slope)
        self.activations = [hidden] * (len(sizes) - 2) + [make_activation(output_activation, leaky_relu_slope)]
        self.hidden_activation = hidden
        self.loss = make_loss(loss, label_smoothing, huber_delta)
        self.is_residual = [
            self.residual and k < self.n_layers - 1 and sizes[k] == sizes[k + 1] for k in range(self.n_layers)
        ]
        self.decision_threshold = 0.0 if self.loss.name == "binary_cross_entropy" else 0.5
        self.layout, self.n_params = param_layout(sizes)
        host = np.stack([initial_params(sizes, s, i) for s, i in zip(self.seeds, self.inits)])
        self.flat_params = self.backend.asarray(host.astype(self.dtype))  # (M, P)
        self.flat_grads = self.backend.zeros((count, self.n_params), self.dtype)
        self.params = self._views(self.flat_params)
        self.grads = self._views(self.flat_grads)
        self._workspaces: dict = {}

    @property
    def n_layers(self) -> int:
        return len(self.sizes) - 1

    def _views(self, flat):
        """[W1, b1, ...]: W_k (M, n_k, n_{k+1}), b_k (M, n_{k+1}), views of the (M, P) buffer."""
        return layer_views(flat, self.layout)

    def layer_params(self, k: int):
        return self.params[2 * k], self.params[2 * k + 1]

    def member(self, i: int) -> MLP:
        """Model i as a single MLP (its parameters copied)."""
        model = MLP(self.sizes, self.hidden_activation.name, self.activations[-1].name, self.loss.name,
                    dtype=self.dtype.name, seed=self.seeds[i], init=self.inits[i],
                    leaky_relu_slope=self.leaky_relu_slope, label_smoothing=self.loss.label_smoothing,
                    huber_delta=self.loss.huber_delta, residual=self.residual, backend=self.backend)  # fmt: skip
        model.flat_params[...] = self.flat_params[i]
        return model

    # ---------------------------------------------------------------- buffers

    def _workspace(self, n: int) -> _Workspace:
        """MLP's workspace with a leading model axis: every buffer (M, n, width)."""
        ws = self._workspaces.get(n)
        if ws is not None:
            return ws
        if len(self._workspaces) >= 4:
            self._workspaces.pop(next(iter(self._workspaces)))
        be, dt, sizes, m = self.backend, self.dtype, self.sizes, self.count
        z, a, x, dx, dz = [], [], [None], [], []
        for k, act in enumerate(self.activations):
            width = sizes[k + 1]
            z.append(be.empty((m, n, width), dt) if act.saves == SAVES_INPUT else None)
            a.append(be.empty((m, n, width), dt))
            x.append(be.empty((m, n, width), dt) if self.is_residual[k] else a[k])
        for k in range(self.n_layers + 1):
            dx.append(dx[k - 1] if k > 0 and self.is_residual[k - 1] else be.empty((m, n, sizes[k]), dt))
        for k in range(self.n_layers):
            dz.append(be.empty((m, n, sizes[k + 1]), dt) if self.is_residual[k] else dx[k + 1])
        ws = self._workspaces[n] = _Workspace(z, a, x, dx, dz)
        return ws

    def as_input(self, x):
        """(N, n_in) shared by every model, or (M, N, n_in): a backend array of the dtype."""
        x = self.backend.asarray(x, dtype=self.dtype)
        if x.shape[-1] != self.sizes[0] or x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[0] != self.count):
            raise ValueError(
                f"input must have shape (batch, {self.sizes[0]}) or ({self.count}, batch, {self.sizes[0]}), "
                f"got {tuple(x.shape)}"
            )
        return x

    def as_target(self, y, n: int):
        """Labels (N,) / (M, N) as int32, or values (N, n_out) / (M, N, n_out)."""
        if self.loss.info.target == "labels":
            y = self.backend.asarray(y, dtype=np.int32)
            if y.shape not in ((n,), (self.count, n)):
                raise ValueError(f"labels must have shape ({n},) or ({self.count}, {n}), got {tuple(y.shape)}")
            return y
        y = self.backend.asarray(y, dtype=self.dtype)
        if y.ndim in (1, 2) and self.sizes[-1] == 1 and y.shape[-1] != 1:
            y = y.reshape(*y.shape, 1)
        if tuple(y.shape[-2:]) != (n, self.sizes[-1]) or y.ndim not in (2, 3):
            raise ValueError(f"targets must have shape ({n}, {self.sizes[-1]}) (or per model), got {tuple(y.shape)}")
        return y

    # ---------------------------------------------------------------- passes

    def _forward(self, x, ws: _Workspace, sl=slice(None)):
        """Models sl's outputs (m, n, n_out); x is every model's input (ws.x[0] is set to it)."""
        be = self.backend
        ws.x[0] = x
        xk = x[sl] if x.ndim == 3 else x  # (m, n, n_in) or shared (n, n_in)
        for k, act in enumerate(self.activations):
            W, b = self.params[2 * k][sl], self.params[2 * k + 1][sl]
            z = (ws.z[k] if ws.z[k] is not None else ws.a[k])[sl]
            a = ws.a[k][sl]
            be.gemm_batched(xk, W, out=z)  # z_k = x_k W_k           (m, n, n_{k+1})
            be.bias_act_forward_batched(z, b, act, out=a)  # a_k = f_k(z_k + b_k)
            if self.is_residual[k]:
                self.xp.add(xk, a, out=ws.x[k + 1][sl])  # x_{k+1} = x_k + a_k
            xk = ws.x[k + 1][sl]
        return xk

    def forward(self, x):
        """Every model's output (M, N, n_out)."""
        x = self.as_input(x)
        return self._forward(x, self._workspace(x.shape[-2])).copy()

    def _backward(self, ws: _Workspace, sl=slice(None)) -> None:
        """Reverse mode for models sl, from D = ws.dx[l][sl]: their rows of self.grads."""
        be = self.backend
        x0 = ws.x[0]
        for k in reversed(range(self.n_layers)):
            act = self.activations[k]
            W = self.params[2 * k][sl]
            dW, db = self.grads[2 * k][sl], self.grads[2 * k + 1][sl]
            saved = (ws.z[k] if ws.z[k] is not None else ws.a[k])[sl]
            D, Dz = ws.dx[k + 1][sl], ws.dz[k][sl]
            xk = x0 if k == 0 and x0.ndim == 2 else ws.x[k][sl]  # a shared batch: (n, n_in)
            if not gradient_passes_through(act, self.is_residual[k]):  # (else D' is D, in its buffer)
                be.act_backward(D, saved, act, out=Dz)  # D' = D * f_k'(.)
            be.gemm_batched(xk, Dz, out=dW, trans_a=True)  # dW_k = x_k^T D'
            be.bias_grad_batched(Dz, out=db)  # db_k = 1^T D'
            if k > 0:
                be.gemm_batched(Dz, W, out=ws.dx[k][sl], trans_b=True, beta=1.0 if self.is_residual[k] else 0.0)

    def _forward_backward_block(self, x, target, ws: _Workspace, sl, loss_out=None, then=None):
        """Loss (m,) of models sl (into loss_out (m,) when given), their gradients into
        self.grads; then then(sl), when given."""
        per_model = target.ndim == (2 if self.loss.info.target == "labels" else 3)
        out = self._forward(x, ws, sl)
        t = target[sl] if per_model else target
        loss = self.backend.loss_forward_backward_batched(out, t, self.loss, grad=ws.dx[-1][sl], out=loss_out)
        self._backward(ws, sl)
        if then is not None:
            then(sl)
        return loss

    def blocks(self, n: int) -> list:
        """The blocks of models (slices) a CPU step runs one after another, or side by side
        on threads (gpubp.backend.threads): each block's buffers at most about BLOCK_BYTES,
        and at least one block per thread (in practice one block per thread: each op's
        call costs the same per block, the GIL is handed over per call). One block on the GPU."""
        if self.backend.name != "cpu":
            return [slice(None)]
        ws = self._workspace(n)
        seen, per_model = set(), 2 * self.n_params  # parameters and gradients
        for buf in [*ws.z, *ws.a, *ws.x[1:], *ws.dx, *ws.dz]:
            if buf is not None and id(buf) not in seen:
                seen.add(id(buf))
                per_model += buf[0].size
        rows = max(1, BLOCK_BYTES // (per_model * self.dtype.itemsize))
        rows = min(rows, -(-self.count // num_threads()))  # at least one block per thread
        return [slice(lo, min(lo + rows, self.count)) for lo in range(0, self.count, rows)]

    def forward_backward(self, x, target, loss_out=None, then=None):
        """Each model's loss (M,) as a backend array (loss_out (M,) when given: nothing is
        allocated, so a captured sweep step can call it), gradients into self.grads.

        then(sl), when given, runs after the backward pass of each block of models sl, in
        that block's task: the rest of a training step for those models alone (their
        guard and update; StackOptimizer.update(rows=sl)), while their gradients, moments
        and parameters are still in the core's cache, and on the block's thread instead
        of in a second pass over all M models. The models are independent, so it gives
        the bits of a whole-stack update after the whole pass. On the GPU: one block."""
        ws = self._workspace(x.shape[-2])
        ws.x[0] = x
        blocks = self.blocks(x.shape[-2])
        if self.backend.name != "cpu":  # one block
            return self._forward_backward_block(x, target, ws, blocks[0], loss_out, then)

        def block(sl):
            return self._forward_backward_block(x, target, ws, sl, None if loss_out is None else loss_out[sl], then)

        runner = getattr(self.backend, "run_blocks", None)  # the RecordingBackend records each block's calls
        losses = run_cpu_blocks(block, blocks) if runner is None else runner(block, blocks, run_cpu_blocks)
        if loss_out is not None:
            return loss_out
        return losses[0] if len(losses) == 1 else self.xp.concatenate(losses)

    def loss_and_grads(self, x, y):
        """(losses as a host array (M,), gradients in params order: views, overwritten by the next call)."""
        x = self.as_input(x)
        loss = self.forward_backward(x, self.as_target(y, x.shape[-2]))
        return self.backend.to_numpy(loss).astype(np.float64), self.grads

    def evaluate(self, x, y, labels=None, batch_size: int = 4096):
        """(mean loss per model (M,), correct counts (M,) or None), in chunks as MLP.evaluate."""
        n = x.shape[-2]
        total = np.zeros(self.count)
        correct = np.zeros(self.count, dtype=np.int64) if labels is not None else None
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            out = self._forward(x[..., start:stop, :], self._workspace(stop - start))
            yy = y[..., start:stop] if y.ndim == x.ndim - 1 else y[..., start:stop, :]
            value = self.backend.to_numpy(self.backend.loss_forward_backward_batched(out, yy, self.loss, grad=None))
            total += value.astype(np.float64) * (stop - start)
            if labels is not None:
                correct += self.backend.to_numpy(
                    self.backend.accuracy_count_batched(out, labels[..., start:stop], self.decision_threshold)
                )
        return total / max(n, 1), correct


def run_cpu_blocks(fn, blocks: list) -> list:
    """[fn(sl) for sl in blocks] as a CPU step runs them: one block inline, several on the
    thread pool (gpubp.backend.threads), OpenBLAS on one thread either way."""
    if len(blocks) == 1:
        with blas_one_thread():
            return [fn(blocks[0])]
    return run_blocks(fn, blocks)


# --------------------------------------------------------------------------- optimizers


class StackOptimizer:
    """torch.optim's rules for every model of a stack, one fused update over (M, P).

    Hyperparameters are scalars (shared) or one value per model; `lr` is a host float64
    array (M,) that a schedule may rewrite before each step. Constant per-model values
    are (M, 1) arrays of the parameters' dtype (device vectors on the GPU).

    What changes from one update to the next lives on the device too, and `update`
    reads only that: `vectors` (n_vectors, M, 1), this update's per-model numbers
    (`step_table`: SGD's learning rate; Adam's 1 - lr wd, lr / (1 - b1^t) and
    sqrt(1 - b2^t)), and `first_step` (0-d bool, SGD's momentum start). `step` fills
    them from the host each update; the trainer's step (gpubp/step.py) fills them on the
    device from precomputed tables, so a captured CUDA graph replays a new step each time
    (fp16: from per-step `rate_table` and per-update `count_table` and a device count of the
    updates taken, backend.update_vectors)."""

    state_names: tuple[str, ...] = ()
    vector_names: tuple[str, ...] = ("lr",)
    bias_corrected = False  # Adam: vectors from rate_table and count_table (backend.update_vectors)
    reads_first_step = True  # SGD's momentum start; Adam's update never reads first_step

    def __init__(self, stack: MLPStack, lr):
        self.stack = stack
        self.backend = stack.backend
        self.lr = np.array(_per_model(lr, stack.count, "lr"), dtype=np.float64)
        if not np.all(self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr.tolist()}")
        self.steps = 0
        shape = (stack.count, stack.n_params)
        for name in self.state_names:
            setattr(self, name, self.backend.zeros(shape, stack.dtype))
        rows = self.backend.optimizer_scratch_rows
        self._scratch = self.backend.empty((rows, *shape), stack.dtype) if rows else None
        self._ones = self._vec(np.ones(stack.count))
        self.vectors = self.backend.zeros((len(self.vector_names), stack.count, 1), stack.dtype)
        self.first_step = self.backend.zeros((), np.bool_)

    def _scratch_rows(self, rows):
        """The update's working rows for models `rows` (None on backends that need none)."""
        return None if self._scratch is None else self._scratch[:, rows]

    def _vec(self, host) -> object:
        """(M, 1) backend array of the stack's dtype from host float64 values."""
        return self.backend.asarray(np.asarray(host, dtype=np.float64).reshape(-1, 1), dtype=self.stack.dtype)

    def _hyper(self, value, name: str) -> np.ndarray:
        return np.array([float(v) for v in _per_model(value, self.stack.count, name)])

    # The tables below are built a chunk of steps at a time (gpubp/step.py: 1024 rows per
    # upload) with the arithmetic of an eager step's Python floats (numpy_ops: the same
    # bits): NumPy's float64 +, -, *, / and sqrt round as Python's do (IEEE), so those run
    # on whole tables; powers stay Python's (libm's pow; NumPy's own may differ in the last bit).

    def _lr_table(self, lrs) -> np.ndarray:
        """(k, M) float64 of k rows of the models' learning rates."""
        return np.array(lrs, dtype=np.float64).reshape(len(lrs), self.stack.count)

    def step_table(self, t: int, lrs) -> np.ndarray:
        """(k, n_vectors, M) float64: what updates t, t + 1, .., t + k - 1 (1-based) read,
        lrs k rows of the models' learning rates (M,), the schedule's by step."""
        return self._lr_table(lrs)[:, None, :]

    def rate_table(self, lrs) -> np.ndarray:
        """(k, 2, M) float64, what the steps' vectors take from their learning rates lrs (k
        rows of (M,), the schedule's, by step): lr and 1 - lr wd."""
        lr = self._lr_table(lrs)
        return np.stack([lr, 1.0 - lr * getattr(self, "weight_decay", np.zeros(self.stack.count))], axis=1)

    def count_table(self, t: int, k: int) -> np.ndarray:
        """(k, 2, M) float64, what updates t .. t + k - 1 (1-based) take from their number:
        Adam's 1 - b1^t and sqrt(1 - b2^t); ones for SGD (its vectors do not depend on t)."""
        return np.ones((k, 2, self.stack.count))

    def step(self, grads=None, grad_scale=None, skip=None) -> None:
        """Update every model (grads: the stack's own gradient views, or None); grad_scale
        (M,) per model (clipping) or None; skip (M,) bool: frozen models change nothing."""
        if grads is not None and grads is not self.stack.grads:
            for dst, src in zip(self.stack.grads, grads):
                if src is not dst:
                    dst[...] = self.backend.asarray(src, dtype=self.stack.dtype)
        self.begin_step()
        self.update(grad_scale, skip)

    def begin_step(self) -> None:
        """Count the update about to be taken and write what it reads (`vectors`,
        `first_step`) from the host; `update` then takes it, for all models at once or
        block by block (MLPStack.forward_backward's `then`)."""
        self.steps += 1
        host = self.step_table(self.steps, [self.lr])[0, ..., None]  # (n_vectors, M, 1): one host-to-device copy
        self.vectors[...] = self.backend.asarray(host, dtype=self.stack.dtype)
        self.first_step[...] = self.steps == 1

    def update(self, grad_scale=None, skip=None, rows=slice(None), low=None) -> None:
        """The update of models `rows` (a slice; default all) from the device-side `vectors`
        and `first_step` alone: nothing here changes between steps, so it can be captured
        once and replayed. grad_scale: those models' (m,) (or 0-d for one model) or None;
        skip: their (m,) / 0-d bool or None. Each model's rows are updated by the same
        arithmetic whatever the slice, so updating block by block gives the same bits.
        low: None, or the (M, P) 16-bit copy of all models' parameters, whose rows `rows`
        the update leaves as their parameters rounded (numpy_stacked.rounded)."""
        dtype = self.stack.dtype
        scale = self._ones[rows] if grad_scale is None else grad_scale.reshape(-1, 1).astype(dtype, copy=False)
        skip = None if skip is None else skip.reshape(-1)
        low = None if low is None else low[rows]
        self._update(self.stack.flat_params[rows], self.stack.flat_grads[rows], scale, skip, rows, low)

    def state_dict(self, i: int | None = None) -> dict:
        """State of every model ((M, P) arrays), or of model i as a single run stores it ((P,))."""
        state = {"steps": self.steps}
        for name in self.state_names:
            arr = self.backend.to_numpy(getattr(self, name))
            state[name] = (arr if i is None else arr[i]).copy()
        return state

    def load_state_dict(self, state: dict, i: int | None = None) -> None:
        self.steps = int(state["steps"])
        for name in self.state_names:
            target = getattr(self, name)
            arr = np.asarray(state[name])
            expected = target.shape if i is None else target.shape[1:]
            if arr.shape != tuple(expected):
                raise ValueError(f"optimizer state {name!r} has shape {arr.shape}, expected {tuple(expected)}")
            if i is None:
                target[...] = self.backend.asarray(arr, dtype=self.stack.dtype)
            else:
                target[i] = self.backend.asarray(arr, dtype=self.stack.dtype)


class StackSGD(StackOptimizer):
    """torch.optim.SGD per model; momentum on for all models or for none (nesterov shared)."""

    state_names = ("momentum_buffer",)

    def __init__(self, stack, lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
        super().__init__(stack, lr)
        self.momentum = self._hyper(momentum, "momentum")
        self.dampening = self._hyper(dampening, "dampening")
        self.weight_decay = self._hyper(weight_decay, "weight_decay")
        on = self.momentum > 0
        if on.any() and not on.all():
            raise ValueError("momentum must be > 0 for every model of a stack or for none")
        if np.any(self.weight_decay < 0) or np.any((self.dampening < 0) | (self.dampening > 1)):
            raise ValueError("weight_decay must be >= 0, dampening in [0, 1]")
        self.nesterov = bool(nesterov)
        if self.nesterov and (not on.all() or np.any(self.dampening != 0)):
            raise ValueError("nesterov momentum requires momentum > 0 and dampening = 0")
        self._momentum_v, self._one_minus_damp = self._vec(self.momentum), self._vec(1.0 - self.dampening)
        self._wd = self._vec(self.weight_decay)
        self._momentum_on, self._decay_on = bool(on.all()), bool(np.any(self.weight_decay))

    def _update(self, p, g, scale, skip, rows, low):
        self.backend.sgd_step_batched(
            p, g, self.momentum_buffer[rows], self._scratch_rows(rows), lr=self.vectors[0][rows],
            momentum=self._momentum_v[rows], one_minus_dampening=self._one_minus_damp[rows], nesterov=self.nesterov,
            weight_decay=self._wd[rows], first_step=self.first_step, grad_scale=scale, skip=skip,
            momentum_on=self._momentum_on, decay_on=self._decay_on, low=low,
        )  # fmt: skip


class StackAdam(StackOptimizer):
    """torch.optim.Adam per model (L2 weight decay); StackAdamW decouples it."""

    state_names = ("exp_avg", "exp_avg_sq")
    vector_names = ("lr_decay", "step_size", "bias2_sqrt")
    decoupled = False
    bias_corrected = True
    reads_first_step = False

    def __init__(self, stack, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(stack, lr)
        pairs = betas if isinstance(betas, list) and betas and isinstance(betas[0], (list, tuple)) else None
        pairs = pairs if pairs is not None else [tuple(betas)] * stack.count
        if len(pairs) != stack.count:
            raise ValueError(f"betas: expected {stack.count} pairs (one per model), got {len(pairs)}")
        self.beta1 = np.array([float(b[0]) for b in pairs])
        self.beta2 = np.array([float(b[1]) for b in pairs])
        self.eps = self._hyper(eps, "eps")
        self.weight_decay = self._hyper(weight_decay, "weight_decay")
        if np.any((self.beta1 < 0) | (self.beta1 >= 1) | (self.beta2 < 0) | (self.beta2 >= 1)):
            raise ValueError("betas must be in [0, 1)")
        if np.any(self.eps <= 0) or np.any(self.weight_decay < 0):
            raise ValueError("eps must be > 0 and weight_decay >= 0")
        self._b1c, self._b2 = self._vec(1.0 - self.beta1), self._vec(self.beta2)
        self._b2c, self._eps, self._wd = self._vec(1.0 - self.beta2), self._vec(self.eps), self._vec(self.weight_decay)
        self._decay_on = bool(np.any(self.weight_decay))

    def step_table(self, t: int, lrs) -> np.ndarray:
        """Rows lr_decay = 1 - lr wd, step_size = lr / (1 - b1^t), bias2_sqrt = sqrt(1 - b2^t):
        per update and model, the Python-float arithmetic of numpy_ops.adam_step (the same
        bits: float64 division is IEEE's, in NumPy as in Python). numpy_ops.update_vectors
        forms the same rows on the device from rate_table (by step) and count_table (by update)."""
        rates, counts = self.rate_table(lrs), self.count_table(t, len(lrs))
        return np.stack([rates[:, 1], rates[:, 0] / counts[:, 0], counts[:, 1]], axis=1)

    def count_table(self, t: int, k: int) -> np.ndarray:
        """(k, 2, M) float64: 1 - b1^u and sqrt(1 - b2^u) for updates u = t .. t + k - 1."""
        betas = self.beta1.tolist() + self.beta2.tolist()  # (2 M,)
        distinct = {b: i for i, b in enumerate(dict.fromkeys(betas))}  # a sweep's models share their betas
        powers = np.array([[b**u for u in range(t, t + k)] for b in distinct])  # (distinct betas, k)
        counts = 1.0 - powers[[distinct[b] for b in betas]].reshape(2, -1, k).transpose(2, 0, 1)
        counts[:, 1] = np.sqrt(counts[:, 1])
        return counts

    def _update(self, p, g, scale, skip, rows, low):
        vec = self.vectors
        self.backend.adam_step_batched(
            p, g, self.exp_avg[rows], self.exp_avg_sq[rows], self._scratch_rows(rows), lr_decay=vec[0][rows],
            one_minus_beta1=self._b1c[rows], beta2=self._b2[rows], one_minus_beta2=self._b2c[rows], eps=self._eps[rows],
            weight_decay=self._wd[rows], step_size=vec[1][rows], bias2_sqrt=vec[2][rows], decoupled=self.decoupled,
            grad_scale=scale, skip=skip, decay_on=self._decay_on, low=low,
        )  # fmt: skip


class StackAdamW(StackAdam):
    """torch.optim.AdamW per model: p <- p (1 - lr wd) before the Adam step."""

    decoupled = True

    def __init__(self, stack, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(stack, lr, betas, eps, weight_decay)


STACK_OPTIMIZER_CLASSES = {"sgd": StackSGD, "adam": StackAdam, "adamw": StackAdamW}


def build_optimizer(classes: dict, target, name: str, lr, momentum=0.0, dampening=0.0, nesterov=False,
                    betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):  # fmt: skip
    """classes[name] over `target` (a stack, or one model for optim.py's classes)."""
    cls = classes.get(name)
    if cls is None:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(classes)}")
    if name == "sgd":
        return cls(target, lr, momentum, dampening, nesterov, weight_decay)
    return cls(target, lr, betas, eps, weight_decay)


def make_stack_optimizer(stack, name: str, lr, *hyper, **named):
    """The optimizer `name` (sgd, adam, adamw) for every model of `stack`; the hyperparameters as build_optimizer."""
    return build_optimizer(STACK_OPTIMIZER_CLASSES, stack, name, lr, *hyper, **named)


def clip_scale_batched(backend, flat_grads, max_norm):
    """(norms (M,), scales (M,)) as optim.clip_scale per model: s = min(1, c / (norm + 1e-6));
    max_norm (M,) backend array of the dtype; where it is 0 (no clipping) s = 1."""
    xp = backend.xp
    norm = xp.sqrt(backend.sum_squares_batched(flat_grads))
    scale = xp.minimum(1.0, max_norm / (norm + 1e-6)).astype(flat_grads.dtype)
    return norm, xp.where(max_norm > 0, scale, xp.ones_like(scale))
