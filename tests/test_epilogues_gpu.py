"""The fused products (cuBLASLt epilogues, gpubp/backend/cublaslt.py) on a GPU, against
the NumPy references (tests marked gpu: they skip without a CUDA device).

Tolerance, as tests/test_gpu.py: |gpu - ref| <= rtol (magnitude + |ref|) + 2^-126, rtol
1e-5 for float32, the magnitude the terms that made the value: sum_k |a_ik b_kj| (+ |bias_j|)
for a product, sum_i |out_ij| for a bias gradient. The ReLU mask is compared where the
pre-activation is farther from 0 than that bound (closer, rounding may decide its sign).

The products must run fused on an H100/H200 with CUDA 12/13's cuBLASLt (a False return
would mean no algorithm: the model would silently fall back, so these tests fail then).
"""

from __future__ import annotations

import numpy as np
import pytest

from gpubp.backend import numpy_ops as ops
from gpubp.model import MLP

from .test_gpu import close, poisoned

pytestmark = pytest.mark.gpu

RTOL = 1e-5
SHAPES = [(1, 3, 1), (37, 13, 10), (100, 784, 512), (4096, 64, 64), (1024, 512, 10), (262144, 64, 64)]


@pytest.fixture(scope="module")
def gpu():
    from gpubp.backend.cupy_backend import CupyBackend

    be = CupyBackend()
    assert be.gemm_epilogues, f"cuBLASLt does not load: {be.epilogue_note}"
    return be


def _operands(rng, m, k, n, trans_a, trans_b):
    a = rng.normal(size=(k, m) if trans_a else (m, k)).astype(np.float32)
    b = rng.normal(size=(n, k) if trans_b else (k, n)).astype(np.float32)
    return a, b, (a.T if trans_a else a).astype(np.float64), (b.T if trans_b else b).astype(np.float64)


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True)])
def test_gemm_bias_relu(gpu, m, k, n, trans_a, trans_b):
    rng = np.random.default_rng(m + n)
    a, b, opa, opb = _operands(rng, m, k, n, trans_a, trans_b)
    bias = rng.normal(size=n).astype(np.float32)
    out = poisoned(gpu, (m, n), np.float32)
    mask = gpu.asarray(np.full((m, ops.relu_mask_bytes(n)), 0xA5, np.uint8))
    ran = gpu.gemm_bias_relu(gpu.asarray(a), gpu.asarray(b), gpu.asarray(bias), out, mask, trans_a, trans_b)
    assert ran, f"cuBLASLt found no RELU_AUX_BIAS algorithm for {(m, k, n)}"
    v = opa @ opb + bias
    mag = np.abs(opa) @ np.abs(opb) + np.abs(bias)
    close(gpu.to_numpy(out), np.maximum(v, 0), np.float32, mag, f"gemm_bias_relu {(m, k, n)}")
    bits = ops.relu_mask_unpack(gpu.to_numpy(mask), n)
    clear = np.abs(v) > 2 * RTOL * mag
    wrong = (bits != (v > 0)) & clear
    assert not wrong.any(), f"mask: {wrong.sum()} of {clear.sum()} clear bits differ (cuBLASLt's bit order?)"


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_gemm_drelu_bias_grad(gpu, m, k, n):
    """The backward product as the model calls it: D (m, k) W^T, W (n, k), with a mask."""
    rng = np.random.default_rng(m * 3 + n)
    d, w, opd, opw = _operands(rng, m, k, n, False, True)
    positive = rng.random((m, n)) < 0.6
    mask = np.zeros((m, ops.relu_mask_bytes(n)), np.uint8)
    ops.relu_mask_pack(positive, mask)
    out, db = poisoned(gpu, (m, n), np.float32), poisoned(gpu, n, np.float32)
    ran = gpu.gemm_drelu_bias_grad(gpu.asarray(d), gpu.asarray(w), gpu.asarray(mask), out, db, trans_b=True)
    assert ran, f"cuBLASLt found no DRELU_BGRAD algorithm for {(m, k, n)}"
    ref = (opd @ opw) * positive
    mag = (np.abs(opd) @ np.abs(opw)) * positive
    close(gpu.to_numpy(out), ref, np.float32, mag, f"gemm_drelu_bias_grad {(m, k, n)}")
    close(gpu.to_numpy(db), ref.sum(0), np.float32, mag.sum(0), f"bias gradient {(m, k, n)}")


@pytest.mark.parametrize("dtype", ["float32", "tf32"])
def test_a_fused_model_step_agrees_with_the_unfused_one(gpu, dtype):
    """Loss and every gradient of a ReLU MLP, fused against unfused on the same GPU, and
    the fused path really ran (each hidden layer's mask written, its backward fused)."""
    sizes = [64, 256, 256, 128, 10]
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4096, 64)).astype(np.float32)
    y = rng.integers(0, 10, 4096)
    kw = dict(loss="softmax_cross_entropy", dtype=dtype, seed=3, backend=gpu)
    fused, plain = MLP(sizes, gemm_epilogues=True, **kw), MLP(sizes, gemm_epilogues=False, **kw)
    results = []
    for model in (fused, plain):
        loss = model.forward_backward(model.as_input(x), model.as_target(y, len(x)))
        results.append((gpu.to_float(loss), gpu.to_numpy(model.flat_grads)))
    ws = fused._workspace(len(x))
    assert ws.fused == [True, True, True, False] and ws.done == [True, True, True, False]
    # two float32 evaluations that differ in their GEMM kernels (summation order): each
    # gradient within ~K u sum|terms| of the exact one, sum|terms| a few times max|g| here;
    # 1e-4 max|g| covers K <= 256 at u = 2^-24 with room. tf32: a kernel may round its
    # inputs to TF32 (u = 2^-11) where the other does not: 8 u
    rtol = 2.0**-11 * 8 if dtype == "tf32" else 1e-4
    (lf, gf), (lp, gp) = results
    assert abs(lf - lp) <= rtol * abs(lp)
    scale = np.abs(gp).max()
    assert np.abs(gf - gp).max() <= rtol * scale, f"gradients differ by {np.abs(gf - gp).max()} of {scale}"
