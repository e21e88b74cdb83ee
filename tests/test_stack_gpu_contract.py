"""The stacked GEMM's raw cuBLAS call, checked on the CPU against the binding's real
signature (see test_gpu_contract.py): gemmStridedBatchedEx gets integers for every
integer parameter, alpha and beta as host addresses holding 1 and beta in the compute
precision, and the strides of each operand (0 for a batch shared by every model, the
flat buffer's row length for the weight views)."""

from __future__ import annotations

import types

import numpy as np

from .test_gpu_contract import _COMPUTE_C, Recorder, binding_signatures


class FakeStack:
    """What gemm_batched reads of a CuPy array: shape, strides, dtype, data.ptr."""

    _next = 0x20000

    def __init__(self, shape, dtype, strides=None):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.itemsize, self.ndim = self.dtype.itemsize, len(shape)
        self.strides = strides or tuple(
            int(np.prod(shape[i + 1 :])) * self.itemsize for i in range(len(shape))
        )  # C order
        FakeStack._next += 0x1000
        self.data = types.SimpleNamespace(ptr=FakeStack._next)


def test_gemm_batched_calls_gemm_strided_batched_ex_as_its_binding_says():
    from gpubp.backend import cupy_backend

    be = cupy_backend.CupyBackend.__new__(cupy_backend.CupyBackend)
    be._cublas, be.handle, be.tf32 = Recorder(), 12345, False
    be._blas = be._cublas
    be._host_scalars = cupy_backend.host_scalars()
    be._cupy = types.SimpleNamespace(ndarray=FakeStack)
    count, m, k, n, flat = 4, 5, 6, 7, 100  # W_k: (count, k, n) views of a (count, flat) buffer
    cases = []
    for dtype in (np.float32, np.float64):
        item = np.dtype(dtype).itemsize
        w = FakeStack((count, k, n), dtype, strides=(flat * item, n * item, item))
        for shared in (False, True):
            for beta in (0.0, 1.0):
                a = FakeStack((m, k) if shared else (count, m, k), dtype)
                be.gemm_batched(a, w, FakeStack((count, m, n), dtype), beta=beta)
                cases.append((beta, 0 if shared else m * k, flat, m * n))
        # dW = x^T D (trans_a) and D W^T (trans_b) take the same call
        be.gemm_batched(FakeStack((count, m, k), dtype), FakeStack((count, m, n), dtype),
                        FakeStack((count, k, n), dtype, strides=(flat * item, n * item, item)), trans_a=True)  # fmt: skip
        cases.append((0.0, m * k, m * n, flat))
    calls = be._cublas.calls
    assert {name for name, _ in calls} == {"gemmStridedBatchedEx"} and len(calls) == len(cases)
    params = binding_signatures("cupy_backends.cuda.libs.cublas", ["gemmStridedBatchedEx"])["gemmStridedBatchedEx"]
    names = [p for _, p in params]
    for (_, args), (beta, stride_a, stride_b, stride_c) in zip(calls, cases):
        assert len(args) == len(params)
        for arg, (ctype, pname) in zip(args, params):
            if ctype in ("int", "intptr_t", "size_t", "long long", "long long int", "intBit"):
                assert isinstance(arg, (int, np.integer)) and not isinstance(arg, bool), (pname, arg)
        scalar = _COMPUTE_C[args[names.index("computeType")]]
        assert scalar.from_address(int(args[names.index("alpha")])).value == 1.0
        assert scalar.from_address(int(args[names.index("beta")])).value == beta
        # column-major trick: cuBLAS's A is our b, its B our a
        assert args[names.index("strideA")] == stride_b and args[names.index("strideB")] == stride_a
        assert args[names.index("strideC")] == stride_c and args[names.index("batchCount")] == count
