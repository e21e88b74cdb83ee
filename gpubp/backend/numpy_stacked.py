"""The stacked op set: numpy_ops over a leading model axis M (gpubp.stack.MLPStack).

Model i of a stack computes exactly what a single model computes with numpy_ops: the
same BLAS calls per slice (np.matmul over a leading axis calls GEMM / GEMV once per
model with that model's 2-D operands), the same elementwise formulas, reductions over
the same contiguous rows. Per-model hyperparameters are (M, 1) arrays of the
parameters' dtype that broadcast over a model's row of the flat buffers; each holds
the value a single run passes as a Python float, rounded to the dtype as NumPy
rounds that float (so the products are the same bits).

Shapes: x, activations (M, N, n); a batch shared by every model may be (N, n);
W (M, n_in, n_out); b (M, n_out); flat buffers (M, P).
"""

from __future__ import annotations

import inspect

import numpy as np

from ..activations import Activation
from ..losses import Loss
from . import cpu_kernels
from .numpy_ops import (
    LOSS_BLOCK,
    _ones,
    act_forward,
    cast,
    elementwise_loss,
    loss_divisor,
    matmul_into,
    momentum_direction,
)
from .threads import blas_one_thread, num_threads, run_blocks


def _t(a):
    return a.swapaxes(-1, -2)


def gemm_batched(a, b, out, trans_a=False, trans_b=False, beta=0.0):
    """out[i] = op(a[i]) @ op(b[i]) + beta out[i] for every model i.

    a: (M, m, k) or a shared (m, k) (transposed: (M, k, m) / (k, m)); b: (M, k, n)
    (transposed (M, n, k)); out: (M, m, n). Transposes are views."""
    return matmul_into(_t(a) if trans_a else a, _t(b) if trans_b else b, out, beta)


def bias_act_forward_batched(z, b, act: Activation, out):
    """z[i] += b[i] (over rows), out = f(z). z, out: (M, N, n); b: (M, n)."""
    np.add(z, b[:, None, :], out=z)
    return act_forward(z, act, out)


def bias_grad_batched(d, out):
    """out[i] = column sums of d[i] (GEMV with ones, as numpy_ops.bias_grad). d: (M, N, n); out: (M, n)."""
    np.matmul(_ones(d.shape[1], d.dtype), d, out=out)
    return out


