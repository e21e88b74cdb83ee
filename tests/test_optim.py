"""Optimizers against hand-computed updates and against torch.optim; schedules and clipping."""

import math

import numpy as np
import pytest

import gpubp
from gpubp.schedules import lr_at

from .conftest import assert_close


def tiny_model(p=(0.5, -1.0), dtype="float64"):
    # MLP [1, 1]: parameters W (1, 1) = p[0] and b (1,) = p[1]
    model = gpubp.MLP([1, 1], "relu", "identity", "mse", dtype=dtype)
    model.set_params([np.array([[p[0]]]), np.array([p[1]])])
    return model


def flat(model):
    return np.concatenate([np.ravel(a) for a in model.params])


G = [np.array([[0.2]]), np.array([-0.4])]


def test_sgd_momentum_weight_decay_by_hand():
    m = tiny_model()
    opt = gpubp.SGD(m, lr=0.1, momentum=0.9, weight_decay=0.01)
    opt.step(G)
    # d = g + wd p = (0.205, -0.41); buf = d; p -= lr d
    assert_close(flat(m), [0.5 - 0.1 * 0.205, -1.0 + 0.1 * 0.41])
    opt.step(G)
    # d = g + wd p = (0.2 + 0.004795, -0.4 - 0.00959); buf = 0.9 buf + d; p -= lr buf
    buf = [0.9 * 0.205 + 0.204795, 0.9 * -0.41 - 0.40959]
    assert_close(flat(m), [0.4795 - 0.1 * buf[0], -0.959 - 0.1 * buf[1]])


def test_sgd_nesterov_by_hand():
    m = tiny_model()
    opt = gpubp.SGD(m, lr=0.1, momentum=0.5, nesterov=True)
    opt.step(G)
    # buf = g; d = g + mu buf = 1.5 g
    assert_close(flat(m), [0.5 - 0.1 * 0.3, -1.0 + 0.1 * 0.6])
    opt.step(G)
    # buf = 0.5 g + g = 1.5 g; d = g + 0.5 * 1.5 g = 1.75 g
    assert_close(flat(m), [0.47 - 0.1 * 0.35, -0.94 + 0.1 * 0.7])


def test_sgd_plain_and_dampening():
    m = tiny_model()
    gpubp.SGD(m, lr=0.5).step(G)
    assert_close(flat(m), [0.5 - 0.1, -1.0 + 0.2])
    m = tiny_model()
    opt = gpubp.SGD(m, lr=1.0, momentum=0.9, dampening=0.5)
    opt.step(G)  # first step: buf = g (no dampening on the first step, as torch)
    opt.step(G)  # buf = 0.9 g + 0.5 g = 1.4 g
    assert_close(flat(m), [0.5 - 0.2 - 1.4 * 0.2, -1.0 + 0.4 + 1.4 * 0.4])


def adam_by_hand(p, g, steps, lr, b1, b2, eps, wd, decoupled):
    p = list(p)
    m = [0.0, 0.0]
    v = [0.0, 0.0]
    for t in range(1, steps + 1):
        for i in range(2):
            gi = g[i] + (0.0 if decoupled else wd * p[i])
            if decoupled:
                p[i] *= 1 - lr * wd
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = b2 * v[i] + (1 - b2) * gi * gi
            mhat = m[i] / (1 - b1**t)
            vhat = v[i] / (1 - b2**t)
            p[i] -= lr * mhat / (math.sqrt(vhat) + eps)
    return p


