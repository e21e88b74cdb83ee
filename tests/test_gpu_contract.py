"""What a GPU run cannot be asked to find, checked on the CPU: the arguments the GPU
backend hands CuPy's raw cuBLAS bindings match the bindings' real signatures, and the
GPU probe refuses a CuPy that cannot load its libraries.

The raw bindings (cupy_backends.cuda.libs.cublas, Cython) take alpha and beta as host
*addresses* (size_t). Cython turns a Python float handed to a size_t parameter into an
integer address without complaint, so a scalar-vs-pointer slip would pass every
CPU test and crash the first GPU run. The bindings' signatures are embedded in the
compiled module (Cython embedsignature); they are read from the file without importing
it, since importing it needs libcublas, which a CPU machine lacks.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import re
import types

import numpy as np
import pytest

from .conftest import run_cli
from .kernel_params import assert_launch_fits, kernel_params, numpy_backend_of_gpu


def binding_signatures(module: str, names) -> dict[str, list[tuple[str, str]]]:
    """name -> [(C type, parameter name)] from the signatures embedded in a Cython module."""
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:  # the parent package (cupy_backends) is absent: no CuPy at all
        spec = None
    if spec is None or not spec.origin:
        pytest.skip(f"{module} is not installed (pip install cupy-cuda13x to run this check)")
    with open(spec.origin, "rb") as f:
        blob = f.read().decode("latin-1")
    found = {}
    for name in names:
        match = re.search(rf"(?<![\w.]){name}\(([^()]*)\)", blob)
        assert match, f"{module}.{name}: no embedded signature found"
        params = [p.strip().rsplit(" ", 1) for p in match.group(1).split(",")]
        found[name] = [(t.strip(), n.strip()) for t, n in params]
    return found


class Recorder:
    """Stands in for the cublas binding module: records every call."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, args))


class FakeArray:
    """What the backend reads of a CuPy array: shape, dtype, data.ptr."""

    _next = 0x10000

    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, np.dtype(dtype)
        FakeArray._next += 0x1000
        self.data = type("Mem", (), {"ptr": FakeArray._next})()

    def fill(self, value):
        pass


_C_SCALAR = {"sgemv": ctypes.c_float, "dgemv": ctypes.c_double}
_COMPUTE_C = {68: ctypes.c_float, 77: ctypes.c_float, 70: ctypes.c_double}  # cublasComputeType_t


def recorded_calls():
    """Every raw cuBLAS call the backend makes for GEMM and both GEMV branches."""
    from gpubp.backend import cupy_backend

    be = cupy_backend.CupyBackend.__new__(cupy_backend.CupyBackend)
    be._cublas, be.handle, be.tf32 = Recorder(), 12345, False
    be._blas = be._cublas
    be._host_scalars = cupy_backend.host_scalars()
    be._check = lambda *args, **kwargs: None  # the fakes are not CuPy arrays
    expected = []
    for dtype in (np.float32, np.float64):
        for m, n, k in [(5, 6, 7), (1, 6, 7), (5, 1, 7), (1, 1, 3)]:
            for ta in (False, True):
                for tb in (False, True):
                    for beta in (0.0, 1.0):
                        a = FakeArray((k, m) if ta else (m, k), dtype)
                        b = FakeArray((n, k) if tb else (k, n), dtype)
                        be.gemm(a, b, FakeArray((m, n), dtype), trans_a=ta, trans_b=tb, beta=beta)
                        expected.append(beta)
    return be, be._cublas.calls, expected


