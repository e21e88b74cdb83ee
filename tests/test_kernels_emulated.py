"""Our CUDA kernels run on the host: every kernels/*.cu built with
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
import itertools
import os
import subprocess

import numpy as np
import pytest

from gpubp import kernels
from gpubp.backend import numpy_ops
from gpubp.losses import make_loss

from .conftest import ROOT
from .kernel_params import C_TYPES, kernel_params, numpy_backend_of_gpu
from .test_kernels_cpu import host_compiler

FILES = tuple(f for f in kernels.KERNEL_FILES)  # every kernel file, one translation unit
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
    cxx = host_compiler("the kernels' runs")
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

        # one SM: grids of at most 32 blocks (grid-stride loops); new buffers poisoned
        self.be = numpy_backend_of_gpu(self._launch, n_sm=1, poison=True)

    def _launch(self, name, grid, block, args):
        params = kernel_params(self.files[name], name)
        assert len(args) == len(params), name
        c_args = []
        for (c_type, pointer, pname), a in zip(params, args):
            if pointer:
                assert isinstance(a, np.ndarray) and a.dtype == np.dtype(C_TYPES[c_type]), (name, pname)
                c_args.append(ctypes.c_void_p(a.ctypes.data))
            else:  # a value of the parameter's own width, as CuPy would pass it
                assert isinstance(a, np.generic) and a.dtype == np.dtype(C_TYPES[c_type]), (name, pname, a)
                c_args.append(CTYPE[np.dtype(C_TYPES[c_type])](a.item()))
        grid, block = (*grid, 1)[:2], (*block, 1)[:2]
        self.seed += 1  # another block order each launch
        status = getattr(self.lib, f"host_{name}")(*map(ctypes.c_uint, (*grid, *block, self.seed)), *c_args)
        assert status == 0, f"{name}: a barrier was not reached by every thread"
        self.launches.append(name)


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
def test_the_loss_kernel_finishes_its_own_mean(host_kernels, name, dtype, monkeypatch):
    """The loss kernel writes value, gradient and batch mean in one launch (groups' row
    sums, block partials, the last block's sum), one block to 38, rows of 1 to 300 columns
    (groups of 1 to 32 lanes, a warp's last rows past the batch's end; 300: a lane's
    columns in three rounds of loss.cuh's LOSS_UNROLL = 4 loads, the last one partial); against the
    reference. Two launches give the same bits, and a row's gradient has the bits of a
    whole warp a row (width 32: the butterfly's first levels add nothing), and of the
    targets read through a window of a split (the training step's batch)."""
    from gpubp.backend import cupy_backend

    gpu = EmulatedGpu(host_kernels)
    rng = np.random.default_rng(2)
    loss = make_loss(name, label_smoothing=0.1, huber_delta=0.8)
    sfx = "f32" if dtype == np.float32 else "f64"
    eps = float(np.finfo(dtype).eps)
    for n, c in [(1, 3), (37, 5), (256, 3), (301, 2), (45, 1), (33, 10), (19, 40), (6, 300)]:
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
        assert gpu.launches == [f"loss_rows_{sfx}"], n
        again = np.full((), np.nan, dtype)
        gpu.be.loss_forward_backward(x, t, loss, None, out=again)  # another block order, another block last
        assert again.tobytes() == out.tobytes(), n
        # the mean of n row losses, each a sum of c terms of magnitude <~ |x| + |t| + 1,
        # each term off by a few eps of that (exp, log) and the sums by n + c roundings
        terms = np.abs(x.astype(np.float64)).sum() + np.abs(t64).sum() * (t.dtype != np.int32) + x.size
        tol = 8 * (n + c) * eps * terms / (n if t.dtype == np.int32 else n * c)
        assert abs(float(out) - v_ref) <= tol, (n, c, float(out), v_ref)
        # each gradient element: a few roundings of a value of magnitude <= max |g|
        np.testing.assert_allclose(grad, g_ref, rtol=8 * c * eps, atol=8 * c * eps * np.abs(g_ref).max())
        with monkeypatch.context() as m:  # a warp a row, as before the groups
            m.setattr(cupy_backend, "loss_group_width", lambda c: 32)
            whole = np.full_like(x, np.nan)
            gpu.be.loss_forward_backward(x, t, loss, whole, out=np.full((), np.nan, dtype))
        assert whole.tobytes() == grad.tobytes(), (n, c)
        # the step's batch read where it lies: t's rows scattered in a split of 2 n + 5 rows,
        # rows perm[start + i]; the same values in the same order, so the same bits
        perm = rng.permutation(2 * n + 5).astype(np.int64)
        start = np.array(n // 2 + 1, np.int64)
        split = np.full((2 * n + 5,) + t.shape[1:], 7, t.dtype)  # (7: any label or value past the window)
        split[perm[int(start) : int(start) + n]] = t
        windowed, w_out = np.full_like(x, np.nan), np.full((), np.nan, dtype)
        gpu.be.loss_forward_backward(x, split, loss, windowed, out=w_out, window=(perm, start))
        assert windowed.tobytes() == grad.tobytes() and w_out.tobytes() == out.tobytes(), (n, c)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_guard_runs_in_the_block_that_finishes_the_norm(host_kernels, dtype):
    """step_guard_norm against numpy_ops.step_guard_norm over a run of steps: one block and
    9, clipping on and off, a NaN gradient (the first bad step is kept); the step's
    advance (running loss, position) by the same launch, once."""
    gpu = EmulatedGpu(host_kernels)
    rng = np.random.default_rng(3)
    t = np.dtype(dtype).type
    ref = [np.array(-1, np.int64), np.array(False), np.zeros((), dtype), np.zeros((), dtype)]
    dev = [a.copy() for a in ref]
    sq_ref, sq_dev = np.zeros((), dtype), np.zeros((), dtype)
    advance = (np.zeros((), np.float64), np.zeros((), np.int64))  # running loss, pos: by the finishing block
    for step, (n, max_norm, nan) in enumerate([(5, 2.0, False), (9000, 1.0, False), (9000, 0.0, False),
                                               (900, 1e-3, False), (9000, 1.0, True), (77, 1.0, False)]):  # fmt: skip
        g = rng.normal(size=n).astype(dtype)
        if nan:
            g[n // 3] = np.nan
        loss = np.array(t(0.5))
        numpy_ops.step_guard_norm(loss, g, sq_ref, step, max_norm, *ref)
        gpu.launches.clear()
        gpu.be.step_guard_norm(loss, g, sq_dev, np.asarray(step, np.int64), max_norm, *dev, advance=advance)
        assert len(gpu.launches) == 1 and gpu.launches[0].startswith("step_guard_norm_")
        assert int(advance[1]) == step + 1 and float(advance[0]) == 0.5 * (step + 1)  # the step's advance too
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


@pytest.mark.parametrize("first", [False, True])
def test_the_guards_advance_selects_this_steps_rows_and_the_next_steps_start(host_kernels, first):
    """tests/test_step_gpu.py's test on the host-run kernels, in one launch a step."""
    from .test_step_gpu import test_the_guards_advance_selects_this_steps_rows_and_the_next_steps_start as gpu_test

    gpu = EmulatedGpu(host_kernels)
    gpu_test(first, be=gpu.be)
    assert gpu.launches == ["step_guard_norm_f32"] * 4  # nothing selected apart


@pytest.mark.parametrize("shape", [(), (300,)])
def test_the_step_advance_selects_the_next_rows(host_kernels, shape):
    """tests/test_step_gpu.py's test of step_advance on the host-run kernels."""
    from .test_step_gpu import test_step_advance_adds_the_loss_counts_once_and_selects_the_next_rows as gpu_test

    gpu = EmulatedGpu(host_kernels)
    gpu_test(shape, be=gpu.be)
    assert gpu.launches == ["step_advance_f32"] * 8  # one a step


def test_a_kernel_that_skips_a_barrier_is_reported_not_hung(host_kernels, tmp_path):
    """The emulation can fail: a block whose threads do not all reach __syncthreads breaks
    the barrier (after its timeout) and the launch says so."""
    cxx = host_compiler("the kernels' runs")
    src, lib = tmp_path / "bad.cpp", tmp_path / "bad.so"
    src.write_text('#include "cuda_host.h"\n'
                   'extern "C" int run(int skip) { return launch(dim3{2}, dim3{64}, 1, [=] {\n'
                   '  if (!skip || threadIdx.x < 32) __syncthreads(); }); }\n')  # fmt: skip
    r = subprocess.run([cxx, "-std=c++20", "-pthread", "-shared", "-fPIC", "-DBARRIER_SECONDS=0.5",
                        "-I", os.path.join(ROOT, "tests"), str(src), "-o", str(lib)], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    run = ctypes.CDLL(str(lib)).run
    assert run(0) == 0 and run(1) == 1


# ---------------------------------------------------------------------------------------
# the other kernels: each launcher and kernel on the host against its NumPy reference


def test_bias_act_forward_and_act_backward(host_kernels):
    """Every activation, float32 and float64 (bf16 for relu: exact), odd shapes so the
    bias index (i % n_cols) and the grid-stride loop are exercised: 481 elements (one
    element a thread) and 26 039, more than the 8192 threads of the emulator's grid
    (32 blocks of 256) take in a pass, so each thread takes ELEM_UNROLL elements a pass
    and the last pass's fourth element runs out (common.cuh GRID_STRIDE_UNROLLED). The
    activation math itself is checked bit-close on the host by test_kernels_cpu; here it
    is the kernels' indexing and in-place handling: a few roundings apart at most, of the
    terms' own size, 16 eps (|result| + |z|) forward and 16 eps (|result| + |d| (1 + |z|))
    backward: the device's exp and tanh differ from NumPy's by ulps of intermediates as
    large as |z|, and gelu_tanh's 0.5 z (1 + tanh u) cancels far below them in its tail."""

    def assert_close(dev, ref, scale, eps, what):
        bad = ~(np.abs(dev.astype(np.float64) - ref) <= 16 * eps * (np.abs(ref) + scale))
        assert not bad.any(), (what, dev[bad][:4], ref[bad][:4])

    from gpubp import precision as PR
    from gpubp.activations import ACTIVATIONS, make_activation

    gpu = EmulatedGpu(host_kernels)
    rng = np.random.default_rng(4)
    for name, dtype, rows in itertools.product(ACTIVATIONS, (np.float32, np.float64), (37, 2003)):
        act = make_activation(name)
        eps = float(np.finfo(dtype).eps)
        z, b = rng.normal(scale=2, size=(rows, 13)).astype(dtype), rng.normal(size=13).astype(dtype)
        z_ref, a_ref = z.copy(), np.empty_like(z)
        numpy_ops.bias_act_forward(z_ref, b, act, a_ref)
        z_dev, a_dev = z.copy(), np.full_like(z, np.nan)
        gpu.be.bias_act_forward(z_dev, b, act, a_dev)
        np.testing.assert_allclose(z_dev, z_ref, rtol=eps, atol=0, err_msg=name)  # one add: exact
        assert_close(a_dev, a_ref, np.abs(z_ref), eps, (name, dtype, rows, "forward"))
        d = rng.normal(size=z.shape).astype(dtype)
        saved = z_ref if act.info.saves == "input" else a_ref
        out_ref, out_dev = np.empty_like(d), np.full_like(d, np.nan)
        numpy_ops.act_backward(d, saved, act, out_ref)
        gpu.be.act_backward(d, saved, act, out_dev)
        assert_close(out_dev, out_ref, np.abs(d) * (1 + np.abs(z_ref)), eps, (name, dtype, rows, "backward"))
    relu = make_activation("relu")
    z32, b = rng.normal(size=(19, 7)).astype(np.float32), rng.normal(size=7).astype(np.float32)
    z16 = PR.bf16_bits(z32)  # bf16 storage: its bit patterns
    a_ref, a_dev = np.empty_like(z16), np.full_like(z16, 0xFFFF)
    numpy_ops.bias_act_forward(z16.copy(), b, relu, a_ref)
    gpu.be.bias_act_forward(z16.copy(), b, relu, a_dev)
    assert np.array_equal(a_dev, a_ref)  # z + b in float, max(., 0), rounded once: bit for bit


def test_gather_windows_moves_the_rows_bytes_in_the_widest_word_that_fits(host_kernels):
    """A batch's rows perm[start .. start + n) of one or two splits (gather.cu), each case
    reaching one word size: the widest of 16, 8, 4, 2, 1 bytes that divides both pairs' row
    bytes and their four addresses (a split that starts one element into its buffer takes a
    narrower one). Rows past what the emulator's 8192 threads take in a pass run several
    passes, the last one short. A copy: the outputs are the NumPy reference's bytes, NaN
    payloads and all (each first split's first value is all one bits: a NaN where it is a
    float)."""
    from gpubp import precision as PR

    gpu = EmulatedGpu(host_kernels)
    rng = np.random.default_rng(11)

    def split(rows, tail, dtype, offset=0):
        size = rows * int(np.prod(tail)) + offset
        if np.dtype(dtype).kind == "f":
            a = rng.normal(size=size).astype(dtype)
        else:
            a = rng.integers(-100, 100, size=size).astype(dtype)
        return a[offset:].reshape((rows, *tail))

    cases = [  # (word, pairs of (row shape, dtype, offset into the buffer))
        (16, [((64,), np.float32, 0), ((64,), np.float32, 0)]),  # narrow: 256-byte rows
        (16, [((64,), np.float32, 0)]),  # one pair
        (8, [((6,), np.float32, 0), ((2,), np.float64, 0)]),  # 24- and 16-byte rows
        (4, [((64,), np.float32, 0), ((), np.int32, 0)]),  # tiny: features and labels
        (4, [((64,), np.float32, 1), ((64,), np.float32, 0)]),  # a split one float into its buffer
        (2, [((3,), PR.BF16, 0), ((5,), PR.BF16, 0)]),  # bf16 rows of odd widths (6 and 10 bytes)
        (1, [((7,), np.int8, 0), ((1,), np.float32, 0)]),  # 7-byte rows
        (4, [((), np.int32, 0)]),  # labels alone
        (8, [((3,), np.float64, 0), ((0,), np.float64, 0)]),  # a pair with no columns: the other alone
    ]
    for word, spec in cases:
        for m, n in ((50, 37), (1200, 1100)):
            srcs = [split(m, tail, dt, off) for tail, dt, off in spec]
            srcs[0].reshape(-1)[:1].view(np.uint8)[:] = 0xFF
            perm = rng.permutation(m + 40).astype(np.int64) % m
            start = np.array(rng.integers(0, 41), np.int64)
            refs = numpy_ops.gather_windows(srcs, perm, start, [np.empty((n, *s.shape[1:]), s.dtype) for s in srcs])
            outs = [np.full((n, *s.shape[1:]), np.nan if s.dtype.kind == "f" else 0x55, s.dtype) for s in srcs]
            gpu.launches.clear()
            assert gpu.be.gather_windows(srcs, perm, start, outs) is outs
            assert gpu.launches == [f"gather_windows_w{word}"], (spec, gpu.launches)
            for out, ref in zip(outs, refs):
                assert out.tobytes() == ref.tobytes(), (spec, m, n)


def test_a_rounded_gather_is_the_gather_then_the_cast(host_kernels):
    """The step's gather for a bf16 or fp16 model (gather.cu's _w4_bf16, _w4_f16): float32
    rows of x into the 16-bit storage, rounded as they move, and the other pair's 4-byte
    words copied: the bytes of numpy_ops' gather then cast (the step's way before), with
    values that round both ways, ties (to even), NaN, infinities, float32 subnormals and
    fp16's overflow, over one pass and several. What it refuses: another pair whose rows
    are not 4-byte words, a float64 x into 16 bits."""
    from gpubp import precision as PR

    gpu = EmulatedGpu(host_kernels)
    rng = np.random.default_rng(12)
    special = np.array([1 + 2.0**-8, 1 + 3 * 2.0**-8, 1 + 2.0**-11, 1 + 3 * 2.0**-11, np.nan, -np.inf, 1e-40, -3e-39,
                        70000.0, 65519.0, 65520.0, -0.0], np.float32)  # fmt: skip
    for low, suffix in ((PR.BF16, "bf16"), (PR.F16, "f16")):
        for m, n, k in ((50, 37, 7), (1200, 1100, 9)):
            x = rng.normal(size=(m, k)).astype(np.float32)
            x.reshape(-1)[: special.size] = special
            perm = rng.permutation(m + 40).astype(np.int64) % m
            start = np.array(rng.integers(0, 41), np.int64)
            others = [(), (rng.integers(0, 9, m).astype(np.int32),), (rng.normal(size=(m, 3)).astype(np.float32),),
                      (rng.normal(size=(m, 2)),)]  # fmt: skip
            for other in others:
                srcs = (x, *other)
                outs_of = [low, *(o.dtype for o in other)]
                refs = numpy_ops.gather_windows(
                    srcs, perm, start, [np.empty((n, *s.shape[1:]), d) for s, d in zip(srcs, outs_of)]
                )
                outs = [np.full((n, *s.shape[1:]), 0x55, d) for s, d in zip(srcs, outs_of)]
                gpu.launches.clear()
                assert gpu.be.gather_windows(srcs, perm, start, outs) is outs
                assert gpu.launches == [f"gather_windows_w4_{suffix}"]
                for out, ref in zip(outs, refs):
                    assert out.tobytes() == ref.tobytes(), (suffix, m, n, len(other))
                want = np.empty((n, k), low)
                numpy_ops.cast(x[perm[int(start) : int(start) + n]], want)  # (the reference is the cast's bits)
                assert refs[0].tobytes() == want.tobytes()
    x, perm, start = np.zeros((5, 2), np.float32), np.arange(5, dtype=np.int64), np.array(0, np.int64)
    with pytest.raises(ValueError, match="4-byte words"):
        gpu.be.gather_windows((x, np.zeros((5, 3), np.int8)), perm, start, (np.empty((5, 2), PR.BF16),
                                                                             np.empty((5, 3), np.int8)))  # fmt: skip
    with pytest.raises(TypeError, match="differ"):
        gpu.be.gather_windows((x.astype(np.float64),), perm, start, (np.empty((5, 2), PR.BF16),))


def test_bias_grad_over_row_chunks(host_kernels):
    """Column sums with (32, 8) blocks over 1 to 19 row chunks (a 2-D grid), the chunks
    summed in order by the last block (one launch, up to 256 columns) or by the finishing
    kernel (more columns: two launches)."""
    gpu = EmulatedGpu(host_kernels)
    rng = np.random.default_rng(5)
    for dtype in (np.float32, np.float64):
        sfx = "f32" if dtype == np.float32 else "f64"
        for n, m, launches in [(1, 1, 1), (300, 70, 1), (2049, 3, 1), (5000, 40, 1), (600, 300, 2)]:
            d = rng.normal(size=(n, m)).astype(dtype)
            out = np.full(m, np.nan, dtype)
            gpu.launches.clear()
            gpu.be.bias_grad(d, out)
            assert gpu.launches == [f"bias_grad_partial_{sfx}", f"bias_grad_finish_{sfx}"][:launches], (n, m)
            ref = d.astype(np.float64).sum(0)
            bound = 2 * n * float(np.finfo(dtype).eps) * np.abs(d).astype(np.float64).sum(0)
            assert (np.abs(out - ref) <= bound).all(), (n, m)


def test_act_backward_bias_grad_is_the_two_kernels_bitwise(host_kernels):
    """The one-pass D' and column sums (reduce.cu's act_backward_bias_grad_partial) against
    act_backward then bias_grad, byte for byte, run on the host: the GPU test's own check
    (tests/test_gpu.py) over one chunk, several (the last block finishes) and more than
    256 columns (the finishing kernel)."""
    from .test_gpu import check_act_backward_bias_grad

    gpu = EmulatedGpu(host_kernels)
    check_act_backward_bias_grad(gpu.be, [(1, 1), (37, 13), (2049, 3), (600, 300)])
    assert "act_backward_bias_grad_partial_f32" in gpu.launches and "bias_grad_finish_f32" in gpu.launches


def test_the_layer_kernels_are_the_products_bias_and_activation(host_kernels, monkeypatch):
    """A narrow layer's forward and backward, one kernel each (layer.cu), run on the host:
    the GPU tests' own checks (tests/test_gpu.py) over one element, odd widths, k in two
    stages (the second partial), several row tiles with a partial one, and, with the
    backward's grid cut to 3 blocks, blocks that take several tiles (the next tile's loads
    in flight during a tile's sums) and shares summed over blocks; every activation on the
    small shapes. The launchers' block tiles are the kernel's."""
    import re

    from gpubp.backend import cupy_backend as C

    from .test_gpu import (
        check_gemm_bias_act,
        check_layer_backward,
        check_layer_backward_primes_below,
        check_layer_windows,
    )

    source = kernels.read_source("layer.cu")
    define = {name: int(v) for name, v in re.findall(r"#define (LAYER_\w+) (\d+)", source)}
    # 16 x 16 threads, each TM rows by TN columns (forward); BR rows a tile, up to BW wide (backward)
    assert C.LAYER_THREADS == define["LAYER_THREADS"] == 16 * 16
    assert (C.LAYER_ROWS, C.LAYER_COLS) == (16 * define["LAYER_TM"], 16 * define["LAYER_TN"])
    assert (C.LAYER_BACK_ROWS, C.LAYER_MAX_WIDTH) == (define["LAYER_BR"], define["LAYER_BW"])
    assert C.LAYER_MAX_WIDTH <= C.LAYER_COLS
    gpu = EmulatedGpu(host_kernels)
    check_gemm_bias_act(gpu.be, [(1, 1, 1), (37, 3, 10)])
    check_gemm_bias_act(gpu.be, [(300, 60, 64), (20, 64, 33)], ("relu", "gelu"))
    check_layer_backward(gpu.be, [(1, 1, 1), (37, 3, 10)])
    monkeypatch.setattr(C, "LAYER_MAX_BLOCKS", 3)
    check_layer_backward(gpu.be, [(300, 64, 64), (170, 33, 7)], ("relu", "identity", "gelu"))
    check_layer_windows(gpu.be, [(170, 33, 7)])  # (the first layer's kernels on a window of a split)
    check_layer_backward_primes_below(gpu.be, [(170, 33, 7)])  # (E as the layer below's D')
    assert set(gpu.launches) >= {"layer_forward_f32", "layer_backward_f32", "sum_shares_f32", "layer_forward_rows_f32",
                                 "layer_backward_rows_f32"}  # fmt: skip


def test_the_bf16_layer_kernels_are_the_products_on_the_tensor_cores(host_kernels, monkeypatch):
    """layer_tc.cu's bf16 layer kernels run on the host (the mma's fragments exchanged by
    shuffles): the GPU test's own checks (tests/test_gpu.py) over one element, odd widths
    (K and N padded to whole mma tiles), several forward row tiles with a partial one, and,
    with the backward's grid cut to 3 blocks, blocks that take several tiles and shares
    summed over blocks; every activation on the small shapes; a window of a float32 split
    as its rows gathered and rounded. Its tiles are layer.cu's, so the launchers' grids
    (and the model's shares) serve both."""
    import re

    from gpubp.backend import cupy_backend as C

    from .test_gpu import check_layer_bf16, check_layer_windows

    define = {name: int(v) for name, v in re.findall(r"#define (TC_\w+) (\d+)", kernels.read_source("layer_tc.cu"))}
    assert (C.LAYER_THREADS, C.LAYER_ROWS, C.LAYER_BACK_ROWS, C.LAYER_MAX_WIDTH) == (
        define["TC_THREADS"], define["TC_FWD_ROWS"], define["TC_BACK_ROWS"], define["TC_W"])  # fmt: skip
    gpu = EmulatedGpu(host_kernels)
    check_layer_bf16(gpu.be, [(1, 1, 1), (37, 3, 10)])
    monkeypatch.setattr(C, "LAYER_MAX_BLOCKS", 3)
    check_layer_bf16(gpu.be, [(300, 64, 64), (170, 33, 7)], ("relu", "identity", "gelu"))
    check_layer_windows(gpu.be, [(170, 33, 7)], low=True)  # (a window of a float32 split, rounded as loaded)
    assert {"layer_forward_bf16", "layer_backward_bf16", "sum_shares_f32", "layer_forward_rows_bf16",
            "layer_backward_rows_bf16"} <= set(gpu.launches)  # fmt: skip


def test_the_layer_launchers_refuse_overlaps_and_take_an_empty_batch(host_kernels):
    """An output that overlaps an input another block may still read is refused (one
    line naming them); an empty batch launches nothing, and its gradient is 0."""
    from gpubp.activations import make_activation

    gpu, relu, f32 = EmulatedGpu(host_kernels), make_activation("relu"), np.float32
    buf = np.zeros(64, f32)
    x, w, b = buf[:12].reshape(4, 3), np.ones((3, 4), f32), np.ones(4, f32)
    with pytest.raises(ValueError, match="out overlaps a, b or bias"):
        gpu.be.gemm_bias_act(x, w, b, relu, buf[10:26].reshape(4, 4))
    d, wd = np.ones((4, 4), f32), buf[20:32].reshape(3, 4)
    with pytest.raises(ValueError, match="e overlaps d, saved, x or w"):
        gpu.be.layer_backward(d, d, x, wd, relu, np.zeros(16, f32), buf[24:36].reshape(4, 3))
    empty, grad = np.zeros((0, 3), f32), np.full(16, np.nan, f32)
    assert gpu.be.gemm_bias_act(empty, w, b, relu, np.zeros((0, 4), f32)) is True
    assert gpu.be.layer_backward(np.zeros((0, 4), f32), np.zeros((0, 4), f32), empty, w, relu, grad) is True
    assert gpu.launches == [] and not grad.any()


def test_the_layer_timing_script_runs_every_part(host_kernels, capsys):
    """tests/layer_timing.py (a GPU-visit aid) on the host-run kernels, at a small shape:
    every part runs (a visit's device time is too short for a script that fails)."""
    from gpubp.backend import NumpyBackend, numpy_ops

    from . import layer_timing

    gpu = EmulatedGpu(host_kernels)
    be = gpu.be
    be.gemm, be.timer, be.describe = numpy_ops.gemm, NumpyBackend().timer, lambda: "host-run kernels"
    for op in ("gemm_bias_relu", "gemm_bias_grad", "gemm_drelu_bias_grad"):  # (cuBLASLt's: the references)
        setattr(be, op, getattr(numpy_ops, op))
    layer_timing.main(be, shape=(40, 8, 8), grids=(1, 2), reps=1)
    out = capsys.readouterr().out
    assert "failed" not in out and out.count("\n") == 2 * (1 + 4 + 2), out
    for name in ("layer_backward_f32", "layer_forward_f32", "layer_backward_bf16", "layer_forward_bf16"):
        assert gpu.launches.count(name) > 0, name


def test_a_model_runs_its_narrow_float32_layers_in_one_kernel(host_kernels):
    """MLP on a backend that has layer.cu (the NumPy backend plus the host-run kernel's
    launchers): each layer of at most LAYER_MAX_WIDTH inputs and outputs runs its forward as
    one launch (z kept for GELU's f') and its backward as one (plus the sum of its shares),
    the others gemm and bias_act_forward, act_backward_bias_grad and gemm.
    Loss and gradients against the NumPy model's, which sums in another order: per layer a
    product's rounding of at most 2 T eps relative (T <= 150 terms here: 130 inputs, 150
    rows), carried through L = 4 layers: 2 L T eps, norm-wise. The same with the input's
    gradient (layer 0's D' W^T from the kernel) and with a residual layer (its forward in
    the kernel, its backward the separate ops: the skip's D adds to D' W^T). The batch as
    a window of a split (the training step's): the same bits. Turned off (gemm_epilogues
    False, or TF32): no launch, and the NumPy model's bits."""
    from gpubp.backend import NumpyBackend
    from gpubp.model import MLP

    gpu = EmulatedGpu(host_kernels)
    be = NumpyBackend()
    be.layer_fits, be.gemm_bias_act, be.layer_backward = gpu.be.layer_fits, gpu.be.gemm_bias_act, gpu.be.layer_backward
    sizes = [6, 40, 130, 40, 3]  # 6 -> 40 and 40 -> 3 fit; 40 -> 130 (outputs) and 130 -> 40 (inputs) do not
    rng = np.random.default_rng(9)
    x, y = rng.normal(size=(150, 6)), rng.integers(0, 3, 150)
    kw = dict(activation="gelu", loss="softmax_cross_entropy", seed=4)
    want = MLP(sizes, backend=NumpyBackend(), **kw).loss_and_grads(x, y)
    model = MLP(sizes, backend=be, **kw)
    assert model.fuses_products
    got = model.loss_and_grads(x, y)
    # forward: layers 0 and 3; backward: layer 3 (D' W^T carried down), then layer 0 (none)
    assert gpu.launches == ["layer_forward_f32"] * 2 + ["layer_backward_f32", "sum_shares_f32"] * 2
    tol = 2 * 4 * 150 * float(np.finfo(np.float32).eps)
    assert abs(got[0] - want[0]) <= tol * abs(want[0])
    for g, w in zip(got[1], want[1]):
        assert np.linalg.norm(g - w) <= tol * np.linalg.norm(w)
    assert any(not np.array_equal(g, w) for g, w in zip(got[1], want[1]))  # another order of sums: it did run
    # the training step's batch read where it lies: x and the labels a window of a split
    # (the first layer's kernels and the loss): the bits of the gathered batch
    assert model.takes_input_window()
    got_grads = [g.copy() for g in got[1]]  # (loss_and_grads gives the model's own buffers)
    perm, start = rng.permutation(400).astype(np.int64), np.array(123, np.int64)
    xs, ys = np.full((400, 6), np.nan, np.float32), np.full(400, 7, np.int32)
    xs[perm[123:273]], ys[perm[123:273]] = model.as_input(x), model.as_target(y, 150)
    gpu.launches.clear()
    loss_w = float(model.forward_backward(xs, ys, target_window=(perm, start), x_window=(perm, start, 150)))
    assert gpu.launches[:1] == ["layer_forward_rows_f32"] and gpu.launches[-2:] == ["layer_backward_rows_f32",
                                                                                       "sum_shares_f32"]  # fmt: skip
    assert loss_w == got[0] and all(np.array_equal(g, w) for g, w in zip(model.grads, got_grads))
    for sizes_r, residual in ((sizes, False), ([6, 40, 40, 3], True)):
        gpu.launches.clear()
        ref = MLP(sizes_r, backend=NumpyBackend(), residual=residual, **kw)
        mine = MLP(sizes_r, backend=be, residual=residual, **kw)
        dx_ref, dx = ref.input_grad(x, y), mine.input_grad(x, y)
        assert np.linalg.norm(dx - dx_ref) <= tol * np.linalg.norm(dx_ref) and not np.array_equal(dx, dx_ref)
        assert all(np.linalg.norm(g - w) <= tol * np.linalg.norm(w) for g, w in zip(mine.grads, ref.grads))
        # input_grad: layer 0's backward carries D' W_0^T too; residual: layer 1 (40 -> 40)
        # runs its forward in the kernel, its backward as the separate ops
        assert gpu.launches.count("layer_backward_f32") == 2
        assert gpu.launches.count("layer_forward_f32") == (3 if residual else 2)
    gpu.launches.clear()
    for off in (MLP(sizes, backend=be, gemm_epilogues=False, **kw), MLP(sizes, backend=be, dtype="tf32", **kw)):
        assert not off.fuses_products
        ref = MLP(sizes, backend=NumpyBackend(), dtype=off.precision.name, **kw).loss_and_grads(x, y)
        loss, grads = off.loss_and_grads(x, y)
        assert loss == ref[0] and all(np.array_equal(g, w) for g, w in zip(grads, ref[1]))
    assert gpu.launches == []


def test_a_bf16_model_runs_its_narrow_layers_on_the_tensor_cores(host_kernels):
    """A bf16 MLP on a backend that has layer_tc.cu (the NumPy backend plus the host-run
    kernels' launchers), under "auto": each layer of at most LAYER_MAX_WIDTH inputs and
    outputs runs forward and backward as one launch each (bf16 storage, float32 sums and
    gradient), the others the separate ops. Loss and gradients against the NumPy bf16
    model's, which rounds each product before its bias and activation (the kernels round
    once): tests/test_epilogues.py's bound for fused against unfused bf16 products,
    2 sqrt(6 L) u relative (u = 2^-8, L = 4 layers). Every layer in the kernels
    (keep_shares, the training step's): the float32 shares summed by the guard give the
    per-layer sums' bits. gemm_epilogues True (cuBLASLt's fused products) or False: no
    launch."""
    from gpubp.backend import NumpyBackend
    from gpubp.model import MLP

    gpu = EmulatedGpu(host_kernels)
    be = NumpyBackend()
    for name in ("layer_fits", "gemm_bias_act", "layer_backward", "layer_share_rows"):
        setattr(be, name, getattr(gpu.be, name))
    sizes = [6, 40, 130, 40, 3]  # 6 -> 40 and 40 -> 3 fit; 40 -> 130 and 130 -> 40 do not
    rng = np.random.default_rng(13)
    x, y = rng.normal(size=(150, 6)), rng.integers(0, 3, 150)
    kw = dict(dtype="bf16", loss="softmax_cross_entropy", seed=4)
    want = MLP(sizes, backend=NumpyBackend(), **kw).loss_and_grads(x, y)
    model = MLP(sizes, backend=be, **kw)
    assert model.fuses_products and model.takes_input_window()  # (its first layer reads a float32 window)
    got = model.loss_and_grads(x, y)
    assert gpu.launches == ["layer_forward_bf16"] * 2 + ["layer_backward_bf16", "sum_shares_f32"] * 2
    rtol = 2 * np.sqrt(6 * 4) * 2.0**-8
    assert abs(got[0] - want[0]) <= rtol * abs(want[0])
    for g, w in zip(got[1], want[1]):
        assert np.linalg.norm(g - w) <= rtol * np.linalg.norm(w)
    assert any(not np.array_equal(g, w) for g, w in zip(got[1], want[1]))  # it did run
    # every layer in the kernels: the shares (float32) left to the guard, then summed by it
    narrow = MLP([6, 40, 33, 3], backend=be, activation="tanh", **kw)
    xb, yb = narrow.as_input(x), narrow.as_target(y, 150)
    narrow.forward_backward(xb, yb)
    per_layer = narrow.flat_grads.copy()
    gpu.launches.clear()
    narrow.forward_backward(xb, yb, keep_shares=True)
    assert narrow.grad_shares.dtype == np.float32 and narrow.grad_shares.shape == (5, per_layer.size)
    assert "sum_shares_f32" not in gpu.launches
    f32 = np.float32
    state = [np.array(-1, np.int64), np.array(False), np.zeros((), f32), np.zeros((), f32)]
    gpu.be.step_guard_norm(np.zeros((), f32), narrow.flat_grads, np.zeros((), f32), 0, 0.0, *state,
                           shares=narrow.grad_shares)  # fmt: skip
    assert narrow.flat_grads.tobytes() == per_layer.tobytes()
    gpu.launches.clear()
    for setting in (True, False):
        model = MLP(sizes, backend=be, gemm_epilogues=setting, **kw)
        model.loss_and_grads(x, y)
    assert gpu.launches == []


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_a_layers_kernel_writes_the_dprime_of_the_layer_below(host_kernels, activation, monkeypatch):
    """A model whose layers all run in layer.cu with an activation whose f' reads its
    output: each layer's backward kernel writes the layer below's D' = (D' W^T) * f'(x)
    (e_act), and the layer below's kernel reads no saved output (identity kind). The loss
    and every gradient byte for byte those of the model without (each kernel's E, then
    its own D'), and of the input's gradient; not for GELU (f' reads z)."""
    from gpubp.activations import make_activation
    from gpubp.backend import NumpyBackend
    from gpubp.model import MLP

    kinds = []  # each layer_backward launch's (kind, e_kind)

    class Spy(EmulatedGpu):
        def _launch(self, name, grid, block, args):
            if name == "layer_backward_f32":
                arg = {pname: a for (_, _, pname), a in zip(kernel_params(self.files[name], name), args)}
                kinds.append((int(arg["kind"]), int(arg["e_kind"])))
            return super()._launch(name, grid, block, args)

    gpu = Spy(host_kernels)
    be = NumpyBackend()
    be.layer_fits, be.gemm_bias_act, be.layer_backward = gpu.be.layer_fits, gpu.be.gemm_bias_act, gpu.be.layer_backward
    sizes = [6, 40, 33, 3]
    rng = np.random.default_rng(11)
    x, y = rng.normal(size=(150, 6)), rng.normal(size=(150, 3))
    runs = []
    for primes in (True, False):
        kinds.clear()
        with monkeypatch.context() as m:
            if not primes:
                m.setattr(MLP, "_primes_below", lambda self, k: False)
            model = MLP(sizes, backend=be, activation=activation, loss="mse", seed=4)
            loss, grads = model.loss_and_grads(x, y)
            runs.append((loss, [g.copy() for g in grads], model.input_grad(x, y)))
            kid = make_activation(activation).info.kernel_id
            # the output layer (identity) then the hidden ones, top down (then input_grad's pass)
            want = [(0, kid), (0, kid), (0, 0)] if primes else [(0, 0), (kid, 0), (kid, 0)]
            assert kinds[:3] == want, (primes, kinds)
    assert runs[0][0] == runs[1][0]
    assert all(np.array_equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert np.array_equal(runs[0][2], runs[1][2])
    gelu = MLP(sizes, backend=be, activation="gelu", loss="mse", seed=4)
    kinds.clear()
    gelu.loss_and_grads(x, y)
    assert [e for _, e in kinds] == [0, 0, 0]


def test_a_models_layer_shares_go_to_the_guard_unsummed(host_kernels):
    """Every layer in layer.cu and keep_shares (the training step's): each layer's backward
    writes its blocks' shares into one (S, P) buffer at its own columns and sums nothing;
    the guard's norm launch (step_guard_norm, shares) then gives the gradient of the
    per-layer sums byte for byte (the same sum of shares in block order), S = 5 shares
    here (150 rows, tiles of 32), and the same squared norm."""
    from gpubp.backend import NumpyBackend
    from gpubp.model import MLP

    gpu = EmulatedGpu(host_kernels)
    be = NumpyBackend()
    for name in ("layer_fits", "gemm_bias_act", "layer_backward", "layer_share_rows"):
        setattr(be, name, getattr(gpu.be, name))
    rng = np.random.default_rng(12)
    x, y = rng.normal(size=(150, 6)), rng.normal(size=(150, 3))
    model = MLP([6, 40, 33, 3], backend=be, activation="relu", loss="mse", seed=4)
    xb, yb = model.as_input(x), model.as_target(y, 150)
    model.forward_backward(xb, yb)
    want = model.flat_grads.copy()
    assert model.grad_shares is None
    gpu.launches.clear()
    model.flat_grads[...] = np.nan
    model.forward_backward(xb, yb, keep_shares=True)
    shares = model.grad_shares
    assert shares.shape == (5, want.size) and "sum_shares_f32" not in gpu.launches
    assert np.isnan(model.flat_grads).all()  # (left for the guard)
    f32 = np.float32
    state = [np.array(-1, np.int64), np.array(False), np.zeros((), f32), np.zeros((), f32)]
    sq = np.zeros((), f32)
    gpu.be.step_guard_norm(np.zeros((), f32), model.flat_grads, sq, 0, 0.0, *state, shares=shares)
    assert model.flat_grads.tobytes() == want.tobytes()
    sq_want = np.zeros((), f32)
    gpu.be.step_guard_norm(np.zeros((), f32), want.copy(), sq_want, 0, 0.0, *[a.copy() for a in state])
    assert sq.tobytes() == sq_want.tobytes()
    # a layer that runs another way (130 outputs): the gradient goes to self.grads as before
    wide = MLP([6, 130, 3], backend=be, activation="relu", loss="mse", seed=4)
    wide.forward_backward(wide.as_input(x), wide.as_target(y, 150), keep_shares=True)
    assert wide.grad_shares is None


def test_bias_grads_last_block_finish_has_the_finishing_kernels_bits(host_kernels):
    """The one-launch column sums (the last block adds the chunks) against the same partial
    kernel with finish = 0 followed by bias_grad_finish: byte for byte, float32 and
    float64, 8 and 19 row chunks."""
    gpu = EmulatedGpu(host_kernels)
    rng = np.random.default_rng(11)
    for dtype in (np.float32, np.float64):
        sfx = "f32" if dtype == np.float32 else "f64"
        for n, m, chunks in [(2049, 3, 8), (5000, 40, 19)]:
            d = rng.normal(size=(n, m)).astype(dtype)
            one = np.full(m, np.nan, dtype)
            gpu.be.bias_grad(d, one)
            rows = -(-n // chunks)
            partial, two, count = np.full((chunks, m), np.nan, dtype), np.full(m, np.nan, dtype), np.zeros(1, np.uint32)
            i32 = np.int32
            gpu._launch(
                f"bias_grad_partial_{sfx}", (-(-m // 32), chunks), (32, 8),
                (d, partial, i32(n), i32(m), i32(rows), i32(0), count, two),
            )  # fmt: skip
            gpu._launch(f"bias_grad_finish_{sfx}", (1,), (256,), (partial, two, i32(chunks), i32(m)))
            assert one.tobytes() == two.tobytes(), (dtype, n, m)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_optimizer_updates(host_kernels, dtype):
    """sgd_step (momentum, dampening, nesterov, the first step) and adam_step (Adam and
    AdamW), with a gradient scale and the skip flag, against the reference: the same
    formulas, a few roundings apart (rtol 16 eps, atol 16 eps |p|max)."""
    gpu = EmulatedGpu(host_kernels)
    rng = np.random.default_rng(6)
    eps = float(np.finfo(dtype).eps)
    n = 1000
    scratch = np.empty((2, n), dtype)
    for skip in (False, True):
        skip_a = np.asarray(skip)
        for nesterov, first in [(False, True), (True, False), (False, False)]:
            p, g, buf = (rng.normal(size=n).astype(dtype) for _ in range(3))
            kw = dict(lr=0.1, momentum=0.9, dampening=0.2 * (not nesterov), nesterov=nesterov, weight_decay=0.01,
                      first_step=first, grad_scale=np.asarray(0.5, dtype), skip=skip_a)  # fmt: skip
            p_ref, buf_ref = p.copy(), buf.copy()
            numpy_ops.sgd_step(p_ref, g, buf_ref, scratch, **kw)
            gpu.be.sgd_step(p, g, buf, scratch, **kw)
            np.testing.assert_allclose(p, p_ref, rtol=16 * eps, atol=16 * eps * np.abs(p_ref).max())
            np.testing.assert_allclose(buf, buf_ref, rtol=16 * eps, atol=16 * eps * np.abs(buf_ref).max())
        for decoupled in (False, True):
            p, g = rng.normal(size=n).astype(dtype), rng.normal(size=n).astype(dtype)
            m, v = rng.normal(size=n).astype(dtype), rng.uniform(size=n).astype(dtype)
            kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=3, decoupled=decoupled,
                      grad_scale=np.asarray(2.0, dtype), skip=skip_a)  # fmt: skip
            refs = [a.copy() for a in (p, m, v)]
            numpy_ops.adam_step(refs[0], g, refs[1], refs[2], scratch, **kw)
            gpu.be.adam_step(p, g, m, v, scratch, **kw)
            for got, want in zip((p, m, v), refs):
                np.testing.assert_allclose(got, want, rtol=16 * eps, atol=16 * eps * np.abs(want).max())


@pytest.mark.parametrize("bias_corrected", [True, False])
def test_update_vectors_bitwise(host_kernels, bias_corrected):
    """fp16's per-update optimizer numbers from the device counters: the reference's bits
    (more models than the kernel's 32 threads; every third step skipped)."""
    gpu = EmulatedGpu(host_kernels)
    rng = np.random.default_rng(8)
    k, m = 9, 37
    rates = np.stack([rng.uniform(1e-6, 0.9, (2, m)) for _ in range(k)])
    counts = np.stack([rng.uniform(1e-3, 1.0, (2, m)) for _ in range(k)])
    rows = 3 if bias_corrected else 1
    ref = {n: np.zeros((), np.int64) for n in ("pos", "t0", "updates")}
    dev = {n: np.zeros((), np.int64) for n in ("pos", "t0", "updates")}
    vc, fc = np.zeros((rows, m, 1), np.float32), np.ones((), np.bool_)
    vg, fg = np.zeros((rows, m, 1), np.float32), np.zeros((), np.bool_)
    for j in range(k):
        skip = np.asarray(j % 3 == 2)
        ref["pos"][...] = dev["pos"][...] = j
        numpy_ops.update_vectors(rates, ref["pos"], counts, ref["t0"], ref["updates"], skip, vc, fc, bias_corrected)
        gpu.be.update_vectors(rates, dev["pos"], counts, dev["t0"], dev["updates"], skip.copy(), vg, fg,
                              bias_corrected)  # fmt: skip
        assert np.array_equal(vg, vc) and bool(fg) == bool(fc) and int(dev["updates"]) == int(ref["updates"]), j


@pytest.mark.parametrize("with_norm", [False, True])
def test_step_guard_scaled_follows_gradscaler(host_kernels, with_norm):
    """fp16's guard with dynamic loss scaling over a run: overflows halve the scale and
    count as skipped, finite steps grow it at the interval, a NaN loss stops the run;
    alone (given |g|^2), or in the launch that sums |g|^2 (step_guard_scaled_norm, 1 to 9
    blocks: g a vector of n equal values v with n v^2 about the step's |g|^2, v of 5
    significant bits, so that every partial sum of the squares (10 bits each, at most
    9000 of them: 24 bits) is exact in float32 and any summation order gives the same
    |g|^2: NumPy's pairwise sum, whose blocks follow the CPU's SIMD width, and the kernel's)."""
    gpu = EmulatedGpu(host_kernels)
    f32 = np.float32
    names = ("first_bad", "skip", "norm", "scale", "loss_scale", "good_steps", "skipped")
    init = [np.array(-1, np.int64), np.array(False), np.zeros((), f32), np.zeros((), f32), np.array(2.0**16, f32),
            np.zeros((), np.int64), np.zeros((), np.int64)]  # fmt: skip
    ref, dev = [a.copy() for a in init], [a.copy() for a in init]
    for step, (loss, sq) in enumerate([(0.5, 4e10), (0.5, np.inf), (0.5, 1e9), (0.5, 1e9), (0.5, 1e9),
                                       (np.nan, 1.0), (0.5, 1.0)]):  # fmt: skip
        if with_norm:  # n equal values v, n v^2 about sq, v rounded to 5 significant bits
            n = [4, 9000, 16, 1024, 4096, 64, 1][step]
            v = np.sqrt(np.float64(sq) / n)
            if np.isfinite(v):
                unit = 2.0 ** (np.floor(np.log2(v)) - 4)
                v = np.round(v / unit) * unit
            g = np.full(n, v, f32)
            sq_ref, sq_dev = np.zeros((), f32), np.zeros((), f32)
            numpy_ops.step_guard_scaled_norm(np.array(loss, f32), g, sq_ref, step, 1.0, *ref, interval=3)
            gpu.be.step_guard_scaled_norm(np.array(loss, f32), g, sq_dev, step, 1.0, *dev, interval=3)
            assert sq_dev.tobytes() == sq_ref.tobytes() and (not np.isfinite(v) or sq_ref == n * v * v), step
        else:
            args = (np.array(loss, f32), np.array(sq, f32), step, 1.0)
            numpy_ops.step_guard_scaled(*args, *ref, interval=3)
            gpu.be.step_guard_scaled(*args, *dev, interval=3)
        for name, got, want in zip(names, dev, ref):
            if name in ("norm", "scale"):  # a sqrt and a division or two: a few float32 roundings
                assert got == want or (np.isnan(got) and np.isnan(want)) or \
                    abs(float(got) - float(want)) <= 4e-7 * abs(float(want)), (step, name, got, want)  # fmt: skip
            else:
                assert got == want, (step, name, got, want)


def test_casts_and_the_16_bit_sum_are_bitwise(host_kernels):
    """float32 <-> bf16/fp16 (round to nearest even, special values included) and the
    residual sum in 16 bits: the reference's bits."""
    from gpubp import precision as PR

    gpu = EmulatedGpu(host_kernels)
    rng = np.random.default_rng(9)
    x = np.concatenate([rng.normal(scale=100, size=500), [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, 65504, 7e4]])
    x = x.astype(np.float32)
    for low in PR.LOW:
        ref, dev = np.empty(x.shape, low), np.empty(x.shape, low)
        numpy_ops.cast(x, ref)
        gpu.be.cast(x, dev)
        assert np.array_equal(ref.view(np.uint16), dev.view(np.uint16)), low
        back_ref, back_dev = np.empty_like(x), np.empty_like(x)
        numpy_ops.cast(ref, back_ref)
        gpu.be.cast(dev, back_dev)
        assert np.array_equal(back_ref.view(np.uint32), back_dev.view(np.uint32)), low
        s_ref, s_dev = np.empty_like(ref), np.empty_like(ref)
        numpy_ops.add(ref, ref[::-1].copy(), s_ref)
        gpu.be.add(ref, ref[::-1].copy(), s_dev)
        assert np.array_equal(s_ref.view(np.uint16), s_dev.view(np.uint16)), low


def test_step_guard_norm_batched_a_block_per_model(host_kernels):
    """A sweep's squared norms and verdicts in one launch, a block per model: the GPU
    test itself (tests/test_stack_gpu.py), on the host-run kernel."""
    from .test_stack_gpu import test_gpu_step_guard_norm_batched_matches_numpy as gpu_test

    gpu = EmulatedGpu(host_kernels)
    gpu_test(gpu.be)
    assert gpu.launches == ["step_guard_norm_batched_f32", "step_guard_norm_batched_f64"]


# The GPU tests of the reductions and guards, run as they are on the host-run kernels:
# minutes on two cores (up to 1024 emulated blocks), so only when asked:
#   GPUBP_EMULATE_GPU_TESTS=1 python -m pytest tests/test_kernels_emulated.py -k gpu_test
# (before a GPU visit: a GPU test that fails here is wrong before any GPU sees it).
GPU_TESTS = [
    ("test_gpu", "test_sum_squares", {"dtype": np.float32}),
    ("test_gpu", "test_sum_squares", {"dtype": np.float64}),
    ("test_gpu", "test_step_guard", {"dtype": np.float32}),
    ("test_gpu", "test_step_guard_norm", {"dtype": np.float32}),
    ("test_gpu", "test_step_guard_norm", {"dtype": np.float64}),
    ("test_gpu", "test_accuracy_count", {"dtype": np.float32}),
    ("test_precision_gpu", "test_step_guard_scaled_matches_the_reference", {}),
    ("test_precision_gpu", "test_step_guard_scaled_norm_matches_the_reference", {}),
    ("test_stack_gpu", "test_gpu_step_guard_norm_batched_matches_numpy", {}),
    ("test_step_gpu", "test_the_loss_reads_a_windows_targets_where_they_lie", {"name": "mse", "dtype": "bf16"}),
    ("test_step_gpu", "test_the_loss_reads_a_windows_targets_where_they_lie", {"name": "huber", "dtype": "float32"}),
]


@pytest.mark.skipif(os.environ.get("GPUBP_EMULATE_GPU_TESTS") != "1", reason="slow: GPUBP_EMULATE_GPU_TESTS=1")
@pytest.mark.parametrize("module, name, kwargs", GPU_TESTS, ids=[f"{m}.{n}" for m, n, _ in GPU_TESTS])
def test_gpu_test_on_the_host_kernels(host_kernels, module, name, kwargs):
    import importlib
    import inspect

    test = getattr(importlib.import_module(f"tests.{module}"), name)
    be = EmulatedGpu(host_kernels).be
    if "be" in inspect.signature(test).parameters:  # (its GPU backend an optional argument)
        test(be=be, **kwargs)
    else:
        test(be, **kwargs)
