"""cuBLASLt matrix products with a fused epilogue, through ctypes.

CuPy 14 does not wrap cuBLASLt, so this module calls libcublasLt itself: the copy that
CuPy's libcublas links (found in /proc/self/maps), else the library by its soname. The
prototypes, enum values and struct sizes below are those of cublasLt.h (CUDA 12 and 13);
tests/test_epilogues.py reads them against the header where one is installed.

Row-major, as in the rest of gpubp: out (M, N) = op(a) (M, K) op(b) (K, N). cuBLASLt is
column-major and sees out^T (N x M) = op(b)^T op(a)^T: its A is b's buffer, its B is a's,
m = N, n = M, k = K (as CupyBackend.gemm does for cuBLAS). Its "rows of D" are our columns,
so the bias (one per output feature) and the bias gradient are per column of out.

The epilogues gpubp uses, in row-major terms (numpy_ops' gemm_bias, gemm_bias_relu,
gemm_drelu_bias_grad and gemm_bias_grad are the references):
  BIAS           out = op(a) op(b) + 1 bias^T
  RELU_AUX_BIAS  v = op(a) op(b) + 1 bias^T;  out = max(v, 0);  mask = bits [v > 0]
  DRELU_BGRAD    out = (op(a) op(b)) * mask;  bias_grad = 1^T out   (sum over the rows)
  BGRADA         out = op(a) op(b);  bias_grad = 1^T op(b)   (cuBLASLt's A is our b; its
                 rows are summed over k: the K rows of op(b))
The ReLU mask is cuBLASLt's own bit matrix: one bit per element of out, each row of out
padded to numpy_ops.MASK_ALIGN bits (its leading dimension must be a multiple of 128).

A plan (descriptors and the heuristic's algorithm) is made once per shape, pointer set
and epilogue and kept: a step calls cublasLtMatmul and nothing else on the host, and a
CUDA graph capture records that one kernel (the workspace is ours, so nothing is
allocated inside a capture). Where cuBLASLt offers no algorithm for a case, `plan`
returns None and the caller runs the unfused ops. So it does where cublasLtMatmul refuses
the heuristic's own plan (NOT_SUPPORTED, INVALID_VALUE, ARCH_MISMATCH: nothing ran;
PyTorch's gemm_and_bias falls back on these too), and the plan is dropped. DRELU_BGRAD
and BGRADA with k = 1 are never asked for (NO_K1).
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

from .numpy_ops import relu_mask_bytes

# cublasLtEpilogue_t (cublasLt.h)
EPILOGUE_DEFAULT = 1
EPILOGUE_BIAS = 4
EPILOGUE_RELU_AUX_BIAS = 134  # RELU (2) | AUX (128) | BIAS (4)
EPILOGUE_DRELU_BGRAD = 152  # DRELU (8 | 128) | BGRAD (16)
EPILOGUE_BGRADA = 256
# epilogues never asked for with k = 1 (a rank-1 product: the unfused ops cost little more).
# cuBLASLt does not support k = 1 with DRELU (nvmath-python refuses it: "K=1 is not
# supported by cuBLAS"), nor with BGRADA/BGRADB before cuBLASLt 12.3.4; here k = 1 is a
# layer above of width 1 (DRELU_BGRAD) or a batch of one row (BGRADA)
NO_K1 = (EPILOGUE_DRELU_BGRAD, EPILOGUE_BGRADA)

# cublasLtMatmulDescAttributes_t
DESC_TRANSA = 3
DESC_TRANSB = 4
DESC_EPILOGUE = 7
DESC_BIAS_POINTER = 8
DESC_EPILOGUE_AUX_POINTER = 11
DESC_EPILOGUE_AUX_LD = 12
DESC_BIAS_DATA_TYPE = 26
# cublasLtMatmulPreferenceAttributes_t
PREF_MAX_WORKSPACE_BYTES = 1
PREF_MIN_ALIGNMENT_A_BYTES, PREF_MIN_ALIGNMENT_B_BYTES = 5, 6
PREF_MIN_ALIGNMENT_C_BYTES, PREF_MIN_ALIGNMENT_D_BYTES = 7, 8

# cublasStatus_t values after which cublasLtMatmul has launched nothing (cublasLt.h: parameters
# in conflict, an operation the implementation or the device does not support)
STATUS_NOTHING_RAN = (7, 8, 15)  # INVALID_VALUE, ARCH_MISMATCH, NOT_SUPPORTED

# cublasOperation_t, cudaDataType_t, cublasComputeType_t (cublas_api.h, library_types.h)
OP_N, OP_T = 0, 1
CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF = 0, 2, 14
COMPUTE_32F, COMPUTE_32F_FAST_TF32 = 68, 77

WORKSPACE_BYTES = 32 << 20  # cuBLAS's recommended workspace on Hopper


class Algo(ctypes.Structure):
    """cublasLtMatmulAlgo_t: uint64_t data[8]."""

    _fields_ = [("data", ctypes.c_uint64 * 8)]


class HeuristicResult(ctypes.Structure):
    """cublasLtMatmulHeuristicResult_t."""

    _fields_ = [
        ("algo", Algo),
        ("workspaceSize", ctypes.c_size_t),
        ("state", ctypes.c_int),
        ("wavesCount", ctypes.c_float),
        ("reserved", ctypes.c_int * 4),
    ]


_P = ctypes.c_void_p
_PP = ctypes.POINTER(ctypes.c_void_p)
# name -> argtypes (every function returns cublasStatus_t, an int)
PROTOTYPES = {
    "cublasLtCreate": [_PP],
    "cublasLtDestroy": [_P],
    "cublasLtMatmulDescCreate": [_PP, ctypes.c_int, ctypes.c_int],
    "cublasLtMatmulDescDestroy": [_P],
    "cublasLtMatmulDescSetAttribute": [_P, ctypes.c_int, _P, ctypes.c_size_t],
    "cublasLtMatrixLayoutCreate": [_PP, ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64],
    "cublasLtMatrixLayoutDestroy": [_P],
    "cublasLtMatmulPreferenceCreate": [_PP],
    "cublasLtMatmulPreferenceDestroy": [_P],
    "cublasLtMatmulPreferenceSetAttribute": [_P, ctypes.c_int, _P, ctypes.c_size_t],
    # handle, desc, A, B, C, D layouts, preference; requested count, results, returned count
    "cublasLtMatmulAlgoGetHeuristic": [_P] * 7
    + [ctypes.c_int, ctypes.POINTER(HeuristicResult), ctypes.POINTER(ctypes.c_int)],  # fmt: skip
    "cublasLtMatmul": [_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, ctypes.POINTER(Algo), _P, ctypes.c_size_t, _P],
}


def load_library():
    """(the libcublasLt this process can call, None) or (None, why not)."""
    path = None
    try:
        with open("/proc/self/maps") as f:
            loaded = [ln.split()[-1] for ln in f if "/libcublas" in ln]
        blas = [p for p in loaded if "/libcublas.so" in p]
        lts = [p for p in loaded if "/libcublasLt.so" in p]
        # the one beside CuPy's libcublas (PyTorch may have loaded a copy of its own)
        near = [p for p in lts if blas and os.path.dirname(p) == os.path.dirname(blas[0])]
        path = (near or lts or [None])[0]
    except OSError:
        pass
    names = [path] if path else ["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"]
    errors = []
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError as e:
            errors.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
    else:
        return None, f"libcublasLt cannot be opened ({'; '.join(errors)})"
    for fname, argtypes in PROTOTYPES.items():
        fn = getattr(lib, fname, None)
        if fn is None:
            return None, f"libcublasLt has no {fname}"
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
    return lib, None


def alignment(ptr: int) -> int:
    """The largest power of two (at most 256 bytes) dividing a device address."""
    return min(256, ptr & -ptr) if ptr else 256


class Plan:
    """One cublasLtMatmul shape, prepared: descriptors, algorithm, scalars. The operand
    addresses are passed at each run; the bias and mask addresses are in the descriptor."""

    def __init__(self, lt, desc, layouts, algo, key=None):
        self.lt, self.desc, self.layouts, self.algo, self.key = lt, desc, layouts, algo, key

    def run(self, a_ptr: int, b_ptr: int, d_ptr: int, stream_ptr: int) -> bool:
        """True: the product is issued; False: cublasLtMatmul refused this plan having
        launched nothing (STATUS_NOTHING_RAN), and the plan is dropped (the Lt remembers
        None for its key); any other failure raises."""
        lt, (la, lb, ld) = self.lt, self.layouts
        status = lt.lib.cublasLtMatmul(
            lt.handle, self.desc, lt.one, a_ptr, la, b_ptr, lb, lt.zero, d_ptr, ld, d_ptr, ld,
            ctypes.byref(self.algo), lt.workspace_ptr, lt.workspace_bytes, stream_ptr,
        )  # fmt: skip
        if status in STATUS_NOTHING_RAN:
            lt.drop(self)
            return False
        if status != 0:
            raise RuntimeError(f"cublasLtMatmul returned status {status}")
        return True


class Lt:
    """A cuBLASLt handle, its workspace and the plans made so far.

    workspace_ptr/workspace_bytes: device memory kept by the caller for the handle's life."""

    def __init__(self, lib, workspace_ptr: int, workspace_bytes: int):
        self.lib = lib
        handle = ctypes.c_void_p()
        self._ok(lib.cublasLtCreate(ctypes.byref(handle)), "cublasLtCreate")
        self.handle = handle
        self.workspace_ptr, self.workspace_bytes = workspace_ptr, workspace_bytes
        self.plans: dict = {}
        # alpha = 1, beta = 0 (float32, pointer mode host: their host addresses are passed)
        self._scalars = np.array([1.0, 0.0], np.float32)
        self.one, self.zero = self._scalars.ctypes.data, self._scalars.ctypes.data + 4

    @staticmethod
    def _ok(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} returned status {status}")

    def drop(self, plan: Plan) -> None:
        """Forget a plan cublasLtMatmul refused: None under its key (no second try), its
        descriptors destroyed."""
        self.plans[plan.key] = None
        for layout in plan.layouts:
            self.lib.cublasLtMatrixLayoutDestroy(layout)
        self.lib.cublasLtMatmulDescDestroy(plan.desc)

    def _set(self, fn, obj, attr: int, value) -> None:
        self._ok(fn(obj, attr, ctypes.byref(value), ctypes.sizeof(value)), f"setting attribute {attr}")

    def plan(self, *, m: int, n: int, k: int, lda: int, trans_a: bool, ldb: int, trans_b: bool, ldd: int,
             epilogue: int, aligns: tuple, tf32: bool = False, bias_ptr: int = 0, mask_ptr: int = 0,
             mask_ld: int = 0, data_type: int = CUDA_R_32F, d_type: int | None = None,
             bias_type: int | None = CUDA_R_32F):  # fmt: skip
        """The Plan of D (m x n, column-major) = op(A) op(B) with `epilogue`, made on first
        use; None where cuBLASLt has no algorithm for it. data_type: A's and B's (float32,
        or 16-bit with float32 accumulation); d_type: D's (default data_type; float32 for
        16-bit inputs' weight gradients); the bias or bias gradient is float32 either way,
        and so are alpha and beta. A, B, D as cuBLASLt
        sees them (column-major; the caller swaps row-major operands); aligns: the byte
        alignments of A, B and D (`alignment`), which the algorithm may rely on. bias_ptr:
        the bias (BIAS epilogues) or the bias gradient (BGRAD); mask_ptr, mask_ld (bits):
        the ReLU mask; bias_type: its CUDA type (None: D's, cuBLASLt's default; gpubp keeps
        float32 biases, tests/lt_bias_probe.py asks which types cuBLASLt takes)."""
        d_type = data_type if d_type is None else d_type
        key = (m, n, k, lda, trans_a, ldb, trans_b, ldd, epilogue, aligns, tf32, bias_ptr, mask_ptr, mask_ld, data_type,
               d_type, bias_type)  # fmt: skip
        if key in self.plans:
            return self.plans[key]
        lib = self.lib
        desc = ctypes.c_void_p()
        compute = COMPUTE_32F_FAST_TF32 if tf32 and data_type == CUDA_R_32F else COMPUTE_32F
        self._ok(lib.cublasLtMatmulDescCreate(ctypes.byref(desc), compute, CUDA_R_32F), "cublasLtMatmulDescCreate")
        set_desc = lib.cublasLtMatmulDescSetAttribute
        self._set(set_desc, desc, DESC_TRANSA, ctypes.c_int32(OP_T if trans_a else OP_N))
        self._set(set_desc, desc, DESC_TRANSB, ctypes.c_int32(OP_T if trans_b else OP_N))
        self._set(set_desc, desc, DESC_EPILOGUE, ctypes.c_uint32(epilogue))
        if bias_ptr:
            self._set(set_desc, desc, DESC_BIAS_POINTER, ctypes.c_void_p(bias_ptr))
            if bias_type is not None and bias_type != d_type:  # by default the bias has D's type
                self._set(set_desc, desc, DESC_BIAS_DATA_TYPE, ctypes.c_int32(bias_type))
        if mask_ptr:
            self._set(set_desc, desc, DESC_EPILOGUE_AUX_POINTER, ctypes.c_void_p(mask_ptr))
            self._set(set_desc, desc, DESC_EPILOGUE_AUX_LD, ctypes.c_int64(mask_ld))
        layouts = []
        # A: op(A) is m x k, stored k x m if transposed; B: op(B) is k x n; D: m x n
        for rows, cols, ld, dtype in ((k, m, lda, data_type) if trans_a else (m, k, lda, data_type),
                                      (n, k, ldb, data_type) if trans_b else (k, n, ldb, data_type),
                                      (m, n, ldd, d_type)):  # fmt: skip
            layout = ctypes.c_void_p()
            self._ok(lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), dtype, rows, cols, ld),
                     "cublasLtMatrixLayoutCreate")  # fmt: skip
            layouts.append(layout)
        pref = ctypes.c_void_p()
        self._ok(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "cublasLtMatmulPreferenceCreate")
        set_pref = lib.cublasLtMatmulPreferenceSetAttribute
        self._set(set_pref, pref, PREF_MAX_WORKSPACE_BYTES, ctypes.c_uint64(self.workspace_bytes))
        align_a, align_b, align_d = aligns
        for attr, value in ((PREF_MIN_ALIGNMENT_A_BYTES, align_a), (PREF_MIN_ALIGNMENT_B_BYTES, align_b),
                            (PREF_MIN_ALIGNMENT_C_BYTES, align_d), (PREF_MIN_ALIGNMENT_D_BYTES, align_d)):  # fmt: skip
            self._set(set_pref, pref, attr, ctypes.c_uint32(value))
        result, count = HeuristicResult(), ctypes.c_int(0)
        status = lib.cublasLtMatmulAlgoGetHeuristic(
            self.handle, desc, layouts[0], layouts[1], layouts[2], layouts[2], pref, 1, ctypes.byref(result),
            ctypes.byref(count),
        )  # fmt: skip
        lib.cublasLtMatmulPreferenceDestroy(pref)
        if status != 0 or count.value < 1 or result.state != 0:
            for layout in layouts:
                lib.cublasLtMatrixLayoutDestroy(layout)
            lib.cublasLtMatmulDescDestroy(desc)
            self.plans[key] = None
            return None
        plan = self.plans[key] = Plan(self, desc, tuple(layouts), result.algo, key)
        return plan


