"""The compiled CPU updates (gpubp/backend/cpu_kernels.py, Numba) against the NumPy code
they replace, bit for bit; and the stack's per-block update (forward_backward's `then`)
against one update of the whole stack.

The kernels claim the NumPy code's exact arithmetic (same operations, same order, same
precision, no fused multiply-add), so the reference is the NumPy path of the same
function with the kernels switched off, and the comparison is on the bytes: NaN,
infinities and -0 in the inputs included. Skipped without numba (CI's first step)."""

from __future__ import annotations

import numpy as np
import pytest

from gpubp.backend import cpu_kernels as CK
from gpubp.backend import numpy_stacked as NS
from gpubp.errors import UsageError

numba = pytest.importorskip("numba")


def _same(a, b) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def _arr(rng, shape, dtype, positive=False):
    """Normal values with a few NaN, +-inf, -0 and +0 planted."""
    a = rng.standard_normal(shape).astype(dtype)
    if positive:
        a = np.abs(a)
    flat = a.reshape(-1)
    for value in (np.nan, np.inf, -np.inf, -0.0, 0.0):
        flat[rng.integers(0, flat.size, 3)] = value
    return a


def _both(monkeypatch, fn, arrays, kwargs, kernel: str):
    """fn over copies of `arrays`, once on NumPy (kernels off) and once compiled; checks that
    the compiled kernel `kernel` ran the second time only (a spy on cpu_kernels)."""
    calls = []
    real = getattr(CK, kernel)
    monkeypatch.setattr(CK, kernel, lambda *a, **k: calls.append(1) or real(*a, **k))
    out = []
    for on in (False, True):
        monkeypatch.setitem(CK._STATE, "numba", None if on else False)
        a = [x.copy() for x in arrays]
        p = a[0]
        with np.errstate(all="ignore"):
            fn(*a, np.empty((2, *p.shape), p.dtype), **kwargs)
        out.append(a)
        assert bool(calls) == on, "the compiled update ran when off, or did not run when on"
    return out


# many short rows (blocks of rows on the threads), one long row and a few long ones (four
# threads: blocks of columns)
SHAPES = [(6, 1000), (1, 300_001), (3, 100_003)]


@pytest.fixture(autouse=True)
def _four_threads(monkeypatch):
    from gpubp.backend import threads

    monkeypatch.setitem(threads._STATE, "threads", 4)  # more tasks than rows for the long shapes


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("decay_on", [False, True])
@pytest.mark.parametrize("with_skip", [False, True])
def test_adam_kernel_is_the_numpy_update_bitwise(monkeypatch, dtype, shape, decoupled, decay_on, with_skip):
    rng = np.random.default_rng(hash((shape, decoupled, decay_on, with_skip)) % 2**32)
    m = shape[0]

    def vec(lo, hi):
        return rng.uniform(lo, hi, (m, 1)).astype(dtype)

    kwargs = dict(lr_decay=vec(0.9, 1), one_minus_beta1=vec(0, 0.2), beta2=vec(0.9, 1), one_minus_beta2=vec(0, 0.1),
                  eps=vec(1e-9, 1e-7), weight_decay=vec(0, 0.1), step_size=vec(0, 1e-2), bias2_sqrt=vec(0.01, 1),
                  grad_scale=vec(0.5, 1.5), decoupled=decoupled, decay_on=decay_on,
                  skip=np.arange(m) % 2 == 1 if with_skip else None)  # fmt: skip
    arrays = [_arr(rng, shape, dtype), _arr(rng, shape, dtype), _arr(rng, shape, dtype), _arr(rng, shape, dtype, True)]
    ref, got = _both(monkeypatch, NS.adam_step_batched, arrays, kwargs, "adam_rows")
    for name, a, b in zip("pgmv", ref, got):
        assert _same(a, b), f"{name} differs"
    assert not _same(ref[0], arrays[0]), "the update changed nothing: the comparison would be empty"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("nesterov,momentum_on", [(False, False), (False, True), (True, True)])
