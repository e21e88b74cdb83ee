"""Fused products (cuBLASLt epilogues) on the CPU.

- The NumPy references gemm_bias_relu / gemm_drelu_bias_grad are the unfused ops, bit
  for bit, and the mask holds [v > 0] where a loop over bits reads it.
- A model with fused products gives the bits of one without (float32 ReLU layers,
  residual layers, an input gradient), also where the GPU finds no algorithm for a
  product and falls back, and inside a captured step; with bf16/fp16 storage (one
  rounding from the float32 accumulator, exact on small integers) within the 16-bit
  rounding bound of the unfused model.
- gpubp/backend/cublaslt.py's row-major -> column-major mapping, run against a stand-in
  libcublasLt that follows cuBLASLt's documented semantics on host memory (column-major
  operands, op(A) op(B), the epilogue's bias, ReLU bit mask and bias gradient).
- The ctypes prototypes, enum values and structs against cublasLt.h, where one is
  installed (the nvidia-cublas wheel, a CUDA toolkit, or GPUBP_CUBLAS_INCLUDE).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import re
import sys
import types

import numpy as np
import pytest

from gpubp import precision as PR
from gpubp.activations import make_activation
from gpubp.backend import NumpyBackend
from gpubp.backend import cublaslt as LT
from gpubp.backend import numpy_ops as ops
from gpubp.backend.recording import RecordingBackend
from gpubp.model import MLP

RELU = make_activation("relu")


def small_ints(rng, shape):
    """float32 integers in [-3, 3]: every product and sum below is exact in float32, so
    the references and the float64 stand-in agree bit for bit, zeros (v = 0) included."""
    return rng.integers(-3, 4, size=shape).astype(np.float32)


def operands(rng, m, k, n, trans_a, trans_b):
    a = small_ints(rng, (k, m) if trans_a else (m, k))
    b = small_ints(rng, (n, k) if trans_b else (k, n))
    return a, b


def mask_bits(mask, n_cols):
    """The bool matrix a loop over the bits reads: bit j of row i is byte j // 8, bit j % 8."""
    rows = mask.shape[0]
    out = np.zeros((rows, n_cols), dtype=bool)
    for i in range(rows):
        for j in range(n_cols):
            out[i, j] = (int(mask[i, j >> 3]) >> (j & 7)) & 1
    return out


SHAPES = [(1, 3, 1), (5, 4, 7), (33, 8, 8), (6, 5, 129), (17, 2, 300)]
TRANS = [(False, False), (True, False), (False, True), (True, True)]


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("trans_a,trans_b", TRANS)
def test_gemm_bias_relu_is_gemm_then_bias_relu_bitwise_with_its_mask(m, k, n, trans_a, trans_b):
    rng = np.random.default_rng(m * 100 + n)
    a, b = operands(rng, m, k, n, trans_a, trans_b)
    bias = small_ints(rng, n)
    out = np.full((m, n), np.nan, np.float32)
    mask = np.full((m, ops.relu_mask_bytes(n)), 0xFF, np.uint8)  # padding must come back 0
    assert ops.gemm_bias_relu(a, b, bias, out, mask, trans_a, trans_b) is True
    z = np.empty((m, n), np.float32)
    ops.gemm(a, b, z, trans_a, trans_b)
    want = ops.bias_act_forward(z, bias, RELU, np.empty_like(z))
    assert np.array_equal(out, want)
    assert np.array_equal(mask_bits(mask, n), z > 0)  # z is v = op(a) op(b) + bias now
    n_bytes = -(-n // 8)
    if n % 8:
        assert (mask[:, n_bytes - 1] >> (n % 8)).max() == 0  # the last byte's spare bits
    assert mask.shape[1] * 8 % 128 == 0 and (mask[:, n_bytes:] == 0).all()
    assert (z == 0).any() or m * n < 40  # the v = 0 edge is exercised on the larger shapes


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("trans_a,trans_b", TRANS)
def test_gemm_drelu_bias_grad_is_gemm_act_backward_bias_grad_bitwise(m, k, n, trans_a, trans_b):
    rng = np.random.default_rng(m * 7 + n)
    a, b = operands(rng, m, k, n, trans_a, trans_b)
    saved = np.maximum(small_ints(rng, (m, n)), 0)  # a ReLU output: its zeros are f' = 0
    mask = np.zeros((m, ops.relu_mask_bytes(n)), np.uint8)
    ops.relu_mask_pack(saved > 0, mask)
    out, db = np.empty((m, n), np.float32), np.empty(n, np.float32)
    assert ops.gemm_drelu_bias_grad(a, b, mask, out, db, trans_a, trans_b) is True
    d = np.empty((m, n), np.float32)
    ops.gemm(a, b, d, trans_a, trans_b)
    want = ops.act_backward(d, saved, RELU, np.empty_like(d))
    assert np.array_equal(out, want)
    assert np.array_equal(db, ops.bias_grad(want, np.empty(n, np.float32)))


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("trans_a,trans_b", TRANS)
def test_gemm_bias_and_gemm_bias_grad_are_the_unfused_ops_bitwise(m, k, n, trans_a, trans_b):
    rng = np.random.default_rng(m * 5 + n)
    a, b = (x + np.float32(0.1) * small_ints(rng, x.shape) for x in operands(rng, m, k, n, trans_a, trans_b))
    bias = small_ints(rng, n) * np.float32(0.3)
    out = np.full((m, n), np.nan, np.float32)
    assert ops.gemm_bias(a, b, bias, out, trans_a, trans_b) is True
    z = ops.gemm(a, b, np.empty((m, n), np.float32), trans_a, trans_b)
    assert np.array_equal(out, ops.bias_act_forward(z, bias, make_activation("identity"), z))
    out, db = np.full((m, n), np.nan, np.float32), np.full(n, np.nan, np.float32)
    assert ops.gemm_bias_grad(a, b, out, db, trans_a, trans_b) is True
    assert np.array_equal(out, ops.gemm(a, b, np.empty((m, n), np.float32), trans_a, trans_b))
    opb = np.ascontiguousarray(b.T if trans_b else b)
    assert np.array_equal(db, ops.bias_grad(opb, np.empty(n, np.float32)))  # 1^T op(b): K rows summed


@pytest.mark.parametrize("storage", ["bf16", "fp16"])
@pytest.mark.parametrize("trans_a,trans_b", TRANS)
def test_16bit_products_round_once_from_the_float32_accumulator(storage, trans_a, trans_b):
    """16-bit a, b, out (float32 bias and bias gradient): out = round(max(acc + bias, 0))
    and, backward, out = round(acc * mask) with db the sum of the unrounded values. Small
    integers make acc exact, and 257 = 2^8 + 1 (not a bf16) in the bias makes a sum that
    rounds: the unfused ops would round acc first, then acc + bias."""
    dt = PR.BF16 if storage == "bf16" else PR.F16
    rng = np.random.default_rng(11)
    m, k, n = 13, 6, 21
    a, b = operands(rng, m, k, n, trans_a, trans_b)
    bias = small_ints(rng, n) + np.float32(257.0) * (rng.random(n) < 0.5)
    a16, b16 = np.empty(a.shape, dt), np.empty(b.shape, dt)
    PR.store(a, a16)
    PR.store(b, b16)
    out, mask = np.empty((m, n), dt), np.zeros((m, ops.relu_mask_bytes(n)), np.uint8)
    assert ops.gemm_bias_relu(a16, b16, bias, out, mask, trans_a, trans_b)
    v = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b) + bias  # exact
    want = np.empty((m, n), dt)
    PR.store(np.maximum(v, 0).astype(np.float32), want)
    assert np.array_equal(out, want) and np.array_equal(mask_bits(mask, n), v > 0)
    assert ops.gemm_bias(a16, b16, bias, out, trans_a, trans_b)  # identity: v rounded once
    PR.store(v.astype(np.float32), want)
    assert np.array_equal(out, want)
    d = np.empty((m, n), dt)
    out2, db = np.empty((m, k), dt), np.empty(k, np.float32)
    PR.store(v.astype(np.float32), d)  # a gradient with values that rounded (257 + ...)
    mask2 = np.zeros((m, ops.relu_mask_bytes(k)), np.uint8)
    positive = rng.random((m, k)) < 0.5
    ops.relu_mask_pack(positive, mask2)
    w16 = np.empty((k, n), dt)  # D (m, n) W^T, W (k, n)
    PR.store(small_ints(rng, (k, n)), w16)
    assert ops.gemm_drelu_bias_grad(d, w16, mask2, out2, db, trans_b=True)
    g = (PR.to_float32(d).astype(np.float64) @ PR.to_float32(w16).T) * positive  # exact in float32
    want2 = np.empty((m, k), dt)
    PR.store(g.astype(np.float32), want2)
    assert np.array_equal(out2, want2) and np.array_equal(db, g.sum(0).astype(np.float32))


