"""Which bias types cuBLASLt takes with 16-bit products, on this GPU (a GPU-visit aid, not a test).

On an H100 (CUDA 13 cuBLASLt, 2026-11-26) cuBLASLt offered no algorithm for bf16/fp16
RELU_AUX_BIAS with a float32 bias (tests/test_epilogues_gpu.py::test_16bit_products).
This asks cublasLtMatmulAlgoGetHeuristic about each epilogue gpubp uses, 16-bit A, B, D,
with the bias (or bias gradient) float32 or of D's type, and with a float32 D; it prints
one line per case: the algorithm found or none. Usage: PYTHONPATH=. python3 tests/lt_bias_probe.py
"""

import numpy as np

from gpubp.backend import cublaslt as L
from gpubp.backend import get_backend
from gpubp.backend.numpy_ops import relu_mask_bytes

be = get_backend("gpu")
cp = be._cupy
lt = be._lt()
if lt is None:
    raise SystemExit(f"no cuBLASLt: {be.epilogue_note}")
m = n = k = 256
bias32, bias16 = cp.zeros(m, np.float32), cp.zeros(m, np.uint16)
mask = cp.zeros((n, relu_mask_bytes(m)), np.uint8)
EPILOGUES = {"BIAS": L.EPILOGUE_BIAS, "RELU_AUX_BIAS": L.EPILOGUE_RELU_AUX_BIAS, "DRELU_BGRAD": L.EPILOGUE_DRELU_BGRAD,
             "BGRADA": L.EPILOGUE_BGRADA}  # fmt: skip
for low_name, low in (("bf16", L.CUDA_R_16BF), ("fp16", L.CUDA_R_16F)):
    for ep_name, ep in EPILOGUES.items():
        for d_name, d_type in ((low_name, low), ("f32", L.CUDA_R_32F)):
            for b_name, b_type, b in (
                ("f32", L.CUDA_R_32F, bias32),
                ("D's", None, bias16 if d_type == low else bias32),
            ):
                aux = ep in (L.EPILOGUE_RELU_AUX_BIAS, L.EPILOGUE_DRELU_BGRAD)
                plan = lt.plan(m=m, n=n, k=k, lda=m, trans_a=False, ldb=k, trans_b=False, ldd=m, epilogue=ep,
                               aligns=(256, 256, 256), bias_ptr=b.data.ptr, mask_ptr=mask.data.ptr if aux else 0,
                               mask_ld=8 * relu_mask_bytes(m) if aux else 0, data_type=low, d_type=d_type,
                               bias_type=b_type)  # fmt: skip
                print(f"{low_name} {ep_name:14s} D {d_name:4s} bias {b_name:4s}: {'algorithm' if plan else 'none'}")
