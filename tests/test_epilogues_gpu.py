"""The fused products (cuBLASLt epilogues, gpubp/backend/cublaslt.py) on a GPU, against
the NumPy references (tests marked gpu: they skip without a CUDA device).

Tolerance (`within`): |gpu - ref| <= (K + 2) u32 sum|terms| (+ u |ref| for a 16-bit
result, rounded once), u32 = 2^-24: the worst case of any summation order of K products
(each partial sum rounds by at most u32 of the sum of the terms' magnitudes) plus the
bias add and the final rounding. A bias gradient sums M rows: M u32 sum|rows| on top of
the rows' own bound. This holds whatever order cuBLASLt sums in (its kernels are not
ours), unlike test_gpu.py's flat 1e-5 for our own kernels; the small shapes keep it
tight enough to catch a wrong mask, column or transpose. The ReLU mask is compared where
the pre-activation is farther from 0 than that bound (closer, rounding decides its sign).

The products must run fused on an H100/H200 with CUDA 12/13's cuBLASLt (a False return
would mean no algorithm: the model would silently fall back, so these tests fail then).
"""

from __future__ import annotations

import numpy as np
import pytest

from gpubp import precision as PR
from gpubp.backend import numpy_ops as ops
from gpubp.model import MLP

from .test_gpu import poisoned

pytestmark = pytest.mark.gpu

U32 = 2.0**-24
FTZ = float(np.finfo(np.float32).tiny)  # -ftz=true: subnormal results flushed


def within(actual, ref, atol, what):
    """|actual - ref| <= atol (elementwise), NaN (an unwritten element) failing."""
    actual, ref = np.asarray(actual, np.float64), np.asarray(ref, np.float64)
    assert actual.shape == ref.shape, f"{what}: shape {actual.shape} != {ref.shape}"
    ok = np.abs(actual - ref) <= atol + FTZ
    if not ok.all():
        i = np.flatnonzero(~ok.ravel())[0]
        raise AssertionError(f"{what}: {(~ok).sum()} of {ok.size} off; first at {i}: {actual.ravel()[i]!r} vs "
                             f"{ref.ravel()[i]!r} (bound {np.broadcast_to(atol, ok.shape).ravel()[i]:.3g})")  # fmt: skip


SHAPES = [(1, 3, 1), (37, 13, 10), (100, 784, 512), (4096, 64, 64), (1024, 512, 10), (262144, 64, 64)]


@pytest.fixture(scope="module")
def gpu():
    from gpubp.backend.cupy_backend import CupyBackend

    be = CupyBackend()
    assert be._lt() is not None, f"cuBLASLt does not load: {be.epilogue_note}"  # (whatever GPUBP_GEMM_EPILOGUES says)
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
    bound = (k + 2) * U32 * (np.abs(opa) @ np.abs(opb) + np.abs(bias))
    within(gpu.to_numpy(out), np.maximum(v, 0), bound, f"gemm_bias_relu {(m, k, n)}")
    bits = ops.relu_mask_unpack(gpu.to_numpy(mask), n)
    clear = np.abs(v) > bound
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
    bound = (k + 2) * U32 * (np.abs(opd) @ np.abs(opw)) * positive
    within(gpu.to_numpy(out), ref, bound, f"gemm_drelu_bias_grad {(m, k, n)}")
    within(gpu.to_numpy(db), ref.sum(0), bound.sum(0) + m * U32 * np.abs(ref).sum(0), f"bias gradient {(m, k, n)}")


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_gemm_bias_and_gemm_bias_grad(gpu, m, k, n):
    """An identity layer's z = x W + b (BIAS), and a weight gradient dW = x^T D' with
    db = 1^T D' (BGRADA, as the model calls it: x (m, k) transposed, D' (m, n))."""
    rng = np.random.default_rng(m + 5 * n)
    a, b, opa, opb = _operands(rng, m, k, n, False, False)
    bias = rng.normal(size=n).astype(np.float32)
    out = poisoned(gpu, (m, n), np.float32)
    assert gpu.gemm_bias(gpu.asarray(a), gpu.asarray(b), gpu.asarray(bias), out), f"no BIAS algorithm {(m, k, n)}"
    bound = (k + 2) * U32 * (np.abs(opa) @ np.abs(opb) + np.abs(bias))
    within(gpu.to_numpy(out), opa @ opb + bias, bound, f"gemm_bias {(m, k, n)}")
    x, g = rng.normal(size=(m, k)).astype(np.float32), rng.normal(size=(m, n)).astype(np.float32)
    dw, db = poisoned(gpu, (k, n), np.float32), poisoned(gpu, n, np.float32)
    ran = gpu.gemm_bias_grad(gpu.asarray(x), gpu.asarray(g), dw, db, trans_a=True)
    # one row (cuBLASLt's k = 1): never asked for (cublaslt.NO_K1), the caller runs bias_grad and gemm
    assert ran or m == 1, f"no BGRADA algorithm {(m, k, n)}"
    if not ran:
        return
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    within(gpu.to_numpy(dw), x64.T @ g64, (m + 2) * U32 * (np.abs(x64.T) @ np.abs(g64)), f"dW {(m, k, n)}")
    within(gpu.to_numpy(db), g64.sum(0), (m + 2) * U32 * np.abs(g64).sum(0), f"db {(m, k, n)}")