# ------------------------------------------------------------------------- the model


FUSED_OPS = ("gemm_bias_relu", "gemm_bias", "gemm_drelu_bias_grad", "gemm_bias_grad")


class Spy(NumpyBackend):
    """The NumPy backend counting the fused products; `refuse`: the ones that answer
    False having done nothing (what the GPU does where cuBLASLt has no algorithm)."""

    def __init__(self, refuse=()):
        self.refuse, self.calls = set(refuse), dict.fromkeys(FUSED_OPS, 0)
        for name in FUSED_OPS:
            setattr(self, name, self._counted(name))

    def _counted(self, name):
        reference = getattr(ops, name)

        @functools.wraps(reference)
        def op(*args, **kw):
            if name in self.refuse:
                return False
            self.calls[name] += 1
            return reference(*args, **kw)

        return op


def loss_and_grads(model, x, y, input_grad=False):
    loss = model.forward_backward(model.as_input(x), model.as_target(y, len(x)), input_grad=input_grad)
    ws = model._workspace(len(x))
    return float(loss), model.flat_grads.copy(), ws.dx[0].copy() if input_grad else None


CASES = {
    # name: (sizes, hidden activation, output activation, residual, dtype)
    "relu": ([6, 16, 16, 12, 3], "relu", "identity", False, "float32"),
    "relu-out": ([5, 9, 4], "relu", "relu", False, "float32"),  # the output layer's ReLU: fused forward only
    "residual": ([6, 16, 16, 16, 3], "relu", "identity", True, "float32"),  # skips: some layers unfused
    "tf32": ([6, 16, 16, 3], "relu", "identity", False, "tf32"),
    "tanh": ([6, 16, 3], "tanh", "identity", False, "float32"),  # nothing to fuse
    "float64": ([6, 16, 3], "relu", "identity", False, "float64"),  # float32 products only
}
FUSED_CALLS = {  # per forward_backward: forward (ReLU, identity), backward (ReLU' + db, dW + db)
    "relu": (3, 1, 3, 1), "relu-out": (2, 0, 1, 1), "residual": (1, 1, 0, 4), "tf32": (2, 1, 2, 1),
    "tanh": (0, 1, 0, 2), "float64": (0, 0, 0, 0),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("input_grad", [False, True])
def test_a_model_with_fused_products_is_the_unfused_model_bitwise(case, input_grad):
    sizes, act, out_act, residual, dtype = CASES[case]
    rng = np.random.default_rng(3)
    x = rng.standard_normal((37, sizes[0]))
    y = rng.integers(0, sizes[-1], 37)
    kw = dict(loss="softmax_cross_entropy", dtype=dtype, seed=5, residual=residual)
    plain = MLP(sizes, act, out_act, backend=NumpyBackend(), **kw)
    spy = Spy()
    fused = MLP(sizes, act, out_act, backend=spy, gemm_epilogues=True, **kw)
    assert not plain.gemm_epilogues  # the NumPy backend's default: unfused
    for _ in range(2):  # twice: the workspace's flags are reset between passes
        want = loss_and_grads(plain, x, y, input_grad)
        got = loss_and_grads(fused, x, y, input_grad)
        assert want[0] == got[0]
        assert np.array_equal(want[1], got[1])
        if input_grad:
            assert np.array_equal(want[2], got[2])
    assert spy.calls == {name: 2 * n for name, n in zip(FUSED_OPS, FUSED_CALLS[case])}


@pytest.mark.parametrize("storage", ["bf16", "fp16"])
def test_a_16bit_model_with_fused_products_stays_within_its_rounding_bound_of_the_unfused(storage):
    """16-bit storage: the fused products round less often (once per product, not after
    the product and again after the bias or the mask), so the bits differ. Bound, as
    tests/test_precision.py derives it: 2 sqrt(6 L) u (relative, 2-norm) between two
    evaluations that each round six times per layer; the difference measured here is
    far below it (the same roundings mostly)."""
    sizes = [12, 48, 48, 5]
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(128, 12)), rng.integers(0, 5, 128)
    kw = dict(loss="softmax_cross_entropy", dtype=storage, seed=1)
    spy = Spy()
    fused = MLP(sizes, backend=spy, gemm_epilogues=True, **kw)
    lf, gf = fused.loss_and_grads(x, y)
    lp, gp = MLP(sizes, backend=NumpyBackend(), **kw).loss_and_grads(x, y)
    # fp16: no DRELU_BGRAD (its bias gradient would be fp16: a scaled batch sum overflows),
    # so each layer's dW and db come from one BGRADA product instead
    assert spy.calls == dict(zip(FUSED_OPS, (2, 1, 2, 1) if storage == "bf16" else (2, 1, 0, 3)))
    tol = 2 * np.sqrt(6 * 3) * (2.0**-8 if storage == "bf16" else 2.0**-11)
    assert abs(lf - lp) <= tol * abs(lp)
    for a, b in zip(gf, gp):
        assert np.linalg.norm(a - b) <= tol * np.linalg.norm(b)
    if storage == "bf16":
        assert any(not np.array_equal(a, b) for a, b in zip(gf, gp))  # the roundings did change
    else:  # fp16: the zero initial biases add nothing to round, and its backward is unfused: the same bits
        assert lf == lp and all(np.array_equal(a, b) for a, b in zip(gf, gp))


