"""fp16's skipped steps as torch.amp.GradScaler has them (gpubp/step.py, StepState.count_updates).

A step whose scaled gradient is not finite takes no update: GradScaler does not call
optimizer.step(), so torch's Adam state 'step' (its bias corrections) and SGD's momentum
start count only the updates taken, while an LR scheduler stepped every iteration gives
the rate of the global step. gpubp counts the updates on the device (`updates`, advanced
by backend.update_vectors after the guard), so a captured step replays it correctly.

Checked here on the CPU: a run with overflows forced (a huge initial loss scale and a
short growth interval, so skips come at the start and again every few steps) equals,
bit for bit, a NumPy loop written from torch's formulas with t = updates taken (and
differs from one with t = step); torch itself (GradScaler + torch.optim, float32 on the
CPU) fed the same scaled gradients agrees within a derived tolerance; the captured step
equals the plain one; a resumed run equals the uninterrupted one; update_vectors gives
the host's Python-float bits.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import gpubp.trainer as T
from gpubp import precision as PR
from gpubp.backend import numpy_ops
from gpubp.backend.recording import RecordingBackend
from gpubp.config import load_config
from gpubp.data import epoch_permutation
from gpubp.stack import MLPStack, StackAdam, StackSGD

from .test_step import BASE, assert_same_run

INIT_SCALE = 2.0**30  # far beyond the ~2^22 these gradients stand in float16: the first ~8 steps overflow
INTERVAL = 5  # the scale doubles after 5 good steps: it climbs back to overflow, a skip every ~6 steps
STEPS = 120

CASES = {
    "adam": ["optimizer.name=adam", "optimizer.lr=0.01", "schedule.name=step", "schedule.step_size=30",
             "schedule.gamma=0.5", "schedule.warmup_steps=6"],
    "adamw": ["optimizer.name=adamw", "optimizer.lr=0.01", "optimizer.weight_decay=0.05", "schedule.name=cosine",
              "schedule.warmup_steps=10", "schedule.min_lr=0.001"],
    # dampening != 0: buf = d on the first update taken, (1 - damp) d had the skipped step counted
    "sgd": ["optimizer.name=sgd", "optimizer.lr=0.1", "optimizer.momentum=0.9", "optimizer.dampening=0.3",
            "schedule.name=step", "schedule.step_size=40", "schedule.warmup_steps=4"],
}  # fmt: skip


@pytest.fixture
def overflowing(monkeypatch):
    """fp16 runs that overflow at the start and again every few steps."""
    monkeypatch.setattr("gpubp.model.LOSS_SCALE_INIT", INIT_SCALE)
    monkeypatch.setattr(PR, "LOSS_SCALE_INTERVAL", INTERVAL)


def config(case: str, steps: int = STEPS, extra=(), dtype: str = "fp16"):
    return load_config(None, BASE + CASES[case] + [f"model.dtype={dtype}", f"train.steps={steps}"] + list(extra))


def train(case: str, device="cpu", steps: int = STEPS, extra=(), dtype: str = "fp16") -> T.Trainer:
    trainer = T.Trainer(config(case, steps, extra, dtype), None, device=device, quiet=True)
    trainer.summary = trainer.train()
    return trainer


# --------------------------------------------------------------------------- a NumPy reference


def reference_run(case: str, count: str = "updates", dtype: str = "fp16"):
    """The run written from torch's formulas (torch.optim.Adam/AdamW/SGD single-tensor
    rules, GradScaler's unscale / skip / update), in float32 NumPy: the model's forward and
    backward give the scaled gradients (the same batches, the same initial weights), the
    rest is this loop's own. count = "updates": t counts the updates taken (GradScaler);
    "steps": t = step + 1 (what gpubp did before). dtype "float32": no scale, no skip (each
    step's rate, bias corrections and batch by the loop's own count). Returns (params,
    updates, skipped, S)."""
    cfg = config(case, dtype=dtype)
    scaled = dtype == "fp16"
    tr = T.Trainer(cfg, None, device="cpu", quiet=True)
    model, split, o = tr.model, tr.run.splits["train"], cfg.optimizer
    f = np.float32
    p = model.flat_params  # the live float32 buffer the forward pass reads
    m, v = np.zeros_like(p), np.zeros_like(p)
    scale, good, taken, skipped = INIT_SCALE, 0, 0, 0
    batch = cfg.train.batch_size
    for s in range(STEPS):
        epoch, b = divmod(s, tr.steps_per_epoch)
        idx = epoch_permutation(cfg.train.seed, epoch, tr.n_train)[b * batch : (b + 1) * batch]
        if scaled:
            model.loss_scale[...] = scale
        with np.errstate(all="ignore"):
            model.forward_backward(split.x[idx], split.target[idx])
        g = model.flat_grads
        if scaled and not np.isfinite(g).all():  # GradScaler: found_inf -> no optimizer.step(); scale *= 0.5
            scale, good, skipped = scale * 0.5, 0, skipped + 1
            continue
        d = g * f(1.0 / scale) if scaled else g.copy()  # unscale_: grads *= 1 / S (float32; exact for 2^k)
        taken += 1
        t = taken if count == "updates" else s + 1
        lr = float(tr._lr_table(s))  # the scheduler steps every iteration: the rate of the global step
        if o.name == "sgd":  # torch.optim.SGD, momentum_buffer created by the first step() called
            if t == 1:  # (t = step + 1: that step was skipped, so never)
                m[...] = d
            else:
                m[...] = m * f(o.momentum) + f(1.0 - o.dampening) * d
            p -= f(lr) * m
        else:  # torch.optim.Adam / AdamW
            if o.name == "adamw":
                p *= f(1.0 - lr * o.weight_decay)
            b1, b2 = o.betas
            m[...] = m + f(1.0 - b1) * (d - m)  # exp_avg.lerp_(grad, 1 - beta1)
            v[...] = v * f(b2) + f(1.0 - b2) * d * d  # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
            step_size = lr / (1.0 - b1**t)
            denom = np.sqrt(v) / f(math.sqrt(1.0 - b2**t)) + f(o.eps)
            p -= f(step_size) * m / denom  # param.addcdiv_(exp_avg, denom, value=-step_size)
        good += 1
        if good == INTERVAL:
            scale, good = scale * 2.0, 0
    return p.copy(), taken, skipped, scale


@pytest.mark.parametrize("case", list(CASES))
def test_run_with_skipped_steps_equals_the_gradscaler_reference_bitwise(overflowing, case):
    run = train(case)
    params, taken, skipped, scale = reference_run(case)
    assert skipped >= 12 and run.summary["skipped_steps"] == skipped  # at the start, and every few steps
    assert run.summary["loss_scale"] == scale
    assert run.opt.steps == taken == STEPS - skipped
    np.testing.assert_array_equal(run.model.flat_params, params)
    # counting t by the step (the old way) gives other bits: the comparison can fail
    old, _, _, _ = reference_run(case, count="steps")
    assert not np.array_equal(old, params)


@pytest.mark.parametrize("case", ["adamw", "sgd"])
def test_without_overflow_the_counted_run_is_the_tables_run_bitwise(monkeypatch, case):
    """No skipped step: the device's count is the step count, and the run equals, bit for
    bit, the same run reading the host's precomputed vectors (StackAdam.step_table, as
    float32 runs do): update_vectors forms the same numbers on the device."""
    from gpubp import step as S

    counted = train(case, steps=60)
    assert counted.summary["skipped_steps"] == 0 and counted.opt.steps == 60
    monkeypatch.setattr(S.StepState, "count_updates", lambda self: None)  # the vectors tables, by step
    tables = train(case, steps=60)
    assert not tables.step_fn.state.counted
    assert_same_run(counted, tables)


@pytest.mark.parametrize("chunk", [None, 7])
@pytest.mark.parametrize("case", list(CASES))
def test_a_float32_run_equals_the_reference_loop_bitwise(case, chunk, monkeypatch):
    """Without a loss scale every step updates: the run's rows of the step tables (each
    step's rate, bias corrections, SGD's first step, its batch), selected by the guard's
    launch and the upload (gpubp/step.py), are the loop's own count of steps; with tables
    of 7 steps too (each upload selects its first step's rows)."""
    from gpubp import step as S

    if chunk:
        monkeypatch.setattr(S.StepState.__init__, "__defaults__", (chunk,))
    run = train(case, dtype="float32")
    params, taken, skipped, _ = reference_run(case, dtype="float32")
    assert skipped == 0 and run.opt.steps == taken == STEPS
    np.testing.assert_array_equal(run.model.flat_params, params)


# --------------------------------------------------------------------------- torch


def test_gradscaler_and_torch_adam_agree(overflowing, monkeypatch):
    """torch.amp.GradScaler("cpu") + torch.optim.Adam (float32, single-tensor) applied to
    the scaled gradients gpubp's run computed, step by step: the surrogate loss
    sum(p * g_s / S_s), scaled by GradScaler's own S, has the gradient g_s exactly when
    GradScaler's S equals gpubp's (powers of two), non-finite entries included. GradScaler
    decides the skips, Adam counts its 'step', the rate is set each iteration (a scheduler
    stepped every iteration).

    Tolerance: both apply the same float32 formulas to the same gradients (no feedback:
    the gradients do not depend on torch's parameters); each update's ~8 roundings may
    differ by an ulp (torch's kernels may fuse multiply-adds), |update| <= lr (1 - b1) /
    sqrt(1 - b2) < 3.2 lr, and p - update rounds once: per step at most
    8 u 3.2 lr + u |p|, u = 2^-24, summed over the steps."""
    torch = pytest.importorskip("torch")
    seen = []
    original = T.FiniteGuard.check

    def check(self, step, loss, grads, grad_sq, max_norm, shares=None, advance=None):
        assert shares is None and advance is None  # (fp16: no fused MLP; pos is read after the guard)
        seen.append((grads.copy(), float(self.loss_scale)))
        original(self, step, loss, grads, grad_sq, max_norm)

    monkeypatch.setattr(T.FiniteGuard, "check", check)
    holder = [T.Trainer(config("adam"), None, device="cpu", quiet=True)]
    start = holder[0].model.flat_params.copy()
    summary = holder[0].train()
    run = holder[0]
    o = run.cfg.optimizer

    p = torch.nn.Parameter(torch.from_numpy(start.copy()))
    opt = torch.optim.Adam([p], lr=o.lr, betas=tuple(o.betas), eps=o.eps, foreach=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=INTERVAL)
    for s, (g, scale) in enumerate(seen):
        assert scaler.get_scale() == scale, s  # the same scale each step
        for group in opt.param_groups:
            group["lr"] = float(run._lr_table(s))
        opt.zero_grad()
        with np.errstate(all="ignore"):
            c = torch.from_numpy(g / np.float32(scale))
        scaler.scale((p * c).sum()).backward()
        scaler.step(opt)
        scaler.update()
    assert len(seen) == STEPS and summary["skipped_steps"] >= 12
    assert int(opt.state[p]["step"]) == run.opt.steps == STEPS - summary["skipped_steps"]
    assert scaler.get_scale() == summary["loss_scale"]
    mine = run.model.flat_params.astype(np.float64)
    theirs = p.detach().numpy().astype(np.float64)
    u = 2.0**-24
    tol = STEPS * (8 * u * 3.2 * o.lr + u * np.abs(mine).max())
    assert np.abs(mine - theirs).max() <= tol


# --------------------------------------------------------------------------- capture, tables, resume


@pytest.mark.parametrize("case", ["adam", "sgd"])
def test_captured_run_with_skipped_steps_equals_the_plain_run_bitwise(overflowing, case):
    plain = train(case)
    rec = RecordingBackend()
    captured = train(case, rec)
    assert len(rec.graphs) == 2 and rec.replays == STEPS - 2
    assert any(c[0] is numpy_ops.update_vectors for c in rec.graphs[0])  # in the graph, not on the host
    assert plain.summary["skipped_steps"] >= 12
    assert captured.opt.steps == plain.opt.steps == STEPS - plain.summary["skipped_steps"]
    assert_same_run(plain, captured)


def test_tables_reloaded_mid_run_with_skipped_steps(overflowing, monkeypatch):
    """Tables of 7 rows: each reload reads the device's update count and writes the
    corrections from there (updates lag the steps by the skips)."""
    from gpubp import step as S

    plain = train("adam")
    monkeypatch.setattr(S, "CHUNK", 7)
    monkeypatch.setattr(S.StepState.__init__, "__defaults__", (7,))
    assert_same_run(plain, train("adam", RecordingBackend()))


@pytest.mark.parametrize("device", ["cpu", "recording"])
def test_resumed_fp16_run_with_skipped_steps_repeats_the_uninterrupted_one(overflowing, tmp_path, device):
    """A checkpoint records the updates taken (optimizer_steps = steps - skipped), and the
    resumed run counts on from there."""
    from gpubp.checkpoint import load_checkpoint

    def trainer(name, steps, resume=None):
        be = RecordingBackend() if device == "recording" else "cpu"
        return T.Trainer(config("adam", steps, ["train.eval_every=10"]), str(tmp_path / name), device=be,
                         quiet=True, resume=resume)  # fmt: skip

    whole = trainer("whole", 60)
    whole.train()
    half = trainer("half", 30)  # 30 = 7 epochs and 2 batches: mid-epoch
    first = half.train()
    meta, arrays = load_checkpoint(str(tmp_path / "half" / "last.npz"))
    assert first["skipped_steps"] >= 6 and meta["optimizer_steps"] == 30 - first["skipped_steps"]
    assert int(arrays["amp.skipped"]) == first["skipped_steps"]
    rest = trainer("rest", 60, resume=str(tmp_path / "half" / "last.npz"))
    rest.train()
    assert rest.opt.steps == whole.opt.steps < 60
    assert np.array_equal(whole.model.flat_params, rest.model.flat_params)
    for name in whole.opt.state_names:
        assert np.array_equal(getattr(whole.opt, name), getattr(rest.opt, name))


# --------------------------------------------------------------------------- the op


@pytest.mark.parametrize("rule", ["adam", "sgd"])
def test_update_vectors_gives_the_host_bits_and_counts(rule):
    """update_vectors (rates by step, corrections by update) = StackOptimizer.step_table
    (t = updates + 1, lr of the step) bit for bit, over rates and update numbers that
    round differently; first_step is SGD's t == 1; the counter moves unless skipped."""
    from gpubp.backend import NumpyBackend

    stack = MLPStack([3, 4, 2], count=3, backend=NumpyBackend(), seed=0)
    if rule == "adam":
        opt = StackAdam(stack, lr=[1e-3, 0.3, 7e-5], betas=[(0.9, 0.999), (0.8, 0.99), (0.95, 0.9999)],
                        weight_decay=[0.0, 0.01, 0.1])  # fmt: skip
    else:
        opt = StackSGD(stack, lr=[0.1, 0.3, 0.7], momentum=0.9)
    rng = np.random.default_rng(5)
    k = 12
    lrs = [rng.uniform(1e-5, 0.5, 3) for _ in range(k)]
    t0 = 37
    rates = opt.rate_table(lrs)
    counts = opt.count_table(t0 + 1, k)
    updates, pos, t0_arr = np.asarray(t0).copy(), np.zeros((), np.int64), np.asarray(t0)
    vectors, first = np.zeros_like(opt.vectors), np.zeros((), np.bool_)
    for j in range(k):
        pos[...] = j
        skip = np.asarray(j % 3 == 1)
        t = int(updates) + 1
        numpy_ops.update_vectors(rates, pos, counts, t0_arr, updates, skip, vectors, first, opt.bias_corrected)
        expected = np.asarray(opt.step_table(t, [lrs[j]])[0, ..., None], dtype=vectors.dtype)
        assert np.array_equal(vectors, expected), j
        assert not first and int(updates) == t - (1 if skip else 0)
    zero = np.zeros((), np.int64)
    numpy_ops.update_vectors(
        rates, pos, counts, zero, zero.copy(), np.asarray(False), vectors, first, opt.bias_corrected
    )
    assert first  # no update taken yet: SGD's momentum starts
