"""Full Jacobians of the network output, in forward and in reverse mode, over the op set.

The network is the composition x_{k+1} = L^k(x_k, theta_k), k = 0..l-1 (0-based here,
1-based in docs/backprop.md), with theta_k = (W_k, b_k) and for one input row x_k (1, n_k):

    z_k = x_k W_k + b_k                    (1, n_{k+1})
    x_{k+1} = f_k(z_k)  (+ x_k if residual)

Its local Jacobians, written for column vectors (numerator layout: row = output entry):

    J_x L^k     = diag(f_k'(z_k)) W_k^T  (+ I if residual)          (n_{k+1}, n_k)
    J_theta L^k = diag(f_k') [x_k ⊗ I | I]                          (n_{k+1}, n_k n_{k+1} + n_{k+1})

where column i n_{k+1} + j of the W block (W_k flattened row-major) holds x_{k,i} f'_j
in row j and zeros elsewhere, and the b block is diag(f').

Forward mode carries the tangent block G^k = d x_{k+1} / d(what is differentiated):

    G^k = ( J_x L^k G^{k-1} | J_theta L^k )       G^{-1} = I (wrt input) or empty (wrt params)

Reverse mode carries D = d y / d x_k, one row per output, from D = I (n_out, n_out):

    D' = D diag(f_k')          saves J_theta block = D J_theta L^k = [x_k ⊗ D' | D']
    D <- D' W_k^T (+ D)        = D J_x L^k

We store the tangent block transposed, T = G^T (m, n_k): m directions as rows, like a
batch, so forward mode is the same GEMM as the forward pass, T_{k+1} = (T_k W_k) * f'
(+ T_k). Everything runs on model.backend's ops and model.xp, so the GPU backend (same
op names) runs the same code. See docs/backprop.md and docs/jacobian.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WRT = ("params", "input")
MODES = ("forward", "reverse")


def _check(model, x, wrt: str, mode: str):
    """The input as a (1, n_in) backend array; ValueError for anything else."""
    if wrt not in WRT:
        raise ValueError(f"wrt must be one of {', '.join(WRT)}, got {wrt!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if model.precision.low:  # the tangent and adjoint blocks are built in the parameter dtype
        raise ValueError(f"jacobian: a model of dtype {model.precision.name} is not supported; use float32 or float64")
    n_in = model.sizes[0]
    x = model.backend.asarray(x, dtype=model.dtype)
    if tuple(x.shape) not in ((n_in,), (1, n_in)):
        raise ValueError(f"jacobian takes one input of shape ({n_in},) or (1, {n_in}), got {tuple(x.shape)}")
    return x.reshape(1, n_in)


def _primal(model, x):
    """The forward pass at one input x (1, n_0): [(x_k (1, n_k), f_k'(z_k) (1, n_{k+1}))].

    f' comes from act_backward with a ones seed: D' = 1 * f'(.), from the same saved
    value (z or y) the backward pass reads."""
    be = model.backend
    ws = model._workspace(1)
    model._forward(x, ws)
    ones = None
    layers = []
    for k, act in enumerate(model.activations):
        n = model.sizes[k + 1]
        if ones is None or ones.shape[1] != n:
            ones = model.xp.ones((1, n), dtype=model.dtype)
        saved = ws.z[k] if ws.z[k] is not None else ws.a[k]
        fprime = be.act_backward(ones, saved, act, out=be.empty((1, n), model.dtype))  # (1, n_{k+1})
        layers.append((ws.x[k].copy(), fprime))
    return layers


def _forward_mode(model, x, wrt: str):
    """J as (columns, n_out): the tangent block T = G^T carried from the input to the output."""
    be, xp, dt, sizes = model.backend, model.xp, model.dtype, model.sizes
    layers = _primal(model, x)
    # T_0: one row per differentiated direction; the identity for the input, none yet for params
    T = xp.eye(sizes[0], dtype=dt) if wrt == "input" else be.zeros((0, sizes[0]), dt)
    for k, (xk, fprime) in enumerate(layers):
        W, _ = model.layer_params(k)
        n_k, n = sizes[k], sizes[k + 1]
        m = T.shape[0]  # directions so far: n_0, or the parameter count of layers < k
        n_new = n_k * n + n if wrt == "params" else 0
        T_next = be.zeros((m + n_new, n), dt)  # (m + n_new, n_{k+1})
        if m:
            U = T_next[:m]  # rows of T J_x^T:  U = (T W_k) * f'  (+ T)
            be.gemm(T, W, out=U)  # (m, n_k) (n_k, n) -> (m, n)
            xp.multiply(U, fprime, out=U)
            if model.is_residual[k]:
                xp.add(U, T, out=U)
        if n_new:
            # rows of J_theta L^k transposed. W block (n_k n, n): row i n + j is x_i f'_j e_j;
            # in the flat storage that entry sits at (i n + j) n + j = i n^2 + j (n + 1),
            # so the (n_k, n^2) view with a stride of n + 1 along j reaches exactly those.
            Wblock = T_next[m : m + n_k * n].reshape(n_k, n * n)
            Wblock[:, :: n + 1] = xk.reshape(n_k, 1) * fprime  # (n_k, 1) * (1, n) = x_i f'_j
            bblock = T_next[m + n_k * n :].reshape(n * n)  # b block (n, n) = diag(f')
            bblock[:: n + 1] = fprime.reshape(n)
        T = T_next
    return T  # (n_0 or n_params, n_out)


def _reverse_mode(model, x, wrt: str):
    """J (n_out, columns): D = dy/dx_k carried from the output back to the input."""
    be, xp, dt, sizes = model.backend, model.xp, model.dtype, model.sizes
    layers = _primal(model, x)
    n_out = sizes[-1]
    J = be.zeros((n_out, model.n_params), dt) if wrt == "params" else None
    D = xp.eye(n_out, dtype=dt)  # dy/dx_l = I: one row per output  (n_out, n_out)
    for k in reversed(range(model.n_layers)):
        xk, fprime = layers[k]
        W, _ = model.layer_params(k)
        w_off, b_off, n_k, n = model.layout[k]
        Dz = be.empty((n_out, n), dt)
        xp.multiply(D, fprime, out=Dz)  # D' = D diag(f')  (n_out, n)
        if J is not None:
            # row r of D J_theta L^k: the W part is x_k^T D'_r (n_k, n), the gradient of y_r
            # in denominator layout, flattened row-major; the b part is D'_r
            J[:, w_off:b_off] = (xk.reshape(1, n_k, 1) * Dz.reshape(n_out, 1, n)).reshape(n_out, n_k * n)
            J[:, b_off : b_off + n] = Dz
        if k > 0 or wrt == "input":
            # D <- D' W_k^T (+ D through a residual skip: beta = 1 accumulates into D)
            if model.is_residual[k]:
                be.gemm(Dz, W, out=D, trans_b=True, beta=1.0)  # (n_out, n_k)
            else:
                D = be.gemm(Dz, W, out=be.empty((n_out, n_k), dt), trans_b=True)
    return J if J is not None else D  # (n_out, n_params) or (n_out, n_0)


def device_jacobian(model, x, wrt: str = "params", mode: str = "reverse"):
    """`jacobian` as a backend array (n_out, columns), left on the device: for forward
    mode a transposed view of the tangent block, no copy."""
    x = _check(model, x, wrt, mode)
    if mode == "forward":
        return _forward_mode(model, x, wrt).T
    return _reverse_mode(model, x, wrt)


def jacobian(model, x, wrt: str = "params", mode: str = "reverse") -> np.ndarray:
    """The Jacobian of the network output (before the loss) at one input x.

    x: (n_in,) or (1, n_in). wrt="params": (n_out, n_params), columns in the order of
    model.flat_params (W_1, b_1, W_2, ... each flattened row-major); wrt="input":
    (n_out, n_in). mode: "forward" (tangents, cost ~ number of columns) or "reverse"
    (adjoints, cost ~ number of outputs); both give the same matrix. Returns NumPy.
    """
    return np.ascontiguousarray(model.backend.to_numpy(device_jacobian(model, x, wrt, mode)))


# ----------------------------------------------------------------------------- cost model


@dataclass(frozen=True)
class Flops:
    """Floating-point operations of one Jacobian, the primal forward pass left out
    (both modes run the same one). gemm: 2 m k n per (m, k) (k, n) product plus m n
    for beta = 1; elementwise: one per product or sum of the recursion."""

    gemm: int
    elementwise: int

    @property
    def total(self) -> int:
        return self.gemm + self.elementwise


def jacobian_flops(sizes, is_residual, wrt: str, mode: str) -> Flops:
    """The operation count of `jacobian` for widths n_0..n_l, as the code above does it.

    Forward, m_k tangent rows entering layer k (n_0 for the input, P_<k = parameters of
    the layers before k for params):
        gemm 2 m_k n_k n_{k+1};  elementwise m_k n_{k+1} (1 + r_k)  [+ n_k n_{k+1} for the W block]
    Reverse, n_out rows throughout:
        elementwise n_out n_{k+1}  [+ n_out n_k n_{k+1} for the W block];
        gemm 2 n_out n_{k+1} n_k + r_k n_out n_k  (not at k = 0 for params)
    """
    if wrt not in WRT or mode not in MODES:
        raise ValueError(f"wrt in {WRT}, mode in {MODES}; got {wrt!r}, {mode!r}")
    params = wrt == "params"
    gemm = elem = 0
    if mode == "forward":
        m = 0 if params else sizes[0]
        for k, (n_k, n) in enumerate(zip(sizes[:-1], sizes[1:])):
            r = int(is_residual[k])
            gemm += 2 * m * n_k * n
            elem += m * n * (1 + r) + (n_k * n if params else 0)
            if params:
                m += n_k * n + n
    else:
        n_out = sizes[-1]
        for k, (n_k, n) in enumerate(zip(sizes[:-1], sizes[1:])):
            r = int(is_residual[k])
            elem += n_out * n + (n_out * n_k * n if params else 0)
            if k > 0 or not params:
                gemm += 2 * n_out * n * n_k + r * n_out * n_k
    return Flops(gemm, elem)


def jacobian_bytes(sizes, wrt: str, mode: str, itemsize: int) -> int:
    """Roughly the largest memory `device_jacobian` holds at once, in bytes: forward
    mode, the tangent blocks T_k (m_k, n_k) and T_{k+1} together; reverse mode, J
    (n_out, P) and the W block's product (n_out, n_k, n_{k+1}) (D and f' are small)."""
    params = wrt == "params"
    largest = 0
    if mode == "forward":
        m = 0 if params else sizes[0]
        for n_k, n in zip(sizes[:-1], sizes[1:]):
            m_next = m + (n_k * n + n if params else 0)
            largest = max(largest, m * n_k + m_next * n)
            m = m_next
    else:
        n_out = sizes[-1]
        n_params = sum(n_k * n + n for n_k, n in zip(sizes[:-1], sizes[1:]))
        widest = max(n_k * n for n_k, n in zip(sizes[:-1], sizes[1:]))
        largest = n_out * n_params + n_out * widest if params else n_out * max(sizes)
    return largest * itemsize
