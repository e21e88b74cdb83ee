"""Mixed precision on the GPU against the NumPy emulation (tests marked gpu: they skip
without a CUDA device; tests/run_gpu_checks.sh runs them).

What must agree, and how closely (u = 2^-8 bf16, 2^-11 fp16 and tf32):
- conversions (cast kernels) and the residual sum: bit for bit; the conversions are
  integer code, the same as the host-checked kernels/precision.cuh;
- elementwise ops on 16-bit storage: equal bits or one 16-bit ulp (the float math
  under the rounding is CUDA's on the GPU and NumPy's on the CPU; gelu's cancellation
  gets the float32 bound of tests/test_gpu.py);
- 16-bit GEMMs: both sides sum exact products in float32, in different orders, then
  round once: |gpu - cpu| <= u (|gpu| + |cpu|) + 2 K u32 sum |a||b|;
- a model's gradients and a short run: within the CPU tolerances of test_precision.py
  (the GPU is one more run whose roundings are independent of the emulation's);
- tf32: which conversion cuBLAS applies (rna, rne or truncation) is found out and printed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from gpubp import precision as PR
from gpubp.activations import ACTIVATIONS, SAVES_INPUT, make_activation
from gpubp.backend import numpy_ops
from gpubp.losses import make_loss
from gpubp.model import MLP

pytestmark = pytest.mark.gpu

U = {"bf16": 2.0**-8, "fp16": 2.0**-11, "tf32": 2.0**-11}
U32 = 2.0**-24
LOW = {"bf16": PR.BF16, "fp16": PR.F16}
TINY = float(np.finfo(np.float32).tiny)  # -ftz=true on the GPU


@pytest.fixture(scope="module")
def gpu():
    from gpubp.backend import get_backend

    return get_backend("gpu")


def to16(x, name):
    out = np.empty(np.shape(x), LOW[name])
    PR.store(np.asarray(x, np.float32), out)
    return out


def one_ulp(a_bits, b_bits):
    a, b = a_bits.astype(np.int32), b_bits.astype(np.int32)
    return (a == b) | ((np.abs(a - b) == 1) & ((a ^ b) & 0x8000 == 0))


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_cast_kernels_round_as_the_reference(gpu, name):
    from .test_kernels_cpu import float32_patterns

    x = float32_patterns()
    out = gpu.cast(gpu.asarray(x), gpu.empty(x.shape, LOW[name]))
    ref = to16(x, name)
    got = gpu.to_numpy(out)
    nan = np.isnan(x)
    # -ftz=true does not touch integer code: float32 subnormal inputs round like the rest
    assert (got.view(np.uint16)[~nan] == ref.view(np.uint16)[~nan]).all()
    back = gpu.to_numpy(gpu.cast(out, gpu.empty(x.shape, np.float32)))
    ref_back = PR.to_float32(ref)
    same = (back.view(np.uint32) == ref_back.view(np.uint32)) | (np.isnan(back) & np.isnan(ref_back))
    assert same.all()


@pytest.mark.parametrize("name", ["bf16", "fp16"])
@pytest.mark.parametrize("act_name", list(ACTIVATIONS))
def test_activations_16bit_match_the_emulation(gpu, name, act_name):
    act = make_activation(act_name, 0.05)
    rng = np.random.default_rng(0)
    z = to16(rng.normal(scale=3, size=(257, 33)), name)
    b = rng.normal(size=33).astype(np.float32)
    keep = act.saves == SAVES_INPUT
    zc, yc = z.copy(), np.empty_like(z)
    numpy_ops.bias_act_forward(zc, b, act, yc if keep else zc)
    yc = yc if keep else zc
    zg = gpu.asarray(z)
    yg = gpu.empty(z.shape, z.dtype) if keep else zg
    gpu.bias_act_forward(zg, gpu.asarray(b), act, yg)
    ok = one_ulp(gpu.to_numpy(yg).view(np.uint16), yc.view(np.uint16))
    slack = np.abs(PR.to_float32(gpu.to_numpy(yg)) - PR.to_float32(yc)) <= 1e-5 * np.maximum(
        1, np.abs(PR.to_float32(z))
    )
    assert (ok | slack).all(), f"{act_name} forward {name}"
    saved = zc if keep else yc
    d = to16(rng.normal(size=z.shape), name)
    gc = numpy_ops.act_backward(d, saved, act, np.empty_like(d))
    gg = gpu.act_backward(gpu.asarray(d), gpu.asarray(saved), act, gpu.empty(d.shape, d.dtype))
    ok = one_ulp(gpu.to_numpy(gg).view(np.uint16), gc.view(np.uint16))
    slack = np.abs(PR.to_float32(gpu.to_numpy(gg)) - PR.to_float32(gc)) <= 1e-5 * np.maximum(
        1, np.abs(PR.to_float32(z))
    )
    assert (ok | slack).all(), f"{act_name} backward {name}"


@pytest.mark.parametrize("name", ["bf16", "fp16"])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("out_kind", ["low", "float32"])
@pytest.mark.parametrize("mkn", [(64, 96, 48), (1, 300, 7), (129, 5, 1)])
def test_gemm_16bit_matches_the_emulation(gpu, name, trans_a, trans_b, beta, out_kind, mkn):
    m, k, n = mkn
    rng = np.random.default_rng(1)
    a = to16(rng.normal(size=(k, m) if trans_a else (m, k)), name)
    b = to16(rng.normal(size=(n, k) if trans_b else (k, n)), name)
    out_dtype = LOW[name] if out_kind == "low" else np.float32
    c = np.empty((m, n), out_dtype)
    PR.store(rng.normal(size=(m, n)).astype(np.float32), c)
    ref = numpy_ops.gemm(a, b, c.copy(), trans_a=trans_a, trans_b=trans_b, beta=beta)
    got = gpu.to_numpy(gpu.gemm(gpu.asarray(a), gpu.asarray(b), gpu.asarray(c), trans_a=trans_a, trans_b=trans_b,
                                beta=beta))  # fmt: skip
    af, bf = PR.to_float32(a).astype(np.float64), PR.to_float32(b).astype(np.float64)
    terms = np.abs(af.T if trans_a else af) @ np.abs(bf.T if trans_b else bf) + beta * np.abs(PR.to_float32(c))
    g, r = PR.to_float32(got).astype(np.float64), PR.to_float32(ref).astype(np.float64)
    u = U[name] if out_kind == "low" else 0.0
    # a bf16 out with beta != 0: cuBLAS rounds the product to bf16 before adding beta c in
    # some kernels (64x96x48 on an H100: every element) and not in others (129x5x1: one
    # rounding, every element); the reference does the former, so either is u |ab| apart
    ab = np.abs((af.T if trans_a else af) @ (bf.T if trans_b else bf))
    first = u * ab if (name == "bf16" and beta != 0.0) else 0.0
    ok = np.abs(g - r) <= u * (np.abs(g) + np.abs(r)) + first + 2 * k * U32 * terms + TINY
    assert ok.all(), rounding_report(got, a, b, c, trans_a, trans_b, beta, ok)


def rounding_report(got, a, b, c, trans_a, trans_b, beta, ok):
    """What the failing elements of a 16-bit product look like, and how many of the
    GPU's results each model of the rounding explains bit for bit: one rounding of
    acc + beta c (the reference), or the product rounded first, then the sum."""
    af, bf = PR.to_float32(a).astype(np.float64), PR.to_float32(b).astype(np.float64)
    acc = (af.T if trans_a else af) @ (bf.T if trans_b else bf)
    cf = PR.to_float32(c).astype(np.float64)

    def round16(x):
        out = np.empty(x.shape, got.dtype)
        PR.store(x.astype(np.float32), out)
        return PR.to_float32(out).astype(np.float64)

    g = PR.to_float32(got).astype(np.float64)
    models = {
        "round(acc + beta c)": round16(acc + beta * cf),
        "round(round(acc) + beta c)": round16(round16(acc) + beta * cf),
    }
    share = ", ".join(f"{k}: {np.mean(v == g):.3f}" for k, v in models.items())
    i = np.unravel_index(np.argmin(ok), ok.shape)
    return f"{(~ok).sum()} of {ok.size} out of bounds; first at {i}: gpu {g[i]!r}, acc {acc[i]!r}, c {cf[i]!r}; bitwise share {share}"


def test_tf32_input_conversion(gpu, capsys):
    """Which rounding cuBLAS applies to float32 inputs under CUBLAS_COMPUTE_32F_FAST_TF32:
    x times the identity, x chosen on the boundaries between the three modes."""
    base = np.float32([1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-11 + 2.0**-20, -(1 + 2.0**-11), 1 + 2.0**-12])
    x = np.resize(base, 256)
    a = np.random.default_rng(5).normal(size=(256, 256)).astype(np.float32)  # large: tensor-core kernels
    a[:, 0] = x
    eye = np.zeros((256, 256), np.float32)
    eye[0, 0] = 1.0  # out[:, 0] = a[:, 0] * 1 + 0: one product, exact in float32 after the conversion
    out = gpu.to_numpy(gpu.gemm(gpu.asarray(a), gpu.asarray(eye), gpu.empty((256, 256), np.float32), tf32=True))
    out = out[:, 0]
    if np.array_equal(out, x):
        pytest.skip("cuBLAS did not convert to tf32 at this size (a float32 kernel): nothing to learn")
    modes = [m for m in PR.TF32_MODES if np.array_equal(out, PR.round_tf32(x, m))]
    with capsys.disabled():
        print(f"\ncuBLAS tf32 input conversion: {modes or 'none of ' + str(PR.TF32_MODES)}; results {out[:5]}")
    assert modes, f"cuBLAS's tf32 conversion is none of {PR.TF32_MODES}: {out[:5]} (x = {x[:5]})"
    if PR.TF32_MODES[0] not in modes:
        pytest.fail(f"the reference's default tf32 mode {PR.TF32_MODES[0]!r} is not cuBLAS's {modes}: change it")


@pytest.mark.parametrize("name", ["bf16", "fp16"])
@pytest.mark.parametrize("loss_name", ["softmax_cross_entropy", "mse", "binary_cross_entropy", "huber"])
def test_loss_and_reductions_16bit_match_the_emulation(gpu, name, loss_name):
    rng = np.random.default_rng(2)
    x = to16(rng.normal(size=(300, 10)), name)
    loss = make_loss(loss_name, 0.1 if loss_name == "softmax_cross_entropy" else 0.0, 1.0)
    labels = rng.integers(0, 10, 300).astype(np.int32)
    y = labels if loss_name == "softmax_cross_entropy" else rng.random((300, 10)).astype(np.float32)
    s = np.float32(512.0)
    gc = np.empty_like(x)
    vc = numpy_ops.loss_forward_backward(x, y, loss, gc, loss_scale=s)
    gg = gpu.empty(x.shape, x.dtype)
    vg = gpu.loss_forward_backward(gpu.asarray(x), gpu.asarray(y), loss, gg, loss_scale=gpu.asarray(s))
    assert abs(gpu.to_float(vg) - float(vc)) <= 1e-5 * abs(float(vc)) + 1e-6
    a, b = PR.to_float32(gpu.to_numpy(gg)), PR.to_float32(gc)
    assert (one_ulp(gpu.to_numpy(gg).view(np.uint16), gc.view(np.uint16)) | (np.abs(a - b) <= 1e-5 * s)).all()
    db = gpu.to_numpy(gpu.bias_grad(gpu.asarray(x), gpu.empty(10, np.float32)))
    np.testing.assert_allclose(db, numpy_ops.bias_grad(x, np.empty(10, np.float32)), rtol=1e-5, atol=1e-4)
    acc = gpu.to_float(gpu.accuracy_count(gpu.asarray(x), gpu.asarray(labels)))
    assert acc == float(numpy_ops.accuracy_count(x, labels))


def test_step_guard_scaled_matches_the_reference(gpu):
    f, i = np.float32, np.int64
    cases = [(1.0, 4.0, 0.0), (1.0, np.inf, 0.0), (1.0, 9.0e6, 1.0), (np.nan, 1.0, 0.0), (1.0, np.nan, 0.0)]
    host = [np.asarray(v).copy() for v in (f(1024), i(0), i(0), i(-1))]  # S, good, skipped, first_bad
    dev = [gpu.asarray(h) for h in host]
    for step, (loss, sq, max_norm) in enumerate(cases * 3):
        outs_c = [np.zeros((), np.bool_), np.zeros((), f), np.zeros((), f)]
        outs_g = [gpu.zeros((), np.bool_), gpu.zeros((), f), gpu.zeros((), f)]
        numpy_ops.step_guard_scaled(f(loss), f(sq), step, max_norm, host[3], outs_c[0], outs_c[1], outs_c[2], host[0],
                                    host[1], host[2], interval=2)  # fmt: skip
        gpu.step_guard_scaled(gpu.asarray(f(loss)), gpu.asarray(f(sq)), step, max_norm, dev[3], outs_g[0], outs_g[1],
                              outs_g[2], dev[0], dev[1], dev[2], interval=2)  # fmt: skip
        for c, g in zip(host + outs_c, dev + outs_g):
            cg = gpu.to_numpy(g).reshape(c.shape)  # asarray of a 0-d array gives (1,): the kernel takes either
            assert np.array_equal(cg, c, equal_nan=True), (step, c, cg)


def test_step_guard_scaled_norm_matches_the_reference(gpu):
    """fp16's guard in the launch that sums |g|^2: g of n equal powers of two whose squares
    sum exactly in any order (v^2 n = sq, every partial sum a power-of-two multiple below
    2^24), 1 to 1024 blocks, an overflowing gradient and a NaN loss on the way; every
    output bit for bit, as step_guard_scaled's."""
    f, i = np.float32, np.int64
    cases = [(1.0, 4.0, 0.0, 4), (1.0, np.inf, 0.0, 1024), (1.0, 2.0**22, 1.0, 4**10), (np.nan, 1.0, 0.0, 16),
             (1.0, 16.0, 0.0, 4**8)]  # fmt: skip
    host = [np.asarray(v).copy() for v in (f(1024), i(0), i(0), i(-1))]  # S, good, skipped, first_bad
    dev = [gpu.asarray(h) for h in host]
    for step, (loss, sq, max_norm, n) in enumerate(cases * 2):
        g = np.full(n, np.sqrt(np.float64(sq) / n), f)
        outs_c = [np.zeros((), np.bool_), np.zeros((), f), np.zeros((), f), np.zeros((), f)]
        outs_g = [gpu.zeros((), np.bool_), gpu.zeros((), f), gpu.zeros((), f), gpu.zeros((), f)]
        numpy_ops.step_guard_scaled_norm(f(loss), g, outs_c[3], step, max_norm, host[3], outs_c[0], outs_c[1],
                                         outs_c[2], host[0], host[1], host[2], interval=2)  # fmt: skip
        gpu.step_guard_scaled_norm(gpu.asarray(f(loss)), gpu.asarray(g), outs_g[3], step, max_norm, dev[3],
                                   outs_g[0], outs_g[1], outs_g[2], dev[0], dev[1], dev[2], interval=2)  # fmt: skip
        for c, gd in zip(host + outs_c, dev + outs_g):
            cg = gpu.to_numpy(gd).reshape(c.shape)  # asarray of a 0-d array gives (1,)
            assert np.array_equal(cg, c, equal_nan=True), (step, c, cg)