@pytest.mark.parametrize("decay_on", [False, True])
@pytest.mark.parametrize("first_step", [False, True])
@pytest.mark.parametrize("with_skip", [False, True])
def test_sgd_kernel_is_the_numpy_update_bitwise(monkeypatch, dtype, shape, nesterov, momentum_on, decay_on,
                                                first_step, with_skip):  # fmt: skip
    rng = np.random.default_rng(hash((shape, nesterov, momentum_on, decay_on, first_step, with_skip)) % 2**32)
    m = shape[0]

    def vec(lo, hi):
        return rng.uniform(lo, hi, (m, 1)).astype(dtype)

    kwargs = dict(lr=vec(0, 0.1), momentum=vec(0.5, 0.99) if momentum_on else vec(0, 0),
                  one_minus_dampening=np.ones((m, 1), dtype) if nesterov else vec(0.5, 1), weight_decay=vec(0, 0.1),
                  nesterov=nesterov, first_step=np.array(first_step), grad_scale=vec(0.5, 1.5),
                  skip=np.arange(m) % 2 == 0 if with_skip else None, momentum_on=momentum_on, decay_on=decay_on)  # fmt: skip
    arrays = [_arr(rng, shape, dtype), _arr(rng, shape, dtype), _arr(rng, shape, dtype)]
    ref, got = _both(monkeypatch, NS.sgd_step_batched, arrays, kwargs, "sgd_rows")
    for name, a, b in zip(["p", "g", "buf"], ref, got):
        assert _same(a, b), f"{name} differs"


def test_arguments_numpy_would_broadcast_take_the_numpy_update(monkeypatch):
    """A 0-d gradient scale for a stack of several models (NumPy broadcasts it; the kernels
    index one per model): the NumPy update runs, and gives NumPy's result."""
    rng = np.random.default_rng(3)
    m, n = 4, 50
    vec = {k: np.full((m, 1), v, np.float32) for k, v in dict(lr_decay=1.0, one_minus_beta1=0.1, beta2=0.999,
           one_minus_beta2=0.001, eps=1e-8, weight_decay=0.0, step_size=1e-3, bias2_sqrt=0.03).items()}  # fmt: skip
    kwargs = dict(vec, grad_scale=np.array(0.5, np.float32).reshape(1, 1), decoupled=True, decay_on=False)
    arrays = [rng.standard_normal((m, n)).astype(np.float32) for _ in range(3)] + [np.ones((m, n), np.float32)]
    monkeypatch.setattr(CK, "adam_rows", lambda *a, **k: pytest.fail("the kernel took a (1, 1) scale for 4 models"))
    out = []
    for on in (False, None):
        monkeypatch.setitem(CK._STATE, "numba", on)
        a = [x.copy() for x in arrays]
        NS.adam_step_batched(*a, np.empty((2, m, n), np.float32), **kwargs)
        out.append(a[0])
    assert _same(out[0], out[1])


def test_kernels_off_and_refused_arguments(monkeypatch):
    """GPUBP_CPU_KERNELS=numpy turns them off; a Python scalar or a 16-bit array makes the
    NumPy code run (usable() says no) instead of failing or converting."""
    monkeypatch.setitem(CK._STATE, "numba", None)
    monkeypatch.setenv("GPUBP_CPU_KERNELS", "numpy")
    assert not CK.enabled() and CK.describe() == "numpy"
    monkeypatch.setitem(CK._STATE, "numba", None)
    monkeypatch.setenv("GPUBP_CPU_KERNELS", "auto")
    assert CK.enabled() and CK.describe().startswith("numba ")
    a = np.zeros((2, 3), np.float32)
    assert CK.usable(a, a)
    assert not CK.usable(a, 0.1)  # a Python float (a hand-set lr)
    assert not CK.usable(a, a.astype(np.float16))
    assert not CK.usable(a, np.zeros((3, 2), np.float32).T)  # rows not contiguous
    monkeypatch.setitem(CK._STATE, "numba", None)
    monkeypatch.setenv("GPUBP_CPU_KERNELS", "fast")
    with pytest.raises(UsageError, match="GPUBP_CPU_KERNELS must be auto, numba or numpy, got 'fast'"):
        CK.enabled()
    monkeypatch.setitem(CK._STATE, "numba", None)


def test_a_bad_setting_is_one_line_and_exit_2(tmp_path):
    """The CLI turns a bad GPUBP_CPU_KERNELS into one line naming it, exit code 2."""
    import os
    import subprocess
    import sys

    cfg = tmp_path / "c.toml"
    cfg.write_text('[data]\ndataset = "spirals"\n[train]\nsteps = 3\n')
    env = dict(os.environ, GPUBP_CPU_KERNELS="fast")
    r = subprocess.run([sys.executable, "-m", "gpubp", "train", "--config", str(cfg), "--out", str(tmp_path / "run"),
                        "--quiet"], capture_output=True, text=True, env=env)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert not (tmp_path / "run").exists()  # failed before the run directory
    assert r.stderr.strip().splitlines() == [
        "gpubp: error: environment variable GPUBP_CPU_KERNELS must be auto, numba or numpy, got 'fast'"
    ]