def test_raw_cublas_calls_match_the_binding_signatures():
    be, calls, betas = recorded_calls()
    names = sorted({name for name, _ in calls})
    assert set(names) == {"gemmEx", "sgemv", "dgemv"}, names  # every path was taken
    sigs = binding_signatures("cupy_backends.cuda.libs.cublas", names)
    assert len(calls) == len(betas)
    for (name, args), beta in zip(calls, betas):
        params = sigs[name]
        assert len(args) == len(params), f"{name}: {len(args)} arguments for {params}"
        for arg, (ctype, pname) in zip(args, params):
            if ctype in ("int", "intptr_t", "size_t"):
                # Cython accepts a float for an integer parameter only by truncating or
                # (size_t) reinterpreting it: every integer parameter gets a real integer
                assert isinstance(arg, (int, np.integer)) and not isinstance(arg, bool), (
                    f"{name}({pname}: {ctype}) got {type(arg).__name__} {arg!r}"
                )
        scalar = _C_SCALAR.get(name) or _COMPUTE_C[args[[p for _, p in params].index("computeType")]]
        for pname, want in (("alpha", 1.0), ("beta", beta)):
            i = [p for _, p in params].index(pname)
            assert params[i][0] == "size_t", f"{name}.{pname} is {params[i][0]}: update the backend"
            # the address holds the scalar, in the precision the call computes in
            assert scalar.from_address(int(args[i])).value == want, f"{name}.{pname} does not point to {want}"


# ---------------------------------------------------------------- the GPU probe

BLOCK_CUBLAS = """
import sys, importlib.abc
class _NoCublas(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "cupy_backends.cuda.libs.cublas":
            raise ImportError("libcublas.so.13: cannot open shared object file (simulated by the test)")
sys.meta_path.insert(0, _NoCublas())
import cupy
cupy.cuda.runtime.getDeviceCount = lambda: 1  # a device answers
"""


@pytest.fixture
def cupy_without_cublas(tmp_path, monkeypatch):
    """A Python whose CuPy sees one device but cannot load cuBLAS."""
    pytest.importorskip("cupy")
    (tmp_path / "sitecustomize.py").write_text(BLOCK_CUBLAS)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return tmp_path


def test_probe_names_the_missing_library(cupy_without_cublas):
    for device in ("gpu", "auto"):
        quiet = ["--quiet"] if device == "gpu" else []  # the fallback note is a message: not with --quiet
        r = run_cli("train", "--config", "configs/spirals.toml", "--device", device, "--out",
                    str(cupy_without_cublas / device), *quiet, "--set", "train.epochs=1")  # fmt: skip
        if device == "gpu":
            assert r.returncode == 2, r.stderr
            assert r.stderr.strip().count("\n") == 0 and "cuBLAS" in r.stderr, r.stderr
            assert "Traceback" not in r.stderr
        else:  # falls back to the CPU with one line saying why, and trains
            assert r.returncode == 0, r.stderr
            notes = [line for line in r.stderr.splitlines() if "using the CPU" in line]
            assert len(notes) == 1 and "cuBLAS" in notes[0], r.stderr


def test_one_gpu_backend_per_device(monkeypatch):
    """Every model and command of a process shares one CupyBackend per device (its
    kernels compiled once, one cuBLAS handle), made on the device the process works on
    (a data-parallel rank's own GPU): a stand-in counts how many get built, and where."""
    from gpubp import backend as B
    from gpubp.backend import cupy_backend

    built = []

    class StandIn:
        def __init__(self, device_id=0):
            built.append(device_id)

    monkeypatch.setattr(B, "_GPU", {})
    monkeypatch.setattr(cupy_backend, "unavailable_reason", lambda: None)
    monkeypatch.setattr(cupy_backend, "CupyBackend", StandIn)
    device = [0]
    monkeypatch.setattr(cupy_backend, "current_device", lambda: device[0])
    first = B.get_backend("gpu")
    assert B.get_backend("gpu") is first and B.resolve_device("auto")[0] is first
    device[0] = 1  # a data-parallel rank that chose GPU 1 gets a backend of its own, on GPU 1
    second = B.get_backend("gpu")
    assert second is not first and B.get_backend("gpu") is second
    assert built == [0, 1]