def loss_forward_backward_batched(x, target, loss: Loss, grad=None, out=None):
    """Each model's mean loss (M,) and grad[i] = dL_i/dx[i], as numpy_ops.loss_forward_backward
    per model (the same row blocks, their sums added in the same order).

    x: (M, N, C); target: labels (M, N) or shared (N,), values (M, N, C) or shared (N, C);
    grad: (M, N, C) or None; out: (M,) of x's dtype (a captured step's fixed buffer) or None."""
    n_models, n, c = x.shape
    divisor = loss_divisor(loss, n, c)
    rows = max(1, LOSS_BLOCK // c)
    if n <= rows:
        total = loss_sum_batched(x, target, loss, grad, divisor)
    else:
        sums = [
            loss_sum_batched(
                x[:, r : r + rows], target[..., r : r + rows] if target.ndim == x.ndim - 1 else _rows(target, r, rows),
                loss, None if grad is None else grad[:, r : r + rows], divisor,
            )
            for r in range(0, n, rows)
        ]  # fmt: skip
        # (M, blocks), each model's block sums contiguous: the same pairwise sum as np.sum(list)
        total = np.ascontiguousarray(np.stack(sums, axis=1)).sum(axis=1, dtype=x.dtype)
    value = (total / divisor).astype(x.dtype, copy=False)
    if out is None:
        return value
    out[...] = value
    return out


def _rows(target, r, rows):
    """Rows r:r+rows of value targets, (M, N, C) or shared (N, C)."""
    return target[:, r : r + rows] if target.ndim == 3 else target[r : r + rows]


def loss_sum_batched(x, target, loss: Loss, grad, divisor: int):
    """Per model the sum of its rows' losses (M,), and grad = d(sum / divisor)/dx: the
    formulas of numpy_ops, each model's terms summed as numpy_ops sums one model's."""
    n_models = x.shape[0]
    if loss.name == "softmax_cross_entropy":
        total = cross_entropy_rows_batched(x, target, loss.label_smoothing, grad, 1.0 / divisor).sum(axis=-1)
    else:
        total = elementwise_loss(x, target, loss, grad, 1.0 / divisor).reshape(n_models, -1).sum(axis=-1)
    return np.asarray(total, dtype=x.dtype)


def row_max(x):
    """max over the last axis, keepdims. For a few classes a maximum per column: max is
    exact, so the same values as x.max(axis=-1), ~10x faster than NumPy's reduction over
    a short last axis (which pays per row)."""
    c = x.shape[-1]
    if c > 32:
        return x.max(axis=-1, keepdims=True)
    out = x[..., :1].copy()
    for k in range(1, c):
        np.maximum(out, x[..., k : k + 1], out=out)
    return out


def cross_entropy_rows_batched(x, labels, eps: float, grad, scale: float):
    """numpy_ops.cross_entropy_rows over (M, N, C) with labels (M, N) or shared (N,): the
    same formulas in the same order (the same bits per model), with the row maximum and
    the label lookups done faster (row_max; one flat index instead of take/put_along_axis).

        logp = x - logsumexp(x); q = (1 - e) onehot(y) + e / C
        L_row = -sum_c q_c logp_c;   dL_row/dx = softmax(x) - q
    """
    c = x.shape[-1]
    shifted = x - row_max(x)
    lse = np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    logp = shifted - lse
    rows = np.arange(logp.size // c)
    label = np.broadcast_to(labels, x.shape[:-1]).reshape(-1)
    nll = -logp.reshape(-1, c)[rows, label].reshape(x.shape[:-1])
    per_row = (1.0 - eps) * nll - (eps / c) * logp.sum(axis=-1) if eps else nll
    if grad is not None:
        np.exp(logp, out=grad)
        grad -= eps / c
        if grad.flags.c_contiguous:
            flat = grad.reshape(-1, c)  # a view of grad
            flat[rows, label] -= 1.0 - eps
        else:  # a block of rows of every model (loss_forward_backward_batched): as numpy_ops does it
            idx = label.reshape(*x.shape[:-1], 1).astype(np.intp)
            np.put_along_axis(grad, idx, np.take_along_axis(grad, idx, axis=-1) - (1.0 - eps), axis=-1)
        grad *= scale
    return per_row


def accuracy_count_batched(x, labels, threshold=0.0):
    """Rows classified right per model, (M,) int64. x: (M, N, C); labels (M, N) or (N,)."""
    pred = x[..., 0] > threshold if x.shape[-1] == 1 else x.argmax(axis=-1)
    return np.count_nonzero(pred == labels, axis=-1).astype(np.int64)


def step_guard_batched(loss, grad_sq, step, max_norm, frozen, first_bad, skip, norm, scale):
    """numpy_ops.step_guard for every model, all (M,) arrays, nothing read back:

        first_bad_i = step          if first_bad_i == -1 and (loss_i or grad_sq_i is not finite)
        skip_i      = first_bad_i >= 0 or frozen_i   (frozen: stopped early, or diverged before)
        norm_i      = sqrt(grad_sq_i)
        scale_i     = min(1, max_norm_i / (norm_i + 1e-6)) if max_norm_i > 0 else 1

    loss, grad_sq, max_norm, norm, scale: dtype T; first_bad int64; frozen, skip bool."""
    t = norm.dtype.type
    bad = ~(np.isfinite(loss) & np.isfinite(grad_sq))
    first_bad[...] = np.where((first_bad == -1) & bad, step, first_bad)
    np.logical_or(first_bad >= 0, frozen, out=skip)
    np.sqrt(grad_sq.astype(norm.dtype, copy=False), out=norm)
    with np.errstate(all="ignore"):
        s = max_norm / (norm + t(1e-6))
        clipped = np.where(s < t(1), s, t(1))  # min(1, s); a NaN s gives 1, as Python's min and the kernel
    scale[...] = np.where(max_norm > 0, clipped, t(1))


def step_guard_norm_batched(loss, g, grad_sq, step, max_norm, frozen, first_bad, skip, norm, scale):
    """grad_sq = sum_squares_batched(g) (M,), then step_guard_batched: every stacked model's
    verdict from its gradients g (M, P), one launch on the GPU (a block per model)."""
    sum_squares_batched(g, out=grad_sq)
    step_guard_batched(loss, grad_sq, step, max_norm, frozen, first_bad, skip, norm, scale)


def sum_squares_batched(g, out=None):
    """sum_j g_ij^2 per model (M,), each the same DOT as numpy_ops.sum_squares (one OpenBLAS
    thread); into out (M,) when given."""
    with blas_one_thread():
        value = np.array([np.dot(row, row) for row in g], dtype=g.dtype)
    if out is None:
        return value
    out[...] = value
    return out


def index_window_batched(perm, start, out):
    """out[i, j] = perm[i, start + j], j < N: each model's batch indices from its own epoch
    order (numpy_ops.index_window per row). perm: (M, n) integers; start: 0-d int64 array;
    out: (M, N) of perm's dtype."""
    np.take(perm, np.arange(out.shape[1]) + start, axis=1, out=out)
    return out


# bytes of one buffer's rows that the NumPy update processes at a time (its 5-6 buffers: about
# a core's L2). Measured, two threads, 64 tiny / 16 mnist models: 128 KiB 6.0 / 66 ms per
# step, 512 KiB 5.0 / 52 ms, no blocking 5.0 / 54 ms (smaller blocks: more calls, each a GIL hand-over).
CACHE_BLOCK = 1 << 19


def _blocked_step(step, arrays: dict, scratch, vectors: dict, kwargs: dict) -> bool:
    """Run an elementwise update over blocks of models whose rows fit in cache (or over
    column blocks of one model when its row does not): the same arithmetic per element
    (so the same bits), far less memory traffic than one pass per op over all M rows.
    The blocks run on the stack's threads. Returns False when one block covers all."""
    p = arrays["p"]
    m, n = p.shape
    rows = max(1, CACHE_BLOCK // max(1, n * p.itemsize))
    cols = n if rows > 1 or n * p.itemsize <= CACHE_BLOCK else max(1, CACHE_BLOCK // p.itemsize)
    if rows >= m and cols >= n:
        return False

    def block(item):
        lo, c0 = item
        rs, cs = slice(lo, min(lo + rows, m)), slice(c0, min(c0 + cols, n))
        step(**{k: a[rs, cs] for k, a in arrays.items()}, scratch=scratch[:, rs, cs],
             **{k: v[rs] for k, v in vectors.items()}, **kwargs, blocked=True)  # fmt: skip

    run_blocks(block, [(lo, c0) for lo in range(0, m, rows) for c0 in range(0, n, cols)])
    return True


KERNEL_CHUNK = 1 << 16  # elements per task of a compiled update split over threads (one model's row or part of it)


def _kernel_step(kernel, arrays: dict, vectors: dict, kwargs: dict, skip) -> bool:
    """Run a compiled update (gpubp.backend.cpu_kernels) when it applies: one pass per
    element instead of one per NumPy operation, the same bits. Rows (models) are split
    over the stack's threads; a stack of few models with long rows is split by columns.
    Returns False when the kernels are off or the arrays do not suit them."""
    p = arrays["p"]
    if not cpu_kernels.usable(*arrays.values(), *vectors.values()):
        return False
    m, n = p.shape
    if any(a.shape != p.shape for a in arrays.values()) or any(v.shape != (m, 1) for v in vectors.values()):
        return False  # what NumPy would broadcast (or refuse): the kernels index rows as given
    skip = None if skip is None else np.asarray(skip, np.bool_).reshape(m)
    tasks = max(1, min(num_threads(), -(-m * n // KERNEL_CHUNK)))
    if m >= tasks:  # blocks of whole rows
        step = -(-m // tasks)
        items = [(slice(lo, min(lo + step, m)), slice(None)) for lo in range(0, m, step)]
    else:  # column blocks of every row
        step = -(-n // tasks)
        items = [(slice(None), slice(c0, min(c0 + step, n))) for c0 in range(0, n, step)]

    def block(item):
        rs, cs = item
        kernel(**{k: a[rs, cs] for k, a in arrays.items()}, **{k: v[rs] for k, v in vectors.items()},
               skip=None if skip is None else skip[rs], **kwargs)  # fmt: skip

    run_blocks(block, items)
    return True


def _subset_step(step, skip, arrays: dict, vectors: dict, kwargs: dict) -> bool:
    """When some models are frozen (skip[i] true), run `step` on the others' rows only and
    write them back; returns whether it did (the caller then returns)."""
    if skip is None or not np.any(skip):
        return False
    keep = np.flatnonzero(~np.asarray(skip))
    if keep.size == 0:
        return True
    sub = {k: np.ascontiguousarray(a[keep]) for k, a in arrays.items()}
    scratch = np.empty((2, keep.size, sub["p"].shape[1]), sub["p"].dtype)
    step(**sub, scratch=scratch, **{k: v[keep] for k, v in vectors.items()}, **kwargs)
    for k, a in arrays.items():
        if k != "g":
            a[keep] = sub[k]
    return True


def sgd_step_batched(p, g, buf, scratch, *, lr, momentum, one_minus_dampening, nesterov, weight_decay, first_step,
                     grad_scale, skip=None, momentum_on=True, decay_on=True, blocked=False):  # fmt: skip
    """numpy_ops.sgd_step for every model: p, g, buf (M, P); scratch (2, M, P); lr, momentum,
    one_minus_dampening, weight_decay, grad_scale: (M, 1); skip: (M,) bool or None (frozen models).
    momentum_on / decay_on: whether any model has momentum / weight decay.

    d = s g + wd p;  buf = d (first step) or mu buf + (1 - damp) d;  d = d + mu buf (nesterov) or buf;  p -= lr d
    """
    vectors = dict(
        lr=lr,
        momentum=momentum,
        one_minus_dampening=one_minus_dampening,
        weight_decay=weight_decay,
        grad_scale=grad_scale,
    )
    flags = dict(nesterov=nesterov, first_step=first_step, momentum_on=momentum_on, decay_on=decay_on)
    if not blocked and _kernel_step(cpu_kernels.sgd_rows, dict(p=p, g=g, buf=buf), vectors,
                                    dict(flags, first_step=bool(first_step)), skip):  # fmt: skip
        return
    if _subset_step(sgd_step_batched, skip, dict(p=p, g=g, buf=buf), vectors, flags):
        return
    if not blocked and _blocked_step(sgd_step_batched, dict(p=p, g=g, buf=buf), scratch, vectors, flags):
        return
    d, t = scratch[0], scratch[1]
    np.multiply(g, grad_scale, out=d)  # s = 1 gives g's own bits
    if decay_on:
        np.multiply(p, weight_decay, out=t)  # wd = 0 adds +0: d unchanged
        d += t
    if momentum_on:
        d = momentum_direction(d, buf, t, momentum, one_minus_dampening, first_step, nesterov)
    np.multiply(d, lr, out=t)
    p -= t


def adam_step_batched(p, g, m, v, scratch, *, lr_decay, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                      step_size, bias2_sqrt, decoupled, grad_scale, skip=None, decay_on=True, blocked=False):  # fmt: skip
    """numpy_ops.adam_step for every model: p, g, m, v (M, P); scratch (2, M, P); the rest
    (M, 1), computed per model on the host as adam_step computes them:
    lr_decay = 1 - lr wd, step_size = lr / (1 - b1^t), bias2_sqrt = sqrt(1 - b2^t).

    d = s g (+ wd p for Adam); p *= 1 - lr wd (AdamW); m += (1 - b1)(d - m); v = b2 v + (1 - b2) d^2;
    p -= step_size m / (sqrt(v) / bias2_sqrt + eps)
    """
    vectors = dict(lr_decay=lr_decay, one_minus_beta1=one_minus_beta1, beta2=beta2, one_minus_beta2=one_minus_beta2,
                   eps=eps, weight_decay=weight_decay, step_size=step_size, bias2_sqrt=bias2_sqrt,
                   grad_scale=grad_scale)  # fmt: skip
    flags = dict(decoupled=decoupled, decay_on=decay_on)
    if not blocked and _kernel_step(cpu_kernels.adam_rows, dict(p=p, g=g, m=m, v=v), vectors, flags, skip):
        return
    if _subset_step(adam_step_batched, skip, dict(p=p, g=g, m=m, v=v), vectors, flags):
        return
    if not blocked and _blocked_step(adam_step_batched, dict(p=p, g=g, m=m, v=v), scratch, vectors, flags):
        return
    d, t = scratch[0], scratch[1]
    np.multiply(g, grad_scale, out=d)
    if decay_on:
        if decoupled:
            p *= lr_decay  # wd = 0: times 1
        else:
            np.multiply(p, weight_decay, out=t)
            d += t
    np.subtract(d, m, out=t)
    t *= one_minus_beta1
    m += t
    v *= beta2
    np.multiply(d, one_minus_beta2, out=t)
    t *= d
    v += t
    den = scratch[0]
    np.sqrt(v, out=den)
    den /= bias2_sqrt
    den += eps
    np.multiply(m, step_size, out=t)
    t /= den
    p -= t


def rounded(update):
    """`update` (sgd_step_batched or adam_step_batched) taking `low` too: a 16-bit array of
    p's shape (mixed precision's copy of the float32 master weights that the GEMMs read)
    that it leaves as p rounded to 16 bits after the update, skipped or not:
        update(p, ...);  low = round16(p)
    The GPU writes low in the update's own kernel (cupy_backend.ELEMENTWISE's "*_bf16",
    "*_f16"), which spares the forward pass its cast, a pass over the parameters."""

    def update_and_round(p, *args, low=None, **kwargs):
        update(p, *args, **kwargs)
        if low is not None:
            cast(p, low)

    # the update's name, text and signature with `low` last (the recording backend binds
    # calls with it; the GPU backend's updates take the same parameters)
    update_and_round.__name__ = update_and_round.__qualname__ = update.__name__
    update_and_round.__doc__ = f"{update.__doc__}\n    With `low`: numpy_stacked.rounded."
    sig = inspect.signature(update)
    low = inspect.Parameter("low", inspect.Parameter.KEYWORD_ONLY, default=None)
    update_and_round.__signature__ = sig.replace(parameters=[*sig.parameters.values(), low])
    return update_and_round
