"""The GPU backend: the op set of numpy_ops implemented with our CUDA kernels
(kernels/*.cu, compiled once per process through CuPy's RawModule) and cuBLAS.

Every launcher checks what it is handed (device arrays, dtype, C-contiguity, shapes)
before it launches; the kernels trust their launchers. Matrix products run on the
original row-major buffers: a row-major (M, N) matrix is a column-major (N, M) one,
so out = op(a) op(b) is computed as out^T = op(b)^T op(a)^T with no transposed copy.
A product with a single row or column uses GEMV.

This module imports cupy only inside functions, so importing it never fails.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile

import numpy as np

from .. import kernels as K
from .. import precision as PR
from ..activations import SAVES_OUTPUT, Activation
from ..errors import DeviceRuntimeError
from ..losses import Loss
from . import cublas_direct, cublaslt
from .numpy_ops import loss_divisor

# every kernel this backend launches, by base name (each exists as _f32 and _f64)
KERNELS_USED = (
    "bias_act_forward", "act_backward", "bias_grad_partial", "bias_grad_finish", "sum", "accuracy_rows",
    "loss_rows", "sgd_step", "adam_step", "step_guard", "step_guard_norm", "step_guard_norm_batched", "update_vectors",
    "mlp_fused", "sum_shares", "step_advance",
)  # fmt: skip

# the narrow layers' kernels, each as _f32 (layer.cu) and _bf16 (layer_tc.cu, the tensor
# cores); _rows: x a window of a whole float32 split
LAYER_KERNELS_USED = ("layer_forward", "layer_backward", "layer_forward_rows", "layer_backward_rows")

# the kernels mixed precision adds (gpubp/precision.py), each as _bf16 and _f16
LOW_KERNELS_USED = (
    "bias_act_forward", "act_backward", "bias_grad_partial", "accuracy_rows", "loss_rows", "cast_f32", "add",
    "gather_windows_w4",  # (the step's gather: float32 x rounded as it moves)
)  # fmt: skip

_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64", PR.BF16: "bf16", PR.F16: "f16"}

# cuBLAS / CUDA enums (cublas_api.h, library_types.h)
_OP_N, _OP_T = 0, 1
_CUDA_R_32F, _CUDA_R_64F, _CUDA_R_16F, _CUDA_R_16BF = 0, 1, 2, 14
_CUDA_TYPE = {np.dtype(np.float32): _CUDA_R_32F, np.dtype(np.float64): _CUDA_R_64F, PR.F16: _CUDA_R_16F,
              PR.BF16: _CUDA_R_16BF}  # fmt: skip
_COMPUTE_32F, _COMPUTE_32F_FAST_TF32, _COMPUTE_64F = 68, 77, 70
_GEMM_DEFAULT = -1
_POINTER_MODE_HOST = 0

BLOCK = 256  # threads per block of the elementwise kernels
# gather.cu's word sizes in bytes, the widest first (gather_windows_w16 .. _w1)
GATHER_WORDS = (16, 8, 4, 2, 1)
# row chunks of the column-sum kernel at most: 256 was the fastest of 32..1024 on an H200
# (docs/gpu-verification.md); more make the ordered second pass the longer one
BIAS_GRAD_MAX_CHUNKS = 256
# the loss kernel's blocks at most (8 rows each, then rows grid-strided): a constant, not the
# GPU's SM count, so the batch mean's bits do not depend on which GPU runs it
LOSS_MAX_BLOCKS = 1024


def loss_group_width(c: int) -> int:
    """Lanes per row of the loss kernel (kernels/loss.cu): the smallest power of two >= c,
    at most a warp's 32. A row of c <= 16 columns takes part of a warp, so a warp runs
    32 / width rows at once: the kernel is latency-bound (a chain of loads and shuffle
    reductions per row), and narrow's 262144 rows of 10 took 154 us as a warp a row (H100)."""
    return min(32, 1 << max(0, int(c) - 1).bit_length())


# the fused MLP kernel (kernels/mlp.cu): its block, the budgets of its (dynamic) shared
# memory, the networks it takes (layers, widths: a width of 128 is tiny-cuda-nn's widest
# too), and the launcher's rule for the rows per tile and the grid (see mlp_tile_rows)
MLP_THREADS = 256
# the tile's activations and gradients at most: 128 KiB, 64 rows of narrow's float32
# network (a block's gradient share is read and written once a tile, and each product's
# weights staged once a tile: the more rows, the fewer times). With the weights' stage the
# block asks for at most 160.25 KiB, which an A100 (163 KiB) and an H100 (227 KiB) give
# a block; a GPU that gives less leaves such a network to the separate ops (the rows, and
# so the bits, do not depend on the GPU)
MLP_SHARED_BYTES = 131072
MLP_WEIGHT_BYTES = 33024  # the weights' stage at most: 64 rows of a 128-wide layer (129 with the padding) in float32
# the kernel's static shared memory at most (the loss's warp sums or the tile's row table, last_block's flag)
MLP_STATIC_BYTES = 2304
MLP_MAX_LAYERS = 8
MLP_MAX_WIDTH = 128
MLP_MAX_ROWS = 64  # rows per tile at most (tests/mlp_tile_sweep.py times fewer)
MLP_ROW_TABLE = 64  # the rows a tile's row table holds (kernels/mlp.cu's MLP_MAX_ROWS): MLP_MAX_ROWS at most
MLP_TILES = 32  # a batch is cut into about this many tiles, more once a tile has MLP_MAX_ROWS
MLP_MAX_BLOCKS = 512  # blocks at most (each then takes several tiles), so at most this many shares
# rows a thread takes in the forward products and D' W^T (1, 2 or 4, at most the tile's rows;
# kernels/mlp.cu's rt): one weight read for them all. The same bits whatever it is. 4: the
# fastest of 1, 2, 4 on an H100 for tiny (49.7 against 51.3 us/step) and narrow (1.5 to 3x)
# in tests/mlp_tile_sweep.py (docs/benchmarks.md); MLP_TILES as it was (tiny: 32 tiles of 4
# rows, the sweep's best grid)
MLP_ROWS_PER_THREAD = 4
# columns a thread takes at most in the products (1, 2 or 4; mlp.cu's ct_max, tile_cols):
# one activation read for them all, and with the rows a register tile of up to 4 x 4 sums.
# The same bits whatever it is. 4: chosen on the CPU (a shared read per 2 multiply-adds
# in place of 5 per 4); tests/mlp_tile_sweep.py times 1, 2, 4 on a GPU
MLP_COLS_PER_THREAD = 4
# what both may be: mlp.cu compiles its products for these rows and columns a thread (MLP_TILE_CALL)
MLP_TILE_SIZES = (1, 2, 4)
# train.fused_mlp = "auto" (mlp_pays): the fused MLP takes a float32 step where its launch is
# one wave of single-tile blocks, each tile's products at most this many multiply-adds: at
# about 2 issued instructions a multiply-add (tests/sass_loops.py's count) that is 2^15 warp
# instructions, some 8192 cycles of an SM's four schedulers, about 5 us at 1.7 GHz, where the
# separate ops' dozen launches cost a few us each in a graph (tiny: 14 of them, 55.3 us a step
# on an H100, and 1.10x that with the fused MLP at 4-row tiles, 2026-11-26). An estimate from
# the instruction count; tests/mlp_tile_sweep.py's batch sweep times where the two cross
MLP_AUTO_TILE_FMAS = 1 << 19
# every layer's W staged once per block where the GPU's shared memory holds them beside the
# tile (mlp.cu's resident mode), else once per tile and product. The same bits either way;
# more shared memory a block may mean fewer blocks an SM: tests/mlp_tile_sweep.py times both
MLP_RESIDENT_WEIGHTS = True


# a narrow layer's forward (product, bias, activation) and backward (D', dW, db, D' W^T),
# one kernel each (kernels/layer.cu): their block, the forward's block tile (LAYER_BM rows,
# LAYER_BN columns), the backward's rows a tile (LAYER_BR) and blocks at most (each then
# takes several tiles: so many shares of dW and db to sum, set by the rows alone, not by
# the GPU), and the layers they take: at most 64 inputs and outputs (the backward keeps a
# thread's 4 x 4 of dW in registers; a wider layer is cuBLAS's, where it reaches its rate).
# narrow's layers (64 x 64 float32 at 262144 rows) took 102 us a product and 78 of
# bias_act_forward on an H100, their traffic about 43 each (docs/benchmarks.md)
LAYER_THREADS = 256
LAYER_ROWS = 128
LAYER_COLS = 64
LAYER_BACK_ROWS = 32
LAYER_MAX_BLOCKS = 256
LAYER_MAX_WIDTH = 64


def mlp_row_values(sizes, saves_z) -> int:
    """Values a tile row takes in the fused MLP's shared memory: every layer's output, the
    pre-activations of the layers whose f' reads them (saves_z), and two gradient rows of
    the widest layer."""
    return sum(sizes) + sum(w for w, z in zip(sizes[1:], saves_z) if z) + 2 * max(sizes)


def mlp_tile_rows(sizes, saves_z, itemsize: int, n: int) -> int:
    """Rows per tile of the fused MLP kernel for a batch of n rows, or 0 where the network
    does not fit it (too many layers, a layer wider than MLP_MAX_WIDTH, or not one row in
    MLP_SHARED_BYTES). The rows: the power of two that cuts n into about MLP_TILES tiles,
    at most MLP_MAX_ROWS and what fits (a power of two too). A function of the network and
    n alone (the results' bits depend on it)."""
    if len(sizes) - 1 > MLP_MAX_LAYERS or max(sizes) > MLP_MAX_WIDTH:
        return 0
    fit = MLP_SHARED_BYTES // (mlp_row_values(sizes, saves_z) * itemsize)
    if fit == 0:
        return 0
    want = 1 << max(0, math.ceil(n / MLP_TILES) - 1).bit_length()  # the power of two >= n / MLP_TILES
    return min(want, MLP_MAX_ROWS, 1 << (fit.bit_length() - 1))  # powers of two: rows per thread divide it