@pytest.mark.parametrize("bias_corrected", [True, False])
def test_update_vectors_matches_the_reference_bitwise(gpu, bias_corrected):
    """The update's numbers from the counters (fp16's skipped steps): lr / (1 - b1^t)
    divided in double and rounded once, the other rows rounded once: the same bits as
    the NumPy reference, the same first-update flag (no update yet at the start) and
    the same counter moves (skip every third step)."""
    rng = np.random.default_rng(8)
    k, m = 9, 37  # more models than the kernel's 32 threads
    rates = np.stack([rng.uniform(1e-6, 0.9, (2, m)) for _ in range(k)])
    counts = np.stack([rng.uniform(1e-3, 1.0, (2, m)) for _ in range(k)])
    rows = 3 if bias_corrected else 1
    host = {"pos": np.zeros((), np.int64), "t0": np.asarray(0, np.int64), "updates": np.asarray(0, np.int64)}
    dev = {name: gpu.zeros((), np.int64) for name in host}
    for name, a in host.items():
        dev[name][...] = int(a)
    skip_g = gpu.zeros((), np.bool_)
    vc, fc = np.zeros((rows, m, 1), np.float32), np.ones((), np.bool_)
    vg, fg = gpu.zeros((rows, m, 1), np.float32), gpu.zeros((), np.bool_)
    rates_g, counts_g = gpu.asarray(rates), gpu.asarray(counts)
    for j in range(k):
        skip = np.asarray(j % 3 == 2)
        host["pos"][...] = j
        dev["pos"][...] = j
        skip_g[...] = bool(skip)
        numpy_ops.update_vectors(rates, host["pos"], counts, host["t0"], host["updates"], skip, vc, fc, bias_corrected)
        gpu.update_vectors(rates_g, dev["pos"], counts_g, dev["t0"], dev["updates"], skip_g, vg, fg,
                           bias_corrected)  # fmt: skip
        assert np.array_equal(gpu.to_numpy(vg), vc) and bool(gpu.to_numpy(fg)) == bool(fc), j
        assert int(gpu.to_numpy(dev["updates"])) == int(host["updates"]), j


