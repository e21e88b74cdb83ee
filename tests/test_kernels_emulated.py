"""Our CUDA kernels run on the host: kernels/reduce.cu, loss.cu and optim.cu built with
g++ on tests/cuda_host.h (a block's CUDA threads as host threads, __syncthreads and warp
shuffles as barriers, blocks in a shuffled order), launched by the GPU backend's own
launchers (CupyBackend with NumPy arrays for CuPy's), against the NumPy reference.

What this checks that the NVRTC compile and the launch-argument contract tests cannot:
the kernels' logic across blocks and threads, in particular the one-launch reductions
(common.cuh's last_block: partials, the ticket counter and its reset; the last block's
sum; the loss kernel's own batch mean; the guard run by the block that finishes the
norm), with the block that finishes last changing from launch to launch. What it cannot
check is the GPU's memory model (the fences), its float rounding of fused operations
and its speed: tests/test_gpu.py does that on a GPU.

Tolerances: the host runs the kernels' own summation order in IEEE float32/float64, so
a result differs from NumPy's (pairwise or BLAS order) by the rounding of a sum of n
terms: |got - ref| <= 2 n eps sum|terms| (the classic bound, n the terms summed), plus,
for the mean loss, the rounding of each row's loss (its terms' magnitudes).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import numpy as np
import pytest

from gpubp import kernels
from gpubp.backend import cupy_backend, numpy_ops
from gpubp.losses import make_loss

from .conftest import ROOT
from .kernel_params import C_TYPES, kernel_params
from .test_kernels_cpu import REQUIRE_KERNEL_TOOLS

FILES = ("reduce.cu", "loss.cu", "optim.cu")
CTYPE = {np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double,
         np.dtype(np.int32): ctypes.c_int, np.dtype(np.int64): ctypes.c_longlong,
         np.dtype(np.uint32): ctypes.c_uint}  # fmt: skip


def wrapper_source(names: dict[str, str]) -> str:
    """C++ that includes the kernel files and exports, per kernel, host_<name>(grid x, y,
    block x, y, seed, <the kernel's parameters>) -> launch status."""
    lines = ['#include "cuda_host.h"'] + [f'#include "{f}"' for f in FILES]
    for name, file in names.items():
        params = kernel_params(file, name)
        decl = ", ".join(f"{t}{'*' if ptr else ''} {p}" for t, ptr, p in params)
        call = ", ".join(p for _, _, p in params)
        lines.append(
            f'extern "C" int host_{name}(unsigned gx, unsigned gy, unsigned bx, unsigned by, unsigned seed, {decl}) '
            f"{{ return launch(dim3{{gx, gy}}, dim3{{bx, by}}, seed, [&] {{ {name}({call}); }}); }}"
        )
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        if REQUIRE_KERNEL_TOOLS:
            pytest.fail("no C++ compiler: CI must run the kernels on the host")
        pytest.skip("no C++ compiler (g++) on this machine: the kernels are not run on the host")
    names = {n: f for f in FILES for n in kernels.kernel_names(f)}
    build = tmp_path_factory.mktemp("kernels_host")
    src, lib = build / "kernels_host.cpp", build / "kernels_host.so"
    src.write_text(wrapper_source(names))
    cmd = [cxx, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-Wall", "-Werror", "-Wno-unused-function",
           "-Wno-sign-compare",  # threadIdx.x (unsigned) against ints, as NVRTC takes it
           "-I", os.path.join(ROOT, "tests"), "-I", kernels.kernel_dir(), str(src), "-o", str(lib)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    return ctypes.CDLL(str(lib)), names


class EmulatedGpu:
    """CupyBackend over NumPy arrays whose kernels run on the host (see the module
    docstring); each launch's arguments are converted by the kernel's C parameter types."""

    def __init__(self, host_kernels, seed: int = 0):
        lib, self.files = host_kernels
        self.lib, self.seed, self.launches = lib, seed, []

        class FakeCupy:
            ndarray = np.ndarray
            empty = staticmethod(
                lambda shape, dtype: (
                    np.full(shape, np.nan, dtype) if np.dtype(dtype).kind == "f" else np.full(shape, 77, dtype)
                )
            )  # fmt: skip  (poisoned: unwritten shows)
            zeros = staticmethod(lambda shape, dtype: np.zeros(shape, dtype))
            full = staticmethod(lambda shape, value, dtype: np.full(shape, value, dtype))

        be = cupy_backend.CupyBackend.__new__(cupy_backend.CupyBackend)
        be._cupy, be.n_sm = FakeCupy(), 1  # one SM: grids of at most 32 blocks (grid-stride loops)
        be._check = lambda *args, **kwargs: None  # NumPy arrays stand in for CuPy's
        be._step_array = lambda step: step if isinstance(step, np.ndarray) else np.asarray(step, np.int64)
        be._function = self._function
        self.be = be

    def _function(self, base, dtype):
        name = base if base.endswith(("_i32", "_i64")) or dtype is None else \
            f"{base}_{cupy_backend._SUFFIX[np.dtype(dtype)]}"  # fmt: skip
        params = kernel_params(self.files[name], name)

        def call(grid, block, args):
            assert len(args) == len(params), name
            c_args = []
            for (c_type, pointer, pname), a in zip(params, args):
                if pointer:
                    assert isinstance(a, np.ndarray) and a.dtype == np.dtype(C_TYPES[c_type]), (name, pname)
                    c_args.append(ctypes.c_void_p(a.ctypes.data))
                else:
                    c_args.append(CTYPE[np.dtype(C_TYPES[c_type])](a.item()))
            grid, block = (*grid, 1)[:2], (*block, 1)[:2]
            self.seed += 1  # another block order each launch
            status = getattr(self.lib, f"host_{name}")(*map(ctypes.c_uint, (*grid, *block, self.seed)), *c_args)
            assert status == 0, f"{name}: a barrier was not reached by every thread"
            self.launches.append(name)

        return call


def sum_bound(terms: np.ndarray, dtype) -> float:
    """2 n eps sum|terms|: any summation order's rounding of a sum of n terms."""
    return 2 * terms.size * float(np.finfo(dtype).eps) * float(np.abs(terms).astype(np.float64).sum())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sum_squares_is_one_launch_and_right_on_any_grid(host_kernels, dtype):
    """One block (n <= 1024) to 9 blocks; the ticket counter is back at 0 after each
    launch; repeated launches (other block orders, another block last) give the same bits."""
    gpu = EmulatedGpu(host_kernels)
    rng = np.random.default_rng(0)
    for n in (1, 1000, 1025, 9000):
        g = rng.normal(size=n).astype(dtype)
        out = np.zeros((), dtype)
        gpu.launches.clear()
        gpu.be.sum_squares(g, out=out)
        assert gpu.launches == [f"sum_{'f32' if dtype == np.float32 else 'f64'}"]
        ref = np.dot(g.astype(np.float64), g.astype(np.float64))
        assert abs(float(out) - ref) <= sum_bound(g.astype(np.float64) ** 2, dtype), n
        first = out.copy()
        for _ in range(3):
            gpu.be.sum_squares(g, out=out)
            assert out.tobytes() == first.tobytes(), n
        counters = {k: int(a[0]) for k, a in gpu.be._kept_arrays.items() if k[0] == "counter"}
        assert counters and not any(counters.values()), counters


def test_accuracy_count_sums_its_rows_in_one_launch(host_kernels):
    gpu = EmulatedGpu(host_kernels)
    rng = np.random.default_rng(1)
    x, labels = rng.normal(size=(3000, 4)).astype(np.float32), rng.integers(0, 4, 3000).astype(np.int32)
    got = gpu.be.accuracy_count(x, labels)
    assert int(got) == int(numpy_ops.accuracy_count(x, labels)) and gpu.launches == ["accuracy_rows_f32", "sum_i32"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["softmax_cross_entropy", "mse", "binary_cross_entropy", "huber"])
def test_the_loss_kernel_finishes_its_mean_up_to_the_finishing_rows(host_kernels, name, dtype, monkeypatch):
    """Up to LOSS_FINISH_ROWS rows the loss kernel's last block writes the mean (one
    launch), above it reduce.cu's sum does; value and gradient against the reference.
    The limit is lowered to 300 rows here (the emulation runs 256 host threads a block,
    slowly): 300 rows are 32 blocks of 8 warps on one SM, so rows are grid-strided too."""
    limit = 300
    monkeypatch.setattr(cupy_backend, "LOSS_FINISH_ROWS", limit)
    gpu = EmulatedGpu(host_kernels)
    rng = np.random.default_rng(2)
    loss = make_loss(name, label_smoothing=0.1, huber_delta=0.8)
    sfx = "f32" if dtype == np.float32 else "f64"
    eps = float(np.finfo(dtype).eps)
    for n, c in [(1, 3), (37, 5), (limit, 3), (limit + 1, 2)]:
        x = rng.normal(scale=2.0, size=(n, c)).astype(dtype)
        if name == "softmax_cross_entropy":
            t = rng.integers(0, c, n).astype(np.int32)
        else:
            t = (rng.uniform(size=(n, c)) if name == "binary_cross_entropy" else rng.normal(size=(n, c))).astype(dtype)
        t64 = t if t.dtype == np.int32 else t.astype(np.float64)
        g_ref = np.empty(x.shape)
        v_ref = float(numpy_ops.loss_forward_backward(x.astype(np.float64), t64, loss, g_ref))
        grad, out = np.full_like(x, np.nan), np.full((), np.nan, dtype)
        gpu.launches.clear()
        assert gpu.be.loss_forward_backward(x, t, loss, grad, out=out) is out
        assert gpu.launches == ([f"loss_rows_{sfx}"] if n <= limit else [f"loss_rows_{sfx}", f"sum_{sfx}"]), n
        # the mean of n row losses, each a sum of c terms of magnitude <~ |x| + |t| + 1,
        # each term off by a few eps of that (exp, log) and the sums by n + c roundings
        terms = np.abs(x.astype(np.float64)).sum() + np.abs(t64).sum() * (t.dtype != np.int32) + x.size
        tol = 8 * (n + c) * eps * terms / (n if t.dtype == np.int32 else n * c)
        assert abs(float(out) - v_ref) <= tol, (n, c, float(out), v_ref)
        # each gradient element: a few roundings of a value of magnitude <= max |g|
        np.testing.assert_allclose(grad, g_ref, rtol=8 * c * eps, atol=8 * c * eps * np.abs(g_ref).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_guard_runs_in_the_block_that_finishes_the_norm(host_kernels, dtype):
    """step_guard_norm against numpy_ops.step_guard_norm over a run of steps: one block and
    9, clipping on and off, a NaN gradient (the first bad step is kept)."""
    gpu = EmulatedGpu(host_kernels)
    rng = np.random.default_rng(3)
    t = np.dtype(dtype).type
    ref = [np.array(-1, np.int64), np.array(False), np.zeros((), dtype), np.zeros((), dtype)]
    dev = [a.copy() for a in ref]
    sq_ref, sq_dev = np.zeros((), dtype), np.zeros((), dtype)
    for step, (n, max_norm, nan) in enumerate([(5, 2.0, False), (9000, 1.0, False), (9000, 0.0, False),
                                               (900, 1e-3, False), (9000, 1.0, True), (77, 1.0, False)]):  # fmt: skip
        g = rng.normal(size=n).astype(dtype)
        if nan:
            g[n // 3] = np.nan
        loss = np.array(t(0.5))
        numpy_ops.step_guard_norm(loss, g, sq_ref, step, max_norm, *ref)
        gpu.launches.clear()
        gpu.be.step_guard_norm(loss, g, sq_dev, np.asarray(step, np.int64), max_norm, *dev)
        assert len(gpu.launches) == 1 and gpu.launches[0].startswith("step_guard_norm_")
        assert dev[0] == ref[0] and dev[1] == ref[1], step
        if nan:  # the sum, the norm NaN; the scale 1 (min(1, NaN) is 1, as Python's min)
            assert np.isnan(sq_dev) and np.isnan(dev[2]) and np.isnan(ref[2]) and dev[3] == ref[3] == 1, step
            continue
        bound = sum_bound(g.astype(np.float64) ** 2, dtype)
        assert abs(float(sq_dev) - float(sq_ref)) <= bound, step
        # norm = sqrt(sum): half the sum's relative error, plus its own rounding; scale: a
        # division of it, one more rounding
        rel = bound / float(sq_ref) + 4 * float(np.finfo(dtype).eps)
        for got, want in zip(dev[2:], ref[2:]):
            assert abs(float(got) - float(want)) <= rel * abs(float(want)), step
    assert int(ref[0]) == 4 and int(dev[0]) == 4


def test_a_kernel_that_skips_a_barrier_is_reported_not_hung(host_kernels, tmp_path):
    """The emulation can fail: a block whose threads do not all reach __syncthreads breaks
    the barrier (after its timeout) and the launch says so."""
    cxx = shutil.which("g++") or shutil.which("c++")
    src, lib = tmp_path / "bad.cpp", tmp_path / "bad.so"
    src.write_text('#include "cuda_host.h"\n'
                   'extern "C" int run(int skip) { return launch(dim3{2}, dim3{64}, 1, [=] {\n'
                   '  if (!skip || threadIdx.x < 32) __syncthreads(); }); }\n')  # fmt: skip
    r = subprocess.run([cxx, "-std=c++20", "-pthread", "-shared", "-fPIC", "-DBARRIER_SECONDS=0.5",
                        "-I", os.path.join(ROOT, "tests"), str(src), "-o", str(lib)], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    run = ctypes.CDLL(str(lib)).run
    assert run(0) == 0 and run(1) == 1