def test_auto_keeps_drelu_bgrad_to_the_narrower_layers(monkeypatch):
    """train.gemm_epilogues = "auto" (MLP's None: fused products in bf16 and fp16 on a
    backend that has them): a ReLU layer's backward rides the product above (DRELU_BGRAD)
    only up to DRELU_BGRAD_MAX_WIDTH outputs; a wider one takes ReLU' on its own and its db
    with its dW (BGRADA). Forced (true), every ReLU layer's does. Either way the gradients
    stay within the rounding bound of the unfused model's (see the test above)."""
    import gpubp.model as M

    monkeypatch.setattr(M, "DRELU_BGRAD_MAX_WIDTH", 16)
    monkeypatch.setattr(NumpyBackend, "gemm_epilogues", True)  # what the GPU backend says
    sizes = [6, 32, 16, 12, 3]  # ReLU layers of 32, 16 and 12 outputs: the first is wider than 16
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((29, 6)), rng.integers(0, 3, 29)
    kw = dict(loss="softmax_cross_entropy", dtype="bf16", seed=2)
    auto, forced = Spy(), Spy()
    ga = MLP(sizes, "relu", "identity", backend=auto, gemm_epilogues=None, **kw).loss_and_grads(x, y)
    gf = MLP(sizes, "relu", "identity", backend=forced, gemm_epilogues=True, **kw).loss_and_grads(x, y)
    gp = MLP(sizes, "relu", "identity", backend=NumpyBackend(), gemm_epilogues=False, **kw).loss_and_grads(x, y)
    # forward: three ReLU products and the output's; backward: DRELU_BGRAD for the layers of
    # 16 and 12 outputs (auto) or all three (forced), BGRADA for the other layers' dW and db
    assert auto.calls == dict(zip(FUSED_OPS, (3, 1, 2, 2)))
    assert forced.calls == dict(zip(FUSED_OPS, (3, 1, 3, 1)))
    tol = 2 * np.sqrt(6 * 4) * 2.0**-8  # 2 sqrt(6 L) u, L = 4 layers (the test above)
    for loss, grads in (ga, gf):
        assert abs(loss - gp[0]) <= tol * abs(gp[0])
        assert all(np.linalg.norm(a - b) <= tol * np.linalg.norm(b) for a, b in zip(grads, gp[1]))


@pytest.mark.parametrize("refuse", [("gemm_drelu_bias_grad",), ("gemm_bias_relu",), ("gemm_bias", "gemm_bias_grad"),
                                    FUSED_OPS])  # fmt: skip
def test_a_product_without_an_algorithm_falls_back_to_the_unfused_ops(refuse):
    sizes = [6, 16, 16, 12, 3]
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((21, 6)), rng.integers(0, 3, 21)
    kw = dict(loss="softmax_cross_entropy", seed=2)
    want = loss_and_grads(MLP(sizes, backend=NumpyBackend(), **kw), x, y, True)
    spy = Spy(refuse)
    got = loss_and_grads(MLP(sizes, backend=spy, gemm_epilogues=True, **kw), x, y, True)
    assert want[0] == got[0] and np.array_equal(want[1], got[1]) and np.array_equal(want[2], got[2])
    if "gemm_bias_relu" in refuse:  # no mask written: the backward pass must not read one
        assert spy.calls["gemm_drelu_bias_grad"] == 0


