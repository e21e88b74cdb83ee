"""MLPStack: model i of a stack is the single MLP with model i's settings, bit for bit
on the CPU (the stacked ops run each model's slice with the single model's formulas
and BLAS calls); the batched ops against numpy_ops slice by slice."""

from __future__ import annotations

import numpy as np
import pytest

from gpubp.activations import make_activation
from gpubp.backend import cpu_kernels as CK
from gpubp.backend import get_backend
from gpubp.backend import numpy_ops as ops
from gpubp.backend import numpy_stacked as sops
from gpubp.losses import make_loss
from gpubp.model import MLP
from gpubp.optim import clip_scale, make_optimizer
from gpubp.stack import MLPStack, clip_scale_batched, initial_params, make_stack_optimizer


def _problem(rng, n, sizes, loss):
    x = rng.standard_normal((n, sizes[0]))
    if loss == "softmax_cross_entropy":
        y = rng.integers(0, sizes[-1], n)
    else:
        y = rng.standard_normal((n, sizes[-1]))
    return x, y


@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "mse", "huber", "binary_cross_entropy"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_batched_loss_equals_single_loss_per_model(loss, dtype):
    rng = np.random.default_rng(1)
    m, n, c = 3, 37, 5
    x = rng.standard_normal((m, n, c)).astype(dtype)
    if loss == "softmax_cross_entropy":
        y = rng.integers(0, c, (m, n)).astype(np.int32)
    else:
        y = rng.uniform(0, 1, (m, n, c)).astype(dtype)
    spec = make_loss(loss, 0.1 if loss == "softmax_cross_entropy" else 0.0, 0.5)
    grad = np.empty_like(x)
    values = sops.loss_forward_backward_batched(x, y, spec, grad)
    for i in range(m):
        g = np.empty_like(x[i])
        v = ops.loss_forward_backward(x[i], y[i], spec, g)
        assert values[i] == v and values.dtype == v.dtype
        np.testing.assert_array_equal(grad[i], g)


def test_batched_loss_in_row_blocks_matches(monkeypatch):
    # a batch longer than one block of rows: the block sums are added as the single op adds them
    monkeypatch.setattr(ops, "LOSS_BLOCK", 40)
    monkeypatch.setattr(sops, "LOSS_BLOCK", 40)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 53, 4))
    y = rng.integers(0, 4, 53).astype(np.int32)  # labels shared by both models
    for eps in (0.0, 0.1):
        spec = make_loss("softmax_cross_entropy", eps)
        grad = np.empty_like(x)  # its blocks of rows are not contiguous across the models
        values = sops.loss_forward_backward_batched(x, y, spec, grad)
        for i in range(2):
            g = np.empty_like(x[i])
            assert values[i] == ops.loss_forward_backward(x[i], y, spec, g)
            np.testing.assert_array_equal(grad[i], g)


def test_batched_gemm_bias_act_and_bias_grad_per_slice():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((4, 9, 6)).astype(np.float32)
    shared = rng.standard_normal((9, 6)).astype(np.float32)
    w = rng.standard_normal((4, 6, 5)).astype(np.float32)
    out = np.empty((4, 9, 5), np.float32)
    for src in (a, shared):
        sops.gemm_batched(src, w, out)
        for i in range(4):
            ref = np.empty((9, 5), np.float32)
            ops.gemm(src[i] if src.ndim == 3 else src, w[i], ref)
            np.testing.assert_array_equal(out[i], ref)
    dw = np.empty((4, 6, 5), np.float32)
    sops.gemm_batched(a, out, dw, trans_a=True)
    for i in range(4):
        np.testing.assert_array_equal(dw[i], ops.gemm(a[i], out[i], np.empty((6, 5), np.float32), trans_a=True))
    b = rng.standard_normal((4, 5)).astype(np.float32)
    z = out.copy()
    act = make_activation("gelu")
    y = np.empty_like(z)
    sops.bias_act_forward_batched(z, b, act, y)
    db = np.empty((4, 5), np.float32)
    sops.bias_grad_batched(y, db)
    for i in range(4):
        zi = out[i].copy()
        yi = ops.bias_act_forward(zi, b[i], act, np.empty_like(zi))
        np.testing.assert_array_equal(y[i], yi)
        np.testing.assert_array_equal(db[i], ops.bias_grad(yi, np.empty(5, np.float32)))


def test_initial_params_are_the_single_models():
    for init in ("he_normal", "xavier_uniform"):
        model = MLP([5, 7, 3], seed=11, init=init, dtype="float64")
        np.testing.assert_array_equal(initial_params([5, 7, 3], 11, init), model.flat_params)