LOW = {"bf16": (PR.BF16, 2.0**-8), "fp16": (PR.F16, 2.0**-11)}


@pytest.mark.parametrize("storage", list(LOW))
@pytest.mark.parametrize("m,k,n", [(37, 13, 10), (100, 784, 512), (262144, 64, 64)])
def test_16bit_products(gpu, storage, m, k, n):
    """bf16/fp16 a, b, out with float32 accumulation, the bias and DRELU_BGRAD's bias
    gradient of out's 16-bit type (cuBLASLt offers no algorithm for a float32 one with a
    16-bit out: tests/lt_bias_probe.py on an H100), BGRADA's float32 with its float32 out:
    the float32 bound plus one 16-bit rounding of the result, u |v|. Whether cuBLASLt's
    DRELU_BGRAD sums the masked accumulator (the reference) or its 16-bit rounding is not
    documented: the bias gradient's bound takes u sum|g| more, so either passes, and u
    |sum g| more for its own rounding."""
    dt, u = LOW[storage]
    rng = np.random.default_rng(m + k)

    def to16(x):
        out = np.empty(x.shape, dt)
        PR.store(x.astype(np.float32), out)
        return out, PR.to_float32(out).astype(np.float64)

    (x16, x), (w16, w) = to16(rng.normal(size=(m, k))), to16(rng.normal(size=(k, n)))
    bias16, bias = to16(rng.normal(size=n))
    out, mask = gpu.empty((m, n), dt), gpu.asarray(np.zeros((m, ops.relu_mask_bytes(n)), np.uint8))
    assert gpu.gemm_bias_relu(gpu.asarray(x16), gpu.asarray(w16), gpu.asarray(bias16), out, mask), (
        f"cuBLASLt found no {storage} RELU_AUX_BIAS algorithm with a {storage} bias"
    )
    v = x @ w + bias
    # u |x w| more: some of cuBLASLt's 16-bit kernels round the product to 16 bits before
    # adding the bias (an H100 at 37x13x10, bf16 and fp16: one ulp past the single
    # rounding's bound; 100x784x512 and 262144x64x64 rounded once)
    bound = u * (np.abs(v) + np.abs(x @ w)) + (k + 2) * U32 * (np.abs(x) @ np.abs(w) + np.abs(bias))
    within(PR.to_float32(gpu.to_numpy(out)), np.maximum(v, 0), bound, f"{storage} gemm_bias_relu")
    bits = ops.relu_mask_unpack(gpu.to_numpy(mask), n)
    assert not ((bits != (v > 0)) & (np.abs(v) > bound)).any(), f"{storage} mask"
    # backward: D (m, n) W^T with W (k, n), the mask above as the ReLU's
    (d16, d), (wt16, wt) = to16(rng.normal(size=(m, n))), to16(rng.normal(size=(k, n)))
    positive = rng.random((m, k)) < 0.6
    mask2 = np.zeros((m, ops.relu_mask_bytes(k)), np.uint8)
    ops.relu_mask_pack(positive, mask2)
    out2, db = gpu.empty((m, k), dt), gpu.empty(k, dt)
    assert gpu.gemm_drelu_bias_grad(gpu.asarray(d16), gpu.asarray(wt16), gpu.asarray(mask2), out2, db, trans_b=True), (
        f"cuBLASLt found no {storage} DRELU_BGRAD algorithm with a {storage} bias gradient"
    )
    g = (d @ wt.T) * positive
    acc_bound = (n + 2) * U32 * (np.abs(d) @ np.abs(wt.T)) * positive
    within(PR.to_float32(gpu.to_numpy(out2)), g, u * np.abs(g) + acc_bound, f"{storage} gemm_drelu_bias_grad")
    db_bound = acc_bound.sum(0) + (m * U32 + u) * np.abs(g).sum(0) + u * np.abs(g.sum(0))
    within(PR.to_float32(gpu.to_numpy(db)).astype(np.float64), g.sum(0), db_bound, f"{storage} bias gradient")
    # an identity layer (v rounded once) and a weight gradient (float32 out) with its db
    assert gpu.gemm_bias(gpu.asarray(x16), gpu.asarray(w16), gpu.asarray(bias16), out), f"no {storage} BIAS algorithm"
    within(PR.to_float32(gpu.to_numpy(out)), v, bound, f"{storage} gemm_bias")
    dw, db3 = gpu.empty((k, n), np.float32), gpu.empty(n, np.float32)
    assert gpu.gemm_bias_grad(gpu.asarray(x16), gpu.asarray(d16), dw, db3, trans_a=True), (
        f"cuBLASLt found no {storage} BGRADA algorithm with a float32 out"
    )
    # float32 out: no 16-bit rounding
    within(gpu.to_numpy(dw), x.T @ d, (m + 2) * U32 * (np.abs(x.T) @ np.abs(d)), f"{storage} dW")
    within(gpu.to_numpy(db3), d.sum(0), (m + 2) * U32 * np.abs(d).sum(0), f"{storage} db")