def test_a_captured_step_with_fused_products_is_the_plain_step_bitwise(monkeypatch):
    """The trainer's step through the recording backend (a CUDA graph's semantics) with
    the fused products on, against the plain NumPy run without them."""
    from tests.test_step import assert_same_run, run

    monkeypatch.setattr(NumpyBackend, "gemm_epilogues", True)  # what the GPU backend says
    rec = RecordingBackend()
    calls = []

    @functools.wraps(ops.gemm_drelu_bias_grad)  # the recorder reads the op's signature
    def counted(*args, **kw):
        calls.append(1)
        return ops.gemm_drelu_bias_grad(*args, **kw)

    monkeypatch.setattr(rec.inner, "gemm_drelu_bias_grad", counted)
    captured = run("adamw-step-clip", rec, ["train.gemm_epilogues=true"])  # float32: "auto" leaves them out
    assert rec.graphs and calls and rec.replays > 0
    monkeypatch.setattr(NumpyBackend, "gemm_epilogues", False)
    assert_same_run(run("adamw-step-clip", "cpu"), captured)


def test_train_gemm_epilogues_auto_true_false(monkeypatch):
    from gpubp.config import load_config
    from gpubp.trainer import build_model

    monkeypatch.setattr(NumpyBackend, "gemm_epilogues", True)  # what the GPU backend says

    def fuses(dtype, setting=None):
        extra = [] if setting is None else [f"train.gemm_epilogues={setting}"]
        cfg = load_config(None, ["model.hidden=[8]", "loss.name=mse", f"model.dtype={dtype}", *extra])
        return build_model(cfg, 4, 2, NumpyBackend()).gemm_epilogues

    # auto (the default): the 16-bit precisions only, where an H100 measured them paying
    assert fuses("bf16") and fuses("fp16") and not fuses("float32") and not fuses("tf32")
    assert fuses("float32", "true") and fuses("tf32", "true")  # true: every precision
    assert not fuses("bf16", "false") and not fuses("float32", "false")
    monkeypatch.setattr(NumpyBackend, "gemm_epilogues", False)  # the CPU's own default
    assert not fuses("bf16") and not fuses("float32", "true")


# ------------------------------------------------------- cublaslt.py against a stand-in


