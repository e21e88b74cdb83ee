"""The cuBLAS routines gpubp uses, called straight through ctypes, for CUDA graph capture.

CuPy's raw bindings (cupy_backends.cuda.libs.cublas) call their `_setStream(handle)`
before every routine: it points the handle at CuPy's current stream through CuPy's
`setStream`, and that refuses with NotImplementedError while the stream captures
("calling cuBLAS API during stream capture is currently unsupported"; seen on an H100
with CuPy 14.2.0, 2026-11-26). cuBLAS itself supports capture (its "CUDA Graphs Support"
section) once the handle's stream is the capture stream and it has a workspace of its own.
The capturer (cupy_backend.CudaGraphCapturer) does both before a capture begins and then
gives the backend this object in place of CuPy's module, for the warm-up and the capture.

The routines take the same arguments, in the same order, as CuPy's bindings of the same
name (the C prototypes of cublas_api.h): handle and addresses as integers, scalars
alpha and beta as host addresses (pointer mode host). A nonzero cublasStatus_t raises."""

import ctypes
import os

_P, _I, _LL = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong

# name in CuPy's binding -> (C symbol, argument types), as in cublas_api.h (CUDA 12, 13)
PROTOTYPES = {
    # handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc, computeType, algo
    "gemmEx": ("cublasGemmEx", [_P, _I, _I, _I, _I, _I, _P, _P, _I, _I, _P, _I, _I, _P, _P, _I, _I, _I, _I]),
    # handle, trans, m, n, alpha, A, lda, x, incx, beta, y, incy
    "sgemv": ("cublasSgemv_v2", [_P, _I, _I, _I, _P, _P, _I, _P, _I, _P, _P, _I]),
    "dgemv": ("cublasDgemv_v2", [_P, _I, _I, _I, _P, _P, _I, _P, _I, _P, _P, _I]),
    # handle, transa, transb, m, n, k, alpha, A, Atype, lda, strideA, B, Btype, ldb, strideB,
    # beta, C, Ctype, ldc, strideC, batchCount, computeType, algo
    "gemmStridedBatchedEx": (
        "cublasGemmStridedBatchedEx",
        [_P, _I, _I, _I, _I, _I, _P, _P, _I, _I, _LL, _P, _I, _I, _LL, _P, _P, _I, _I, _LL, _I, _I, _I],
    ),
}


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def loaded_libcublas():
    """(the libcublas this process loaded, None) or (None, why not). The copy CuPy's
    binding links, found in /proc/self/maps, opened without loading anything new
    (PyTorch may have loaded a copy of its own under another path)."""
    try:
        with open("/proc/self/maps") as f:
            path = next((ln.split()[-1] for ln in f if "/libcublas.so" in ln), None)
        if path is None:
            return None, "libcublas is not loaded in this process"
        return ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY), None
    except OSError as e:
        return None, f"libcublas cannot be opened ({_one_line(e)})"


class CublasError(RuntimeError):
    """A cuBLAS routine returned a status other than CUBLAS_STATUS_SUCCESS (0)."""


class DirectCublas:
    """gemmEx, sgemv, dgemv, gemmStridedBatchedEx of `lib` (a libcublas, or a stand-in in
    the tests), with CuPy's argument order; none of them touches the handle's stream."""

    def __init__(self, lib):
        for name, (symbol, argtypes) in PROTOTYPES.items():
            fn = getattr(lib, symbol, None)
            if fn is None:
                raise CublasError(f"libcublas has no {symbol}")
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
            setattr(self, name, self._checked(symbol, fn))

    @staticmethod
    def _checked(symbol, fn):
        def call(*args):
            status = fn(*args)
            if status != 0:
                raise CublasError(f"{symbol} returned cuBLAS status {status}")

        call.__name__ = symbol
        return call


def direct_cublas():
    """(DirectCublas on this process's libcublas, None) or (None, why not)."""
    lib, why = loaded_libcublas()
    if lib is None:
        return None, why
    try:
        return DirectCublas(lib), None
    except CublasError as e:
        return None, str(e)
