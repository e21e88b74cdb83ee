"""Precisions (model.dtype) and the NumPy reference of their rounding.

    name      parameters, gradients,   activations and    GEMM
              optimizer state          GEMM inputs        (accumulation)
    float64   float64                  float64            float64
    float32   float32                  float32            float32
    tf32      float32                  float32            inputs rounded to tf32, float32
    bf16      float32 (master)         bfloat16           float32
    fp16      float32 (master)         float16            float32, dynamic loss scaling

bf16/fp16 ("mixed precision"): the optimizer updates the float32 parameters; before a
forward pass their weights are rounded once into a 16-bit copy that the GEMMs read.
Activations (z, f(z)), their gradients (D, D') and the GEMM outputs that become
activations are stored in 16 bits; every elementwise op reads 16-bit values, computes
in float32 and rounds its result once (round to nearest, ties to even). The parameter
gradients come out of the GEMM (dW) and the column sums (db) in float32.

Storage on both backends: float16 arrays for fp16 and the raw bit patterns of bfloat16
as uint16 arrays (CuPy has no bfloat16 dtype; NumPy neither without ml_dtypes), so the
NumPy backend holds the very bits the kernels hold and is the specification of the GPU
path. The conversions here are exact bit-level emulations on float32 bit patterns (no
dependency); tests cross-check them against ml_dtypes and numpy.float16.

Unit roundoff u (half the distance from 1 to the next value): 2^-8 bf16 (8 significant
bits), 2^-11 fp16 and tf32 (11 bits), 2^-24 float32, 2^-53 float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BF16 = np.dtype(np.uint16)  # bfloat16 stored as its bit pattern
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
LOW = (BF16, F16)  # 16-bit storage dtypes

DTYPES = ("float32", "float64", "tf32", "bf16", "fp16")

# fp16 dynamic loss scaling, as torch.cuda.amp.GradScaler's defaults
LOSS_SCALE_INIT = 2.0**16
LOSS_SCALE_BACKOFF = 0.5  # on a non-finite gradient: skip the step, scale *= 0.5
LOSS_SCALE_GROWTH = 2.0  # after LOSS_SCALE_INTERVAL finite steps in a row: scale *= 2
LOSS_SCALE_INTERVAL = 2000


@dataclass(frozen=True)
class Precision:
    name: str
    param_dtype: np.dtype  # parameters, gradients, optimizer state
    store_dtype: np.dtype  # activations and GEMM inputs
    tf32: bool  # float32 GEMMs with CUBLAS_COMPUTE_32F_FAST_TF32
    loss_scaling: bool  # fp16: dynamic loss scaling
    unit_roundoff: float  # of the GEMM inputs and stored activations

    @property
    def low(self) -> bool:
        """Activations in 16 bits (bf16, fp16)."""
        return self.store_dtype in LOW


PRECISIONS = {
    "float64": Precision("float64", np.dtype(np.float64), np.dtype(np.float64), False, False, 2.0**-53),
    "float32": Precision("float32", F32, F32, False, False, 2.0**-24),
    "tf32": Precision("tf32", F32, F32, True, False, 2.0**-11),
    "bf16": Precision("bf16", F32, BF16, False, False, 2.0**-8),
    "fp16": Precision("fp16", F32, F16, False, True, 2.0**-11),
}


def get_precision(name) -> Precision:
    name = str(name)
    if name not in PRECISIONS:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return PRECISIONS[name]


# ------------------------------------------------------------------ bfloat16 bits


def bf16_bits(x) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest, ties to even.

    With u the float32 bits: add 0x7fff plus the lowest kept bit (bit 16), then keep the
    high 16 bits. A tie (low half exactly 0x8000) rounds up only when bit 16 is odd;
    a carry out of the mantissa steps the exponent (up to inf, as it must). NaN stays
    NaN (quiet bit set, sign kept): adding could carry it into inf. As __float2bfloat16_rn.
    """
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (u + (np.uint32(0x7FFF) + ((u >> 16) & 1))) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    out = np.where(nan, (u >> 16) | 0x0040, rounded)
    return out.astype(np.uint16)