def row_major_product(lt: Lt, a, b, out, vector, mask, epilogue: int, trans_a: bool, trans_b: bool, tf32: bool, ptr,
                      stream_ptr: int, data_type: int = CUDA_R_32F, d_type: int | None = None,
                      bias_type: int = CUDA_R_32F) -> bool:  # fmt: skip
    """The row-major out (M, N) = op(a) (M, K) op(b) (K, N) with `epilogue` (vector: the
    bias or bias gradient, (N,); mask: (M, relu_mask_bytes(N)) uint8, or None where the
    epilogue has none) on stream_ptr, its shapes checked; False, nothing done, for an
    empty product or where cuBLASLt has no algorithm (or refuses the one it offered).
    ptr(x): an array's device address; data_type: a's and b's CUDA type, d_type: out's
    (default data_type)."""
    plan = row_major_plan(lt, a, b, out, vector, mask, epilogue, trans_a, trans_b, tf32, ptr, data_type, d_type,
                          bias_type)  # fmt: skip
    if plan is None:
        return False
    return plan.run(ptr(b), ptr(a), ptr(out), stream_ptr)  # cuBLASLt's A is b, its B is a (below)


def row_major_plan(lt: Lt, a, b, out, vector, mask, epilogue: int, trans_a: bool, trans_b: bool, tf32: bool, ptr,
                   data_type: int = CUDA_R_32F, d_type: int | None = None, bias_type: int = CUDA_R_32F):  # fmt: skip
    """The Plan of row_major_product's product; None for an empty one, a k = 1 one with
    an epilogue of NO_K1, or where cuBLASLt has no algorithm. Column-major, out^T (N x M)
    = op(b)^T op(a)^T, so cuBLASLt's A is b and its B is a, m = N, n = M; out's rows are
    D's columns (ld N), and so are the mask's (ld in bits)."""
    m_rows, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
    kb, n_cols = (b.shape[1], b.shape[0]) if trans_b else b.shape
    if k != kb or out.shape != (m_rows, n_cols):
        raise ValueError(f"gemm: op(a) {(m_rows, k)} @ op(b) {(kb, n_cols)} does not fit out {out.shape}")
    if vector.shape != (n_cols,) or (mask is not None and mask.shape != (m_rows, relu_mask_bytes(n_cols))):
        shapes = f"vector {vector.shape}" + (f" and mask {mask.shape}" if mask is not None else "")
        raise ValueError(f"fused product: {shapes} do not fit out {out.shape}")
    if m_rows == 0 or n_cols == 0 or k == 0 or (k == 1 and epilogue in NO_K1):
        return None
    return lt.plan(
        m=n_cols, n=m_rows, k=k, lda=b.shape[1], trans_a=trans_b, ldb=a.shape[1], trans_b=trans_a, ldd=n_cols,
        epilogue=epilogue, aligns=(alignment(ptr(b)), alignment(ptr(a)), alignment(ptr(out))), tf32=tf32,
        bias_ptr=ptr(vector), mask_ptr=ptr(mask) if mask is not None else 0,
        mask_ld=mask.shape[1] * 8 if mask is not None else 0, data_type=data_type, d_type=d_type,
        bias_type=bias_type,
    )  # fmt: skip