def _train_pair(sizes, settings, opt_name, loss, dtype, steps, residual=False, clip=None, shared_data=False):
    """Train a stack of len(settings) models and each single model with the same
    settings for `steps` steps on its own batches; return the largest difference."""
    m = len(settings)
    rng = np.random.default_rng(0)
    n = 16
    batches = [[_problem(rng, n, sizes, loss) for _ in range(m)] for _ in range(steps)]
    kw = dict(activation="tanh", loss=loss, dtype=dtype, residual=residual)
    stack = MLPStack(
        sizes, m, seed=[s["seed"] for s in settings], init=[s.get("init", "he_normal") for s in settings], **kw
    )
    hyper = {k: [s[k] for s in settings] for k in settings[0] if k not in ("seed", "init")}
    sopt = make_stack_optimizer(stack, opt_name, **hyper)
    singles = [MLP(sizes, seed=s["seed"], init=s.get("init", "he_normal"), **kw) for s in settings]
    opts = [make_optimizer(mod, opt_name, **{k: s[k] for k in hyper}) for mod, s in zip(singles, settings)]
    be = get_backend("cpu")
    start = stack.flat_params.copy()
    max_norm = None if clip is None else np.array(clip, dtype=dtype)
    for step in range(steps):
        if shared_data:
            x, y = batches[step][0]
        else:
            x = np.stack([b[0] for b in batches[step]])
            y = np.stack([b[1] for b in batches[step]])
        losses, _ = stack.loss_and_grads(x, y)
        scale = None
        if max_norm is not None:
            _, scale = clip_scale_batched(be, stack.flat_grads, max_norm)
        sopt.step(grad_scale=scale)
        for i, (mod, opt) in enumerate(zip(singles, opts)):
            xi, yi = batches[step][0] if shared_data else batches[step][i]
            li, _ = mod.loss_and_grads(xi, yi)
            assert li == np.float64(np.asarray(losses[i], dtype=dtype)) or li == losses[i], (step, i)
            s = 1.0
            if clip is not None and clip[i] > 0:
                _, s = clip_scale(be, mod.flat_grads, clip[i])
            opt.step(grad_scale=s)
    assert np.all(np.any(stack.flat_params != start, axis=1))  # every model trained
    return max(float(np.max(np.abs(stack.flat_params[i] - mod.flat_params))) for i, mod in enumerate(singles))