def bf16_to_float32(bits) -> np.ndarray:
    """bfloat16 bit patterns -> float32, exact: the bits become the high half."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def round_bf16(x) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), as float32."""
    return bf16_to_float32(bf16_bits(x))


# ------------------------------------------------------------------ float16 bits


def f16_bits(x) -> np.ndarray:
    """float32 -> IEEE half bit patterns (uint16), round to nearest even: numpy's
    conversion, which is correctly rounded (subnormal halves, overflow to inf, included).
    kernels/precision.cuh does the same on bits; tests/host_math.cpp checks them equal."""
    with np.errstate(over="ignore", invalid="ignore"):  # beyond 65504: inf, as the kernels round
        return np.asarray(x, dtype=np.float32).astype(np.float16).view(np.uint16)


def round_f16(x) -> np.ndarray:
    """float32 values rounded to the nearest float16 (ties to even), as float32."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


# ------------------------------------------------------------------ tf32

# How cuBLAS turns float32 GEMM inputs into TF32 (8-bit exponent, 10 explicit mantissa
# bits) under CUBLAS_COMPUTE_32F_FAST_TF32 is not documented by cuBLAS. PyTorch's notes
# disagree over time: pytorch/pytorch#49625 (an NVIDIA engineer, 2020) changed its TF32
# docs from "truncating" to "rounding", while docs/source/notes/numerical_accuracy.rst
# (pytorch/pytorch#79537, 2022) says "only the first 10 bits of the input mantissa are
# read". The PTX conversion cvt.rna.tf32.f32 rounds to nearest, ties away from zero
# (cutf uses it for TF32 casts on sm_80+); CUTLASS offers round-to-nearest and
# truncation converters. tests/test_precision_gpu.py::test_tf32_input_conversion asks
# the GPU: on an H100 (cuBLAS of CUDA 13, CuPy 14.2.0, 2026-11-26) cuBLAS rounds to
# nearest, ties to even ("rne"), on inputs chosen on the boundaries between the three
# modes. So the reference rounds that way (the default, first in TF32_MODES); the parity
# tolerance still allows the truncation bound 2^-10 (it covers all three modes).
TF32_MODES = ("rne", "rna", "truncate")


def round_tf32(x, mode: str = "rne") -> np.ndarray:
    """float32 values with the low 13 mantissa bits dropped (TF32 keeps 10), as float32.

    rne (cuBLAS's, measured): + 0xfff + bit 13 (ties to even); rna: + 0x1000 then clear
    (ties away from zero); truncate: clear. inf and NaN pass unchanged."""
    if mode not in TF32_MODES:
        raise ValueError(f"tf32 mode must be one of {TF32_MODES}, got {mode!r}")
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    if mode == "rna":
        r = u + np.uint32(0x1000)
    elif mode == "rne":
        r = u + (np.uint32(0xFFF) + ((u >> 13) & 1))
    else:
        r = u
    r = r & np.uint32(0xFFFFE000)
    special = (u & 0x7F800000) == 0x7F800000
    return np.where(special, u, r).astype(np.uint32).view(np.float32).reshape(np.shape(x))


# ------------------------------------------------------------------ storage conversions


def to_float32(a) -> np.ndarray:
    """A storage array (bf16 bits, float16, float32) as float32 values (a itself when float32)."""
    a = np.asarray(a)
    if a.dtype == BF16:
        return bf16_to_float32(a)
    if a.dtype == F16:
        return a.astype(np.float32)
    return a


def store(values, out) -> None:
    """out[...] = values rounded to out's storage dtype (bf16 bits, float16, float32/64)."""
    if out.dtype == BF16:
        out[...] = bf16_bits(values).reshape(out.shape)
    else:
        with np.errstate(over="ignore", invalid="ignore"):  # fp16 overflow to inf is the rounding's result
            out[...] = np.asarray(values).astype(out.dtype, copy=False)


def round_to(values, dtype) -> np.ndarray:
    """float32 values rounded as storing them in `dtype` would, returned as float32."""
    dtype = np.dtype(dtype)
    if dtype == BF16:
        return round_bf16(values)
    if dtype == F16:
        return round_f16(values)
    return np.asarray(values, dtype=np.float32)
