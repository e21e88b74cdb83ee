"""Mixed precision on the CPU (model.dtype = tf32, bf16, fp16; gpubp/precision.py).

The NumPy backend emulates what the GPU computes (16-bit storage, float32 math and
accumulation, rounding to nearest even where the kernels round), so these tests check
the specification of the GPU path: the rounding references against independent ones,
each op against float64 within a bound derived from the unit roundoff u (2^-8 bf16,
2^-11 fp16 and tf32), a whole run against float32, accuracy on digits and an
MNIST-1D-like set, and fp16's dynamic loss scaling.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from gpubp import precision as PR
from gpubp.activations import ACTIVATIONS, SAVES_INPUT, make_activation
from gpubp.backend import NumpyBackend, numpy_ops
from gpubp.config import load_config
from gpubp.errors import ConfigError
from gpubp.losses import make_loss
from gpubp.model import MLP
from gpubp.optim import make_optimizer
from gpubp.trainer import FiniteGuard, load_dataset, train_in_memory

from . import mnist1d_like
from .conftest import ROOT, run_cli
from .test_kernels_cpu import float32_patterns

U = {"bf16": 2.0**-8, "fp16": 2.0**-11, "tf32": 2.0**-11}
U32 = 2.0**-24
LOW = {"bf16": PR.BF16, "fp16": PR.F16}
DIGITS = os.path.join(ROOT, "configs", "digits.toml")


def to16(x, name):
    out = np.empty(np.shape(x), LOW[name])
    PR.store(np.asarray(x, np.float32), out)
    return out


# --------------------------------------------------------------------------- the rounding references


def test_bf16_rounding_matches_ml_dtypes_bit_for_bit():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = float32_patterns()
    with np.errstate(all="ignore"):
        ref = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    ours = PR.bf16_bits(x)
    nan = np.isnan(x)
    assert (ours[~nan] == ref[~nan]).all()
    assert np.isnan(PR.bf16_to_float32(ours[nan])).all()
    bits = np.arange(2**16, dtype=np.uint16)  # widening: every pattern
    wide, want = PR.bf16_to_float32(bits), bits.view(ml_dtypes.bfloat16).astype(np.float32)
    same = (wide.view(np.uint32) == want.view(np.uint32)) | (np.isnan(wide) & np.isnan(want))
    assert same.all()


def test_bf16_rounding_by_hand():
    one = 1.0
    cases = [
        (one + 2.0**-8, one),  # a tie: to the even neighbour 1
        (one + 3 * 2.0**-8, one + 2.0**-6),  # a tie: 1 + 2^-7 is odd, 1 + 2^-6 even
        (one + 2.0**-8 + 2.0**-20, one + 2.0**-7),  # just above the tie
        (-(one + 2.0**-8 + 2.0**-20), -(one + 2.0**-7)),  # symmetric
        (3.4028235e38, np.inf),  # float32's max rounds past bf16's max
        (1e-40, PR.bf16_to_float32(PR.bf16_bits(np.float32(1e-40)))),  # subnormals round too
    ]
    for x, want in cases:
        got = PR.round_bf16(np.float32(x))
        assert got == np.float32(want), (x, got, want)
    assert PR.bf16_bits(np.float32(1e-40)) != 0
    assert np.isnan(PR.round_bf16(np.float32(np.nan)))


def test_fp16_rounding_by_hand():
    cases = [(65519.0, 65504.0), (65520.0, np.inf), (2.0**-25, 0.0), (2.0**-25 * (1 + 2.0**-10), 2.0**-24),
             (1 + 2.0**-11, 1.0), (1 + 3 * 2.0**-11, 1 + 2.0**-9)]  # fmt: skip
    for x, want in cases:
        assert PR.round_f16(np.float32(x)) == np.float32(want), x


def test_tf32_rounding_modes():
    x = np.float32([1 + 2.0**-11, 1 + 3 * 2.0**-11, -(1 + 2.0**-11), 1 + 2.0**-11 + 2.0**-23, np.inf, np.nan])
    rna, rne, trunc = (PR.round_tf32(x, m) for m in ("rna", "rne", "truncate"))
    np.testing.assert_array_equal(rna[:4], np.float32([1 + 2.0**-10, 1 + 2.0**-9, -(1 + 2.0**-10), 1 + 2.0**-10]))
    np.testing.assert_array_equal(rne[:4], np.float32([1, 1 + 2.0**-9, -1, 1 + 2.0**-10]))
    np.testing.assert_array_equal(trunc[:4], np.float32([1, 1 + 2.0**-10, -1, 1]))
    for r in (rna, rne, trunc):
        assert r[4] == np.inf and np.isnan(r[5])
    np.testing.assert_array_equal(PR.round_tf32(x)[:4], rne[:4])  # the default: cuBLAS's mode (H100)
    # the rounded values have 10 explicit mantissa bits: the low 13 are zero
    y = PR.round_tf32(np.random.default_rng(0).normal(size=1000).astype(np.float32))
    assert (y.view(np.uint32) & 0x1FFF == 0).all()


# --------------------------------------------------------------------------- ops against float64


@pytest.mark.parametrize("name", ["bf16", "fp16"])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("out_kind", ["low", "float32"])
def test_gemm_16bit_within_the_rounding_bound(name, trans_a, trans_b, beta, out_kind):
    """out = round(sum_k a_ik b_kj + beta c): with a, b already 16-bit, the products are
    exact in float32 (8 + 8 or 11 + 11 significant bits <= 24) and the float32 sum of K
    of them errs by at most K u32 sum |a||b| (u32 = 2^-24); rounding the result to 16
    bits adds u |result| (u = 2^-8 bf16, 2^-11 fp16), a float32 out adds nothing; a bf16
    out with beta != 0 rounds the product first, as cuBLAS does (numpy_ops.gemm): u |ab|
    more. So |out - exact| <= u_out (|exact| (1 + K u32) + [bf16 and beta] |ab| (1 + K u32))
    + K u32 (|a||b| + |c|), exact in float64."""
    rng = np.random.default_rng(3)
    m, k, n = 33, 70, 17
    a = to16(rng.normal(size=(k, m) if trans_a else (m, k)), name)
    b = to16(rng.normal(size=(n, k) if trans_b else (k, n)), name)
    out_dtype = LOW[name] if out_kind == "low" else np.float32
    c = np.empty((m, n), out_dtype)
    PR.store(rng.normal(size=(m, n)).astype(np.float32), c)
    c0 = PR.to_float32(c).astype(np.float64)
    numpy_ops.gemm(a, b, c, trans_a=trans_a, trans_b=trans_b, beta=beta)
    af, bf = PR.to_float32(a).astype(np.float64), PR.to_float32(b).astype(np.float64)
    opa, opb = (af.T if trans_a else af), (bf.T if trans_b else bf)
    exact = opa @ opb + beta * c0
    terms = np.abs(opa) @ np.abs(opb) + beta * np.abs(c0)
    u_out = U[name] if out_kind == "low" else 0.0
    first = np.abs(opa @ opb) * (1 + k * U32) if (name == "bf16" and beta != 0.0) else 0.0  # round(ab) first
    bound = u_out * (np.abs(exact) * (1 + k * U32) + first) + k * U32 * terms
    got = PR.to_float32(c).astype(np.float64)
    assert (np.abs(got - exact) <= bound).all()
    # the bound is not vacuous: 16-bit outputs do show rounding at the size of u
    if out_kind == "low":
        assert np.abs(got - exact).max() > 0.1 * U[name] * np.abs(exact).max()


def test_gemm_tf32_within_the_rounding_bound():
    """tf32: each float32 input rounded to 10 explicit mantissa bits, relative error <= u
    = 2^-11 each (round to nearest), products exact in float32, float32 sum:
    |out - ab| <= ((1 + u)^2 - 1 + K u32) sum |a||b|."""
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(40, 90)).astype(np.float32), rng.normal(size=(90, 30)).astype(np.float32)
    out = np.empty((40, 30), np.float32)
    numpy_ops.gemm(a, b, out, tf32=True)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    terms = np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64))
    u = U["tf32"]
    assert (np.abs(out - exact) <= ((1 + u) ** 2 - 1 + 90 * U32) * terms).all()
    plain = np.empty_like(out)
    numpy_ops.gemm(a, b, plain)  # without tf32: float32's much smaller error
    assert np.abs(out - exact).max() > 10 * np.abs(plain - exact).max()


@pytest.mark.parametrize("name", ["bf16", "fp16"])
@pytest.mark.parametrize("act_name", list(ACTIVATIONS))
def test_activations_on_16bit_storage(name, act_name):
    """bias_act_forward / act_backward on 16-bit arrays: the float32 math of the widened
    values, rounded once: |y - f(z + b)| <= u |f(z + b)| + the float32 formula's own
    error (TOL float32 of tests/test_kernels_cpu, times max(1, |z|))."""
    act = make_activation(act_name, 0.05)
    rng = np.random.default_rng(5)
    z = to16(rng.normal(scale=3, size=(64, 9)), name)
    b = rng.normal(size=9).astype(np.float32)
    v = PR.to_float32(z).astype(np.float64) + b
    y = np.empty_like(z)
    numpy_ops.bias_act_forward(z.copy() if act.saves != SAVES_INPUT else z, b, act, y)
    ref = numpy_ops.act_forward(v.copy(), act, np.empty_like(v))
    u, slack = U[name], 1e-5 * np.maximum(1, np.abs(v))
    assert (np.abs(PR.to_float32(y) - ref) <= u * np.abs(ref) + slack).all()
    if act.saves == SAVES_INPUT:  # z was updated in place to round(z + b)
        assert (PR.to_float32(z) == PR.round_to(v.astype(np.float32), LOW[name])).all()
    saved = z if act.saves == SAVES_INPUT else y
    d = to16(rng.normal(size=(64, 9)), name)
    g = numpy_ops.act_backward(d, saved, act, np.empty_like(d))
    s64 = PR.to_float32(saved).astype(np.float64)
    gref = PR.to_float32(d) * numpy_ops.act_backward(np.ones_like(s64), s64, act, np.empty_like(s64))
    assert (np.abs(PR.to_float32(g) - gref) <= u * np.abs(gref) + slack).all()


@pytest.mark.parametrize("name", ["bf16", "fp16"])
@pytest.mark.parametrize("loss_name", ["softmax_cross_entropy", "mse", "binary_cross_entropy", "huber"])
def test_loss_on_16bit_outputs(name, loss_name):
    """The value in float32 from the widened outputs (float32's accuracy); the gradient
    is S dL/dx rounded once: |g - S g64| <= u |S g64| + float32 slack. fp16's loss
    scale S multiplies the gradient only, never the value."""
    rng = np.random.default_rng(6)
    x16 = to16(rng.normal(size=(50, 7)), name)
    loss = make_loss(loss_name, 0.1 if loss_name == "softmax_cross_entropy" else 0.0, 1.0)
    y = rng.integers(0, 7, 50) if loss_name == "softmax_cross_entropy" else rng.random((50, 7)).astype(np.float32)
    x64 = PR.to_float32(x16).astype(np.float64)
    g64 = np.empty_like(x64)
    v64 = numpy_ops.loss_forward_backward(x64, y, loss, g64)
    scale = np.float32(1024.0)
    g = np.empty_like(x16)
    value = numpy_ops.loss_forward_backward(x16, y, loss, g, loss_scale=scale)
    assert value.dtype == np.float32 and abs(value - v64) <= 1e-5 * abs(v64)
    want = scale * g64
    got = PR.to_float32(g)
    assert (np.abs(got - want) <= U[name] * np.abs(want) + 1e-5 * np.abs(want).max()).all()


def test_bias_grad_and_accuracy_read_16bit_storage():
    rng = np.random.default_rng(7)
    d = to16(rng.normal(size=(300, 5)), "bf16")
    out = np.empty(5, np.float32)
    numpy_ops.bias_grad(d, out)  # float32 column sums of the widened values
    np.testing.assert_allclose(out, PR.to_float32(d).astype(np.float64).sum(axis=0), rtol=1e-5, atol=1e-4)
    x = to16(rng.normal(size=(40, 3)), "fp16")
    labels = rng.integers(0, 3, 40)
    assert numpy_ops.accuracy_count(x, labels) == np.count_nonzero(PR.to_float32(x).argmax(axis=1) == labels)


# --------------------------------------------------------------------------- whole models


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name", ["tf32", "bf16", "fp16"])
@pytest.mark.parametrize("act", ["tanh", "gelu", "silu"])
def test_gradients_against_float64(name, act):
    """Tolerance, derived: a layer rounds six times between the input and its gradient
    (forward: x_k, W_k, and z_k or f(z_k); backward: D, D' = D f', and D' W^T), each a
    relative error <= u, independent and unbiased (round to nearest even), so they add
    in quadrature: a gradient's relative (2-norm) error is about sqrt(6 L) u for L
    layers; tf32 rounds only the GEMM inputs, four per layer: sqrt(4 L) u. With a factor
    2 for the first-order constants: tol = 2 sqrt(r L) u. Smooth activations (a ReLU's
    kink turns a rounding of z across 0 into an O(1) change of that element)."""
    sizes = [12, 48, 48, 5]
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(128, 12)), rng.integers(0, 5, 128)
    ref = MLP(sizes, act, loss="softmax_cross_entropy", dtype="float64", seed=1)
    loss64, g64 = ref.loss_and_grads(x, y)
    model = MLP(sizes, act, loss="softmax_cross_entropy", dtype=name, seed=1)
    loss, grads = model.loss_and_grads(x, y)
    L, r = len(sizes) - 1, (4 if name == "tf32" else 6)
    tol = 2 * math.sqrt(r * L) * U[name]
    assert abs(loss - loss64) <= tol * abs(loss64)
    for k, (g, gr) in enumerate(zip(grads, g64)):
        assert g.dtype == np.float32  # float32 gradients
        assert rel(g, gr) <= tol, f"{name} {act}: gradient {k} off by {rel(g, gr):.2e} > {tol:.2e}"
    # and the errors are the 16-bit ones: well above float32's
    assert max(rel(g, gr) for g, gr in zip(grads, g64)) > 50 * U32


def run_digits(dtype, *overrides, dataset=None):
    cfg = load_config(DIGITS, [f"model.dtype={dtype}", *overrides])
    return train_in_memory(cfg, dataset if dataset is not None else load_dataset(cfg))


@pytest.fixture(scope="module")
def digits_200():
    """200 Adam steps on digits (64-512-10, silu) in every precision, and the start."""
    ds = load_dataset(load_config(DIGITS))
    runs = {d: run_digits(d, "train.steps=200", dataset=ds) for d in ("float32", "tf32", "bf16", "fp16")}
    m = runs["float32"].model
    start = MLP(m.sizes, "silu", seed=0, init=m.init).flat_params.astype(np.float64)
    return runs, start


@pytest.mark.parametrize("name", ["tf32", "bf16", "fp16"])
def test_200_step_run_tracks_float32(digits_200, name):
    """Tolerance, derived: each step's gradient has the relative error e = sqrt(r L) u of
    test_gradients_against_float64 (r = 6, tf32 4; L = 2 layers here). Adam's step is a
    normalised function of the gradient, so a relative error e in it moves each update
    by about e times its size; while the two runs stay close (200 steps, lr 1e-3) the
    parameters' distance from the float32 run, relative to the distance they travelled
    from their start, stays at that level: tol = 2 sqrt(r L) u (bf16: 0.028, fp16 and
    tf32: 0.0034 and 0.0028). The training loss, a mean over the split, is held to the
    same relative tolerance. Measured: about 1.5 u (bf16) to 2 u (fp16, tf32)."""
    runs, start = digits_200
    ref, run = runs["float32"], runs[name]
    p32 = ref.run.backend.to_numpy(ref.model.flat_params).astype(np.float64)
    p = run.run.backend.to_numpy(run.model.flat_params).astype(np.float64)
    r = 4 if name == "tf32" else 6
    tol = 2 * math.sqrt(r * 2) * U[name]
    drift = np.linalg.norm(p - p32) / np.linalg.norm(p32 - start)
    assert drift <= tol, f"{name}: parameters {drift:.2e} from float32's, relative to their travel; tol {tol:.2e}"
    assert drift > 0.1 * U[name]  # it did run in the lower precision
    l32, lo = ref.summary["train_loss"], run.summary["train_loss"]
    assert abs(lo - l32) <= tol * l32
    if name == "fp16":
        assert run.summary["skipped_steps"] == 0 and run.summary["loss_scale"] == PR.LOSS_SCALE_INIT


@pytest.fixture(scope="module")
def digits_float32():
    """configs/digits.toml as it is (30 epochs) in float32: (dataset, test accuracy)."""
    ds = load_dataset(load_config(DIGITS))
    return ds, run_digits("float32", dataset=ds).summary["test_accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tf32", "bf16", "fp16"])
def test_digits_accuracy_within_half_a_point_of_float32(digits_float32, name):
    """configs/digits.toml as it is (30 epochs): test accuracy within 0.5 points."""
    ds, acc32 = digits_float32
    acc = run_digits(name, dataset=ds).summary["test_accuracy"]
    assert acc32 > 0.95
    assert abs(acc - acc32) <= 0.005, (name, acc, acc32)


MNIST1D_ARGS = ["model.hidden=[256, 256]", 'model.activation="relu"', "train.epochs=8", "train.batch_size=64",
                "data.test_fraction=0.0"]  # fmt: skip


@pytest.fixture(scope="module")
def mnist1d_float32():
    """An MNIST-1D-like set (tests/mnist1d_like.py): 4000 training signals, a separate
    test set of 10000 (so that 0.5 points are 50 signals, not sampling noise); the
    float32 run's test accuracy."""
    ds = mnist1d_like.make(4000, seed=0)
    ds.test = mnist1d_like.make(10000, seed=1)
    return ds, run_digits("float32", *MNIST1D_ARGS, dataset=ds).summary["test_accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_mnist1d_like_accuracy_within_half_a_point_of_float32(mnist1d_float32, name):
    ds, acc32 = mnist1d_float32
    acc = run_digits(name, *MNIST1D_ARGS, dataset=ds).summary["test_accuracy"]
    assert 0.75 < acc32 < 0.98  # a task with room to differ
    assert abs(acc - acc32) <= 0.005, (name, acc, acc32)


# --------------------------------------------------------------------------- fp16 loss scaling


def scalar(value, dtype):
    return np.asarray(value, dtype=dtype).copy()


def test_step_guard_scaled_follows_gradscaler():
    """GradScaler's rule: a non-finite gradient skips the step and halves S; `interval`
    finite steps in a row double it; the clip factor and the norm are unscaled; a
    non-finite loss is a divergence (first_bad), after which S stays as it is."""
    f, i = np.float32, np.int64
    first_bad, skip = scalar(-1, i), scalar(False, np.bool_)
    norm, scale, s = scalar(0, f), scalar(0, f), scalar(1024.0, f)
    good, skipped = scalar(0, i), scalar(0, i)

    def step(k, loss, grad_sq, max_norm=0.0):
        numpy_ops.step_guard_scaled(scalar(loss, f), scalar(grad_sq, f), k, max_norm, first_bad, skip, norm, scale,
                                    s, good, skipped, interval=3)  # fmt: skip
        return bool(skip), float(s), int(good), int(skipped)

    assert step(0, 1.0, (1024.0 * 3) ** 2) == (False, 1024.0, 1, 0)
    assert norm == 3.0 and scale == np.float32(1 / 1024)  # the true norm; the update unscales
    step(1, 1.0, 1.0, max_norm=1.5)
    assert scale == np.float32(1 / 1024)  # norm 1/1024 < 1.5: no clipping
    assert step(2, 1.0, 1.0) == (False, 2048.0, 0, 0)  # 3 good steps: doubled
    assert step(3, 1.0, np.inf) == (True, 1024.0, 0, 1)  # overflow: skipped, halved
    assert step(4, 1.0, np.nan) == (True, 512.0, 0, 2)
    assert step(5, 1.0, (512.0 * 6) ** 2, max_norm=3.0) == (False, 512.0, 1, 2)
    assert scale == np.float32(3.0 / (6.0 + 1e-6) / 512.0)  # clip to norm 3, and unscale
    assert int(first_bad) == -1
    assert step(6, np.nan, 1.0) == (True, 512.0, 1, 2)  # a non-finite loss: divergence
    assert int(first_bad) == 6
    assert step(7, 1.0, np.inf) == (True, 512.0, 1, 2)  # stopped: nothing more is counted


def test_forced_overflow_is_skipped_and_counted():
    """An fp16 model whose loss scale is far too large: the scaled gradient overflows
    float16, the guard skips the update (parameters and Adam's state unchanged), counts
    it and halves S; the next step with S small enough updates."""
    rng = np.random.default_rng(9)
    x, y = rng.normal(size=(32, 6)), rng.integers(0, 3, 32)
    model = MLP([6, 16, 3], "tanh", loss="softmax_cross_entropy", dtype="fp16", seed=2)
    opt = make_optimizer(model, "adam", 1e-2, 0.0, 0.0, False, (0.9, 0.999), 1e-8, 0.0)
    guard = FiniteGuard(model.backend, model.dtype, model.loss_scale)
    be = model.backend
    xb, yb = model.as_input(x), model.as_target(y, 32)
    model.loss_scale[...] = 2.0**40  # 1e12 times gradients of ~1e-2: beyond float16's 65504
    before = model.flat_params.copy()
    with np.errstate(all="ignore"):  # inf - inf and inf * 0 on the way: the point of the test
        loss = model.forward_backward(xb, yb)
    assert not np.isfinite(model.flat_grads).all()
    guard.check(0, loss, model.flat_grads, be.zeros((), model.flat_grads.dtype), 0.0)
    opt.step(grad_scale=guard.scale, skip=guard.skip)
    np.testing.assert_array_equal(model.flat_params, before)
    assert not opt.exp_avg.any()
    assert guard.scaler_record() == {"skipped_steps": 1, "loss_scale": 2.0**39}
    assert guard.first_bad_step() is None  # not a divergence
    model.loss_scale[...] = 2.0**10
    loss = model.forward_backward(xb, yb)
    guard.check(1, loss, model.flat_grads, be.zeros((), model.flat_grads.dtype), 0.0)
    opt.step(grad_scale=guard.scale, skip=guard.skip)
    assert not np.array_equal(model.flat_params, before)
    # the unscaled update equals the float32-gradient one to fp16's accuracy
    ref = MLP([6, 16, 3], "tanh", loss="softmax_cross_entropy", dtype="fp16", seed=2)
    _, g = ref.loss_and_grads(x, y)  # scaled=False: S = 1
    assert rel(model.flat_grads / 2.0**10, np.concatenate([a.ravel() for a in g])) < 10 * U["fp16"]


def test_fp16_run_skips_overflow_then_the_scale_grows_back(monkeypatch):
    """A whole fp16 run started with S = 2^30 (monkeypatched) and a growth interval of 10:
    the first steps overflow and are skipped (S halves each time, no divergence stop),
    then S doubles every 10 finite steps; summary and metrics report both."""
    monkeypatch.setattr("gpubp.model.LOSS_SCALE_INIT", 2.0**30)
    monkeypatch.setattr(PR, "LOSS_SCALE_INTERVAL", 10)
    t = run_digits("fp16", "train.steps=80", "train.eval_every=20")
    s = t.summary
    assert s["skipped_steps"] >= 1
    lowest = 2.0**30 / 2 ** s["skipped_steps"]
    scales = [r["loss_scale"] for r in t.history]
    assert min(scales) >= lowest and scales[-1] > lowest  # grew back
    assert s["loss_scale"] == scales[-1]
    assert [r["skipped_steps"] for r in t.history][-1] == s["skipped_steps"]
    assert s["test_accuracy"] > 0.85  # the skipped steps cost nothing else


def test_fp16_cli_reports_skipped_steps_and_keeps_the_scaler_in_checkpoints(tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", "--config", DIGITS, "--device", "cpu", "--set", "model.dtype=fp16", "--set",
                "train.steps=30", "--out", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "skipped_steps 0" in r.stderr  # the progress line
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] == 0 and summary["loss_scale"] == PR.LOSS_SCALE_INIT
    with np.load(out / "last.npz") as z:
        assert float(z["amp.loss_scale"]) == PR.LOSS_SCALE_INIT and int(z["amp.skipped"]) == 0


# --------------------------------------------------------------------------- configuration


def test_bad_dtype_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(DIGITS, ["model.dtype=bf8"])
    msg = str(e.value)
    assert "\n" not in msg and "model.dtype" in msg and "bf16" in msg and "fp16" in msg and "tf32" in msg
    r = run_cli("train", "--config", DIGITS, "--set", "model.dtype=half", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "model.dtype" in r.stderr


def test_mlp_dtype_argument():
    for name in PR.DTYPES:
        m = MLP([3, 4, 2], dtype=name)
        assert m.precision.name == name and m.config_dict()["dtype"] == name
        assert m.flat_params.dtype == (np.float64 if name == "float64" else np.float32)
    assert MLP([3, 4, 2], dtype="bf16").flat_params_low.dtype == PR.BF16
    with pytest.raises(ValueError, match="dtype must be one of"):
        MLP([3, 4, 2], dtype="float16")


def test_mixed_precision_backend_is_the_numpy_one():
    """The 16-bit ops are part of the backend's op set (the GPU backend has the same names)."""
    from gpubp.backend.cupy_backend import CupyBackend

    for op in ("cast", "add", "step_guard_scaled"):
        assert callable(getattr(NumpyBackend, op)) and callable(getattr(CupyBackend, op))


def test_gpu_backend_finds_every_16bit_kernel_by_name():
    """Without a GPU: the names the CuPy backend asks its compiled modules for (NAME_bf16,
    NAME_f16, cast_f32_bf16, ...) are entry points of the file it compiles for them, and
    cast/add launch the right one."""
    from gpubp import kernels
    from gpubp.backend import cupy_backend

    be = cupy_backend.CupyBackend.__new__(cupy_backend.CupyBackend)
    be._functions, be._modules = {}, {}
    be._kernel_file = {n: f for f in kernels.KERNEL_FILES for n in kernels.kernel_names(f)}
    launched = []

    class Module:
        def __init__(self, file):
            self.file = file

        def get_function(self, name):
            assert name in kernels.kernel_names(self.file), (name, self.file)
            return lambda grid, block, args: launched.append(name)

    be._compile = Module
    for base in cupy_backend.LOW_KERNELS_USED:
        for dtype in (PR.BF16, PR.F16):
            be._function(base, dtype)
    be._function("step_guard_scaled_f32", None)
    be._check = lambda *a, **k: None
    be.n_sm = 1

    class Fake:
        def __init__(self, dtype, shape=(4, 3)):
            self.dtype, self.shape, self.size = np.dtype(dtype), shape, 12

    for low, suffix in ((PR.BF16, "bf16"), (PR.F16, "f16")):
        be.cast(Fake(np.float32), Fake(low))
        be.cast(Fake(low), Fake(np.float32))
        be.add(Fake(low), Fake(low), Fake(low))
        assert launched[-3:] == [f"cast_f32_{suffix}", f"cast_{suffix}_f32", f"add_{suffix}"]
    with pytest.raises(TypeError, match="not supported"):
        be.cast(Fake(PR.BF16), Fake(PR.F16))


def test_estimator_trains_in_bf16_and_round_trips(tmp_path):
    """The estimators take the precision as any other key (config={"model.dtype": ...});
    predictions come out of the float32 widening, and save/load keeps the dtype."""
    import gpubp

    ds = load_dataset(load_config(DIGITS))
    x, y = ds.x[:600], ds.y[:600]
    clf = gpubp.MLPClassifier(hidden_layer_sizes=(64,), max_iter=30, random_state=0, config={"model.dtype": "bf16"})
    clf.fit(x, y)
    assert clf.score(x, y) > 0.9
    path = str(tmp_path / "m.npz")
    clf.save(path)
    again = gpubp.estimators.load(path, device="cpu")
    np.testing.assert_array_equal(again.predict(x), clf.predict(x))
    np.testing.assert_array_equal(again.predict_proba(x), clf.predict_proba(x))


def test_fp16_resume_continues_the_loss_scaler(tmp_path, monkeypatch):
    """last.npz holds the scaler (amp.loss_scale, amp.good_steps, amp.skipped): a resumed
    fp16 run goes on from that scale and count, not from 2^16 and 0."""
    from gpubp.trainer import Trainer

    monkeypatch.setattr("gpubp.model.LOSS_SCALE_INIT", 2.0**30)  # the first steps overflow
    cfg = load_config(DIGITS, ["model.dtype=fp16", "train.steps=20", "train.eval_every=20"])
    first = Trainer(cfg, str(tmp_path / "a"), device="cpu", quiet=True).train()
    assert first["skipped_steps"] >= 1 and first["loss_scale"] < 2.0**30
    assert first["loss_scale"] != 2.0**16  # else the check below could not tell
    monkeypatch.setattr("gpubp.model.LOSS_SCALE_INIT", 2.0**16)
    cfg = load_config(DIGITS, ["model.dtype=fp16", "train.steps=30", "train.eval_every=10"])
    resumed = Trainer(cfg, str(tmp_path / "a"), device="cpu", quiet=True, resume=str(tmp_path / "a" / "last.npz"))
    second = resumed.train()
    assert second["skipped_steps"] >= first["skipped_steps"]
    assert second["loss_scale"] <= first["loss_scale"] and second["loss_scale"] != 2.0**16


def test_memory_estimate_counts_16bit_activations():
    from gpubp.backend import get_backend
    from gpubp.trainer import memory_estimate

    est = {d: memory_estimate(load_config(DIGITS, [f"model.dtype={d}"]), [64, 512, 10], 32, 1797, get_backend())
           for d in ("float32", "bf16")}  # fmt: skip
    assert est["bf16"]["batch"] * 2 == est["float32"]["batch"]
    assert est["bf16"]["params"] == est["float32"]["params"]  # float32 master weights and state