class FakeLt:
    """libcublasLt's calls as cublasLt.h documents them, on host memory: the 'device
    addresses' are NumPy arrays' addresses. Column-major matrices: element (i, j) of a
    (rows x cols, ld) layout is at address + 4 (i + j ld); D = alpha op(A) op(B) + beta C,
    then the epilogue: BIAS adds bias[i] to row i; RELU_AUX_BIAS also stores bit i + j ld of
    the aux buffer ([D > 0], least significant bit first) and applies max(., 0);
    DRELU_BGRAD multiplies D by those bits and writes the row sums of D to the bias pointer."""

    def __init__(self, refuse=False, matmul_status=0):
        """refuse: the heuristic offers no algorithm; matmul_status: cublasLtMatmul returns
        it having done nothing (a plan the library refuses at run time)."""
        self.objects, self.next, self.refuse, self.heuristics = {}, 1, refuse, 0
        self.matmul_status, self.matmuls = matmul_status, 0

    def _new(self, ref, obj):
        self.objects[self.next] = obj
        ref._obj.value = self.next
        self.next += 1
        return 0

    def cublasLtCreate(self, ref):
        return self._new(ref, "handle")

    def cublasLtMatmulDescCreate(self, ref, compute, scale):
        return self._new(ref, {"compute": compute, "scale": scale, LT.DESC_TRANSA: 0, LT.DESC_TRANSB: 0,
                               LT.DESC_EPILOGUE: LT.EPILOGUE_DEFAULT})  # fmt: skip

    def cublasLtMatmulDescSetAttribute(self, desc, attr, buf, size):
        assert size == ctypes.sizeof(buf._obj)
        self.objects[desc.value][attr] = buf._obj.value
        return 0

    STORAGE = {LT.CUDA_R_32F: np.dtype(np.float32), LT.CUDA_R_16BF: PR.BF16, LT.CUDA_R_16F: PR.F16}

    def cublasLtMatrixLayoutCreate(self, ref, dtype, rows, cols, ld):
        assert dtype in self.STORAGE and ld >= rows
        return self._new(ref, (rows, cols, ld, dtype))

    def cublasLtMatmulPreferenceCreate(self, ref):
        return self._new(ref, {})

    cublasLtMatmulPreferenceSetAttribute = cublasLtMatmulDescSetAttribute

    def _destroy(self, obj):
        del self.objects[obj.value]
        return 0

    cublasLtMatmulDescDestroy = cublasLtMatrixLayoutDestroy = cublasLtMatmulPreferenceDestroy = _destroy

    def cublasLtMatmulAlgoGetHeuristic(self, handle, desc, la, lb, lc, ld, pref, requested, result, count):
        self.heuristics += 1
        assert requested >= 1 and self.objects[pref.value][LT.PREF_MAX_WORKSPACE_BYTES] > 0
        count._obj.value = 0 if self.refuse else 1
        result._obj.state = 0
        return 0

    def _matrix(self, ptr, layout):
        """The stored matrix (rows x cols, column-major, ld) as a strided view of its storage dtype."""
        rows, cols, ld, dtype = layout
        store = self.STORAGE[dtype]
        buf = ((ctypes.c_uint8 * store.itemsize) * (ld * (cols - 1) + rows)).from_address(ptr)
        flat = np.ctypeslib.as_array(buf).reshape(-1).view(store)
        return np.lib.stride_tricks.as_strided(flat, (rows, cols), (store.itemsize, store.itemsize * ld))

    def cublasLtMatmul(self, handle, desc, alpha, a, la, b, lb, beta, c, lc, d, ld, algo, ws, ws_bytes, stream):
        self.matmuls += 1
        if self.matmul_status:
            return self.matmul_status
        desc = self.objects[desc.value]
        assert c == d and lc.value == ld.value and ws and ws_bytes > 0
        layout_a, layout_b, layout_d = self.objects[la.value], self.objects[lb.value], self.objects[ld.value]
        assert layout_a[3] == layout_b[3] and layout_d[3] in (layout_a[3], LT.CUDA_R_32F)
        if layout_a[3] != LT.CUDA_R_32F:  # 16-bit: float32 accumulation
            assert desc["compute"] == LT.COMPUTE_32F
        if layout_d[3] != LT.CUDA_R_32F:  # the bias would have D's type: ours is named float32
            assert desc.get(LT.DESC_BIAS_DATA_TYPE) == LT.CUDA_R_32F
        A = PR.to_float32(self._matrix(a, layout_a)).astype(np.float64)
        B = PR.to_float32(self._matrix(b, layout_b)).astype(np.float64)
        A = A.T if desc[LT.DESC_TRANSA] else A
        B = B.T if desc[LT.DESC_TRANSB] else B
        alpha_v = ctypes.c_float.from_address(alpha).value
        beta_v = ctypes.c_float.from_address(beta).value
        assert (alpha_v, beta_v) == (1.0, 0.0)
        D = alpha_v * (A @ B)  # (m, n)
        m, n = D.shape
        epilogue = desc[LT.DESC_EPILOGUE]
        if epilogue != LT.EPILOGUE_DEFAULT:
            vector = np.ctypeslib.as_array((ctypes.c_float * m).from_address(desc[LT.DESC_BIAS_POINTER]))
        if epilogue in (LT.EPILOGUE_RELU_AUX_BIAS, LT.EPILOGUE_DRELU_BGRAD):
            bits_ld = desc[LT.DESC_EPILOGUE_AUX_LD]
            assert bits_ld % 128 == 0 and bits_ld >= m
            aux = np.ctypeslib.as_array(
                (ctypes.c_uint8 * (bits_ld * n // 8)).from_address(desc[LT.DESC_EPILOGUE_AUX_POINTER])
            )
        if epilogue == LT.EPILOGUE_BIAS:
            D += vector[:, None]
        elif epilogue == LT.EPILOGUE_RELU_AUX_BIAS:
            D += vector[:, None]
            for j in range(n):
                for i in range(m):
                    bit = j * bits_ld + i
                    if D[i, j] > 0:
                        aux[bit >> 3] |= 1 << (bit & 7)
                    else:
                        aux[bit >> 3] &= ~(1 << (bit & 7)) & 0xFF
            D = np.maximum(D, 0)
        elif epilogue == LT.EPILOGUE_DRELU_BGRAD:
            for j in range(n):
                for i in range(m):
                    bit = j * bits_ld + i
                    D[i, j] *= (int(aux[bit >> 3]) >> (bit & 7)) & 1
            vector[:] = D.sum(axis=1)
        elif epilogue == LT.EPILOGUE_BGRADA:
            vector[:] = A.sum(axis=1)  # op(A) (m x k) summed over k
        else:
            assert epilogue == LT.EPILOGUE_DEFAULT
        PR.store(D.astype(np.float32), self._matrix(d, layout_d))  # rounded once into D's type
        return 0


def lt_product(lt, epilogue, a, b, out, vector, mask, trans_a, trans_b, data_type=LT.CUDA_R_32F, d_type=None):
    """What CupyBackend._lt_product does, on host memory."""
    return LT.row_major_product(lt, a, b, out, vector, mask, epilogue, trans_a, trans_b, False,
                                lambda x: x.ctypes.data, 0, data_type, d_type)  # fmt: skip


def stored(x, dt):
    """x (float32 values) in storage dtype dt."""
    out = np.empty(x.shape, dt)
    PR.store(x, out)
    return out


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("trans_a,trans_b", TRANS)
@pytest.mark.parametrize("storage", ["float32", "bf16"])
def test_the_cublaslt_calls_compute_the_reference_products(m, k, n, trans_a, trans_b, storage):
    rng = np.random.default_rng(m + 31 * n + 7 * k)
    fake = FakeLt()
    workspace = np.empty(64, np.uint8)
    lt = LT.Lt(fake, workspace.ctypes.data, workspace.nbytes)
    dt, code = (np.dtype(np.float32), LT.CUDA_R_32F) if storage == "float32" else (PR.BF16, LT.CUDA_R_16BF)
    a, b = (stored(v, dt) for v in operands(rng, m, k, n, trans_a, trans_b))
    bias = small_ints(rng, n) + np.float32(257.0)  # 16-bit: the sum rounds (once, in the epilogue)
    out, mask = np.empty((m, n), dt), np.full((m, ops.relu_mask_bytes(n)), 0xFF, np.uint8)
    assert lt_product(lt, LT.EPILOGUE_RELU_AUX_BIAS, a, b, out, bias, mask, trans_a, trans_b, code)
    want, want_mask = np.empty_like(out), np.empty_like(mask)
    ops.gemm_bias_relu(a, b, bias, want, want_mask, trans_a, trans_b)
    assert np.array_equal(out, want)
    # the stand-in leaves the padding bits as they were (set here); the reference zeroes them
    assert np.array_equal(mask_bits(mask, n), mask_bits(want_mask, n))

    # the backward product of the layer above reads that mask: D (m x k2) W^T, W (n x k2)
    k2 = k + 1
    d, w = stored(small_ints(rng, (m, k2)), dt), stored(small_ints(rng, (n, k2)), dt)
    out2, db = np.empty((m, n), dt), np.empty(n, np.float32)
    assert lt_product(lt, LT.EPILOGUE_DRELU_BGRAD, d, w, out2, db, mask, False, True, code)
    want2, want_db = np.empty_like(out2), np.empty_like(db)
    ops.gemm_drelu_bias_grad(d, w, want_mask, want2, want_db, False, True)
    assert np.array_equal(out2, want2) and np.array_equal(db, want_db)

    heuristics = fake.heuristics
    assert lt_product(lt, LT.EPILOGUE_DRELU_BGRAD, d, w, out2, db, mask, False, True, code)
    assert fake.heuristics == heuristics  # a plan is made once per shape and address set

    # an identity layer's product (BIAS), and a weight gradient with its bias gradient
    # (BGRADA, float32 out for 16-bit inputs): dW = x^T D', x (k, m), D' (k, n)
    assert lt_product(lt, LT.EPILOGUE_BIAS, a, b, out, bias, None, trans_a, trans_b, code)
    ops.gemm_bias(a, b, bias, want, trans_a, trans_b)
    assert np.array_equal(out, want)
    x, g = stored(small_ints(rng, (k, m)), dt), stored(small_ints(rng, (k, n)), dt)
    dw, db3 = np.empty((m, n), np.float32), np.empty(n, np.float32)
    assert lt_product(lt, LT.EPILOGUE_BGRADA, x, g, dw, db3, None, True, False, code, LT.CUDA_R_32F)
    want_dw, want_db3 = np.empty_like(dw), np.empty_like(db3)
    ops.gemm_bias_grad(x, g, want_dw, want_db3, trans_a=True)
    assert np.array_equal(dw, want_dw) and np.array_equal(db3, want_db3)


class HostArray(np.ndarray):
    """A NumPy array with CuPy's `.data.ptr` (its host address): the GPU backend's code
    runs on it against the stand-in library."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)


@pytest.mark.parametrize("storage", ["float32", "bf16", "fp16"])
def test_the_gpu_backends_fused_ops_make_the_reference_products(storage):
    """CupyBackend.gemm_bias_relu / gemm_drelu_bias_grad, the code a GPU runs (its checks
    aside), on host arrays and the stand-in libcublasLt: the reference's results; and
    False, nothing written, without a libcublasLt."""
    from gpubp.backend.cupy_backend import CupyBackend

    be = CupyBackend.__new__(CupyBackend)
    be.tf32, be._check = False, lambda *args, **kw: None
    stream = types.SimpleNamespace(ptr=0)
    be._cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(get_current_stream=lambda: stream))
    workspace = np.empty(64, np.uint8)
    be._lt_handle, be._lt_note = LT.Lt(FakeLt(), workspace.ctypes.data, workspace.nbytes), None
    rng = np.random.default_rng(9)
    m, k, n = 9, 6, 11
    dt = {"float32": np.dtype(np.float32), "bf16": PR.BF16, "fp16": PR.F16}[storage]
    x, w, bias = stored(small_ints(rng, (m, k)), dt), stored(small_ints(rng, (k, n)), dt), small_ints(rng, n)
    out, mask = np.empty((m, n), dt), np.zeros((m, ops.relu_mask_bytes(n)), np.uint8)
    host = [v.view(HostArray) for v in (x, w, bias, out, mask)]
    assert be.gemm_bias_relu(*host)
    want, want_mask = np.empty_like(out), np.empty_like(mask)
    ops.gemm_bias_relu(x, w, bias, want, want_mask)
    assert np.array_equal(out, want) and np.array_equal(mask_bits(mask, n), mask_bits(want_mask, n))
    d, w2 = stored(small_ints(rng, (m, 5)), dt), stored(small_ints(rng, (n, 5)), dt)
    out2, db = np.empty((m, n), dt), np.empty(n, np.float32)
    host2 = [v.view(HostArray) for v in (d, w2, mask, out2, db)]
    assert be.gemm_drelu_bias_grad(*host2, trans_b=True)
    want2, want_db = np.empty_like(out2), np.empty_like(db)
    ops.gemm_drelu_bias_grad(d, w2, want_mask, want2, want_db, trans_b=True)
    assert np.array_equal(out2, want2) and np.array_equal(db, want_db)
    assert be.gemm_bias(*host[:4])
    ops.gemm_bias(x, w, bias, want)
    assert np.array_equal(out, want)
    g = stored(small_ints(rng, (m, n)), dt)
    dw, db3 = np.empty((k, n), np.float32), np.empty(n, np.float32)
    assert be.gemm_bias_grad(*(v.view(HostArray) for v in (x, g, dw, db3)), trans_a=True)
    want_dw, want_db3 = np.empty_like(dw), np.empty_like(db3)
    ops.gemm_bias_grad(x, g, want_dw, want_db3, trans_a=True)
    assert np.array_equal(dw, want_dw) and np.array_equal(db3, want_db3)
    be._lt_handle, be._lt_note = None, "libcublasLt cannot be opened"
    out[...] = 7
    assert not be.gemm_bias_relu(*host) and (out == 7).all()
    assert not be.gemm_epilogues and be.epilogue_note == "libcublasLt cannot be opened"


def test_gpubp_gemm_epilogues_0_turns_the_gpu_default_off(monkeypatch):
    """The process-wide switch (a GPU visit reruns its tests unfused with it)."""
    from gpubp.backend.cupy_backend import CupyBackend

    be = CupyBackend.__new__(CupyBackend)
    be._lt_handle, be._lt_note = object(), None  # a loaded cuBLASLt
    assert be.gemm_epilogues and be.epilogue_note is None
    monkeypatch.setenv("GPUBP_GEMM_EPILOGUES", "0")
    assert not be.gemm_epilogues and be.epilogue_note == "GPUBP_GEMM_EPILOGUES=0"


def test_no_algorithm_means_no_plan_and_nothing_written():
    lt = LT.Lt(FakeLt(refuse=True), 1, 1)
    rng = np.random.default_rng(0)
    a, b = operands(rng, 4, 3, 5, False, False)
    out = np.full((4, 5), 7.0, np.float32)
    mask = np.zeros((4, ops.relu_mask_bytes(5)), np.uint8)
    assert not lt_product(lt, LT.EPILOGUE_RELU_AUX_BIAS, a, b, out, np.zeros(5, np.float32), mask, False, False)
    assert (out == 7.0).all()
    assert list(lt.plans.values()) == [None]  # remembered: no second heuristic query


def test_drelu_bgrad_and_bgrada_with_k_of_one_are_not_asked_for():
    """cuBLASLt has no DRELU epilogue for k = 1 (nvmath-python refuses it, "K=1 is not
    supported by cuBLAS") and BGRADA's k = 1 only from 12.3.4: a ReLU layer under a
    one-unit output layer, and a batch of one row, run unfused, nothing written and no
    heuristic asked. The stand-in would compute them; the other epilogues' k = 1 runs."""
    fake = FakeLt()
    lt = LT.Lt(fake, 1, 1)
    rng = np.random.default_rng(1)
    m, n = 5, 7
    mask = np.zeros((m, ops.relu_mask_bytes(n)), np.uint8)
    ops.relu_mask_pack(rng.random((m, n)) < 0.5, mask)
    d, w = small_ints(rng, (m, 1)), small_ints(rng, (n, 1))  # D (m, 1) W^T, W (n, 1): k = 1
    out, db = np.full((m, n), 7.0, np.float32), np.full(n, 7.0, np.float32)
    assert not lt_product(lt, LT.EPILOGUE_DRELU_BGRAD, d, w, out, db, mask, False, True)
    x, g = small_ints(rng, (1, m)), small_ints(rng, (1, n))  # dW = x^T D' over one row: k = 1
    dw = np.full((m, n), 7.0, np.float32)
    assert not lt_product(lt, LT.EPILOGUE_BGRADA, x, g, dw, db, None, True, False)
    assert (out == 7.0).all() and (db == 7.0).all() and (dw == 7.0).all()
    assert fake.heuristics == 0 and fake.matmuls == 0
    relu_out = np.empty((m, n), np.float32)
    assert lt_product(lt, LT.EPILOGUE_RELU_AUX_BIAS, d, w, relu_out, db, mask, False, True)  # k = 1 forward
    want, want_mask = np.empty_like(relu_out), np.empty_like(mask)
    ops.gemm_bias_relu(d, w, db, want, want_mask, False, True)
    assert np.array_equal(relu_out, want)


@pytest.mark.parametrize("status", LT.STATUS_NOTHING_RAN)
def test_a_plan_cublaslt_refuses_at_run_time_falls_back_and_is_dropped(status):
    """cublasLtMatmul may refuse the heuristic's own algorithm (PyTorch's gemm_and_bias
    warns and runs the unfused path on it: pytorch/pytorch#91436): False, nothing
    written, the plan forgotten (no second heuristic query, no second call)."""
    fake = FakeLt(matmul_status=status)
    lt = LT.Lt(fake, 1, 1)
    a, b = operands(np.random.default_rng(2), 4, 3, 5, False, False)
    out, mask = np.full((4, 5), 7.0, np.float32), np.zeros((4, ops.relu_mask_bytes(5)), np.uint8)
    for _ in range(2):
        assert not lt_product(lt, LT.EPILOGUE_RELU_AUX_BIAS, a, b, out, np.zeros(5, np.float32), mask, False, False)
    assert (out == 7.0).all() and fake.heuristics == 1 and fake.matmuls == 1
    assert list(lt.plans.values()) == [None]
    assert list(fake.objects.values()) == ["handle"]  # the plan's descriptors destroyed


def test_a_failed_launch_still_raises():
    """EXECUTION_FAILED (13): the device reported an error; not a case to fall back on."""
    lt = LT.Lt(FakeLt(matmul_status=13), 1, 1)
    a, b = operands(np.random.default_rng(2), 4, 3, 5, False, False)
    with pytest.raises(RuntimeError, match="status 13"):
        lt_product(lt, LT.EPILOGUE_BIAS, a, b, np.empty((4, 5), np.float32), np.zeros(5, np.float32), None, False,
                   False)  # fmt: skip


def test_a_misfit_is_refused_before_anything_runs():
    lt = LT.Lt(FakeLt(), 1, 1)
    a, b, out = np.zeros((4, 3), np.float32), np.zeros((3, 5), np.float32), np.zeros((4, 5), np.float32)
    with pytest.raises(ValueError, match="not fit"):
        lt_product(lt, LT.EPILOGUE_RELU_AUX_BIAS, a, b, out, np.zeros(4, np.float32),
                   np.zeros((4, ops.relu_mask_bytes(5)), np.uint8), False, False)  # fmt: skip
    with pytest.raises(ValueError, match="not fit"):
        lt_product(lt, LT.EPILOGUE_RELU_AUX_BIAS, a, b.T.copy(), out, np.zeros(5, np.float32),
                   np.zeros((4, ops.relu_mask_bytes(5)), np.uint8), False, False)  # fmt: skip


def test_alignment_is_the_largest_power_of_two_up_to_256():
    assert [LT.alignment(p) for p in (0, 4, 12, 16, 48, 256, 512, 4096 + 8)] == [256, 4, 4, 16, 16, 256, 256, 8]


# ------------------------------------------------------------- against cublasLt.h


def _include_dirs():
    dirs = [os.environ.get("GPUBP_CUBLAS_INCLUDE", "")]
    for root in sys.path:
        dirs += glob.glob(os.path.join(root, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(root, "nvidia", "cublas", "include"))
    dirs += [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include"), "/usr/include"]
    return [d for d in dirs if d and os.path.isfile(os.path.join(d, "cublasLt.h"))]


@pytest.fixture(scope="module")
def header():
    dirs = _include_dirs()
    if not dirs:
        pytest.skip("no cublasLt.h here (pip install nvidia-cublas, or set GPUBP_CUBLAS_INCLUDE)")
    text = ""
    for name in ("cublasLt.h", "cublas_api.h"):
        path = os.path.join(dirs[0], name)
        if os.path.isfile(path):
            with open(path) as f:
                text += re.sub(r"/\*.*?\*/|//[^\n]*", "", f.read(), flags=re.S)
    return text


def _enum_values(text: str) -> dict:
    """NAME -> value of every enumerator `NAME = expr` (expr over earlier names, | and ints)."""
    values: dict = {}
    for name, expr in re.findall(r"\b([A-Z][A-Z0-9_]+)\s*=\s*([^,}]+)[,}]", text):
        expr = re.sub(r"\b([A-Z][A-Z0-9_]+)\b", lambda mt: str(values.get(mt.group(1), "None")), expr)
        try:
            values[name] = int(eval(expr, {"__builtins__": {}}))  # noqa: S307 - integers and | only
        except Exception:
            pass
    return values


def test_the_enum_values_are_the_headers(header):
    v = _enum_values(header)
    assert {
        "CUBLASLT_EPILOGUE_DEFAULT": LT.EPILOGUE_DEFAULT, "CUBLASLT_EPILOGUE_BIAS": LT.EPILOGUE_BIAS,
        "CUBLASLT_EPILOGUE_RELU_AUX_BIAS": LT.EPILOGUE_RELU_AUX_BIAS,
        "CUBLASLT_EPILOGUE_DRELU_BGRAD": LT.EPILOGUE_DRELU_BGRAD, "CUBLASLT_EPILOGUE_BGRADA": LT.EPILOGUE_BGRADA,
        "CUBLASLT_MATMUL_DESC_TRANSA": LT.DESC_TRANSA, "CUBLASLT_MATMUL_DESC_TRANSB": LT.DESC_TRANSB,
        "CUBLASLT_MATMUL_DESC_EPILOGUE": LT.DESC_EPILOGUE, "CUBLASLT_MATMUL_DESC_BIAS_POINTER": LT.DESC_BIAS_POINTER,
        "CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER": LT.DESC_EPILOGUE_AUX_POINTER,
        "CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD": LT.DESC_EPILOGUE_AUX_LD,
        "CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE": LT.DESC_BIAS_DATA_TYPE,
        "CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES": LT.PREF_MAX_WORKSPACE_BYTES,
        "CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES": LT.PREF_MIN_ALIGNMENT_A_BYTES,
        "CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES": LT.PREF_MIN_ALIGNMENT_B_BYTES,
        "CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES": LT.PREF_MIN_ALIGNMENT_C_BYTES,
        "CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES": LT.PREF_MIN_ALIGNMENT_D_BYTES,
        "CUBLAS_OP_N": LT.OP_N, "CUBLAS_OP_T": LT.OP_T, "CUBLAS_COMPUTE_32F": LT.COMPUTE_32F,
        "CUBLAS_COMPUTE_32F_FAST_TF32": LT.COMPUTE_32F_FAST_TF32,
    }.items() <= v.items()  # fmt: skip


_POINTER_TYPES = ("cublasLtHandle_t", "cublasLtMatmulDesc_t", "cublasLtMatrixLayout_t", "cublasLtMatmulPreference_t",
                  "cudaStream_t")  # fmt: skip
_INT_TYPES = ("cublasComputeType_t", "cudaDataType_t", "cudaDataType", "cublasLtMatmulDescAttributes_t",
              "cublasLtMatmulPreferenceAttributes_t", "int")  # fmt: skip


def _kind_of_c(param: str) -> str:
    param = re.sub(r"\b\w+\s*\[\]$", "*", param.strip())  # `T name[]` is a pointer
    words = param.replace("*", " * ").split()
    if "*" in words or any(w in _POINTER_TYPES for w in words):
        return "pointer"
    for c, kind in (("uint64_t", "u64"), ("int64_t", "i64"), ("size_t", "u64")):  # ctypes: size_t is uint64
        if c in words:
            return kind
    assert any(w in _INT_TYPES for w in words), param
    return "int"


def _kind_of_ctypes(t) -> str:
    if t in (ctypes.c_void_p,) or issubclass(t, ctypes._Pointer):
        return "pointer"
    assert ctypes.sizeof(ctypes.c_size_t) == 8 and ctypes.sizeof(ctypes.c_int) == 4
    return {ctypes.c_int: "int", ctypes.c_uint64: "u64", ctypes.c_int64: "i64", ctypes.c_size_t: "u64"}[t]


@pytest.mark.parametrize("name", list(LT.PROTOTYPES))
def test_each_prototype_matches_the_header(header, name):
    found = re.search(r"cublasStatus_t\s+CUBLASWINAPI\s+" + name + r"\s*\(([^)]*)\)", header)
    assert found, name
    params = [p for p in found.group(1).split(",") if p.strip()]
    assert [_kind_of_c(p) for p in params] == [_kind_of_ctypes(t) for t in LT.PROTOTYPES[name]]


def test_the_structs_match_the_header(header):
    algo = re.search(r"typedef struct \{\s*uint64_t data\[(\d+)\];\s*\} cublasLtMatmulAlgo_t;", header)
    assert algo and ctypes.sizeof(LT.Algo) == 8 * int(algo.group(1))
    body = re.search(r"typedef struct \{([^{}]*)\} cublasLtMatmulHeuristicResult_t;", header).group(1)
    fields = re.findall(r"(\w+)\s+(\w+)(\[\d+\])?;", body)
    assert [(f[1], f[2]) for f in fields] == [("algo", ""), ("workspaceSize", ""), ("state", ""),
                                              ("wavesCount", ""), ("reserved", "[4]")]  # fmt: skip
    assert [f[0] for f in LT.HeuristicResult._fields_] == ["algo", "workspaceSize", "state", "wavesCount", "reserved"]


def test_the_library_has_every_function_declared():
    """Where a libcublasLt can be opened (a GPU machine, or the nvidia-cublas wheel on
    LD_LIBRARY_PATH), every function of PROTOTYPES is in it (load_library checks)."""
    lib, note = LT.load_library()
    if lib is None:
        pytest.skip(note)
    assert all(hasattr(lib, name) for name in LT.PROTOTYPES)