GRID = [dict(lr=lr, seed=seed, weight_decay=wd) for lr in (0.05, 0.2) for seed in (0, 1) for wd in (0.0, 1e-3)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sgd_momentum_grid_is_bitwise_the_single_runs(dtype):
    settings = [dict(s, momentum=0.9) for s in GRID]
    assert _train_pair([6, 8, 3], settings, "sgd", "softmax_cross_entropy", dtype, 25) == 0.0


@pytest.mark.parametrize("opt", ["adamw", "adam"])
def test_adam_grid_with_residual_layers_is_bitwise_the_single_runs(opt):
    settings = [dict(s, lr=s["lr"] / 10, betas=(0.9, 0.99 if s["seed"] else 0.999)) for s in GRID]
    assert _train_pair([6, 8, 8, 3], settings, opt, "mse", "float64", 25, residual=True) == 0.0


def test_shared_batch_and_per_model_clipping_are_bitwise():
    settings = [dict(lr=0.5, seed=s, momentum=0.5, nesterov=True) for s in range(3)]
    diff = _train_pair([4, 8, 2], settings, "sgd", "huber", "float32", 20, clip=[0.0, 0.1, 1.0], shared_data=True)
    assert diff == 0.0


def test_frozen_model_does_not_move_the_others_do():
    stack = MLPStack([3, 4, 2], 3, loss="mse", dtype="float64")
    opt = make_stack_optimizer(stack, "adamw", lr=0.01)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    before = stack.flat_params.copy()
    stack.loss_and_grads(x, y)
    opt.step(skip=np.array([False, True, False]))
    assert np.array_equal(stack.flat_params[1], before[1]) and np.all(opt.exp_avg[1] == 0)
    assert not np.array_equal(stack.flat_params[0], before[0]) and not np.array_equal(stack.flat_params[2], before[2])


def test_member_and_bad_arguments():
    stack = MLPStack([3, 4, 2], 2, seed=[5, 9])
    np.testing.assert_array_equal(stack.member(1).flat_params, stack.flat_params[1])
    with pytest.raises(ValueError, match="seed: expected 2 values"):
        MLPStack([3, 2], 2, seed=[1, 2, 3])
    with pytest.raises(ValueError, match="momentum must be > 0 for every model"):
        make_stack_optimizer(stack, "sgd", lr=0.1, momentum=[0.0, 0.9])
    with pytest.raises(ValueError, match="lr must be > 0"):
        make_stack_optimizer(stack, "adam", lr=[0.1, 0.0])
    with pytest.raises(ValueError, match="input must have shape"):
        stack.forward(np.zeros((3, 5, 3)))


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_updates_in_cache_sized_blocks_of_models_are_bitwise_the_same(monkeypatch, opt):
    # one model per block (a tiny CACHE_BLOCK) against the single runs: the blocking changes no bits
    monkeypatch.setitem(CK._STATE, "numba", False)  # the NumPy update, which blocks (the compiled one needs none)
    monkeypatch.setattr(sops, "CACHE_BLOCK", 8)
    settings = [dict(s, momentum=0.9) if opt == "sgd" else dict(s, lr=s["lr"] / 10) for s in GRID]
    assert _train_pair([6, 8, 3], settings, opt, "softmax_cross_entropy", "float32", 10) == 0.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batched_step_guard_is_the_single_guard_per_model(dtype):
    # losses and squared norms with a NaN, an inf and finite values; clipping on for some models
    loss = np.array([0.5, np.nan, 2.0, 1.0, 3.0], dtype)
    sq = np.array([4.0, 1.0, np.inf, 0.01, 1e6], dtype)
    max_norm = np.array([1.0, 0.0, 1.0, 0.0, 0.5], dtype)
    frozen = np.array([False, False, False, True, False])
    first_bad = np.array([-1, -1, -1, -1, 2], np.int64)
    skip, norm, scale = np.empty(5, bool), np.empty(5, dtype), np.empty(5, dtype)
    sops.step_guard_batched(loss, sq, 7, max_norm, frozen, first_bad, skip, norm, scale)
    for i in range(5):
        fb, sk = np.array(-1 if i < 4 else 2, np.int64), np.zeros((), bool)
        n1, s1 = np.zeros((), dtype), np.zeros((), dtype)
        ops.step_guard(loss[i : i + 1].reshape(()), sq[i : i + 1].reshape(()), 7, float(max_norm[i]), fb, sk, n1, s1)
        assert first_bad[i] == fb and skip[i] == (bool(sk) or frozen[i]), i
        np.testing.assert_array_equal(norm[i], n1)
        if not np.isnan(n1):  # a NaN norm: that step is skipped, its scale unused
            assert scale[i] == s1, i
    assert first_bad.tolist() == [-1, 7, 7, -1, 2] and skip.tolist() == [False, True, True, True, True]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shared_data", [False, True])
def test_blocks_of_models_on_threads_are_bitwise_the_single_runs(monkeypatch, threads, shared_data):
    # one model per block (BLOCK_BYTES 1), the blocks run one after another or on two threads,
    # OpenBLAS on one thread meanwhile: each model still the single run, bit for bit
    import gpubp.stack as stack_module
    from gpubp.backend import threads as th

    monkeypatch.setattr(stack_module, "BLOCK_BYTES", 1)
    monkeypatch.setattr(sops, "CACHE_BLOCK", 8)
    monkeypatch.setitem(th._STATE, "threads", threads)
    settings = [dict(s, lr=s["lr"] / 10) for s in GRID]
    diff = _train_pair([6, 8, 8, 3], settings, "adamw", "softmax_cross_entropy", "float32", 10, residual=True,
                       clip=[0.0, 0.1, 1.0, 0.0, 0.5, 0.0, 2.0, 0.0], shared_data=shared_data)  # fmt: skip
    assert diff == 0.0
    assert len(MLPStack([6, 8, 3], 5).blocks(16)) == 5  # the blocks were single models


def test_blocks_cover_every_model_once_and_one_block_per_thread_at_least(monkeypatch):
    import gpubp.stack as stack_module
    from gpubp.backend import threads as th

    monkeypatch.setitem(th._STATE, "threads", 1)
    stack = MLPStack([64, 128, 10], 64)
    assert len(stack.blocks(128)) == 1  # 64 models of 246 KiB (parameters, gradients, activations) fit BLOCK_BYTES
    monkeypatch.setattr(stack_module, "BLOCK_BYTES", 1 << 22)
    blocks = stack.blocks(128)
    covered = np.concatenate([np.arange(64)[b] for b in blocks])
    np.testing.assert_array_equal(covered, np.arange(64))
    assert len(blocks) == 4  # 16 in 4 MiB
    small = MLPStack([6, 8, 3], 5)
    assert small.blocks(16) == [slice(0, 5)]  # all in one block on one thread
    monkeypatch.setitem(th._STATE, "threads", 2)
    assert small.blocks(16) == [slice(0, 3), slice(3, 5)]  # one block per thread


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_updates_in_column_blocks_of_one_model_are_bitwise_the_same(monkeypatch, opt):
    # a row longer than CACHE_BLOCK (16 bytes: 2 float64 per block): blocks of columns
    monkeypatch.setitem(CK._STATE, "numba", False)  # the NumPy update, which blocks
    monkeypatch.setattr(sops, "CACHE_BLOCK", 16)
    settings = [dict(s, momentum=0.9) if opt == "sgd" else dict(s, lr=s["lr"] / 10) for s in GRID[:3]]
    assert _train_pair([6, 8, 3], settings, opt, "mse", "float64", 5) == 0.0


@pytest.mark.parametrize("kernels", [False, None])  # the NumPy update; the compiled one where numba is installed
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_update_block_by_block_inside_the_pass_is_the_whole_update(monkeypatch, kernels, opt):
    """forward_backward(then=update(rows=sl)) on three blocks of models on two threads (the
    sweep step's CPU order) against the whole pass and then one update of all models:
    the same bits, parameters and optimizer state, over several steps."""
    import gpubp.stack as stack_module
    from gpubp.backend import threads as th

    monkeypatch.setitem(CK._STATE, "numba", kernels)
    monkeypatch.setitem(th._STATE, "threads", 2)
    monkeypatch.setattr(stack_module, "BLOCK_BYTES", 16000)  # blocks of 3, 3 and 1 models
    hyper = dict(lr=[0.05, 0.1, 0.2, 0.05, 0.1, 0.2, 0.3], weight_decay=1e-3)
    hyper.update(momentum=0.9) if opt == "sgd" else hyper.update(lr=[v / 10 for v in hyper["lr"]])
    stacks = [MLPStack([6, 8, 8, 3], 7, activation="tanh", loss="softmax_cross_entropy") for _ in range(2)]
    opts = [make_stack_optimizer(st, opt, **hyper) for st in stacks]
    assert len(stacks[1].blocks(16)) == 3
    rng = np.random.default_rng(0)
    for _ in range(6):
        x, y = rng.standard_normal((7, 16, 6)).astype(np.float32), rng.integers(0, 3, (7, 16))
        stacks[0].loss_and_grads(x, y)
        opts[0].step()
        opts[1].begin_step()
        stacks[1].forward_backward(
            stacks[1].as_input(x), stacks[1].as_target(y, 16), then=lambda sl: opts[1].update(rows=sl)
        )
    assert np.any(stacks[0].flat_params != MLPStack([6, 8, 8, 3], 7).flat_params)  # it trained
    np.testing.assert_array_equal(stacks[0].flat_params, stacks[1].flat_params)
    for name in opts[0].state_names:
        np.testing.assert_array_equal(getattr(opts[0], name), getattr(opts[1], name))


@pytest.mark.parametrize("rule", ["adam", "adamw", "sgd"])
def test_step_tables_hold_the_python_float_arithmetic(rule):
    """The step tables (gpubp/step.py uploads them 1024 rows at a time), built as whole
    NumPy tables, hold bit for bit what an eager step's Python floats give row by row:
    SGD's lr; Adam's 1 - lr wd, lr / (1 - b1^t) and sqrt(1 - b2^t) (Python's ** and
    math.sqrt), over rates, betas and update numbers (1 and large) that round differently."""
    import math

    stack = MLPStack([3, 4, 2], count=3, backend=get_backend("cpu"), seed=0)
    wd = [0.0, 0.01, 0.37]
    b1, b2 = [0.9, 0.8, 0.95], [0.999, 0.99, 0.9999]
    if rule == "sgd":
        opt = make_stack_optimizer(stack, "sgd", [0.1, 0.3, 0.7], momentum=0.9, weight_decay=wd)
    else:
        opt = make_stack_optimizer(stack, rule, [1e-3, 0.3, 7e-5], betas=list(zip(b1, b2)), weight_decay=wd)
    rng = np.random.default_rng(3)
    for t0, k in ((1, 40), (99_990, 17)):
        lrs = [rng.uniform(1e-5, 0.5, 3).tolist() for _ in range(k)]
        steps, rates, counts = opt.step_table(t0, lrs), opt.rate_table(lrs), opt.count_table(t0, k)
        assert steps.shape == (k, len(opt.vector_names), 3) and rates.shape == counts.shape == (k, 2, 3)
        for j, lr in enumerate(lrs):
            t = t0 + j
            decay = [1.0 - a * d for a, d in zip(lr, wd)]
            assert rates[j].tolist() == [lr, decay], (t0, j)
            if rule == "sgd":
                assert steps[j].tolist() == [lr] and counts[j].tolist() == [[1.0] * 3] * 2, (t0, j)
            else:
                corr = [[1.0 - b**t for b in b1], [math.sqrt(1.0 - b**t) for b in b2]]
                assert counts[j].tolist() == corr, (t0, j)
                assert steps[j].tolist() == [decay, [a / c for a, c in zip(lr, corr[0])], corr[1]], (t0, j)