@pytest.mark.parametrize("name", ["bf16", "fp16"])
@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_updates_write_the_16bit_copy_on_the_gpu(gpu, rule, name):
    """The stacked update with `low` (one kernel: the update, then the parameters rounded
    into their 16-bit copy): p and the state as the NumPy reference's (float32 arithmetic,
    the same order: a few ulps), low bit for bit the GPU's own p rounded by the reference
    (numpy_ops.cast), the skipped model's too."""
    from gpubp.backend import NumpyBackend

    from .test_elementwise_host import _update_args

    state, kw = _update_args(rule, np.random.default_rng(5), 3, 10007)
    names = [k for k in state if k not in ("p", "g")]
    update = f"{rule}_step_batched"
    want = {k: a.copy() for k, a in state.items()}
    getattr(NumpyBackend, update)(want["p"], want["g"], *(want[k] for k in names),
                                  np.empty((2, 3, 10007), np.float32), **kw)  # fmt: skip
    dev = {k: gpu.asarray(a) for k, a in state.items()}
    kw_dev = {k: gpu.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    low = gpu.zeros((3, 10007), LOW[name])
    getattr(gpu, update)(dev["p"], dev["g"], *(dev[k] for k in names), None, low=low, **kw_dev)
    got = {k: gpu.to_numpy(a) for k, a in dev.items()}
    for k in state:  # float32, a handful of roundings in the same order: 8 ulps
        np.testing.assert_allclose(got[k], want[k], rtol=8 * 2.0**-23, atol=TINY, err_msg=k)
    assert np.array_equal(got["p"][1], state["p"][1])  # skipped
    assert np.array_equal(gpu.to_numpy(low), numpy_ops.cast(got["p"], np.empty((3, 10007), LOW[name])))


@pytest.mark.parametrize("name", ["tf32", "bf16", "fp16"])
@pytest.mark.parametrize("residual", [False, True])
def test_model_gradients_gpu_against_the_emulation(gpu, name, residual):
    """The CPU emulation and the GPU round independently (different summation orders),
    so each is within test_precision's derived tolerance 2 sqrt(r L) u of float64; the
    two differ by at most twice that."""
    sizes = [12, 48, 48, 5]
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(256, 12)), rng.integers(0, 5, 256)
    cpu_model = MLP(sizes, "gelu", loss="softmax_cross_entropy", dtype=name, seed=4, residual=residual)
    gpu_model = MLP(sizes, "gelu", loss="softmax_cross_entropy", dtype=name, seed=4, residual=residual, backend=gpu)
    lc, gc = cpu_model.loss_and_grads(x, y)
    lg, gg = gpu_model.loss_and_grads(x, y)
    L, r = len(sizes) - 1, (4 if name == "tf32" else 6)
    tol = 2 * 2 * math.sqrt(r * L) * U[name]
    assert abs(lg - lc) <= tol * abs(lc)
    for k, (a, b) in enumerate(zip(gg, gc)):
        a = gpu.to_numpy(a).astype(np.float64)
        assert np.linalg.norm(a - b) <= tol * np.linalg.norm(b), f"{name}: gradient {k}"
    out = gpu.to_numpy(gpu_model.forward(x))
    assert out.dtype == np.float32


