"""Compiled CPU kernels (Numba) for the optimizers' updates, where NumPy needs one pass
over memory per operation (Adam: 14 passes over p, g, m, v; one pass here, ~5x faster
on the sweep bench's 64 tiny models).

Optional: `pip install 'gpubp[numba]'`. Without Numba (or with GPUBP_CPU_KERNELS=numpy)
the NumPy code of numpy_ops / numpy_stacked runs, as before. The kernels are the NumPy
code's arithmetic, operation by operation, in the same order and the same precision
(no fused multiply-add, no reassociation: Numba's default, fastmath off), so they give
the same bits; tests/test_cpu_kernels.py checks that bit for bit, NaN, infinities and
-0 included. Each kernel releases the GIL (nogil), so the stack's thread pool runs
them on several cores at once.

    enabled()            whether the kernels are used (GPUBP_CPU_KERNELS: auto / numba / numpy)
    describe()           "numba 0.xx" or "numpy" (what `gpubp bench` prints)
    adam_rows(...)       numpy_stacked.adam_step_batched over (M, P) rows
    sgd_rows(...)        numpy_stacked.sgd_step_batched over (M, P) rows

Measured and not kept (2026-11-26, docs/benchmarks.md): bias + ReLU and the ReLU
backward compiled were no faster than NumPy (memory-bound either way), and the softmax
cross-entropy was slower: Numba's exp is the C library's scalar one, 7-12x slower than
NumPy's vectorized exp.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from ..errors import UsageError

_STATE: dict = {"numba": None}
_LOCK = threading.Lock()
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def choice() -> str:
    """GPUBP_CPU_KERNELS: auto (Numba when installed; the default), numba or numpy.
    Checked when the CPU backend is chosen, so a bad value fails before a run starts."""
    value = os.environ.get("GPUBP_CPU_KERNELS", "auto").strip().lower() or "auto"
    if value not in ("auto", "numba", "numpy"):
        raise UsageError(f"environment variable GPUBP_CPU_KERNELS must be auto, numba or numpy, got {value!r}")
    return value


def _numba():
    """The numba module, or False when it cannot (or must not) be used."""
    if _STATE["numba"] is None:
        with _LOCK:  # the pool's threads may ask at once: one defines the kernels, the others wait
            if _STATE["numba"] is None:
                _STATE["numba"] = _load()
    return _STATE["numba"]


def _load():
    """Import numba and define the kernels; the module, or False."""
    choice_ = choice()
    if choice_ == "numpy":
        return False
    try:
        import numba
    except ImportError:
        if choice_ == "numba":
            raise UsageError(
                "GPUBP_CPU_KERNELS=numba but numba is not installed: pip install 'gpubp[numba]', or unset it"
            ) from None
        return False
    _compile(numba)  # before _STATE says "on": no thread may find the kernels missing
    return numba


def enabled() -> bool:
    return bool(_numba())


def describe() -> str:
    nb = _numba()
    return f"numba {nb.__version__}" if nb else "numpy"


def usable(*arrays) -> bool:
    """The kernels apply: enabled, every argument a NumPy array (not a Python scalar),
    float32 or float64 alike, rows contiguous."""
    if not enabled() or not all(isinstance(a, np.ndarray) for a in arrays):
        return False
    dtype = arrays[0].dtype
    return dtype in DTYPES and all(a.dtype == dtype and a.strides[-1] == a.itemsize for a in arrays)


_KERNELS: dict = {}


def _compile(nb) -> None:
    """Define the kernels (compiled on first call, cached on disk by Numba)."""
    jit = nb.njit(nogil=True, cache=True, error_model="numpy")  # numpy: 1/0 is inf, no check per division

    @jit
    def adam_rows(p, g, m, v, skip, lr_decay, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                  step_size, bias2_sqrt, grad_scale, decoupled, decay_on):  # fmt: skip
        # per model i (row): the operations of numpy_stacked.adam_step_batched, in its order
        for i in range(p.shape[0]):
            if skip[i]:
                continue
            s, b1c, b2, b2c = grad_scale[i, 0], one_minus_beta1[i, 0], beta2[i, 0], one_minus_beta2[i, 0]
            e, wd, lrd, ss, bs = eps[i, 0], weight_decay[i, 0], lr_decay[i, 0], step_size[i, 0], bias2_sqrt[i, 0]
            pi, gi, mi, vi = p[i], g[i], m[i], v[i]
            for j in range(pi.shape[0]):
                d = gi[j] * s  # d = s g
                pj = pi[j]
                if decay_on:
                    if decoupled:
                        pj = pj * lrd  # p *= 1 - lr wd
                    else:
                        d = d + pj * wd  # d += wd p
                mj = mi[j] + (d - mi[j]) * b1c  # m += (1 - b1) (d - m)
                vj = vi[j] * b2 + (d * b2c) * d  # v = b2 v + ((1 - b2) d) d
                mi[j] = mj
                vi[j] = vj
                pi[j] = pj - (mj * ss) / ((np.sqrt(vj) / bs) + e)  # p -= step_size m / (sqrt(v) / bias2_sqrt + eps)

    @jit
    def sgd_rows(p, g, buf, skip, lr, momentum, one_minus_dampening, weight_decay, grad_scale, first_step, nesterov,
                 momentum_on, decay_on):  # fmt: skip
        # per model i: numpy_stacked.sgd_step_batched (and numpy_ops.momentum_direction)
        for i in range(p.shape[0]):
            if skip[i]:
                continue
            s, mu, omd, wd, rate = (
                grad_scale[i, 0],
                momentum[i, 0],
                one_minus_dampening[i, 0],
                weight_decay[i, 0],
                lr[i, 0],
            )
            pi, gi, bi = p[i], g[i], buf[i]
            for j in range(pi.shape[0]):
                d = gi[j] * s  # d = s g
                if decay_on:
                    d = d + pi[j] * wd  # d += wd p
                if momentum_on:
                    if first_step:
                        b = d  # buf = d
                    else:
                        b = bi[j] * mu + d * omd  # buf = mu buf + (1 - damp) d
                    bi[j] = b
                    d = d + b * mu if nesterov else b  # direction
                pi[j] = pi[j] - d * rate  # p -= lr d

    _KERNELS.update(adam_rows=adam_rows, sgd_rows=sgd_rows)


def _kernel(name: str):
    if not _numba():
        raise RuntimeError("the compiled CPU kernels are off: numba is not installed, or GPUBP_CPU_KERNELS=numpy")
    return _KERNELS[name]


def _skip(skip, m: int) -> np.ndarray:
    return np.zeros(m, np.bool_) if skip is None else np.asarray(skip, np.bool_).reshape(m)


def adam_rows(p, g, m, v, *, skip, lr_decay, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, step_size,
              bias2_sqrt, grad_scale, decoupled, decay_on) -> None:  # fmt: skip
    """p, g, m, v: (M, P), rows contiguous; the rest (M, 1) of their dtype; skip (M,) bool or None."""
    _kernel("adam_rows")(p, g, m, v, _skip(skip, p.shape[0]), lr_decay, one_minus_beta1, beta2, one_minus_beta2,
                          eps, weight_decay, step_size, bias2_sqrt, grad_scale, bool(decoupled), bool(decay_on))  # fmt: skip


def sgd_rows(p, g, buf, *, skip, lr, momentum, one_minus_dampening, weight_decay, grad_scale, first_step, nesterov,
             momentum_on, decay_on) -> None:  # fmt: skip
    """p, g, buf: (M, P), rows contiguous; the rest (M, 1); first_step a bool (or 0-d array)."""
    _kernel("sgd_rows")(p, g, buf, _skip(skip, p.shape[0]), lr, momentum, one_minus_dampening, weight_decay,
                         grad_scale, bool(first_step), bool(nesterov), bool(momentum_on), bool(decay_on))  # fmt: skip