@pytest.mark.parametrize("dtype", ["float32", "tf32", "bf16"])
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
    # relative 2-norm of the difference. float32: two evaluations that differ in their GEMM
    # kernels (summation order), each within ~K u sum|terms| of the exact gradient: 1e-4
    # covers K <= 256 at u = 2^-24 with room. tf32: a kernel may round its inputs to TF32
    # (u = 2^-11) where the other does not: 8 u. bf16: the fused products round fewer
    # times (tests/test_epilogues.py's CPU bound, 2 sqrt(6 L) u, L = 4)
    rtol = {"tf32": 2.0**-11 * 8, "bf16": 2 * np.sqrt(24) * 2.0**-8}.get(dtype, 1e-4)
    (lf, gf), (lp, gp) = results
    assert abs(lf - lp) <= rtol * abs(lp)
    rel = np.linalg.norm(gf - gp) / np.linalg.norm(gp)
    assert rel <= rtol, f"gradients differ by {rel:.2e} (relative 2-norm) > {rtol:.2e}"


@pytest.mark.parametrize("dtype", ["float32", "bf16"])
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_a_narrow_model_runs_its_layers_in_the_layer_kernels(gpu, act, dtype):
    """float32 and bf16 under "auto": each layer of at most 64 inputs and outputs runs
    z = x W + b, a = f(z) as one kernel and D', dW, db, D' W^T as another (kernels/layer.cu,
    layer_tc.cu on the tensor cores; GELU keeps z for its f'), no cuBLASLt product. Loss and
    gradients against the model with fused products off, within the reorder bound of the
    test above (float32 1e-4; bf16 2 sqrt(6 L) u, L = 3: the kernels round each result
    once, the unfused ops twice); with the shares left to the guard (the step's), the same
    bits."""
    sizes = [64, 64, 64, 10]
    rng = np.random.default_rng(8)
    x = rng.standard_normal((8192, 64)).astype(np.float32)
    y = rng.integers(0, 10, 8192)
    kw = dict(activation=act, loss="softmax_cross_entropy", seed=5, backend=gpu, dtype=dtype)
    auto, plain = MLP(sizes, **kw), MLP(sizes, gemm_epilogues=False, **kw)
    assert auto.fuses_products and not plain.fuses_products
    assert all(auto._layer_kernel(k) and not auto._lt(k) for k in range(auto.n_layers))
    results = []
    for model in (auto, plain):
        loss = model.forward_backward(model.as_input(x), model.as_target(y, len(x)))
        results.append((gpu.to_float(loss), gpu.to_numpy(model.flat_grads)))
    (la, ga), (lp, gp) = results
    rtol = 2 * np.sqrt(6 * 3) * 2.0**-8 if dtype == "bf16" else 1e-4
    assert abs(la - lp) <= rtol * abs(lp)
    rel = np.linalg.norm(ga - gp) / np.linalg.norm(gp)
    assert rel <= rtol, f"gradients differ by {rel:.2e} (relative 2-norm)"
    assert not np.array_equal(ga, gp)  # another order of sums than cuBLAS's: the kernels ran
    # the training step's way: the layers' shares left unsummed, the guard's launch sums
    # them (in block order, as each layer's own sum did): the same bits, the same norm
    auto.flat_grads.fill(np.nan)
    auto.forward_backward(auto.as_input(x), auto.as_target(y, len(x)), keep_shares=True)
    assert auto.grad_shares is not None and auto.grad_shares.shape == (256, auto.flat_grads.size)
    f32 = np.float32
    state = [gpu.asarray(np.array(-1, np.int64)), gpu.zeros((), np.bool_), gpu.zeros((), f32), gpu.zeros((), f32)]
    sq, sq_want = gpu.zeros((), f32), gpu.zeros((), f32)
    gpu.step_guard_norm(gpu.zeros((), f32), auto.flat_grads, sq, 0, 0.0, *state, shares=auto.grad_shares)
    assert gpu.to_numpy(auto.flat_grads).tobytes() == ga.tobytes()
    gpu.step_guard_norm(gpu.zeros((), f32), gpu.asarray(ga), sq_want, 0, 0.0, *state)
    assert gpu.to_numpy(sq).tobytes() == gpu.to_numpy(sq_want).tobytes()