@pytest.mark.parametrize("cls,wd", [(gpubp.Adam, 0.0), (gpubp.Adam, 0.1), (gpubp.AdamW, 0.1)])
def test_adam_by_hand(cls, wd):
    m = tiny_model()
    opt = cls(m, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd)
    # step 1 in closed form: mhat = d, vhat = d^2, so the move is lr d / (|d| + eps)
    opt.step(G)
    if cls is gpubp.Adam:
        d = [0.2 + wd * 0.5, -0.4 - wd * 1.0]
        expect = [0.5 - 0.01 * d[0] / (abs(d[0]) + 1e-6), -1.0 - 0.01 * d[1] / (abs(d[1]) + 1e-6)]
    else:
        expect = [0.5 * (1 - 0.001) - 0.01 * 0.2 / (0.2 + 1e-6), -1.0 * (1 - 0.001) + 0.01 * 0.4 / (0.4 + 1e-6)]
    assert_close(flat(m), expect)
    for _ in range(4):
        opt.step(G)
    assert_close(flat(m), adam_by_hand((0.5, -1.0), (0.2, -0.4), 5, 0.01, 0.8, 0.99, 1e-6, wd, cls is gpubp.AdamW))


TORCH_CASES = [
    ("sgd", {"lr": 0.05}),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "dampening": 0.3}),
    ("adam", {"lr": 1e-2}),
    ("adam", {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 1e-2}),
    ("adamw", {"lr": 1e-2, "weight_decay": 0.1}),
]


@pytest.mark.parametrize("name,kw", TORCH_CASES, ids=[f"{n}-{sorted(k)}" for n, k in TORCH_CASES])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_against_torch_optim(name, kw, dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    model = gpubp.MLP([3, 5, 2], "tanh", "identity", "mse", dtype=np.dtype(dtype).name, seed=1)
    tparams = [torch.tensor(model.backend.to_numpy(p).copy(), requires_grad=True) for p in model.params]
    ours = {"sgd": gpubp.SGD, "adam": gpubp.Adam, "adamw": gpubp.AdamW}[name](model, **kw)
    theirs = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name](tparams, **kw)
    for _ in range(6):
        grads = [rng.normal(size=p.shape).astype(dtype) for p in model.params]
        ours.step(grads)
        for tp, g in zip(tparams, grads):
            tp.grad = torch.tensor(g)
        theirs.step()
    for p, tp in zip(model.params, tparams):
        assert_close(p, tp.detach().numpy(), dtype, scale=10, what=name)  # 6 steps of rounding


def test_clip_grad_norm_like_torch():
    torch = pytest.importorskip("torch")
    model = gpubp.MLP([4, 3, 2], dtype="float64", seed=0)
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=p.shape) for p in model.grads]
    for dst, src in zip(model.grads, grads):
        dst[...] = src
    tg = [torch.tensor(g, requires_grad=True) for g in grads]
    for t in tg:
        t.grad = t.detach().clone()
    norm = gpubp.clip_grad_norm(model, 0.5)
    tnorm = torch.nn.utils.clip_grad_norm_(tg, 0.5)
    assert_close(norm, tnorm.item())
    for g, t in zip(model.grads, tg):
        assert_close(g, t.grad.numpy())
    # below the bound nothing changes but the 1e-6 in the denominator
    before = model.flat_grads.copy()
    gpubp.clip_grad_norm(model, 100.0)
    assert_close(model.flat_grads, before)


def test_schedules():
    assert lr_at(0, 0.1) == 0.1
    assert_close(lr_at(0, 0.1, warmup_steps=4), 0.025)
    assert_close(lr_at(3, 0.1, warmup_steps=4), 0.1)
    assert_close(lr_at(25, 0.1, "step", step_size=10, gamma=0.5), 0.1 * 0.25)
    assert_close(lr_at(10, 0.1, "cosine", total_steps=110, warmup_steps=10), 0.1)
    assert_close(lr_at(60, 0.1, "cosine", total_steps=110, warmup_steps=10, min_lr=0.01), 0.01 + 0.09 * 0.5)
    assert_close(lr_at(110, 0.1, "cosine", total_steps=110, warmup_steps=10, min_lr=0.01), 0.01)