def test_16bit_gemm_calls_gemmex_with_16bit_inputs_and_float_compute():
    """bf16/fp16 GEMMs: cublasGemmEx with A and B of CUDA_R_16BF (14) or CUDA_R_16F (2),
    C of the same type or CUDA_R_32F (0: the weight gradients), compute CUBLAS_COMPUTE_32F
    (68: float accumulation), alpha and beta host addresses of float32 values, every
    integer argument an int; never the float GEMV routines. tf32: compute 77."""
    from gpubp import precision as PR
    from gpubp.backend import cupy_backend

    be = cupy_backend.CupyBackend.__new__(cupy_backend.CupyBackend)
    be._cublas, be.handle, be.tf32 = Recorder(), 12345, False
    be._blas = be._cublas
    be._host_scalars = cupy_backend.host_scalars()
    be._check = lambda *args, **kwargs: None
    seen = []
    for low, code in ((PR.BF16, 14), (PR.F16, 2)):
        for out_dtype, out_code in ((low, code), (np.float32, 0)):
            for m, n, k in [(5, 6, 7), (1, 6, 7), (5, 1, 7)]:
                for beta in (0.0, 1.0):
                    be._cublas.calls.clear()
                    be.gemm(FakeArray((m, k), low), FakeArray((k, n), low), FakeArray((m, n), out_dtype), beta=beta)
                    ((name, args),) = be._cublas.calls
                    assert name == "gemmEx"
                    assert args[3:6] == (n, m, k)
                    assert (args[8], args[11], args[15], args[17]) == (code, code, out_code, 68)
                    assert ctypes.c_float.from_address(args[6]).value == 1.0
                    assert ctypes.c_float.from_address(args[13]).value == beta
                    assert all(isinstance(a, int) for a in args)
                    seen.append(out_code)
    assert set(seen) == {14, 2, 0}
    be._cublas.calls.clear()
    be.gemm(FakeArray((5, 7), np.float32), FakeArray((7, 6), np.float32), FakeArray((5, 6), np.float32), tf32=True)
    assert be._cublas.calls[0][1][17] == 77  # CUBLAS_COMPUTE_32F_FAST_TF32


# ---------------------------------------------------------------- CUDA graph capture


def test_capture_binds_cublas_to_its_stream_through_the_raw_binding():
    """The capturer points the cuBLAS handle at its stream with the raw setStream (before
    the capture begins) and puts the old stream back; the arguments fit the bindings."""
    from gpubp.backend import cupy_backend

    calls = []

    class Cublas:
        def getStream(self, *args):
            calls.append(("getStream", args))
            return 0

        def setStream(self, *args):
            calls.append(("setStream", args))

    be = cupy_backend.CupyBackend.__new__(cupy_backend.CupyBackend)
    be._cublas, be.handle = Cublas(), 12345
    cap = cupy_backend.CudaGraphCapturer.__new__(cupy_backend.CudaGraphCapturer)
    cap.backend = be
    previous = cap.bind_cublas(0x7F00)
    cap.bind_cublas(previous)
    assert calls == [("getStream", (12345,)), ("setStream", (12345, 0x7F00)), ("getStream", (12345,)),
                     ("setStream", (12345, 0))]  # fmt: skip
    sigs = binding_signatures("cupy_backends.cuda.libs.cublas", ["getStream", "setStream"])
    assert sigs == {"getStream": [("intptr_t", "handle")], "setStream": [("intptr_t", "handle"), ("size_t", "stream")]}
    for name, args in calls:
        assert len(args) == len(sigs[name])
        assert all(isinstance(a, int) and not isinstance(a, bool) for a in args), (name, args)


def test_cupy_offers_what_the_capturer_uses():
    """Stream capture, graph launch and a private memory pool, as CuPy 14 names them
    (read without a GPU: the classes import, nothing is created)."""
    cupy = pytest.importorskip("cupy")
    for name in ("begin_capture", "end_capture", "record", "wait_event", "__enter__"):
        assert hasattr(cupy.cuda.Stream, name), name
    from cupy.cuda.graph import Graph

    assert hasattr(Graph, "launch")
    assert callable(cupy.cuda.using_allocator) and hasattr(cupy.cuda.MemoryPool, "malloc")