@pytest.mark.parametrize("name", ["tf32", "bf16", "fp16"])
def test_short_run_gpu_against_the_emulation(gpu, name):
    """60 Adam steps on digits, GPU vs the CPU emulation: the parameters' distance,
    relative to their travel, within twice test_precision's run tolerance."""
    import os

    from gpubp.config import load_config
    from gpubp.trainer import load_dataset, train_in_memory

    from .conftest import ROOT

    cfg = load_config(os.path.join(ROOT, "configs", "digits.toml"), [f"model.dtype={name}", "train.steps=60"])
    ds = load_dataset(cfg)
    runs = {dev: train_in_memory(cfg, ds, device=dev) for dev in ("cpu", "gpu")}
    pc = runs["cpu"].run.backend.to_numpy(runs["cpu"].model.flat_params).astype(np.float64)
    pg = runs["gpu"].run.backend.to_numpy(runs["gpu"].model.flat_params).astype(np.float64)
    m = runs["cpu"].model
    start = MLP(m.sizes, "silu", seed=0, init=m.init).flat_params.astype(np.float64)
    r = 4 if name == "tf32" else 6
    tol = 2 * 2 * math.sqrt(r * 2) * U[name]
    assert np.linalg.norm(pg - pc) <= tol * np.linalg.norm(pc - start)
    if name == "fp16":
        assert runs["gpu"].summary["skipped_steps"] == runs["cpu"].summary["skipped_steps"]