@pytest.mark.parametrize("name", ["constant", "step", "cosine"])
def test_schedule_tables_are_the_python_float_formula_bit_for_bit(name):
    """lr_table (the step tables take a chunk of steps at once) gives, bit for bit, the
    formula evaluated step by step in Python floats: in warmup, after it, past the end
    (cosine holds its last value), with rates and spans that round differently."""
    import math

    from gpubp.schedules import lr_table

    lr, total, warmup, step_size, gamma, min_lr = 0.0737, 997, 13, 7, 0.83, 0.0031

    def python_float(t):  # the schedule's formula (module docstring), step by step
        if t < warmup:
            return lr * (t + 1) / warmup
        s = t - warmup
        if name == "constant":
            return lr
        if name == "step":
            return lr * gamma ** (s // step_size)
        span = max(total - warmup, 1)
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(s, span) / span))

    steps = np.r_[np.arange(0, 400), np.arange(950, 1100)]
    table = lr_table(steps, lr, name, total, warmup, step_size, gamma, min_lr)
    assert table.tolist() == [python_float(int(t)) for t in steps]
    assert lr_at(500, lr, name, total, warmup, step_size, gamma, min_lr) == python_float(500)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_table(steps, lr, "linear")


def test_schedule_matches_torch_cosine():
    torch = pytest.importorskip("torch")
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50, eta_min=0.01)
    for t in range(50):
        assert_close(lr_at(t, 0.3, "cosine", total_steps=50, min_lr=0.01), opt.param_groups[0]["lr"], what=f"t={t}")
        opt.step()
        sched.step()


def test_bad_hyperparameters_are_refused():
    m = tiny_model()
    with pytest.raises(ValueError):
        gpubp.SGD(m, lr=0.0)
    with pytest.raises(ValueError):
        gpubp.SGD(m, lr=0.1, nesterov=True)
    with pytest.raises(ValueError):
        gpubp.Adam(m, betas=(1.0, 0.9))


@pytest.mark.parametrize("name,kw", TORCH_CASES + [("adamw", {"lr": 1e-2, "weight_decay": 0.0})])
def test_a_step_leaves_the_gradients_alone(name, kw):
    # the NumPy updates may read g in place of a scaled copy: they must never write it
    model = gpubp.MLP([3, 5, 2], "tanh", dtype="float64", seed=1)
    opt = {"sgd": gpubp.SGD, "adam": gpubp.Adam, "adamw": gpubp.AdamW}[name](model, **kw)
    rng = np.random.default_rng(0)
    for _ in range(3):
        model.flat_grads[...] = rng.normal(size=model.n_params)
        before = model.flat_grads.copy()
        opt.step()
        assert np.array_equal(model.flat_grads, before)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_step_guard_closed_form(dtype):
    """numpy_ops.step_guard: the first non-finite step is kept, skip follows it, the norm
    and torch's clipping factor min(1, max_norm / (norm + 1e-6)) come out of grad_sq."""
    from gpubp.backend import numpy_ops

    t = np.dtype(dtype).type
    first_bad, skip = np.array(-1, np.int64), np.array(False)
    norm, scale = np.zeros((), dtype), np.zeros((), dtype)
    numpy_ops.step_guard(t(0.5), t(16.0), 3, 2.0, first_bad, skip, norm, scale)
    assert (first_bad, bool(skip), norm, scale) == (-1, False, 4.0, t(2.0) / (t(4.0) + t(1e-6)))
    numpy_ops.step_guard(t(0.5), t(1.0), 4, 2.0, first_bad, skip, norm, scale)
    assert scale == 1.0 and norm == 1.0  # below max_norm: no clipping
    numpy_ops.step_guard(t(0.5), t(16.0), 5, 0.0, first_bad, skip, norm, scale)
    assert scale == 1.0  # max_norm 0: clipping off
    for step, loss, sq in [(6, np.nan, 1.0), (7, 1.0, np.inf)]:  # the first bad step stays
        numpy_ops.step_guard(t(loss), t(sq), step, 2.0, first_bad, skip, norm, scale)
        assert first_bad == 6 and bool(skip)