def test_the_cublas_workspace_goes_through_ctypes_as_its_c_signature_says():
    """cublasSetWorkspace_v2(cublasHandle_t, void *workspace, size_t bytes) -> status: the
    ctypes declaration and the call (a stand-in library records it)."""
    from gpubp.backend.cupy_backend import cublas_set_workspace

    calls = []

    class Fn:
        def __call__(self, *args):
            calls.append((self.argtypes, self.restype, args))
            return self.status

    class Lib:
        cublasSetWorkspace_v2 = Fn()

    lib = Lib()
    lib.cublasSetWorkspace_v2.status = 0
    assert cublas_set_workspace(12345, 0x7000, 32 << 20, lib) is None
    assert calls == [([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t], ctypes.c_int, (12345, 0x7000, 32 << 20))]
    lib.cublasSetWorkspace_v2.status = 7
    assert cublas_set_workspace(1, 2, 3, lib) == "cublasSetWorkspace_v2 returned status 7"
    assert cublas_set_workspace(1, 2, 3, object()) == "libcublas has no cublasSetWorkspace_v2"
    # this machine has no libcublas loaded: a reason, not an error
    assert isinstance(cublas_set_workspace(1, 2, 3), (str, type(None)))


_CTYPE_OF = {"int": ctypes.c_int, "intptr_t": ctypes.c_void_p, "size_t": ctypes.c_void_p,
             "long long": ctypes.c_longlong, "int64_t": ctypes.c_longlong}  # fmt: skip


def test_direct_cublas_declares_what_cupys_bindings_take():
    """cublas_direct (cuBLAS inside a capture) is called with the arguments the backend
    hands CuPy's bindings: the same count, in the same order, each declared to ctypes as
    its C type (addresses and handles as pointers, 64-bit strides as long long)."""
    from gpubp.backend.cublas_direct import PROTOTYPES

    sigs = binding_signatures("cupy_backends.cuda.libs.cublas", list(PROTOTYPES))
    for name, (symbol, argtypes) in PROTOTYPES.items():
        params = sigs[name]
        assert len(argtypes) == len(params), f"{symbol}: {len(argtypes)} ctypes arguments for {params}"
        for have, (ctype, pname) in zip(argtypes, params):
            assert have is _CTYPE_OF[ctype], f"{symbol}({pname}: {ctype}) declared as {have.__name__}"


def test_direct_cublas_calls_the_c_symbols_and_raises_on_a_status():
    """Each routine calls its C symbol (a stand-in library records it) with the arguments
    as given; a nonzero cublasStatus_t raises, naming the symbol and the status."""
    from gpubp.backend import cublas_direct

    calls = []

    class Fn:
        status = 0

        def __call__(self, *args):
            calls.append((self.name, self.restype, args))
            return self.status

    class Lib:
        pass

    lib = Lib()
    for symbol, _ in cublas_direct.PROTOTYPES.values():
        fn = Fn()
        fn.name = symbol
        setattr(lib, symbol, fn)
    blas = cublas_direct.DirectCublas(lib)
    for name, (symbol, argtypes) in cublas_direct.PROTOTYPES.items():
        args = tuple(range(len(argtypes)))
        getattr(blas, name)(*args)
        assert calls[-1] == (symbol, ctypes.c_int, args)
        assert getattr(lib, symbol).argtypes == argtypes
    lib.cublasGemmEx.status = 13
    with pytest.raises(cublas_direct.CublasError, match="cublasGemmEx returned cuBLAS status 13"):
        blas.gemmEx(*range(19))
    del Lib, lib.cublasSgemv_v2
    with pytest.raises(cublas_direct.CublasError, match="libcublas has no cublasSgemv_v2"):
        cublas_direct.DirectCublas(lib)
    # this machine has no libcublas loaded: a reason, not an error
    direct, why = cublas_direct.direct_cublas()
    assert (direct is None) == isinstance(why, str)