@pytest.mark.parametrize("m,k,n", [(262144, 64, 64), (4096, 512, 512), (1024, 512, 10)])
def test_the_fused_products_repeat_bitwise(gpu, m, k, n):
    """docs/architecture.md promises two runs the same bits (no atomics). The bias
    gradients of DRELU_BGRAD and BGRADA reduce over all M rows, across thread blocks:
    the same product twice, on the same inputs, must give the same out, mask and db."""
    rng = np.random.default_rng(m + k + n)
    x, w = (
        gpu.asarray(rng.normal(size=(m, k)).astype(np.float32)),
        gpu.asarray(rng.normal(size=(k, n)).astype(np.float32)),
    )
    bias = gpu.asarray(rng.normal(size=n).astype(np.float32))
    d = gpu.asarray(rng.normal(size=(m, k)).astype(np.float32))
    runs = []
    for _ in range(2):
        out, mask = poisoned(gpu, (m, n), np.float32), gpu.asarray(np.zeros((m, ops.relu_mask_bytes(n)), np.uint8))
        assert gpu.gemm_bias_relu(x, w, bias, out, mask)
        out2, db2 = poisoned(gpu, (m, n), np.float32), poisoned(gpu, n, np.float32)
        assert gpu.gemm_drelu_bias_grad(d, gpu.asarray(gpu.to_numpy(w).T.copy()), mask, out2, db2, trans_b=True)
        dw, db3 = poisoned(gpu, (k, n), np.float32), poisoned(gpu, n, np.float32)
        assert gpu.gemm_bias_grad(x, out2, dw, db3, trans_a=True)
        runs.append([gpu.to_numpy(v) for v in (out, mask, out2, db2, dw, db3)])
    for name, first, second in zip(("out", "mask", "D'", "db (DRELU_BGRAD)", "dW", "db (BGRADA)"), *runs):
        assert np.array_equal(first, second, equal_nan=True), f"{name} differs between two runs {(m, k, n)}"