def mlp_shared(sizes, saves_z, itemsize: int, rows: int) -> tuple[int, int]:
    """(bytes of dynamic shared memory, values of the weights' stage) of a fused MLP launch
    of `rows` rows per tile: the tile, then a stage that holds the widest layer's whole W
    (row stride n_out + 1) where MLP_WEIGHT_BYTES allows, else as many of its rows as that
    does (at least one)."""
    stage = max(a * (b + 1) for a, b in zip(sizes[:-1], sizes[1:]))
    stage = max(min(stage, MLP_WEIGHT_BYTES // itemsize), max(sizes[1:]) + 1)
    return (rows * mlp_row_values(sizes, saves_z) + stage) * itemsize, stage


def mlp_weight_values(sizes) -> int:
    """Values of every layer's W staged at once in the fused MLP's shared memory (row
    stride n_out + 1, as mlp_shared's stage): the kernel's resident mode."""
    return sum(a * (b + 1) for a, b in zip(sizes[:-1], sizes[1:]))


# CuPy elementwise kernels of the stacked and step-state ops: name -> (inputs, outputs,
# body, kernel name), made on first use (CupyBackend._stacked_kernel)
ELEMENTWISE = {
    "select": ("raw T table, raw int64 pos, int64 width", "T out", "out = table[pos[0] * width + i]",
               "gpubp_select_row"),
    # two tables' rows: i runs over wa + wb elements (call with size=)
    "select2": ("raw T a, raw U b, raw int64 pos, int64 wa, int64 wb", "raw T out_a, raw U out_b",
                "if (i < wa) out_a[i] = a[pos[0] * wa + i]; else out_b[i - wa] = b[pos[0] * wb + (i - wa)];",
                "gpubp_select_rows"),
    "window": ("raw I perm, raw int64 start", "I out", "out = perm[start[0] + i]", "gpubp_index_window"),
    # i runs over out's M * N elements, row-major
    "window_rows": ("raw I perm, raw int64 start, int64 n, int64 width", "I out",
                    "out = perm[(i / width) * n + start[0] + i % width]", "gpubp_index_window_batched"),
    "sgd": (
        "T g, T scale, T wd, T mu, T omd, T lr, bool skip, bool first, int32 nesterov, int32 mom_on",
        "T p, T buf",
        """
        if (!skip) {
            T d = g * scale + p * wd;                  // d = s g + wd p
            if (mom_on) {
                buf = first ? d : mu * buf + omd * d;  // buf = mu buf + (1 - damp) d
                d = nesterov ? d + mu * buf : buf;
            }
            p = p - lr * d;
        }
        """,
        "gpubp_sgd_step_batched",
    ),
    "adam": (
        "T g, T scale, T wd, T lr_decay, T omb1, T b2, T omb2, T eps, T step_size, T bias2_sqrt, "
        "bool skip, int32 decoupled",
        "T p, T m, T v",
        """
        if (!skip) {
            T d = g * scale;
            if (decoupled) p = p * lr_decay; else d = d + p * wd;
            m = m + omb1 * (d - m);                    // m += (1 - b1)(d - m)
            v = b2 * v + omb2 * d * d;                 // v = b2 v + (1 - b2) d^2
            p = p - step_size * m / (sqrt(v) / bias2_sqrt + eps);
        }
        """,
        "gpubp_adam_step_batched",
    ),
}  # fmt: skip
# Mixed precision: the updates that also write the parameters' 16-bit copy, which the next
# forward pass's GEMMs read: low = p rounded to nearest even (precision.cuh), after the
# update, skipped or not (low: (M, P) raw uint16, the bits of bf16 or fp16). One pass over
# the parameters less than the update plus a cast (wide bf16 on an H100: the cast was 437 us
# of a 7427 us step).
ELEMENTWISE |= {
    f"{rule}_{store}": (
        ins,
        f"{outs}, raw uint16 low",
        f"{body}low[i] = {store}_from_float(p).bits;",
        f"{name}_{store}",
    )
    for rule in ("sgd", "adam")
    for ins, outs, body, name in [ELEMENTWISE[rule]]
    for store in ("bf16", "f16")
}
# the headers (kernels/) whose text an ELEMENTWISE kernel takes as its preamble
PREAMBLES = {name: "precision.cuh" for name in ELEMENTWISE if name.endswith(("_bf16", "_f16"))}


def elementwise_preamble(name: str) -> str:
    """The preamble of ELEMENTWISE[name]: its header's text, which is the kernel's main
    file there (so without `#pragma once`); "" for most."""
    header = PREAMBLES.get(name)
    return K.read_source(header).replace("#pragma once\n", "") if header else ""


def unavailable_reason() -> str | None:
    """None when CuPy imports, a CUDA device answers and the libraries the backend calls
    (cuBLAS, NVRTC) load; else why not, as one line."""
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed; pip install 'gpubp[cuda12]' or 'gpubp[cuda13]' to match your CUDA driver"
    except Exception as e:  # a broken CUDA installation raises all sorts of things
        return f"CuPy does not import ({_one_line(e)})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return f"no CUDA device answers ({_one_line(e)})"
    if count <= 0:
        return "no CUDA device found"
    # CuPy loads cuBLAS on the first import of its binding and NVRTC on the first call:
    # a CuPy installed without them (no [ctk] extra, no CUDA toolkit) fails here, not mid-run
    fix = "install CuPy with its CUDA libraries: pip install 'gpubp[cuda13]' (or [cuda12])"
    try:
        from cupy_backends.cuda.libs import cublas  # noqa: F401
    except Exception as e:
        return f"CuPy cannot load cuBLAS ({_one_line(e)}); {fix}"
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as e:
        return f"CuPy cannot load NVRTC ({_one_line(e)}); {fix}"
    return None


def current_device() -> int:
    """The CUDA device this process (thread) works on now."""
    import cupy

    return int(cupy.cuda.runtime.getDevice())


def host_scalars() -> dict:
    """(type, value) -> one-element host array: the alpha = 1 and beta in {0, 1} of cuBLAS
    calls in host pointer mode, passed by address (array.ctypes.data)."""
    return {(t, v): np.full(1, v, t) for t in (np.float32, np.float64) for v in (0.0, 1.0)}


def _one_line(e: BaseException) -> str:
    """'Type: first line of the message', at most 200 characters."""
    text = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {text[0] if text else ''}"
    return text if len(text) <= 200 else text[:197] + "..."


def kernel_name(base: str, dtype) -> str:
    """The extern "C" name of kernel `base` for a storage dtype: base_<f32|f64|bf16|f16>;
    `base` itself when dtype is None or base names its integer type (sum_i32)."""
    if dtype is None or base.endswith(("_i32", "_i64")):
        return base
    return f"{base}_{_SUFFIX[np.dtype(dtype)]}"


def _checked_window(op: str, window) -> tuple:
    """() for no window, else its (perm, start): the rows perm[start + i] of a whole split
    (int64 perm (P,), one int64 start on the device), checked."""
    if window is None:
        return ()
    perm, start = window
    if perm.dtype != np.int64 or perm.ndim != 1 or start.dtype != np.int64 or start.size != 1:
        raise TypeError(f"{op}: the window's perm is int64 (P,), its start one int64")
    return (perm, start)


def _leaky_slopes(activations) -> set:
    """The leaky_relu slopes of a network's layers (the fused MLP kernel takes one)."""
    return {a.alpha for a in activations if a.name == "leaky_relu"}


def _address(a) -> int:
    """Where an array's data starts (a CuPy array, or the tests' NumPy stand-in)."""
    return a.data.ptr if hasattr(a.data, "ptr") else a.ctypes.data


def _overlap(p, q) -> bool:
    """Whether two arrays' bytes share an address."""
    return _address(p) < _address(q) + q.nbytes and _address(q) < _address(p) + p.nbytes


def _math(dtype) -> np.dtype:
    """The type kernels compute in (and take scalars in) for a storage dtype: float32 for
    the 16-bit ones, else the dtype itself."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype in PR.LOW else dtype


class EventTimer:
    """start() ... stop() -> milliseconds between two CUDA events (stop() synchronizes)."""

    def __init__(self, cupy):
        self._cupy = cupy
        self._start, self._stop = cupy.cuda.Event(), cupy.cuda.Event()

    def start(self) -> None:
        self._start.record()

    def stop(self) -> float:
        self._stop.record()
        self._stop.synchronize()
        return float(self._cupy.cuda.get_elapsed_time(self._start, self._stop))


def _gemm_dims(a, b, out, trans_a: bool, trans_b: bool, beta: float):
    """(m, n, k) of out (m, n) = op(a) (m, k) @ op(b) (k, n) + beta out, checked; None when
    no product is left for cuBLAS (an empty out, or k = 0: out = beta out, done here)."""
    m, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
    kb, n = (b.shape[1], b.shape[0]) if trans_b else b.shape
    if k != kb or out.shape != (m, n):
        raise ValueError(f"gemm: op(a) {(m, k)} @ op(b) {(kb, n)} does not fit out {out.shape}")
    if beta not in (0.0, 1.0):
        raise ValueError("gemm: beta must be 0 or 1")
    if m == 0 or n == 0:
        return None
    if k == 0:
        if beta == 0.0:
            out.fill(0)
        return None
    return m, n, k


class CupyBackend:
    """The GPU backend: CuPy arrays, our kernels, cuBLAS."""

    name = "gpu"
    optimizer_scratch_rows = 0  # the fused update kernels need no working space
    tf32 = False  # float32 GEMMs on tensor cores in TF32 (opt-in, per instance)
    compute_capability = 0  # the device's, as 10 major + minor (90: an H100)

    def __init__(self, device_id: int | None = None):
        """device_id None: the current device (0 unless a data-parallel rank chose its own)."""
        import cupy
        from cupy_backends.cuda.libs import cublas

        self.xp = cupy
        self._cupy = cupy
        self._cublas = cublas
        self._blas = cublas  # the routines' module: CuPy's, or cublas_direct's inside a capture
        self.device = cupy.cuda.Device(device_id)
        self.device.use()
        self.out_of_memory_errors = (cupy.cuda.memory.OutOfMemoryError, MemoryError)
        self.n_sm = self.device.attributes["MultiProcessorCount"]
        # the most shared memory a block may have (opt-in past 48 KiB): the fused MLP's limit
        self.shared_optin = self.device.attributes["MaxSharedMemoryPerBlockOptin"]
        self.compute_capability = int(self.device.compute_capability)
        self.handle = self.device.cublas_handle
        cublas.setPointerMode(self.handle, _POINTER_MODE_HOST)
        self.tf32 = False  # float32 GEMMs on tensor cores in TF32 (opt-in)
        self._modules: dict[str, object] = {}
        self._functions: dict[str, object] = {}
        self._kernel_file = {n: f for f in K.KERNEL_FILES for n in K.kernel_names(f)}
        self._no_skip = cupy.zeros((), dtype=np.bool_)  # the update's skip flag when none is given
        # host scalars for cuBLAS (pointer mode host): the raw bindings take alpha and beta
        # as host *addresses* (size_t), so each value lives in a NumPy array kept alive here
        self._host_scalars = host_scalars()

    # ------------------------------------------------------------------ memory

    def describe(self) -> str:
        props = self._cupy.cuda.runtime.getDeviceProperties(self.device.id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        return f"gpu ({name}, CuPy {self._cupy.__version__})"

    def asarray(self, a, dtype=None):
        return self._cupy.ascontiguousarray(self._cupy.asarray(a, dtype=dtype))

    def to_numpy(self, a) -> np.ndarray:
        return self._cupy.asnumpy(a) if isinstance(a, self._cupy.ndarray) else np.asarray(a)

    def to_float(self, a) -> float:
        return float(a.item()) if isinstance(a, self._cupy.ndarray) else float(a)

    def empty(self, shape, dtype):
        return self._cupy.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype):
        return self._cupy.zeros(shape, dtype=dtype)

    def _kept(self, key, make):
        """The device array cached under `key`, made by make() on first use and kept: the
        backend's constants and working buffers (a step allocates nothing, and a captured
        step's kernels keep reading and writing where the graph recorded)."""
        cache = self.__dict__.setdefault("_kept_arrays", {})
        buf = cache.get(key)
        if buf is None:
            buf = cache[key] = make()
        return buf

    def _scratch(self, name: str, shape, dtype):
        """A working buffer an op fills and reads before it returns (partial sums, row
        losses), one per (name, shape, dtype). Ops run in order on one stream, so one
        buffer serves every call of that op."""
        shape = tuple(shape) if isinstance(shape, tuple) else (int(shape),)
        return self._kept(("scratch", name, shape, np.dtype(dtype)), lambda: self._cupy.empty(shape, dtype=dtype))

    def synchronize(self) -> None:
        self._cupy.cuda.get_current_stream().synchronize()

    def timer(self) -> EventTimer:
        """A stopwatch of CUDA events on the current stream: it times the device's work."""
        return EventTimer(self._cupy)

    def memory_reset(self) -> None:
        """Release the memory pool's cached blocks, so that its size afterwards is the peak."""
        self.synchronize()
        self._cupy.get_default_memory_pool().free_all_blocks()

    def memory_peak(self) -> int:
        """Bytes the memory pool holds: what the work since memory_reset() needed at its peak."""
        return int(self._cupy.get_default_memory_pool().total_bytes())

    # ------------------------------------------------------------------ kernels

    def _function(self, base: str, dtype) -> object:
        """The compiled kernel kernel_name(base, dtype), compiling its file on first use."""
        name = kernel_name(base, dtype)
        fn = self._functions.get(name)
        if fn is None:
            file = self._kernel_file[name]
            module = self._modules.get(file)
            if module is None:
                module = self._compile(file)
                self._modules[file] = module
            fn = self._functions[name] = module.get_function(name)
        return fn

    def _compile(self, file: str):
        cupy = self._cupy
        try:
            # CuPy appends K.CUPY_APPENDED_OPTIONS (-ftz=true among them) to these
            module = cupy.RawModule(code=K.read_source(file), options=K.NVRTC_OPTIONS)
            module.compile()
            return module
        except cupy.cuda.compiler.CompileException as e:
            log = str(e)
            fd, path = tempfile.mkstemp(prefix=f"gpubp-nvrtc-{file}-", suffix=".log")
            with os.fdopen(fd, "w") as f:
                f.write(log)
            first = next((line for line in log.splitlines() if "error" in line), log.splitlines()[0] if log else "")
            raise DeviceRuntimeError(
                f"kernels/{file}: NVRTC compile failed: {first.strip()} (full log: {path})"
            ) from None

    def _blocks(self, total: int, block: int = BLOCK) -> int:
        # enough blocks to fill the GPU; the kernels' grid-stride loops cover the rest
        return max(1, min(math.ceil(total / block), self.n_sm * 32))

    def _check(self, op: str, dtype, **arrays) -> None:
        """Every array is a C-contiguous CuPy array of `dtype`, and float dtypes are ours."""
        cupy = self._cupy
        if np.dtype(dtype).kind == "f" and np.dtype(dtype) not in _SUFFIX:
            raise TypeError(f"{op}: dtype {np.dtype(dtype)} is not supported (float32, float64, float16)")
        for name, a in arrays.items():
            if not isinstance(a, cupy.ndarray):
                raise TypeError(f"{op}: {name} must be a CuPy array on the GPU, got {type(a).__name__}")
            if a.dtype != dtype:
                raise TypeError(f"{op}: {name} has dtype {a.dtype}, expected {np.dtype(dtype)}")
            if not a.flags.c_contiguous:
                raise ValueError(f"{op}: {name} must be C-contiguous")

    def _unit_scale(self, dtype):
        """A device scalar 1 of `dtype` (the default gradient scale)."""
        return self._constant(1, (), dtype)

    def _skip_flag(self, skip):
        """A device bool scalar: the caller's flag, or a cached False."""
        if skip is None:
            return self._no_skip
        if not isinstance(skip, self._cupy.ndarray) or skip.size != 1:
            raise ValueError("skip must be a 0-d CuPy array")
        return skip if skip.dtype == np.bool_ else skip.astype(np.bool_)

    def _scale_array(self, grad_scale, dtype):
        """A device scalar of `dtype` holding the gradient scale."""
        if isinstance(grad_scale, self._cupy.ndarray):
            if grad_scale.size != 1:
                raise ValueError("grad_scale must hold one value")
            return grad_scale if grad_scale.dtype == dtype else grad_scale.astype(dtype)
        if grad_scale == 1.0:
            return self._unit_scale(dtype)
        return self._cupy.full((), grad_scale, dtype=dtype)

    # ------------------------------------------------------------------ matrix products

    def gemm(self, a, b, out, trans_a=False, trans_b=False, beta=0.0, tf32=False):
        """out = op(a) @ op(b) + beta out with cuBLAS; see numpy_ops.gemm. 16-bit a, b
        (bf16/fp16): cublasGemmEx with 16-bit A and B, compute type 32F (float
        accumulation), out 16-bit (rounded once) or float32 (the weight gradients).
        tf32 (or the backend-wide self.tf32): float32 with CUBLAS_COMPUTE_32F_FAST_TF32."""
        if a.dtype in PR.LOW:
            return self._gemm_low(a, b, out, trans_a, trans_b, beta)
        dtype = out.dtype
        self._check("gemm", dtype, a=a, b=b, out=out)
        dims = _gemm_dims(a, b, out, trans_a, trans_b, beta)
        if dims is None:
            return out
        m, n, k = dims
        h = self.handle
        if m == 1 or n == 1:
            return self._gemv(a, b, out, trans_a, trans_b, beta, m, n, k)
        t = dtype.type
        # column-major: out^T (n x m) = op(b)^T (n x k) . op(a)^T (k x m)
        fast = tf32 or self.tf32
        compute = _COMPUTE_64F if t is np.float64 else (_COMPUTE_32F_FAST_TF32 if fast else _COMPUTE_32F)
        data = _CUDA_R_64F if t is np.float64 else _CUDA_R_32F
        self._blas.gemmEx(
            h, _OP_T if trans_b else _OP_N, _OP_T if trans_a else _OP_N, n, m, k,
            self._scalar_ptr(t, 1.0), b.data.ptr, data, b.shape[1], a.data.ptr, data, a.shape[1],
            self._scalar_ptr(t, beta), out.data.ptr, data, n, compute, _GEMM_DEFAULT,
        )  # fmt: skip
        return out

    def _gemm_low(self, a, b, out, trans_a, trans_b, beta):
        """16-bit A, B (the same type), out of that type or float32; always GEMM (the
        GEMV routines have no 16-bit form). alpha, beta: float, as compute type 32F wants."""
        low = a.dtype
        if out.dtype not in (low, np.dtype(np.float32)):
            raise TypeError(f"gemm: out has dtype {out.dtype}, expected {low} or float32 for {low} inputs")
        self._check("gemm", low, a=a, b=b)
        self._check("gemm", out.dtype, out=out)
        dims = _gemm_dims(a, b, out, trans_a, trans_b, beta)
        if dims is None:
            return out
        m, n, k = dims
        t, io, c = np.float32, _CUDA_TYPE[low], _CUDA_TYPE[out.dtype]
        self._blas.gemmEx(
            self.handle, _OP_T if trans_b else _OP_N, _OP_T if trans_a else _OP_N, n, m, k,
            self._scalar_ptr(t, 1.0), b.data.ptr, io, b.shape[1], a.data.ptr, io, a.shape[1],
            self._scalar_ptr(t, beta), out.data.ptr, c, n, _COMPUTE_32F, _GEMM_DEFAULT,
        )  # fmt: skip
        return out

    def _scalar_ptr(self, t, value: float) -> int:
        """Host address of a cuBLAS scalar (alpha = 1, beta in {0, 1}) of type t."""
        return self._host_scalars[(t, float(value))].ctypes.data

    def _gemv(self, a, b, out, trans_a, trans_b, beta, m, n, k):
        """A product with one output row (x W: the vector-Jacobian product of a batch of
        one) or one output column, as cuBLAS GEMV on the matrix operand."""
        t = out.dtype.type
        gemv = self._blas.dgemv if t is np.float64 else self._blas.sgemv
        alpha, beta = self._scalar_ptr(t, 1.0), self._scalar_ptr(t, beta)
        if m == 1:
            # out (1, n) = v (1, k) op(b): y = op(b)^T v, b seen column-major as (b.shape[1], b.shape[0])
            op = _OP_T if trans_b else _OP_N
            gemv(self.handle, op, b.shape[1], b.shape[0], alpha, b.data.ptr, b.shape[1], a.data.ptr, 1, beta,
                 out.data.ptr, 1)  # fmt: skip
        else:
            # out (m, 1) = op(a) (m, k) v (k, 1)
            op = _OP_N if trans_a else _OP_T
            gemv(self.handle, op, a.shape[1], a.shape[0], alpha, a.data.ptr, a.shape[1], b.data.ptr, 1, beta,
                 out.data.ptr, 1)  # fmt: skip
        return out

    # ------------------------------------------------------------------ fused products (cuBLASLt)

    @property
    def gemm_epilogues(self) -> bool:
        """Whether models fuse their products here by default: cuBLASLt loads, and the
        environment does not say GPUBP_GEMM_EPILOGUES=0 (a switch for a whole process,
        test suites included; a run's own is train.gemm_epilogues). `epilogue_note`: why not."""
        return self.epilogue_note is None

    @property
    def epilogue_note(self) -> str | None:
        if os.environ.get("GPUBP_GEMM_EPILOGUES", "").strip() == "0":
            return "GPUBP_GEMM_EPILOGUES=0"
        self._lt()
        return self.__dict__.get("_lt_note")

    def _lt(self):
        """The cuBLASLt handle (gpubp/backend/cublaslt.py), made on first use with a
        workspace of its own from the default pool (kept: a captured graph's products
        work there); None, with _lt_note saying why, where libcublasLt does not load."""
        if "_lt_handle" in self.__dict__:
            return self._lt_handle
        lt = None
        lib, note = cublaslt.load_library()
        if lib is not None:
            cupy = self._cupy
            with cupy.cuda.using_allocator(cupy.get_default_memory_pool().malloc):
                self._lt_workspace = cupy.empty(cublaslt.WORKSPACE_BYTES, dtype=np.uint8)
            try:
                lt = cublaslt.Lt(lib, self._lt_workspace.data.ptr, self._lt_workspace.nbytes)
            except RuntimeError as e:
                lt, note = None, _one_line(e)
        self._lt_handle, self._lt_note = lt, note
        return lt

    def _lt_product(self, op, epilogue, a, b, out, vector, mask, trans_a, trans_b, tf32) -> bool:
        """out = op(a) op(b) with `epilogue` in one cuBLASLt product (a, b, out float32 or
        all of one 16-bit storage; vector: the bias or the bias gradient, (N,) float32, or
        of out's 16-bit storage (cuBLASLt takes a float32 one only with a float32 out: the
        H100's answer, tests/lt_bias_probe.py); mask: (M, relu_mask_bytes(N)) uint8, or None), after the checks;
        False, nothing done, where it cannot run (no libcublasLt, an empty product, no
        algorithm for the case)."""
        dtype = a.dtype  # float32, or bf16/fp16 storage (float32 accumulation)
        if dtype not in (np.dtype(np.float32), *PR.LOW):
            raise TypeError(f"{op}: a has dtype {dtype}, expected float32, bf16 or float16")
        if out.dtype != dtype and not (op == "gemm_bias_grad" and out.dtype == np.float32):
            raise TypeError(f"{op}: out has dtype {out.dtype}, expected {dtype}")  # (dW: float32 too)
        self._check(op, dtype, a=a, b=b)
        self._check(op, out.dtype, out=out)
        self._check(op, out.dtype if vector.dtype == out.dtype and out.dtype in PR.LOW else np.float32, vector=vector)
        if mask is not None:
            self._check(op, np.uint8, mask=mask)
        lt = self._lt()
        if lt is None:
            return False
        stream = self._cupy.cuda.get_current_stream().ptr
        return cublaslt.row_major_product(lt, a, b, out, vector, mask, epilogue, trans_a, trans_b,
                                          bool(tf32 or self.tf32), lambda x: x.data.ptr, stream, _CUDA_TYPE[dtype],
                                          _CUDA_TYPE[out.dtype], _CUDA_TYPE[vector.dtype])  # fmt: skip

    def gemm_bias(self, a, b, bias, out, trans_a=False, trans_b=False, tf32=False) -> bool:
        """out = op(a) op(b) + bias in one cuBLASLt product (BIAS); see numpy_ops.gemm_bias.
        False, nothing done, where cuBLASLt cannot run it."""
        return self._lt_product("gemm_bias", cublaslt.EPILOGUE_BIAS, a, b, out, bias, None, trans_a, trans_b, tf32)

    def gemm_bias_grad(self, a, b, out, db, trans_a=False, trans_b=False, tf32=False) -> bool:
        """out = op(a) op(b), db = 1^T op(b) in one cuBLASLt product (BGRADA); see
        numpy_ops.gemm_bias_grad. False, nothing done, where cuBLASLt cannot run it."""
        return self._lt_product("gemm_bias_grad", cublaslt.EPILOGUE_BGRADA, a, b, out, db, None, trans_a, trans_b, tf32)

    def gemm_bias_relu(self, a, b, bias, out, mask, trans_a=False, trans_b=False, tf32=False) -> bool:
        """out = max(op(a) op(b) + bias, 0), mask = its bits, in one cuBLASLt product
        (RELU_AUX_BIAS); see numpy_ops.gemm_bias_relu. False, nothing done, where
        cuBLASLt cannot run it (the caller runs gemm and bias_act_forward)."""
        return self._lt_product(
            "gemm_bias_relu", cublaslt.EPILOGUE_RELU_AUX_BIAS, a, b, out, bias, mask, trans_a, trans_b, tf32
        )

    def gemm_drelu_bias_grad(self, a, b, mask, out, db, trans_a=False, trans_b=False, tf32=False) -> bool:
        """out = (op(a) op(b)) * mask, db = 1^T out, in one cuBLASLt product (DRELU_BGRAD);
        see numpy_ops.gemm_drelu_bias_grad. False, nothing done, where cuBLASLt cannot
        run it (the caller runs gemm, act_backward and bias_grad)."""
        return self._lt_product("gemm_drelu_bias_grad", cublaslt.EPILOGUE_DRELU_BGRAD, a, b, out, db, mask, trans_a, trans_b,
                                tf32)  # fmt: skip

    # ------------------------------------------------------------------ narrow layers (kernels/layer.cu)

    def layer_fits(self, n_in: int, n_out: int, dtype, tf32: bool = False) -> bool:
        """Whether gemm_bias_act and layer_backward run a layer of n_in inputs and n_out
        outputs in `dtype` storage here: both widths at most LAYER_MAX_WIDTH, float32
        multiplied in float32 (not TF32; layer.cu) or bfloat16 on a GPU with bf16 tensor
        cores (compute capability 8.0 on; layer_tc.cu), and GPUBP_GEMM_EPILOGUES=0 not set."""
        narrow = 0 < n_in <= LAYER_MAX_WIDTH and 0 < n_out <= LAYER_MAX_WIDTH
        off = os.environ.get("GPUBP_GEMM_EPILOGUES", "").strip() == "0"  # every fused product off (gemm_epilogues)
        dtype = np.dtype(dtype)
        kernel = (dtype == np.float32 and not (tf32 or self.tf32)) or (
            dtype == PR.BF16 and self.compute_capability >= 80
        )
        return narrow and not off and kernel

    def gemm_bias_act(self, a, b, bias, act: Activation, out, z=None, tf32=False, window=None) -> bool:
        """z = a b + bias (where z is given), out = f(a b + bias), in one launch for a
        narrow float32 or bfloat16 layer (layer_fits; bias float32); see
        numpy_ops.gemm_bias_act. False, nothing done, where the layer does not fit: the
        caller runs gemm and bias_act_forward. out and z must not overlap a, b or bias.
        window (perm, start): a is a whole split's float32 x, and row i's is its row
        perm[start + i] (bfloat16: rounded as the kernel loads it, cast's rounding)."""
        if a.ndim != 2 or b.ndim != 2:
            raise ValueError(f"gemm_bias_act: a {a.shape} and b {b.shape} must be matrices")
        k, n_out, n = a.shape[1], b.shape[1], out.shape[0]
        dtype, f32 = np.dtype(out.dtype), np.dtype(np.float32)  # (the storage: out's)
        if not self.layer_fits(k, n_out, dtype, tf32) or n >= 2**31:
            return False
        rows = self._layer_window("gemm_bias_act", window, a, n)
        self._check("gemm_bias_act", dtype, b=b, out=out, **({"z": z} if z is not None else {}))
        self._check("gemm_bias_act", dtype if window is None else f32, a=a)
        self._check("gemm_bias_act", f32, bias=bias)
        if (
            b.shape[0] != k
            or bias.shape != (n_out,)
            or out.shape != (n, n_out)
            or (z is not None and z.shape != out.shape)
        ):
            raise ValueError(f"gemm_bias_act: a {a.shape}, b {b.shape}, bias {bias.shape}, out {out.shape}"
                             + (f", z {z.shape}" if z is not None else "") + " do not fit")  # fmt: skip
        for name, c in (("out", out), ("z", z)):
            if c is not None and any(_overlap(c, r) for r in (a, b, bias)):
                raise ValueError(f"gemm_bias_act: {name} overlaps a, b or bias (other blocks still read them)")
        if n == 0:
            return True
        self._function("layer_forward" if window is None else "layer_forward_rows", dtype)(
            (-(-n // LAYER_ROWS),), (LAYER_THREADS,),
            (a, *rows, b, bias, z if z is not None else out, out, np.int32(n), np.int32(k), np.int32(n_out),
             np.int32(z is not None), np.int32(act.info.kernel_id), f32.type(act.alpha)),
        )  # fmt: skip
        return True

    @staticmethod
    def _layer_window(op: str, window, x, n: int) -> tuple:
        """The layer kernels' window arguments: () for x's own rows (x: (n, K)), else
        (perm, start) checked (x: a whole split's)."""
        if window is None and x.shape[0] != n:
            raise ValueError(f"{op}: x {x.shape} does not fit the batch's {n} rows")
        return _checked_window(op, window)

    def layer_share_rows(self, n: int) -> int:
        """S, the shares (blocks) of layer_backward for a batch of n rows: n's alone."""
        return max(1, min(-(-n // LAYER_BACK_ROWS), LAYER_MAX_BLOCKS))

    def layer_backward(self, d, saved, x, w, act: Activation, grad, e=None, tf32=False, window=None,
                       e_act=None, shares=None) -> bool:  # fmt: skip
        """A narrow float32 or bfloat16 layer's backward pass in one launch of
        kernels/layer.cu or layer_tc.cu (and the sum of its blocks' shares): D' = d *
        f'(saved), grad = (x^T D' row-major, then 1^T D'; float32), and e = D' w^T where
        given; see numpy_ops.layer_backward. False, nothing done, where the layer does not
        fit (layer_fits): the caller runs the separate ops. e must not overlap d, saved, x
        or w (other blocks still read them). window (perm, start): x is a whole split's
        float32 x, and row i's is its row perm[start + i] (bfloat16: rounded as the kernel
        loads it). e_act: the
        layer below's activation, whose f' reads x (its output): e = (D' w^T) * f'(x).
        shares (buffer, o): the blocks' shares go to buffer[:, o : o + K N + N] (buffer
        (layer_share_rows(n), P) float32, a whole model's) and are not summed; grad is left
        as it was (the caller sums the buffer: the step's guard)."""
        if x.ndim != 2 or w.ndim != 2 or d.ndim != 2:
            raise ValueError(f"layer_backward: d {d.shape}, x {x.shape} and w {w.shape} must be matrices")
        k, n_out, n = x.shape[1], w.shape[1], d.shape[0]
        dtype, f32, op = np.dtype(d.dtype), np.dtype(np.float32), "layer_backward"  # (the storage: d's)
        if not self.layer_fits(k, n_out, dtype, tf32) or n >= 2**31:
            return False
        rows = self._layer_window(op, window, x, n)
        self._check(op, dtype, d=d, saved=saved, w=w, **({"e": e} if e is not None else {}))
        self._check(op, dtype if window is None else f32, x=x)
        self._check(op, f32, grad=grad)
        p = k * n_out + n_out  # dW's values, then db's
        if (d.shape != (n, n_out) or saved.shape != d.shape or w.shape != (k, n_out) or grad.shape != (p,)
                or (e is not None and e.shape != (n, k))):  # fmt: skip
            raise ValueError(f"{op}: d {d.shape}, saved {saved.shape}, x {x.shape}, w {w.shape}, grad {grad.shape}"
                             + (f", e {e.shape}" if e is not None else "") + " do not fit")  # fmt: skip
        if e is not None and any(_overlap(e, a) for a in (d, saved, x, w)):
            raise ValueError(f"{op}: e overlaps d, saved, x or w (other blocks still read them)")
        if e_act is not None and (e is None or e_act.saves != SAVES_OUTPUT):
            raise ValueError(f"{op}: e_act ({e_act.name}) needs e, and an f' that reads the output")
        grid = self.layer_share_rows(n)
        if shares is not None:
            buffer, o = shares
            self._check(op, f32, shares=buffer)
            if buffer.ndim != 2 or buffer.shape[0] != grid or not 0 <= o <= buffer.shape[1] - p:
                raise ValueError(f"{op}: shares {buffer.shape} at {o} do not fit {grid} shares of {p} values")
            if n == 0:
                buffer[:, o : o + p] = 0
                return True
            into, stride = buffer.reshape(-1)[o:], buffer.shape[1]  # (a 1-d view: the kernel's pointer)
        elif n == 0:
            grad.fill(0)
            return True
        else:
            into = self._kept(("layer_shares", grid, p), lambda: self._cupy.empty((grid, p), f32))
            stride = p
        self._function(op if window is None else "layer_backward_rows", dtype)(
            (grid,), (LAYER_THREADS,),
            (d, saved, x, *rows, w, e if e is not None else d, into, np.int64(stride), np.int32(n), np.int32(k),
             np.int32(n_out), np.int32(e is not None), np.int32(act.info.kernel_id), f32.type(act.alpha),
             np.int32(0 if e_act is None else e_act.info.kernel_id), f32.type(0.0 if e_act is None else e_act.alpha)),
        )  # fmt: skip
        if shares is None:
            self._sum_shares(into, grad)  # in block order
        return True

    # ------------------------------------------------------------------ activations

    def bias_act_forward(self, z, b, act: Activation, out):
        """z += b, out = f(z); see numpy_ops.bias_act_forward."""
        dtype = z.dtype
        self._check("bias_act_forward", dtype, z=z, out=out)
        self._check("bias_act_forward", _math(dtype), b=b)
        if z.ndim != 2 or b.shape != (z.shape[1],) or out.shape != z.shape:
            raise ValueError(f"bias_act_forward: z {z.shape}, b {b.shape}, out {out.shape} do not fit")
        total = z.size
        if total == 0:
            return out
        fn = self._function("bias_act_forward", dtype)
        fn((self._blocks(total),), (BLOCK,),
           (z, b, out, np.int64(total), np.int32(z.shape[1]), np.int32(act.info.kernel_id), _math(dtype).type(act.alpha)))  # fmt: skip
        return out

    def act_backward(self, d, saved, act: Activation, out):
        """out = d * f'(saved); see numpy_ops.act_backward."""
        dtype = d.dtype
        self._check("act_backward", dtype, d=d, saved=saved, out=out)
        if saved.shape != d.shape or out.shape != d.shape:
            raise ValueError(f"act_backward: d {d.shape}, saved {saved.shape}, out {out.shape} differ")
        if act.name == "identity":  # f' = 1
            if out is not d:
                self._cupy.copyto(out, d)
            return out
        total = d.size
        if total == 0:
            return out
        fn = self._function("act_backward", dtype)
        fn((self._blocks(total),), (BLOCK,),
           (d, saved, out, np.int64(total), np.int32(act.info.kernel_id), _math(dtype).type(act.alpha)))  # fmt: skip
        return out

    # ------------------------------------------------------------------ reductions

    def bias_grad(self, d, out):
        """out = column sums of d; see numpy_ops.bias_grad. Deterministic: rows are cut
        into chunks by the shape alone, each chunk summed in a fixed order, then the chunks
        in order: by the partial kernel's last block up to BLOCK columns (one launch), by
        bias_grad_finish's blocks above."""
        dtype = d.dtype
        self._check("bias_grad", dtype, d=d)
        self._check("bias_grad", _math(dtype), out=out)  # 16-bit d: float32 sums
        n, m = d.shape
        if out.shape != (m,):
            raise ValueError(f"bias_grad: out {out.shape} does not fit d {d.shape}")
        if m == 0:
            return out
        if n == 0:
            out.fill(0)
            return out
        return self._column_sums("bias_grad_partial", d, (d,), out)

    def act_backward_bias_grad(self, d, saved, act: Activation, out, db):
        """out = d * f'(saved) and db = its column sums in one pass over d (reduce.cu's
        act_backward_bias_grad_partial: act_backward's values, summed as bias_grad sums
        them: the bits of the two ops); see numpy_ops.act_backward_bias_grad."""
        dtype = d.dtype
        self._check("act_backward_bias_grad", dtype, d=d, saved=saved, out=out)
        self._check("act_backward_bias_grad", _math(dtype), db=db)
        if saved.shape != d.shape or out.shape != d.shape or d.ndim != 2 or db.shape != (d.shape[1],):
            raise ValueError(f"act_backward_bias_grad: d {d.shape}, saved {saved.shape}, out {out.shape}, "
                             f"db {db.shape} do not fit")  # fmt: skip
        if d.shape[0] == 0 or d.shape[1] == 0:
            return self.bias_grad(self.act_backward(d, saved, act, out), db)
        front = (d, saved, out, np.int32(act.info.kernel_id), _math(dtype).type(act.alpha))
        return self._column_sums("act_backward_bias_grad_partial", d, front, db)

    def _column_sums(self, kernel: str, d, front: tuple, out):
        """out (m,) = the column sums of the (n, m) values `kernel` (a reduce.cu column-sum
        pass, called with its `front` arguments first) sums over d's shape, n, m > 0."""
        n, m = d.shape
        # up to ~1024 blocks of (32, 8) threads to fill the GPU; each chunk keeps >= 256 rows
        # (32 per thread) so the finishing pass stays small. A function of the shape only.
        tiles = math.ceil(m / 32)
        chunks = max(1, min(BIAS_GRAD_MAX_CHUNKS, math.ceil(1024 / tiles), n // 256))
        rows_per_chunk = math.ceil(n / chunks)
        partial = out if chunks == 1 else self._scratch("bias_grad", (chunks, m), out.dtype)
        finish = chunks > 1 and m <= BLOCK  # the last block sums the chunks: one launch
        self._function(kernel, d.dtype)(
            (tiles, chunks), (32, 8),
            (*front, partial, np.int32(n), np.int32(m), np.int32(rows_per_chunk), np.int32(finish),
             self._counter("bias_grad", (tiles, chunks)), out),
        )  # fmt: skip
        if chunks > 1 and not finish:
            self._function("bias_grad_finish", out.dtype)(
                (self._blocks(m),), (BLOCK,), (partial, out, np.int32(chunks), np.int32(m))
            )
        return out

    def _sum(self, x, square: bool, divisor, out, kernel: str, acc_dtype):
        """out (0-d) = sum of x (or x^2) / divisor, in one deterministic launch of `kernel`
        (reduce.cu's sum: block partials, finished by the last block). The grid is a function
        of n only; the partials and the last block's ticket counter are kept per grid."""
        n = x.size
        blocks, partial = self._sum_grid(n, acc_dtype)
        self._function(kernel, x.dtype)(
            (blocks,), (BLOCK,),
            (x, np.int64(n), np.int32(square), partial, self._counter("sum", blocks), out,
             np.dtype(acc_dtype).type(divisor)),
        )  # fmt: skip
        return out

    def _sum_grid(self, n: int, acc_dtype, per_thread: int = 4) -> tuple[int, object]:
        """The one-launch sum's grid for n values, about per_thread a thread (a function of
        n only: the same partition, the same bits) and its kept partial-sum buffer."""
        blocks = max(1, min(1024, math.ceil(n / (per_thread * BLOCK))))
        return blocks, self._scratch("sum", blocks, acc_dtype)

    def _counter(self, name: str, grid) -> object:
        """The zeroed ticket counter (one uint32) of a one-launch reduction (common.cuh's
        last_block), kept per (name, grid) like its partial sums; the kernel leaves it 0."""
        return self._kept(("counter", name, grid), lambda: self._cupy.zeros(1, dtype=np.uint32))

    def sum_squares(self, g, out=None):
        """sum_j g_j^2 as a 0-d array (`out` when given); see numpy_ops.sum_squares."""
        self._check("sum_squares", g.dtype, g=g)
        out = self._cupy.empty((), dtype=g.dtype) if out is None else out
        return self._sum(g, True, 1, out, "sum", g.dtype)

    def loss_forward_backward(self, x, target, loss: Loss, grad=None, loss_scale=None, out=None, window=None):
        """Mean loss (0-d, `out` when given) and grad = dL/dx; see numpy_ops.loss_forward_backward.
        16-bit x, grad: float32 targets, value and row losses; grad = round(dL/dx S), S =
        loss_scale (a device float32, fp16) or 1. window (perm, start): the targets' rows
        perm[start + i] of a whole split's, read by the kernel where they lie."""
        dtype = x.dtype
        mt = _math(dtype)  # the type of the targets, the value and the scalars
        n, c = x.shape
        _checked_window("loss_forward_backward", window)
        rows = n if window is None else target.shape[0]  # the targets' rows
        labels, targets, divisor = self._loss_targets("loss_forward_backward", target, loss, n, c, mt, rows)
        self._check("loss_forward_backward", dtype, x=x, **({"grad": grad} if grad is not None else {}))
        if grad is not None and grad.shape != x.shape:
            raise ValueError(f"loss_forward_backward: grad {grad.shape} differs from x {x.shape}")
        out = self._loss_out("loss_forward_backward", out, mt)
        if n == 0:
            out.fill(np.nan)
            return out
        row_loss = self._scratch("loss_rows", n, mt)
        # value, gradient and the batch mean in one launch
        self._loss_rows(x, labels, targets, grad, row_loss, c, loss, divisor, loss_scale, out, window)
        return out

    def _loss_targets(self, op: str, target, loss: Loss, n: int, c: int, mt, rows=None) -> tuple:
        """(labels, targets, divisor) of the loss kernels for the outputs (n, c): int32
        labels (rows,) or targets (rows, c) of `mt` (the other one a dummy pointer of its
        type; rows: n, or a whole split's where the batch is a window of it), and what the
        batch mean divides by (numpy_ops.loss_divisor)."""
        rows = n if rows is None else rows
        if loss.info.target == "labels":
            self._check(op, np.int32, labels=target)
            if target.shape != (rows,):
                raise ValueError(f"{op}: labels {target.shape} do not fit the outputs {(n, c)}")
            return target, self._unit_scale(mt), n  # targets unused: a pointer of its type
        self._check(op, mt, targets=target)
        if target.shape != (rows, c):
            raise ValueError(f"{op}: targets {target.shape} differ from the outputs {(n, c)}")
        return self._unit_scale(np.int32), target, n * c

    def _loss_out(self, op: str, out, mt):
        """The 0-d `out` of a loss (checked), or a new one."""
        if out is None:
            return self._cupy.empty((), dtype=mt)
        if out.shape != () or out.dtype != mt:
            raise ValueError(f"{op}: out must be a 0-d array of {mt}")
        return out

    def _loss_rows(self, x2, labels, targets, grad, row_loss, c: int, loss: Loss, divisor, loss_scale=None,
                   out=None, window=None):  # fmt: skip
        """Launch loss_rows over x2's rows (kernels/loss.cu): row_loss, and grad unless None;
        with `out` (0-d) also out = sum(row_loss) / divisor (block partials, finished by the
        kernel's last block); window (perm, start): the targets' rows perm[start + i]."""
        dtype, mt, n = x2.dtype, _math(x2.dtype), x2.shape[0]
        finish = out is not None
        width = loss_group_width(c)
        windowed = window is not None
        if not windowed:  # (pointers of their types, unread)
            window = (self._constant(0, (1,), np.int64), self._constant(0, (), np.int64))
        args = (x2, labels, targets, *window, np.int32(windowed), grad if grad is not None else x2,
                np.int32(grad is not None), row_loss,
                np.int32(n), np.int32(c), np.int32(width), np.int32(loss.info.kernel_id),
                mt.type(loss.label_smoothing), mt.type(loss.huber_delta), mt.type(1.0 / divisor if divisor else 0.0))  # fmt: skip
        if dtype in PR.LOW:
            args += (self._scale_array(1.0 if loss_scale is None else loss_scale, mt),)
        # a group of `width` lanes per row; the grid (and so the batch mean's partials) a
        # function of n and c alone
        blocks = max(1, min(math.ceil(n / (BLOCK // width)), LOSS_MAX_BLOCKS))
        partial = self._scratch("loss_partial", blocks, mt) if finish else row_loss
        args += (np.int32(finish), partial, self._counter("loss_rows", blocks), out if finish else row_loss,
                 mt.type(divisor))  # fmt: skip
        self._function("loss_rows", dtype)((blocks,), (BLOCK,), args)

    def accuracy_count(self, x, labels, threshold=0.0):
        """Rows classified right (0-d int64); see numpy_ops.accuracy_count."""
        dtype = x.dtype
        self._check("accuracy_count", dtype, x=x)
        self._check("accuracy_count", np.int32, labels=labels)
        n, c = x.shape
        if labels.shape != (n,):
            raise ValueError(f"accuracy_count: labels {labels.shape} do not fit x {x.shape}")
        out = self._cupy.zeros((), dtype=np.int64)
        if n == 0:
            return out
        correct = self._scratch("accuracy_rows", n, np.int32)
        self._function("accuracy_rows", dtype)(
            (self._blocks(n),), (BLOCK,), (x, labels, correct, np.int32(n), np.int32(c), _math(dtype).type(threshold))
        )
        return self._sum(correct, False, 1, out, "sum_i32", np.int64)

    # ------------------------------------------------------------------ fused MLP

    def mlp_forward_backward(self, x, target, params, grads, sizes, activations, loss: Loss, out, window=None):
        """The forward pass, loss and backward pass of a plain MLP in one launch of
        kernels/mlp.cu (see numpy_ops.mlp_forward_backward, the reference); the mean loss
        into `out`. Returns the gradient's shares (S, P), one per block (grads itself when
        S = 1: written), or None, having done nothing, where the kernel does not take the
        network (mlp_tile_rows; float32 and float64; one leaky_relu slope). window (perm,
        start, n): the batch is rows perm[start : start + n] of x and target, read by the
        kernel where they lie (no gather before it)."""
        dtype, sizes = x.dtype, tuple(int(w) for w in sizes)
        saves_z = tuple(int(a.saves == "input") for a in activations)
        n_x, p = x.shape[0], grads.size
        n = n_x if window is None else int(window[2])
        rows = self._mlp_rows(sizes, activations, dtype, n)
        if not rows:
            return None
        op = "mlp_forward_backward"
        self._check(op, dtype, x=x, params=params, grads=grads)
        if MLP_ROWS_PER_THREAD not in MLP_TILE_SIZES or MLP_COLS_PER_THREAD not in MLP_TILE_SIZES:
            raise ValueError(f"{op}: MLP_ROWS_PER_THREAD {MLP_ROWS_PER_THREAD} and MLP_COLS_PER_THREAD "
                             f"{MLP_COLS_PER_THREAD} must each be one of {MLP_TILE_SIZES} (kernels/mlp.cu's tiles)")  # fmt: skip
        if rows > MLP_ROW_TABLE:
            raise ValueError(f"{op}: {rows} rows a tile (MLP_MAX_ROWS {MLP_MAX_ROWS}) where kernels/mlp.cu's row "
                             f"table holds {MLP_ROW_TABLE}")  # fmt: skip
        n_params = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))  # model.param_layout's P
        if x.shape != (n_x, sizes[0]) or params.shape != (p,) or p != n_params or len(activations) != len(sizes) - 1:
            raise ValueError(f"{op}: x {x.shape}, params {params.shape} do not fit the widths {sizes}")
        labels, targets, _ = self._loss_targets(op, target, loss, n_x, sizes[-1], dtype)
        divisor = loss_divisor(loss, n, sizes[-1])  # the batch's rows, not the split's
        if window is None:
            perm = start = self._constant(0, (1,), np.int64)  # (not read)
        else:
            perm, start = window[0], window[1]
            self._check(op, np.int64, perm=perm, start=start)
            if perm.ndim != 1 or start.size != 1 or perm.shape[0] < n:
                raise ValueError(f"{op}: window perm {perm.shape}, start {start.shape} for {n} rows")
        out = self._loss_out(op, out, dtype)
        kinds = tuple(a.info.kernel_id for a in activations)
        dims = self._kept(("mlp_dims", sizes, kinds, saves_z),
                          lambda: self._cupy.asarray(np.array(sizes + kinds + saves_z, np.int32)))  # fmt: skip
        grid = min(-(-n // rows), MLP_MAX_BLOCKS)  # every block takes at least one tile
        # the shares outlive the call (the step's guard sums them): kept per gradient buffer
        key = ("mlp_shares", _address(grads), grid, p, dtype)
        shares = grads.reshape(1, p) if grid == 1 else self._kept(key, lambda: self._cupy.empty((grid, p), dtype))
        t, alpha = dtype.type, max(_leaky_slopes(activations), default=0.0)
        shared, stage = mlp_shared(sizes, saves_z, dtype.itemsize, rows)
        # resident: every layer's W staged once per block where this GPU's shared memory
        # holds them all beside the tile (narrow's five 64 x 64 on an H100, not on an A100),
        # not once per tile and product: the same sums (the same bits), fewer stages
        whole = mlp_weight_values(sizes)
        resident = (
            MLP_RESIDENT_WEIGHTS and shared + (whole - stage) * dtype.itemsize + MLP_STATIC_BYTES <= self.shared_optin
        )
        if resident:
            shared, stage = shared + (whole - stage) * dtype.itemsize, whole
        kernel = self._function("mlp_fused", dtype)
        # the kernel's dynamic shared memory at most (48 KiB less the static until set): raised
        # where this launch needs more (within shared_optin: _mlp_rows), once, before any capture
        allowed = self.__dict__.setdefault("_dynamic_shared", {})
        if allowed.get(kernel_name("mlp_fused", dtype), 0) < shared:
            kernel.max_dynamic_shared_size_bytes = shared
            allowed[kernel_name("mlp_fused", dtype)] = shared
        kernel(
            (grid,), (MLP_THREADS,),
            (x, labels, targets, perm, start, np.int32(window is not None), params, shares, np.int64(p), dims,
             np.int32(len(sizes) - 1), np.int32(n), np.int32(rows), np.int32(min(MLP_ROWS_PER_THREAD, rows)),
             np.int32(MLP_COLS_PER_THREAD), np.int32(stage), np.int32(resident), t(alpha), np.int32(loss.info.kernel_id),
             t(loss.label_smoothing), t(loss.huber_delta), t(1.0 / divisor), self._scratch("mlp_loss", grid, dtype),
             self._counter("mlp_fused", grid), out, t(divisor)),
            shared_mem=shared,
        )  # fmt: skip
        return shares

    def _mlp_rows(self, sizes, activations, dtype, n: int) -> int:
        """The fused MLP kernel's rows per tile for this network and batch (mlp_tile_rows),
        0 where it does not take them: not float32 or float64, two leaky_relu slopes, an
        empty batch, what mlp_tile_rows refuses, or a tile (mlp_shared) larger than this
        GPU's shared memory for a block."""
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64) or n == 0 or len(_leaky_slopes(activations)) > 1:
            return 0
        saves_z = [a.saves == "input" for a in activations]
        rows = mlp_tile_rows(sizes, saves_z, dtype.itemsize, n)
        if rows and mlp_shared(sizes, saves_z, dtype.itemsize, rows)[0] + MLP_STATIC_BYTES > self.shared_optin:
            return 0  # a GPU that gives a block less shared memory than this tile needs
        return rows

    def mlp_fits(self, sizes, activations, dtype, n: int) -> bool:
        """Whether mlp_forward_backward runs (not None) for this network, dtype and batch rows."""
        return self._mlp_rows(sizes, activations, dtype, n) > 0

    def mlp_pays(self, sizes, activations, dtype, n: int) -> bool:
        """train.fused_mlp = "auto": whether the fused MLP is the faster way for this network
        and batch. float32 (float64's products are cuBLAS's on the tensor cores), and a launch
        whose time is one tile's: every tile its own block, at most one a multiprocessor, and
        a tile's products (forward, weight gradient, D' W^T but the first layer's) at most
        MLP_AUTO_TILE_FMAS multiply-adds. Small batches of narrow networks (tiny: 32 tiles of
        4 rows); not narrow's 262144 rows, where cuBLAS's tensor cores win (0.21x, H100)."""
        sizes = [int(w) for w in sizes]
        rows = self._mlp_rows(sizes, activations, dtype, n) if np.dtype(dtype) == np.float32 else 0
        if not rows:
            return False
        products = 3 * sum(a * b for a, b in zip(sizes[:-1], sizes[1:])) - sizes[0] * sizes[1]
        return -(-n // rows) <= min(self.n_sm, MLP_MAX_BLOCKS) and rows * products <= MLP_AUTO_TILE_FMAS

    def sum_shares(self, shares, g):
        """g = the sum of the gradient's shares (S, P) in order; see numpy_ops.sum_shares."""
        self._check("sum_shares", g.dtype, shares=shares, g=g)
        if shares.ndim != 2 or shares.shape[1] != g.size:
            raise ValueError(f"sum_shares: shares {shares.shape} do not fit g {g.shape}")
        if shares.shape[0] > 1 or _address(shares) != _address(g):  # (one share: g itself, or a copy)
            self._sum_shares(shares, g)
        return g

    def _sum_shares(self, shares, g) -> None:
        """sum_shares' launch, its arguments checked (layer_backward's too: the bench's
        per-op timing wraps the public op, and would count this part twice)."""
        self._function("sum_shares", g.dtype)(
            (self._blocks(g.size),), (BLOCK,), (shares, np.int32(shares.shape[0]), np.int64(g.size), g)
        )

    # ------------------------------------------------------------------ optimizers

    def sgd_step(self, p, g, buf, scratch, *, lr, momentum, dampening, nesterov, weight_decay, first_step,
                 grad_scale=1.0, skip=None):  # fmt: skip
        """One fused SGD update; see numpy_ops.sgd_step (scratch is not needed here)."""
        dtype = p.dtype
        self._check("sgd_step", dtype, p=p, g=g, buf=buf)
        if not (g.shape == p.shape == buf.shape):
            raise ValueError("sgd_step: p, g and buf must have the same shape")
        t = dtype.type
        self._function("sgd_step", dtype)(
            (self._blocks(p.size),), (BLOCK,),
            (p, g, buf, np.int64(p.size), t(lr), t(momentum), t(1.0 - dampening), np.int32(bool(nesterov)),
             t(weight_decay), np.int32(bool(first_step)), self._scale_array(grad_scale, dtype),
             self._skip_flag(skip)),
        )  # fmt: skip

    def adam_step(self, p, g, m, v, scratch, *, lr, beta1, beta2, eps, weight_decay, step, decoupled,
                  grad_scale=1.0, skip=None):  # fmt: skip
        """One fused Adam/AdamW update; see numpy_ops.adam_step."""
        dtype = p.dtype
        self._check("adam_step", dtype, p=p, g=g, m=m, v=v)
        if not (g.shape == p.shape == m.shape == v.shape):
            raise ValueError("adam_step: p, g, m and v must have the same shape")
        t = dtype.type
        step_size = lr / (1.0 - beta1**step)
        bias2_sqrt = math.sqrt(1.0 - beta2**step)
        self._function("adam_step", dtype)(
            (self._blocks(p.size),), (BLOCK,),
            (p, g, m, v, np.int64(p.size), t(1.0 - beta1), t(beta2), t(1.0 - beta2), t(eps), t(weight_decay),
             np.int32(bool(decoupled)), t(1.0 - lr * weight_decay), t(step_size), t(bias2_sqrt),
             self._scale_array(grad_scale, dtype), self._skip_flag(skip)),
        )  # fmt: skip

    def _check_guard(self, op: str, dtype, g=None, **state) -> None:
        """The guard's arrays: loss, grad_sq, norm, scale of `dtype` (and the gradients g),
        first_bad int64, skip bool, each of the state one value."""
        self._check(op, dtype, **{k: state[k] for k in ("loss", "grad_sq", "norm", "scale")},
                    **({"g": g} if g is not None else {}))  # fmt: skip
        self._check(op, np.int64, first_bad=state["first_bad"])
        self._check(op, np.bool_, skip=state["skip"])
        for name, a in state.items():
            if a.size != 1:
                raise ValueError(f"{op}: {name} must hold one value, has {a.size}")

    def step_guard(self, loss, grad_sq, step, max_norm, first_bad, skip, norm, scale):
        """The step's verdict in one launch; see numpy_ops.step_guard."""
        dtype = norm.dtype
        self._check_guard("step_guard", dtype, loss=loss, grad_sq=grad_sq, first_bad=first_bad, skip=skip, norm=norm,
                          scale=scale)  # fmt: skip
        self._function("step_guard", dtype)(
            (1,), (32,), (loss, grad_sq, self._step_array(step), dtype.type(max_norm), first_bad, skip, norm, scale)
        )

    def step_guard_norm(self, loss, g, grad_sq, step, max_norm, first_bad, skip, norm, scale, shares=None,
                        advance=None):  # fmt: skip
        """grad_sq = |g|^2 and the step's verdict in one launch (the block that finishes the
        sum runs the guard); shares (S, P): g summed from them first, in the same launch;
        advance (running, pos) or (running, pos, now, ahead): step_advance_selecting too,
        by that block. See numpy_ops.step_guard_norm."""
        dtype = norm.dtype
        self._check_guard("step_guard_norm", dtype, g, loss=loss, grad_sq=grad_sq, first_bad=first_bad, skip=skip,
                          norm=norm, scale=scale)  # fmt: skip
        if shares is None:
            shares = g.reshape(1, g.size)
        self._check("step_guard_norm", dtype, shares=shares)
        if shares.ndim != 2 or shares.shape[1] != g.size:
            raise ValueError(f"step_guard_norm: shares {shares.shape} do not fit g {g.shape}")
        # an element a thread when each is a sum of shares (more blocks read them at once)
        blocks, partial = self._sum_grid(g.size, dtype, 1 if shares.shape[0] > 1 else 4)
        if advance is None:
            running, pos = self._constant(0, (1,), np.float64), self._constant(0, (1,), np.int64)  # (not written)
            now, ahead = (), ()
        else:
            running, pos, now, ahead = (*advance, (), ())[:4]
            self._check("step_guard_norm", np.float64, running=running)
            self._check("step_guard_norm", np.int64, pos=pos)
            if running.size != 1 or pos.size != 1:
                raise ValueError("step_guard_norm: advance's running and pos must hold one value each")
        *now_rows, _ = self._row_bytes("step_guard_norm", now, 2)  # (the kernel bounds the ahead row alone)
        rows = now_rows + self._row_bytes("step_guard_norm", ahead, 1)
        self._function("step_guard_norm", dtype)(
            (blocks,), (BLOCK,),
            (loss, g, shares, np.int32(shares.shape[0]), np.int64(g.size), partial, self._counter("sum", blocks),
             grad_sq, self._step_array(step), dtype.type(max_norm), first_bad, skip, norm, scale,
             np.int32(advance is not None), running, pos, *rows),
        )  # fmt: skip

    @staticmethod
    def _check_row(op: str, table, out) -> None:
        """out can take a row of table: table (K, *out.shape), both C-contiguous, one dtype."""
        if not (table.flags.c_contiguous and out.flags.c_contiguous) or table.shape[1:] != out.shape:
            raise ValueError(f"{op}: table {table.shape} rows do not fit out {out.shape}")
        if table.dtype != out.dtype:
            raise TypeError(f"{op}: table {table.dtype} and out {out.dtype} differ")

    def _row_bytes(self, op: str, pairs, most: int) -> list:
        """(table, out, out's bytes) as bytes for each of `most` (table, out) row selections
        (optim.cu's select_row_block), (a byte, a byte, 0) where fewer are given, then the
        tables' rows (0: none), which they share."""
        pairs = list(pairs)
        if len(pairs) > most:
            raise ValueError(f"{op}: at most {most} table rows to select here, got {len(pairs)}")
        if len({table.shape[0] for table, _ in pairs}) > 1:
            raise ValueError(f"{op}: the tables' rows differ: {[table.shape for table, _ in pairs]}")
        args = []
        for table, out in pairs:
            self._check_row(op, table, out)
            args += [table.reshape(-1).view(np.uint8), out.reshape(-1).view(np.uint8), np.int32(out.nbytes)]
        unused = self._constant(0, (1,), np.uint8)
        return [
            *args,
            *[unused, unused, np.int32(0)] * (most - len(pairs)),
            np.int64(pairs[0][0].shape[0] if pairs else 0),
        ]

    def step_guard_scaled(self, loss, grad_sq, step, max_norm, first_bad, skip, norm, scale, loss_scale, good_steps,
                          skipped, interval=PR.LOSS_SCALE_INTERVAL):  # fmt: skip
        """fp16's verdict with dynamic loss scaling in one launch; see numpy_ops.step_guard_scaled."""
        args = self._scaled_guard_args("step_guard_scaled", loss, grad_sq, step, max_norm, first_bad, skip, norm,
                                       scale, loss_scale, good_steps, skipped, interval)  # fmt: skip
        self._function("step_guard_scaled_f32", None)((1,), (32,), (loss, grad_sq, *args))

    def step_guard_scaled_norm(self, loss, g, grad_sq, step, max_norm, first_bad, skip, norm, scale, loss_scale,
                               good_steps, skipped, interval=PR.LOSS_SCALE_INTERVAL):  # fmt: skip
        """grad_sq = |g|^2 and fp16's verdict in one launch (the block that finishes the sum
        runs the guard); see numpy_ops.step_guard_scaled_norm."""
        args = self._scaled_guard_args("step_guard_scaled_norm", loss, grad_sq, step, max_norm, first_bad, skip, norm,
                                       scale, loss_scale, good_steps, skipped, interval)  # fmt: skip
        self._check("step_guard_scaled_norm", np.float32, g=g)
        blocks, partial = self._sum_grid(g.size, np.float32)
        self._function("step_guard_scaled_norm_f32", None)(
            (blocks,), (BLOCK,), (loss, g, np.int64(g.size), partial, self._counter("sum", blocks), grad_sq, *args)
        )

    def _scaled_guard_args(self, op, loss, grad_sq, step, max_norm, first_bad, skip, norm, scale, loss_scale,
                           good_steps, skipped, interval) -> tuple:  # fmt: skip
        """Checks fp16's guard state (float32 values, int64 counters, a bool) and returns the
        kernels' arguments after (loss, grad_sq)."""
        f32 = np.float32
        self._check(op, f32, loss=loss, grad_sq=grad_sq, norm=norm, scale=scale, loss_scale=loss_scale)
        self._check(op, np.int64, first_bad=first_bad, good_steps=good_steps, skipped=skipped)
        self._check(op, np.bool_, skip=skip)
        state = {"loss": loss, "grad_sq": grad_sq, "first_bad": first_bad, "skip": skip, "norm": norm,
                 "scale": scale, "loss_scale": loss_scale, "good_steps": good_steps, "skipped": skipped}  # fmt: skip
        for name, a in state.items():
            if a.size != 1:
                raise ValueError(f"{op}: {name} must hold one value, has {a.size}")
        return (self._step_array(step), f32(max_norm), first_bad, skip, norm, scale, loss_scale, good_steps, skipped,
                np.int64(interval), f32(PR.LOSS_SCALE_BACKOFF), f32(PR.LOSS_SCALE_GROWTH))  # fmt: skip

    # ------------------------------------------------------------------ mixed precision

    def cast(self, src, out):
        """out = src in out's storage type; see numpy_ops.cast. float32 <-> bf16/fp16 by
        our kernels (round to nearest even), anything else by CuPy's astype."""
        if src.shape != out.shape:
            raise ValueError(f"cast: src {src.shape} and out {out.shape} differ")
        f32 = np.dtype(np.float32)
        if out.dtype in PR.LOW and src.dtype == f32:
            name = f"cast_f32_{_SUFFIX[out.dtype]}"
        elif src.dtype in PR.LOW and out.dtype == f32:
            name = f"cast_{_SUFFIX[src.dtype]}_f32"
        elif src.dtype in PR.LOW or out.dtype in PR.LOW:
            raise TypeError(f"cast: {src.dtype} -> {out.dtype} is not supported (16 bits <-> float32 only)")
        else:
            out[...] = src.astype(out.dtype, copy=False)
            return out
        self._check("cast", src.dtype, src=src)
        self._check("cast", out.dtype, out=out)
        if src.size:
            self._function(name, None)((self._blocks(src.size),), (BLOCK,), (src, out, np.int64(src.size)))
        return out

    def add(self, a, b, out):
        """out = a + b; 16-bit: in float, rounded once (see numpy_ops.add)."""
        if out.dtype not in PR.LOW:
            return self._cupy.add(a, b, out=out)
        self._check("add", out.dtype, a=a, b=b, out=out)
        if not (a.shape == b.shape == out.shape):
            raise ValueError(f"add: a {a.shape}, b {b.shape}, out {out.shape} differ")
        if out.size:
            self._function("add", out.dtype)((self._blocks(out.size),), (BLOCK,), (a, b, out, np.int64(out.size)))
        return out

    def _step_array(self, step):
        """The step index as a 0-d int64 device array: the trainer's device counter as it
        is (a captured step reads it when it runs), or a Python int copied over."""
        if isinstance(step, self._cupy.ndarray):
            if step.dtype != np.int64 or step.size != 1:
                raise ValueError("step must be a 0-d int64 array")
            return step
        return self._cupy.full((), int(step), dtype=np.int64)

    # ------------------------------------------------------------------ data

    def gather_rows(self, src, idx, out):
        """out[i] = src[idx[i]] on the device; see numpy_ops.gather_rows."""
        self._cupy.take(src, idx, axis=0, out=out)
        return out

    def gather_windows(self, srcs, perm, start, outs):
        """outs[k][i] = srcs[k][perm[start + i]] for one or two pairs (a batch's x and
        target), in one launch of gather.cu's kernel; see numpy_ops.gather_windows. The
        rows move as words of the widest size (16, 8, 4, 2, 1 bytes) that divides both
        pairs' row bytes and all their addresses. A float32 x into a bf16 or fp16 out is
        rounded as it moves (4-byte words; the other pair's row bytes a multiple of 4)."""
        if len(srcs) != len(outs) or len(srcs) not in (1, 2):
            raise ValueError(f"gather_windows: one or two (src, out) pairs, got {len(srcs)} and {len(outs)}")
        _checked_window("gather_windows", (perm, start))
        n = outs[0].shape[0]
        rounded = srcs[0].dtype == np.float32 and outs[0].dtype in PR.LOW and outs[0].size > 0  # x to 16 bits
        for k, (src, out) in enumerate(zip(srcs, outs)):
            if not (src.flags.c_contiguous and out.flags.c_contiguous) or src.shape[1:] != out.shape[1:]:
                raise ValueError(f"gather_windows: src {src.shape} rows do not fit out {out.shape}")
            if src.dtype != out.dtype and not (k == 0 and rounded):
                raise TypeError(f"gather_windows: src {src.dtype} and out {out.dtype} differ (or float32 x to 16 bits)")
            if out.shape[0] != n:
                raise ValueError(f"gather_windows: every out has the same rows, got {out.shape[0]} and {n}")
        # the pairs with bytes to move, as bytes (the kernel's pointers); a lone pair goes twice, its second width 0
        moved = [(src, out) for src, out in zip(srcs, outs) if out.size]
        pairs = [(src.view(np.uint8), out.view(np.uint8)) for src, out in moved]
        if n == 0 or not pairs:
            return outs
        row_bytes = [out.size // n * src.itemsize for src, out in moved]  # (a rounded x: its float32 source's)
        if rounded:
            if any(b % 4 for b in row_bytes) or any(_address(a) % 4 for a in pairs[-1]):
                raise ValueError("gather_windows: a rounded x's other pair moves as 4-byte words")
            word, name = 4, f"gather_windows_w4_{_SUFFIX[outs[0].dtype]}"
        else:
            word = next(w for w in GATHER_WORDS
                        if all(b % w == 0 for b in row_bytes) and all(_address(a) % w == 0 for pair in pairs for a in pair))  # fmt: skip
            name = f"gather_windows_w{word}"
        widths = [b // word for b in row_bytes] + [0]
        (xs, xo), (ys, yo) = pairs[0], pairs[-1]
        total = n * (widths[0] + widths[1])
        fn = self._function(name, None)
        fn((self._blocks(total),), (BLOCK,),
           (xs, ys, perm, start, np.int64(n), np.int32(widths[0]), np.int32(widths[1]), xo, yo))  # fmt: skip
        return outs

    # ------------------------------------------------------------------ device-side step state (gpubp/step.py)

    def select_rows(self, tables, pos, outs):
        """outs[k] = tables[k][pos], pos a 0-d int64 device counter: two pairs per launch;
        see numpy_ops.select_rows."""
        if len(tables) != len(outs) or not tables:
            raise ValueError(f"select_rows: (table, out) pairs, got {len(tables)} tables and {len(outs)} outs")
        if pos.dtype != np.int64 or pos.size != 1:
            raise TypeError("select_rows: pos is one int64")
        for table, out in zip(tables, outs):
            self._check_row("select_rows", table, out)
        pairs = [(t, o) for t, o in zip(tables, outs) if o.size]
        for k in range(0, len(pairs) - 1, 2):
            (a, out_a), (b, out_b) = pairs[k], pairs[k + 1]
            self._stacked_kernel("select2")(
                a, b, pos, np.int64(out_a.size), np.int64(out_b.size), out_a, out_b, size=out_a.size + out_b.size
            )
        if len(pairs) % 2:
            table, out = pairs[-1]
            self._stacked_kernel("select")(table, pos, np.int64(out.size), out)
        return outs

    def step_advance(self, running, loss, pos, ahead=()):
        """running += loss, pos += 1 and the ahead tables' rows at the new pos, in one launch
        of one block (optim.cu's step_advance); see numpy_ops.step_advance."""
        if running.shape != loss.shape or pos.dtype != np.int64 or pos.size != 1:
            raise ValueError(
                f"step_advance: running {running.shape} and loss {loss.shape} differ, or pos is not one int64"
            )
        self._check("step_advance", np.float64, running=running)
        self._check("step_advance", loss.dtype, loss=loss)
        rows = self._row_bytes("step_advance", ahead, 3)
        self._function("step_advance", loss.dtype)((1,), (BLOCK,), (loss, running, np.int64(running.size), pos, *rows))

    def index_window(self, perm, start, out):
        """out[i] = perm[start + i]; see numpy_ops.index_window."""
        if perm.dtype != out.dtype or start.dtype != np.int64 or start.size != 1 or not perm.flags.c_contiguous:
            raise TypeError("index_window: perm and out share an integer dtype; start is one int64")
        self._stacked_kernel("window")(perm, start, out)
        return out

    def update_vectors(self, rates, pos, counts, t0, updates, skip, vectors, first_step, bias_corrected):
        """The update's numbers from the counters, and updates += !skip, in one launch (one
        block over the M models); see numpy_ops.update_vectors."""
        dtype = vectors.dtype
        self._check("update_vectors", np.float64, rates=rates, counts=counts)
        self._check("update_vectors", np.int64, pos=pos, t0=t0, updates=updates)
        self._check("update_vectors", np.bool_, skip=skip, first_step=first_step)
        self._check("update_vectors", dtype, vectors=vectors)
        m = vectors.shape[1] if vectors.ndim == 3 else -1
        rows = 3 if bias_corrected else 1
        if vectors.shape != (rows, m, 1) or rates.ndim != 3 or rates.shape[1:] != (2, m) or counts.shape[1:] != (2, m):
            raise ValueError(f"update_vectors: vectors {vectors.shape} must be ({rows}, M, 1), rates {rates.shape} "
                             f"and counts {counts.shape} (K, 2, M)")  # fmt: skip
        for name, a in (("pos", pos), ("t0", t0), ("updates", updates), ("skip", skip), ("first_step", first_step)):
            if a.size != 1:
                raise ValueError(f"update_vectors: {name} must hold one value, has {a.size}")
        self._function("update_vectors", dtype)(
            (1,), (32,), (rates, pos, counts, t0, updates, skip, np.int64(m), np.int32(bool(bias_corrected)), vectors,
                          first_step),
        )  # fmt: skip

    def graph_capturer(self):
        """What gpubp/step.py captures the training step with: CUDA graphs. A new one per
        step function: its stream, memory pools, workspace and graphs live as long as it."""
        return CudaGraphCapturer(self)

    # ------------------------------------------------------------------ stacked models (gpubp.stack)
    # The *_batched ops of numpy_stacked with a leading model axis M: cuBLAS strided-batched
    # GEMM (one call for all M models), our row kernels over the M*N rows, and elementwise
    # updates whose per-model hyperparameters are (M, 1) device vectors broadcast over (M, P).

    def _slices_ok(self, op: str, name: str, a, dtype) -> int:
        """a (M, r, c) or shared (r, c) whose 2-D slices are row-major contiguous; returns its
        model stride in elements (0 for a shared operand)."""
        if not isinstance(a, self._cupy.ndarray) or a.dtype != dtype:
            raise TypeError(f"{op}: {name} must be a CuPy array of dtype {np.dtype(dtype)}")
        item = a.itemsize
        if a.ndim not in (2, 3) or a.strides[-1] != item or (a.shape[-2] > 1 and a.strides[-2] != a.shape[-1] * item):
            raise ValueError(f"{op}: {name} {a.shape} must be a stack of row-major contiguous matrices")
        return 0 if a.ndim == 2 else a.strides[0] // item

    def gemm_batched(self, a, b, out, trans_a=False, trans_b=False, beta=0.0):
        """out[i] = op(a[i]) @ op(b[i]) + beta out[i] for all i in ONE cublasGemmStridedBatchedEx;
        see numpy_stacked.gemm_batched. alpha and beta go to cuBLAS as host pointers."""
        dtype = out.dtype
        sa, sb, so = (self._slices_ok("gemm_batched", n, x, dtype) for n, x in (("a", a), ("b", b), ("out", out)))
        count = out.shape[0]
        m, k = (a.shape[-1], a.shape[-2]) if trans_a else a.shape[-2:]
        kb, n = (b.shape[-1], b.shape[-2]) if trans_b else b.shape[-2:]
        if out.ndim != 3 or k != kb or out.shape[1:] != (m, n) or (a.ndim == 3 and a.shape[0] != count) or b.ndim != 3:
            raise ValueError(f"gemm_batched: op(a) {(m, k)} @ op(b) {(kb, n)} does not fit out {out.shape}")
        if beta not in (0.0, 1.0):
            raise ValueError("gemm_batched: beta must be 0 or 1")
        if count == 0 or m == 0 or n == 0:
            return out
        t = dtype.type
        compute = _COMPUTE_64F if t is np.float64 else (_COMPUTE_32F_FAST_TF32 if self.tf32 else _COMPUTE_32F)
        data = _CUDA_R_64F if t is np.float64 else _CUDA_R_32F
        # column-major: out[i]^T (n x m) = op(b[i])^T (n x k) . op(a[i])^T (k x m)
        self._blas.gemmStridedBatchedEx(
            self.handle, _OP_T if trans_b else _OP_N, _OP_T if trans_a else _OP_N, n, m, k,
            self._scalar_ptr(t, 1.0), b.data.ptr, data, b.shape[-1], sb,
            a.data.ptr, data, a.shape[-1], sa,
            self._scalar_ptr(t, beta), out.data.ptr, data, n, so, count, compute, _GEMM_DEFAULT,
        )  # fmt: skip
        return out

    def bias_act_forward_batched(self, z, b, act: Activation, out):
        """z[i] += b[i], out = f(z); see numpy_stacked.bias_act_forward_batched."""
        self._cupy.add(z, b[:, None, :], out=z)
        zero = self._constant(0.0, (z.shape[-1],), z.dtype)
        self.bias_act_forward(z.reshape(-1, z.shape[-1]), zero, act, out.reshape(-1, out.shape[-1]))
        return out

    def _constant(self, value: float, shape: tuple, dtype):
        """A cached device array filled with `value` (the unit scale, the zero bias, the ones row)."""
        return self._kept(
            ("constant", value, shape, np.dtype(dtype)), lambda: self._cupy.full(shape, value, dtype=dtype)
        )

    def bias_grad_batched(self, d, out):
        """out[i] = 1^T d[i] (M, n): one strided-batched GEMM with a shared ones row."""
        self.gemm_batched(self._constant(1.0, (1, d.shape[1]), d.dtype), d, out[:, None, :])
        return out

    def _stack_rows(self, target, count: int):
        """Targets (N, ...) shared by every model as (M * N, ...) contiguous rows, else reshaped."""
        cupy = self._cupy
        if target.ndim in (1, 2) and not (target.ndim == 2 and target.dtype == np.int32):
            shared = target.ndim == 1 if target.dtype == np.int32 else target.ndim == 2
            if shared:
                target = cupy.broadcast_to(target, (count, *target.shape))
        return cupy.ascontiguousarray(target).reshape(-1, *target.shape[2:])

    def loss_forward_backward_batched(self, x, target, loss: Loss, grad=None, out=None):
        """Each model's mean loss (M,) and grad; see numpy_stacked.loss_forward_backward_batched.
        The loss_rows kernel runs over all M * N rows; each model's row losses are then summed
        (into `out` (M,) when given: a captured step's fixed buffer, the same two kernels)."""
        dtype = x.dtype
        count, n, c = x.shape
        labels_kind = loss.info.target == "labels"
        rows = self._stack_rows(target, count)
        if labels_kind:
            labels, targets = rows, self._unit_scale(dtype)  # targets unused
        else:
            labels, targets = self._unit_scale(np.int32), rows
        divisor = n if labels_kind else n * c
        row_loss = self._scratch("loss_rows", count * n, dtype)
        x2 = x.reshape(-1, c)
        g2 = grad.reshape(-1, c) if grad is not None else x2
        self._check("loss_forward_backward_batched", dtype, x=x2, grad=g2)
        self._loss_rows(x2, labels, targets, g2 if grad is not None else None, row_loss, c, loss, divisor)
        if out is None:
            return row_loss.reshape(count, n).sum(axis=1) / dtype.type(divisor)
        if out.shape != (count,) or out.dtype != dtype:
            raise ValueError(f"loss_forward_backward_batched: out must be ({count},) of {dtype}")
        row_loss.reshape(count, n).sum(axis=1, out=out)
        self._cupy.divide(out, dtype.type(divisor), out=out)
        return out

    def accuracy_count_batched(self, x, labels, threshold=0.0):
        """Rows classified right per model (M,) int64."""
        count, n, c = x.shape
        lab = self._stack_rows(labels, count)
        correct = self._scratch("accuracy_rows", count * n, np.int32)
        self._function("accuracy_rows", x.dtype)(
            (self._blocks(count * n),), (BLOCK,),
            (x.reshape(-1, c), lab, correct, np.int32(count * n), np.int32(c), x.dtype.type(threshold)),
        )  # fmt: skip
        return correct.reshape(count, n).sum(axis=1, dtype=np.int64)

    def sum_squares_batched(self, g, out=None):
        """sum_j g_ij^2 per model (M,), one reduction kernel (into `out` when given)."""
        kernel = self._stacked_kernel("sumsq")
        return kernel(g, axis=1) if out is None else kernel(g, axis=1, out=out)

    def index_window_batched(self, perm, start, out):
        """out[i, j] = perm[i, start + j]; see numpy_stacked.index_window_batched."""
        if perm.dtype != out.dtype or start.dtype != np.int64 or start.size != 1 or not perm.flags.c_contiguous:
            raise TypeError("index_window_batched: perm and out share an integer dtype; start is one int64")
        if perm.ndim != 2 or out.ndim != 2 or perm.shape[0] != out.shape[0] or not out.flags.c_contiguous:
            raise ValueError(f"index_window_batched: perm {perm.shape} and out {out.shape} must be (M, n), (M, N)")
        self._stacked_kernel("window_rows")(perm, start, np.int64(perm.shape[1]), np.int64(out.shape[1]), out)
        return out

    def step_guard_norm_batched(self, loss, g, grad_sq, step, max_norm, frozen, first_bad, skip, norm, scale):
        """|g_i|^2 and every model's verdict in one launch, a block per model; see
        numpy_stacked.step_guard_norm_batched."""
        dtype = g.dtype
        if g.ndim != 2:
            raise ValueError(f"step_guard_norm_batched: g must be (M, P), got {g.shape}")
        m = g.shape[0]
        self._check("step_guard_norm_batched", dtype, loss=loss, g=g, grad_sq=grad_sq, max_norm=max_norm, norm=norm,
                    scale=scale)  # fmt: skip
        self._check("step_guard_norm_batched", np.int64, first_bad=first_bad)
        self._check("step_guard_norm_batched", np.bool_, frozen=frozen, skip=skip)
        for name, a in (("loss", loss), ("grad_sq", grad_sq), ("max_norm", max_norm), ("frozen", frozen),
                        ("first_bad", first_bad), ("skip", skip), ("norm", norm), ("scale", scale)):  # fmt: skip
            if a.shape != (m,):
                raise ValueError(f"step_guard_norm_batched: {name} must be ({m},), got {a.shape}")
        if m:
            self._function("step_guard_norm_batched", dtype)(
                (m,), (BLOCK,), (loss, g, np.int64(g.shape[1]), grad_sq, self._step_array(step), max_norm, frozen,
                                 first_bad, skip, norm, scale),
            )  # fmt: skip

    def _stacked_kernel(self, name: str):
        """CuPy's elementwise (or, for "sumsq", reduction) kernel of ELEMENTWISE[name], made once."""
        cache = self.__dict__.setdefault("_stacked", {})
        if name not in cache:
            cupy = self._cupy
            if name == "sumsq":
                cache[name] = cupy.ReductionKernel("T x", "T y", "x * x", "a + b", "y = a", "0", "gpubp_sumsq")
            else:
                cache[name] = cupy.ElementwiseKernel(*ELEMENTWISE[name], preamble=elementwise_preamble(name))
        return cache[name]

    @staticmethod
    def _rounding(rule: str, p, low) -> tuple[str, tuple]:
        """The update kernel of `rule` ("sgd", "adam") and its extra output: with `low` (a
        16-bit array of p's shape), the variant that also writes low = p in 16 bits."""
        if low is None:
            return rule, ()
        if low.dtype not in PR.LOW or p.dtype != np.float32 or low.shape != p.shape or not low.flags.c_contiguous:
            raise ValueError(f"{rule}_step_batched: low must be a C-contiguous bf16/fp16 array of p's shape "
                             f"{p.shape} (p float32), got {low.dtype} {low.shape}")  # fmt: skip
        return f"{rule}_{_SUFFIX[low.dtype]}", (low.view(np.uint16),)

    def _skip_rows(self, skip, count: int):
        if skip is None:
            return self._constant(False, (count, 1), np.bool_)
        return skip.reshape(count, 1).astype(np.bool_, copy=False)

    def sgd_step_batched(self, p, g, buf, scratch, *, lr, momentum, one_minus_dampening, nesterov, weight_decay,
                         first_step, grad_scale, skip=None, momentum_on=True, decay_on=True, low=None):  # fmt: skip
        """numpy_stacked.sgd_step_batched as one elementwise kernel over (M, P) (with `low`:
        numpy_stacked.rounded's, the 16-bit copy written in the same kernel)."""
        self._check("sgd_step_batched", p.dtype, p=p, g=g, buf=buf)
        name, low_out = self._rounding("sgd", p, low)
        self._stacked_kernel(name)(
            g, grad_scale, weight_decay, momentum, one_minus_dampening, lr, self._skip_rows(skip, p.shape[0]),
            first_step if isinstance(first_step, self._cupy.ndarray) else np.bool_(first_step),
            np.int32(bool(nesterov)), np.int32(bool(momentum_on)), p, buf, *low_out,
        )  # fmt: skip

    def adam_step_batched(self, p, g, m, v, scratch, *, lr_decay, one_minus_beta1, beta2, one_minus_beta2, eps,
                          weight_decay, step_size, bias2_sqrt, decoupled, grad_scale, skip=None,
                          decay_on=True, low=None):  # fmt: skip
        """numpy_stacked.adam_step_batched as one elementwise kernel over (M, P) (with `low`:
        numpy_stacked.rounded's, the 16-bit copy written in the same kernel)."""
        self._check("adam_step_batched", p.dtype, p=p, g=g, m=m, v=v)
        name, low_out = self._rounding("adam", p, low)
        self._stacked_kernel(name)(
            g, grad_scale, weight_decay, lr_decay, one_minus_beta1, beta2, one_minus_beta2, eps, step_size,
            bias2_sqrt, self._skip_rows(skip, p.shape[0]), np.int32(bool(decoupled)), p, m, v, *low_out,
        )  # fmt: skip


class CudaGraphCapturer:
    """Captures the trainer's step (gpubp/step.py) as one CUDA graph per batch shape.

    - warmup(key, fn): the shape's first step runs plainly, on the capture stream, with
      a memory pool of its own: its buffers (workspace, batch, index) are made there, and
      every kernel is compiled and loaded before the capture.
    - capture(key, fn): the second step is captured on that stream with that pool
      (CuPy's relaxed capture mode; nothing runs), and replay() launches the graph on
      the current stream (the stream is non-blocking: nothing on the legacy default
      stream can join the capture; the warm-up is ordered with events). The pool is never used by anything else afterwards, so the
      temporaries the graph's kernels write (partial sums) stay its own.
    cuBLAS: the handle's stream is set to the capture stream (CuPy's setStream) before
    the capture begins and put back after (which also gives cuBLAS its default workspace
    back). In between, the backend calls cuBLAS through `cublas_direct` (ctypes on the
    same libcublas), not CuPy's bindings: those set the handle's stream before every
    routine, and CuPy's setStream refuses while the stream captures (seen on an H100,
    CuPy 14.2.0). In between, too, cuBLAS works in a workspace of
    ours (WORKSPACE_BYTES, kept for the graphs' life), so it allocates nothing inside a
    capture: CuPy 14's raw binding has no cublasSetWorkspace, so it is called through
    ctypes on the libcublas CuPy loaded (`cublas_set_workspace`); where that fails,
    `workspace_note` says why and cuBLAS (12.2+ allocates stream-ordered) goes on
    without."""

    WORKSPACE_BYTES = cublaslt.WORKSPACE_BYTES  # cuBLAS's recommended workspace on Hopper (cuBLASLt's too)

    def __init__(self, backend):
        cupy = backend._cupy
        self.backend = backend
        self.stream = cupy.cuda.Stream(non_blocking=True)  # a side stream, ordered by events (warmup)
        self.pools: dict = {}  # key -> the MemoryPool of that shape's step
        self.graphs: dict = {}  # key -> the captured graph (kept alive)
        self.workspace = None  # cuBLAS's workspace inside warm-ups and captures (device bytes)
        self.workspace_note = None  # why cuBLAS has none of ours, if it has not
        self.direct, why = cublas_direct.direct_cublas()  # cuBLAS inside warm-ups and captures
        if self.direct is None:
            raise DeviceRuntimeError(f"CUDA graphs need cuBLAS through ctypes: {why}; set train.cuda_graph = false")

    def bind_cublas(self, stream_ptr: int) -> int:
        """Point the backend's cuBLAS handle at stream `stream_ptr`; returns the stream it had."""
        cublas, handle = self.backend._cublas, self.backend.handle
        previous = int(cublas.getStream(handle))
        cublas.setStream(handle, int(stream_ptr))
        return previous

    @contextlib.contextmanager
    def _on_stream(self, key):
        cupy = self.backend._cupy
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = cupy.cuda.MemoryPool()
        if self.workspace is None:
            self.workspace = cupy.empty(self.WORKSPACE_BYTES, dtype=np.uint8)  # the default pool: kept
        previous = self.bind_cublas(self.stream.ptr)
        try:
            self.workspace_note = cublas_set_workspace(
                self.backend.handle, self.workspace.data.ptr, self.workspace.nbytes
            )
            self.backend._blas = self.direct
            with cupy.cuda.using_allocator(pool.malloc), self.stream:
                yield
        finally:
            self.backend._blas = self.backend._cublas
            self.bind_cublas(previous)

    def warmup(self, key, fn) -> None:
        """Run fn plainly on the capture stream, after the current stream's work and before its next."""
        current = self.backend._cupy.cuda.get_current_stream()
        self.stream.wait_event(current.record())
        with self._on_stream(key):
            fn()
        current.wait_event(self.stream.record())

    def capture(self, key, fn):
        with self._on_stream(key):
            self.stream.begin_capture()
            try:
                fn()
            except BaseException:
                with contextlib.suppress(Exception):
                    self.stream.end_capture()
                raise
            graph = self.stream.end_capture()
        self.graphs[key] = graph
        return graph.launch


def cublas_set_workspace(handle: int, ptr: int, size: int, lib=None) -> str | None:
    """cublasSetWorkspace_v2(handle, ptr, size) through ctypes on the libcublas this process
    loaded (CuPy's binding links it; CuPy 14 does not wrap this call). `lib`: the library
    (tests pass a stand-in). Returns None, or why the workspace was not set."""
    import ctypes

    if lib is None:
        lib, why = cublas_direct.loaded_libcublas()
        if lib is None:
            return why
    fn = getattr(lib, "cublasSetWorkspace_v2", None)
    if fn is None:
        return "libcublas has no cublasSetWorkspace_v2"
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    fn.restype = ctypes.c_int
    status = fn(int(handle), int(ptr), int(size))
    return None if status == 0 else f"cublasSetWorkspace_v2 returned status {status}"