def test_the_capture_calls_cublas_directly_and_gives_cupys_bindings_back():
    """Inside a warm-up or a capture the backend's routines are cublas_direct's (CuPy's
    bindings set the handle's stream before each call, and refuse while it captures);
    after it, and after a failure inside it, CuPy's again, with the handle's stream back."""
    from gpubp.backend import cupy_backend

    class FakeStream(contextlib.nullcontext):
        ptr = 0x7F00

    class FakeCupy:
        class cuda:  # noqa: N801 (CuPy's name)
            MemoryPool = type("MemoryPool", (), {"malloc": None})
            using_allocator = staticmethod(lambda malloc: contextlib.nullcontext())

    stream_calls = []

    class Cublas:
        getStream = staticmethod(lambda h: 0)
        setStream = staticmethod(lambda h, s: stream_calls.append(s))

    be = cupy_backend.CupyBackend.__new__(cupy_backend.CupyBackend)
    be._cupy, be.handle = FakeCupy(), 12345
    be._cublas = be._blas = Cublas()
    cap = cupy_backend.CudaGraphCapturer.__new__(cupy_backend.CudaGraphCapturer)
    cap.backend, cap.stream, cap.pools, cap.direct = be, FakeStream(), {}, object()
    cap.workspace = types.SimpleNamespace(data=types.SimpleNamespace(ptr=0x9000), nbytes=1 << 20)
    seen = []
    with cap._on_stream(64):
        seen.append(be._blas)
    assert seen == [cap.direct] and be._blas is be._cublas and stream_calls == [0x7F00, 0]
    with pytest.raises(RuntimeError), cap._on_stream(64):
        raise RuntimeError("a step that fails inside")
    assert be._blas is be._cublas and stream_calls[-1] == 0


def test_reductions_reuse_their_working_buffers():
    """Partial sums (sum_squares, the loss's mean) and their last-block counters are made
    once per grid and kept: a step allocates nothing, and a captured step's kernels write
    where the graph recorded. CuPy stand-in: empty() and zeros() are counted, the kernels
    are no-ops."""
    from gpubp.backend import cupy_backend

    made = []

    class FakeCupy:
        def empty(self, shape, dtype):
            made.append(("empty", shape, np.dtype(dtype)))
            return np.empty(shape, dtype)

        def zeros(self, shape, dtype):
            made.append(("zeros", shape, np.dtype(dtype)))
            return np.zeros(shape, dtype)

    be = cupy_backend.CupyBackend.__new__(cupy_backend.CupyBackend)
    be._cupy = FakeCupy()
    be._function = lambda name, dtype: lambda grid, block, args: None
    out = np.empty((), np.float32)
    for n in (100_000, 100_000, 100_000, 7):
        be._sum(np.ones(n, np.float32), True, 1, out, "sum", np.float32)
    # a partial buffer and a zeroed uint32 counter per grid (98 blocks, 1 block), not per call
    assert sorted(made) == sorted([("empty", (98,), np.dtype(np.float32)), ("empty", (1,), np.dtype(np.float32)),
                                   ("zeros", 1, np.dtype(np.uint32)), ("zeros", 1, np.dtype(np.uint32))])  # fmt: skip