def _step(model, x, y):
    loss = model.forward_backward(model.as_input(x), model.as_target(y, len(x)))
    return model.backend.to_float(loss), model.backend.to_numpy(model.flat_grads)


@pytest.mark.parametrize("dtype", ["float32", "bf16"])
@pytest.mark.parametrize("n", [4099, 1])
def test_odd_widths_a_one_unit_output_and_one_row(gpu, dtype, n):
    """The shapes a regression model makes: one output unit (the ReLU layer below it has
    cuBLASLt's k = 1 in its backward product: not asked for, NO_K1), odd widths (biases
    and weights at 4-byte aligned offsets of the flat buffers: the heuristic must pick
    algorithms for those alignments), a batch of one row (BGRADA's k = 1). Fused against
    unfused on the same GPU (the bounds of test_a_fused_model_step_agrees_with_the_unfused_one),
    and the fused step twice: the same bits."""
    sizes = [13, 37, 29, 1]
    rng = np.random.default_rng(11)
    x, y = rng.standard_normal((n, 13)).astype(np.float32), rng.standard_normal((n, 1)).astype(np.float32)
    kw = dict(loss="mse", dtype=dtype, seed=4, backend=gpu)
    fused, plain = MLP(sizes, gemm_epilogues=True, **kw), MLP(sizes, gemm_epilogues=False, **kw)
    (lf, gf), (lp, gp) = _step(fused, x, y), _step(plain, x, y)
    rtol = 2 * np.sqrt(18) * 2.0**-8 if dtype == "bf16" else 1e-4
    assert abs(lf - lp) <= rtol * abs(lp)
    rel = np.linalg.norm(gf - gp) / np.linalg.norm(gp)
    assert rel <= rtol, f"gradients differ by {rel:.2e} (relative 2-norm) > {rtol:.2e}"
    again = _step(fused, x, y)
    assert again[0] == lf and np.array_equal(again[1], gf), "the fused step is not repeatable bitwise"


def test_a_nan_in_the_batch_still_reaches_the_gradients(gpu):
    """cuBLASLt's ReLU epilogue maps NaN to 0 (forums.developer.nvidia.com, "Incorrect
    result of cublasLtMatmul with CUBLASLT_EPILOGUE_RELU when input is NaN"), where our
    kernel passes it through: the fused forward may hide a NaN row from the loss. The
    step guard must still see it: dW_0 = x^T D'_0 multiplies the NaN itself."""
    sizes = [16, 64, 64, 4]
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((256, 16)).astype(np.float32), rng.integers(0, 4, 256)
    x[3, 5] = np.nan
    model = MLP(sizes, gemm_epilogues=True, loss="softmax_cross_entropy", seed=2, backend=gpu)
    loss, grads = _step(model, x, y)
    assert not (np.isfinite(loss) and np.isfinite(grads).all()), "a NaN input left the loss and gradients finite"