def _launching_backend(launched: list):
    """A CupyBackend whose CuPy is NumPy and whose kernels record (name, grid, block, args)."""
    be = numpy_backend_of_gpu(lambda *launch: launched.append(launch), n_sm=132)
    be._check = lambda *args, **kwargs: None  # (the tests hand some launchers stand-in arrays)
    return be


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_sum_is_one_launch_that_fits_its_kernel(dtype):
    """sum_squares and the accuracy count are one launch of reduce.cu's sum (the last
    block finishes), its arguments of the kernel's C types, the grid a function of n
    alone, the partial buffer as long as the grid and a uint32 ticket counter."""
    launched = []
    be = _launching_backend(launched)
    out = np.empty((), dtype)
    for n in (1, 1024, 1025, 300_000, 10_000_000):
        launched.clear()
        g = np.ones(n, dtype)
        assert be.sum_squares(g, out=out) is out
        ((name, grid, block, args),) = launched
        assert name == f"sum_{'f32' if dtype == 'float32' else 'f64'}" and block == (256,)
        assert grid == (max(1, min(1024, -(-n // 1024))),) and args[3].shape == grid
        assert args[0] is g and args[1] == n and args[2] == 1 and args[5] is out and args[6] == 1
        assert_launch_fits("reduce.cu", name, args)
    launched.clear()
    correct = be.accuracy_count(np.zeros((700, 3), dtype), np.zeros(700, np.int32))
    assert [n for n, *_ in launched] == [f"accuracy_rows_{'f32' if dtype == 'float32' else 'f64'}", "sum_i32"]
    assert_launch_fits("reduce.cu", "sum_i32", launched[1][3])
    assert launched[1][3][5] is correct and correct.dtype == np.int64


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_guard_with_its_norm_is_one_launch_that_fits_its_kernel(dtype):
    """step_guard_norm: one launch of optim.cu's step_guard_norm on the sum's grid (the
    partials and counter sum_squares uses for that length), its arguments of the kernel's
    C types; the step index a device array when given one, else copied to one."""
    launched = []
    be = _launching_backend(launched)
    be._step_array = lambda step: step if isinstance(step, np.ndarray) else np.asarray(step, np.int64)
    zero = lambda dt: np.zeros((), dt)  # noqa: E731
    for n in (5, 300_000):
        launched.clear()
        g, grad_sq, loss, step = np.ones(n, dtype), zero(dtype), zero(dtype), np.asarray(7, np.int64)
        first_bad, skip, norm, scale = zero(np.int64), zero(np.bool_), zero(dtype), zero(dtype)
        be.step_guard_norm(loss, g, grad_sq, step, 2.5, first_bad, skip, norm, scale)
        ((name, grid, block, args),) = launched
        assert name == f"step_guard_norm_{'f32' if dtype == 'float32' else 'f64'}" and block == (256,)
        assert_launch_fits("optim.cu", name, args)
        assert grid == (max(1, min(1024, -(-n // 1024))),) and args[5].shape == grid
        assert args[0] is loss and args[1] is g and args[4] == n and args[7] is grad_sq and args[8] is step
        assert args[2].shape == (1, n) and np.shares_memory(args[2], g) and args[3] == 1  # no shares: g, one
        assert args[9] == 2.5 and all(a is b for a, b in zip(args[10:14], (first_bad, skip, norm, scale)))
        assert args[14] == 0 and args[15].dtype == np.float64 and args[16].dtype == np.int64  # no advance
        be.sum_squares(g, out=grad_sq)  # the same partials and counter as the plain sum
        assert launched[-1][3][3] is args[5] and launched[-1][3][4] is args[6]
        shares = np.ones((3, n), dtype)  # the gradient in three shares: summed in the same launch
        be.step_guard_norm(loss, g, grad_sq, step, 2.5, first_bad, skip, norm, scale, shares=shares)
        assert_launch_fits("optim.cu", name, launched[-1][3])
        assert launched[-1][3][2] is shares and launched[-1][3][3] == 3 and launched[-1][3][1] is g
        assert launched[-1][1] == (max(1, min(1024, -(-n // 256))),)  # an element a thread: each a sum of shares
        with pytest.raises(ValueError, match="shares"):
            be.step_guard_norm(loss, g, grad_sq, step, 2.5, first_bad, skip, norm, scale, shares=shares[:, 1:])
        running, pos = zero(np.float64), zero(np.int64)  # the step's advance, in the same launch
        be.step_guard_norm(loss, g, grad_sq, step, 2.5, first_bad, skip, norm, scale, advance=(running, pos))
        assert_launch_fits("optim.cu", name, launched[-1][3])
        assert launched[-1][3][14] == 1 and launched[-1][3][15] is running and launched[-1][3][16] is pos
        with pytest.raises(ValueError, match="advance"):
            be.step_guard_norm(loss, g, grad_sq, step, 2.5, first_bad, skip, norm, scale,
                               advance=(np.zeros(2), pos))  # fmt: skip


@pytest.mark.parametrize("dtype", ["float32", "float64", "bf16", "fp16"])
def test_a_batchs_loss_is_one_launch(dtype):
    """The loss kernel writes the batch mean itself at any batch size (finish = 1, block
    partials as long as its grid, `out` the caller's 0-d buffer, the divisor N or N C);
    a sweep's batched loss does not (finish = 0: it sums its models' row losses). The
    arguments fit the kernels' C parameters, 16-bit storage's loss scale included."""
    from gpubp import precision as PR
    from gpubp.backend import cupy_backend
    from gpubp.losses import make_loss

    storage = {"bf16": PR.BF16, "fp16": PR.F16}[dtype] if dtype in ("bf16", "fp16") else np.dtype(dtype)
    mt = cupy_backend._math(storage)
    suffix = cupy_backend._SUFFIX[storage]
    for loss_name, n in [("softmax_cross_entropy", 128), ("mse", 1024), ("softmax_cross_entropy", 300_000)]:
        launched = []
        be = _launching_backend(launched)
        c = 10
        x = np.zeros((n, c), storage)
        target = np.zeros(n, np.int32) if loss_name == "softmax_cross_entropy" else np.zeros((n, c), mt)
        out = np.empty((), mt)
        grad = np.empty_like(x)
        assert be.loss_forward_backward(x, target, make_loss(loss_name), grad=grad, out=out) is out
        divisor = n if loss_name == "softmax_cross_entropy" else n * c
        ((name, grid, block, args),) = launched
        # 16 rows a block (10 columns: a group of 16 lanes a row, two rows a warp) up to
        # LOSS_MAX_BLOCKS, whatever the GPU's SM count (the mean's bits)
        assert name == f"loss_rows_{suffix}" and grid == (min(-(-n // 16), cupy_backend.LOSS_MAX_BLOCKS),)
        assert block == (256,)
        assert_launch_fits("loss.cu", name, args)
        arg = {pname: a for (_, _, pname), a in zip(kernel_params("loss.cu", name), args)}
        assert arg["width"] == 16 and arg["windowed"] == 0
        finish, partial, count, written, div = args[-5:]
        assert finish == 1 and partial.shape == grid and count.dtype == np.uint32 and written is out
        assert div == mt.type(divisor)
        # the training step's batch: the targets of a whole split, rows perm[start + i]
        launched.clear()
        perm, start = np.arange(n + 7, dtype=np.int64)[::-1].copy(), np.array(3, np.int64)
        split = np.zeros((n + 7,) + target.shape[1:], target.dtype)
        be.loss_forward_backward(x, split, make_loss(loss_name), grad=grad, out=out, window=(perm, start))
        ((name, grid, block, args),) = launched
        assert_launch_fits("loss.cu", name, args)
        arg = {pname: a for (_, _, pname), a in zip(kernel_params("loss.cu", name), args)}
        assert arg["windowed"] == 1 and arg["perm"] is perm and arg["start"] is start
        assert (arg["labels"] if loss_name == "softmax_cross_entropy" else arg["targets"]) is split
        with pytest.raises(ValueError, match="differ|do not fit"):  # a split's rows, unwindowed
            be.loss_forward_backward(x, split, make_loss(loss_name), grad=grad, out=out)
    if dtype in ("float32", "float64"):  # the sweep's loss (no 16-bit stacks)
        launched.clear()
        x3 = np.zeros((3, 50, 4), storage)
        be.loss_forward_backward_batched(x3, np.zeros(50, np.int32), make_loss("softmax_cross_entropy"))
        name, grid, block, args = launched[0]
        assert_launch_fits("loss.cu", name, args)
        assert args[-5] == 0


def test_a_window_is_an_int64_order_and_one_int64_start():
    """Every op that reads a batch through a window (perm, start) of a split refuses
    another index type before it launches (a kernel would read int32 as int64 pairs)."""
    from gpubp.activations import make_activation
    from gpubp.losses import make_loss

    launched = []
    be = _launching_backend(launched)
    f32, relu = np.float32, make_activation("relu")
    x, w, b, out = np.zeros((9, 4), f32), np.zeros((4, 3), f32), np.zeros(3, f32), np.zeros((5, 3), f32)
    good = (np.arange(9, dtype=np.int64), np.array(2, np.int64))

    def run(op, window):
        if op == "gemm_bias_act":
            return be.gemm_bias_act(x, w, b, relu, out, window=window)
        if op == "layer_backward":
            return be.layer_backward(out, out, x, w, relu, np.zeros(15, f32), window=window)
        if op == "loss_forward_backward":
            return be.loss_forward_backward(out, np.zeros((9, 3), f32), make_loss("mse"), window=window)
        return be.gather_windows((x,), *window, (np.zeros((5, 4), f32),))

    for window in [(good[0].astype(np.int32), good[1]), (good[0], good[1].astype(np.int32)),
                   (good[0][None], good[1]), (good[0], np.zeros(2, np.int64))]:  # fmt: skip
        for op in ("gemm_bias_act", "layer_backward", "loss_forward_backward", "gather_windows"):
            with pytest.raises(TypeError, match="int64"):
                run(op, window)
    assert launched == []
    assert be.gemm_bias_act(x, w, b, relu, out, window=good) and [name for name, *_ in launched] == [
        "layer_forward_rows_f32"
    ]


@pytest.mark.parametrize("bias_corrected", [True, False])
def test_update_vectors_launch_matches_the_kernel_signature(bias_corrected):
    """The launcher hands update_vectors_f32 its arguments in the order and types of the
    kernel's C parameters (kernels/optim.cu), read from the source: each pointer gets
    the array of that name and C type, m the models' count as int64, the flag an int32
    (a swapped pair would pass the NVRTC compile and be caught only on a GPU). CuPy
    stand-in: NumPy arrays, no launch."""
    import re

    from gpubp import kernels
    from gpubp.backend import cupy_backend

    source = kernels.read_source("optim.cu")
    params = re.search(r"__device__ void update_vectors\(([^)]*)\)", source).group(1)
    c_params = [re.match(r"\s*(.*?)\s*(\w+)$", p).groups() for p in params.split(",")]
    launched = []
    be = cupy_backend.CupyBackend.__new__(cupy_backend.CupyBackend)
    be._cupy = type("FakeCupy", (), {"ndarray": np.ndarray})()
    be._function = lambda name, dtype: lambda grid, block, args: launched.append((name, dtype, grid, block, args))
    m, k = 4, 6
    rng = np.random.default_rng(1)
    given = {
        "rates": rng.uniform(0.01, 1, (k, 2, m)), "pos": np.asarray(3, np.int64),
        "counts": rng.uniform(0.1, 1, (k, 2, m)), "t0": np.asarray(7, np.int64), "updates": np.asarray(9, np.int64),
        "skip": np.asarray(False), "vectors": np.zeros((3 if bias_corrected else 1, m, 1), np.float32),
        "first_step": np.asarray(True),
    }  # fmt: skip
    be.update_vectors(**given, bias_corrected=bias_corrected)
    ((name, dtype, grid, block, args),) = launched
    assert name == "update_vectors" and np.dtype(dtype) == np.float32 and grid == (1,)
    assert [n for _, n in c_params] == ["rates", "pos", "counts", "t0", "updates", "skip", "m", "bias_corrected",
                                         "vectors", "first_step"]  # fmt: skip
    c_types = {"const double*": np.float64, "const long long*": np.int64, "long long*": np.int64,
               "const bool*": np.bool_, "bool*": np.bool_, "T*": np.float32}  # fmt: skip
    assert len(args) == len(c_params)
    for (c_type, pname), arg in zip(c_params, args):
        if c_type == "long long":
            assert isinstance(arg, np.int64) and arg == m, pname
        elif c_type == "int":
            assert isinstance(arg, np.int32) and arg == int(bias_corrected), pname
        else:
            assert arg is given[pname] and arg.dtype == c_types[c_type], pname
