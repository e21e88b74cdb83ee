"""Divergence, Ctrl-C, crashes in checkpoint writes, out of memory, unexpected errors."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import gpubp.trainer as T
from gpubp.checkpoint import load_checkpoint
from gpubp.config import format_size, load_config
from gpubp.data import epoch_permutation
from gpubp.errors import DeviceRuntimeError, Interrupted, TrainingError
from gpubp.model import MLP
from gpubp.optim import make_optimizer

from .conftest import ROOT, run_cli

# 240 training samples, batches of 32: 8 steps an epoch, an evaluation every 10 steps
SMALL = ["data.dataset=spirals", "data.n_samples=300", "data.val_fraction=0.2", "data.test_fraction=0.0",
         "model.hidden=[8]", "train.batch_size=32", "train.eval_every=10", "train.steps=40",
         "optimizer.lr=0.01", "train.checkpoint_every_s=0"]  # fmt: skip  # checkpoints at every evaluation
STEPS_PER_EPOCH = 8


def trainer(path, overrides=(), device="cpu", **kw) -> T.Trainer:
    return T.Trainer(load_config(None, SMALL + list(overrides)), str(path), device=device, quiet=True, **kw)


def metrics(path):
    lines = [json.loads(line) for line in open(path)]
    for rec in lines:
        rec.pop("elapsed_s")
    return lines


def same_run(a, b):
    """Two run directories hold the same results (timings aside), bitwise."""
    for name in ("last.npz", "best.npz"):
        (ma, xa), (mb, xb) = load_checkpoint(str(a / name)), load_checkpoint(str(b / name))
        assert xa.keys() == xb.keys()
        for k in xa:
            assert np.array_equal(xa[k], xb[k]), (name, k)
        for m in (ma, mb):
            m["config"]["data"].pop("path")
        assert ma == mb, name
    assert metrics(a / "metrics.jsonl") == metrics(b / "metrics.jsonl")
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for key in ("seconds", "eval_seconds", "run_dir"):
        sa.pop(key), sb.pop(key)
    assert sa == sb


# --------------------------------------------------------------------------- divergence


def poison_step(monkeypatch, step: int, what: str):
    """The `step`-th call of forward_backward (1-based) returns a NaN loss, or leaves an
    infinite gradient with a finite loss. (A Python-side fault: the trainer that meets it
    must run its step uncaptured, train.cuda_graph = false, as a CUDA graph replays only
    what the device did when it was captured.)"""
    original = MLP.forward_backward
    calls = []

    def forward_backward(self, x, target, input_grad=False, **kw):
        loss = original(self, x, target, input_grad, **kw)
        calls.append(1)
        if len(calls) == step:
            if what == "loss":
                loss = loss * np.nan
            else:
                self.flat_grads[5] = np.inf
        return loss

    monkeypatch.setattr(MLP, "forward_backward", forward_backward)


@pytest.mark.parametrize("device", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_divergence_names_the_first_bad_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, what, device):
    poison_step(monkeypatch, 23, what)
    bad = trainer(tmp_path / "bad", ["train.cuda_graph=false"], device=device)
    with pytest.raises(TrainingError) as e:
        bad.train()
    monkeypatch.undo()
    last = tmp_path / "bad" / "last.npz"
    epoch, batch = divmod(23 - 1, STEPS_PER_EPOCH)
    assert str(e.value) == (
        f"training diverged: the loss or gradient became non-finite at step 23 (epoch {epoch + 1}, batch {batch + 1}); "
        f"the last good checkpoint {last} (step 20) is kept. Lower optimizer.lr (now 0.01) or set "
        "optimizer.clip_grad_norm (e.g. 1.0)"
    )
    # the parameters stopped at their values after step 22: those of a clean 22-step run
    host = bad.run.backend.to_numpy
    clean22 = trainer(tmp_path / "clean22", ["train.steps=22"], device=device)
    clean22.train()
    assert np.array_equal(host(bad.model.flat_params), host(clean22.model.flat_params))
    # last.npz is the good one from step 20, as a clean run writes it; nothing after it was logged
    clean20 = trainer(tmp_path / "clean20", ["train.steps=20"], device=device)
    clean20.train()
    meta, arrays = load_checkpoint(str(last))
    assert meta["step"] == 20
    assert np.array_equal(arrays["params"], host(clean20.model.flat_params))
    assert [r["step"] for r in metrics(last.parent / "metrics.jsonl")] == [10, 20]


def first_nonfinite_step(config, overrides) -> int:
    """Reference: the same run step by step on the host, with the plain Python API,
    checking the loss and every gradient after each step (0-based; -1 if none)."""
    cfg = load_config(config, SMALL + overrides)
    run = T.prepare(cfg, "cpu")
    model, part, bs = run.model, run.splits["train"], cfg.train.batch_size
    opt = make_optimizer(model, cfg.optimizer.name, cfg.optimizer.lr)
    with np.errstate(all="ignore"):
        for s in range(cfg.train.steps):
            epoch, b = divmod(s, STEPS_PER_EPOCH)
            idx = epoch_permutation(cfg.train.seed, epoch, part.n)[b * bs : (b + 1) * bs]
            loss, grads = model.loss_and_grads(part.x[idx], part.target[idx])
            if not (math.isfinite(loss) and all(np.isfinite(g).all() for g in grads)):
                return s
            opt.step(grads)
    return -1


def test_a_real_divergence_through_the_cli(tmp_path):
    overrides = ["optimizer.name=sgd", "optimizer.lr=300", "train.steps=200"]
    config = tmp_path / "empty.toml"
    config.write_text("# every value from SMALL and the defaults\n")
    first = first_nonfinite_step(str(config), overrides)
    assert 10 < first < 200  # it diverges, and after the first evaluation
    args = [a for o in SMALL + overrides for a in ("--set", o)]
    out = tmp_path / "run"
    r = run_cli("train", "--device", "cpu", "--quiet", "--out", str(out), *args, "--config", str(config))
    assert r.returncode == 1 and r.stdout == ""
    epoch, batch = divmod(first, STEPS_PER_EPOCH)
    assert r.stderr.splitlines() == [
        f"gpubp: error: training diverged: the loss or gradient became non-finite at step {first + 1} "
        f"(epoch {epoch + 1}, batch {batch + 1}); the last good checkpoint {out / 'last.npz'} "
        f"(step {first // 10 * 10}) is kept. Lower optimizer.lr (now 300) or set optimizer.clip_grad_norm (e.g. 1.0)"
    ]
    for name in ("last.npz", "best.npz"):
        _, arrays = load_checkpoint(str(out / name))
        assert all(np.isfinite(a).all() for a in arrays.values())
    assert not (out / "summary.json").exists()


# --------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_mid_interval_saves_a_checkpoint_that_resumes_exactly(tmp_path, monkeypatch):
    """SIGINT during step 18 (between evaluations at 10 and 20): last.npz at step 18,
    holding the training loss summed over steps 11..18, so that the resumed run logs
    the same train_loss at step 20 as an uninterrupted one."""
    original = T.Step.run

    def run(self, step):
        if step == 17:  # the 18th step is starting
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, step)

    monkeypatch.setattr(T.Step, "run", run)
    a = trainer(tmp_path / "a")
    with pytest.raises(Interrupted) as e:
        a.train()
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert (e.value.step, e.value.checkpoint) == (18, str(tmp_path / "a" / "last.npz"))
    meta, arrays = load_checkpoint(e.value.checkpoint)
    assert meta["step"] == 18 and meta["running_steps"] == 8 and arrays["train.running_loss"] > 0

    trainer(tmp_path / "a", resume=e.value.checkpoint).train()
    trainer(tmp_path / "b").train()
    same_run(tmp_path / "a", tmp_path / "b")


def test_ctrl_c_through_the_cli_prints_the_resume_command(tmp_path):
    overrides = ["data.n_samples=600", "model.hidden=[32, 32]", "train.batch_size=16", "train.eval_every=0",
                 "train.steps=0", "train.epochs=60", "train.early_stopping_patience=0"]  # fmt: skip
    args = [a for o in SMALL + overrides for a in ("--set", o)]
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", "configs/spirals.toml", "--device", "cpu",
           "--out", str(out), *args]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr.readline().startswith("training on cpu")
    deadline = time.monotonic() + 60
    while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:  # the first epoch is done
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and stdout == "", stderr
    *evaluations, line = stderr.splitlines()
    assert all(e.startswith("epoch ") for e in evaluations), stderr  # one line per evaluation (no terminal)
    match = re.fullmatch(r"gpubp: interrupted at step (\d+); resume with: (.*)", line)
    assert match, line
    step = int(match[1])
    words = shlex.split(match[2])
    assert words == ["python", os.path.join(ROOT, "train.py"), "--resume", str(out / "last.npz"), "--device", "cpu"]
    assert 0 < step < 1800 and load_checkpoint(str(out / "last.npz"))[0]["step"] == step

    r = subprocess.run([sys.executable, *words[1:], "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    reference = T.Trainer(load_config("configs/spirals.toml", SMALL + overrides), str(tmp_path / "ref"), device="cpu",
                          quiet=True)  # fmt: skip
    reference.train()
    same_run(out, tmp_path / "ref")


# --------------------------------------------------------------------------- crashes in writes


def test_a_crash_in_any_checkpoint_write_resumes_to_the_same_run(tmp_path, monkeypatch):
    """A checkpoint write fails (as a killed process leaves it: the old file in place):
    resuming from whatever last.npz is on disk gives the same last.npz, best.npz and
    log as an uninterrupted run. Crash points: the first writes, the last write of
    best.npz (the best val_accuracy is not beaten after it) and the write after it."""
    overrides = ["train.eval_every=5", "train.early_stopping_metric=val_accuracy"]
    original = T.save_checkpoint
    writes = []

    def save_checkpoint(path, meta, arrays):
        writes.append(os.path.basename(path))
        if len(writes) == crash_at + 1:
            raise SystemExit("killed")
        original(path, meta, arrays)

    monkeypatch.setattr(T, "save_checkpoint", save_checkpoint)
    crash_at = -1
    trainer(tmp_path / "ref", overrides).train()
    last_best = max(i for i, name in enumerate(writes) if name == "best.npz")
    assert last_best < len(writes) - 2  # later evaluations do not improve on it
    for crash_at in sorted({0, 1, last_best, last_best + 1}):
        writes.clear()
        run = tmp_path / f"crash{crash_at}"
        with pytest.raises(SystemExit):
            trainer(run, overrides).train()
        if (run / "last.npz").exists():
            trainer(run, overrides, resume=str(run / "last.npz")).train()
        else:  # killed before the first checkpoint: start again
            trainer(run, overrides, overwrite=True).train()
        same_run(run, tmp_path / "ref")


@pytest.mark.parametrize("torn", ['{"step": 30, "epoch": 4, "tra', '{"step": 30, "epoch": 4}'])
def test_resume_drops_temporaries_and_a_torn_log_line(tmp_path, torn):
    from gpubp.plotting import read_metrics

    trainer(tmp_path / "a", ["train.steps=20"]).train()
    run = tmp_path / "a"
    (run / ".tmp-last.npz-k1ll3d").write_bytes(b"PK\x03\x04 half a checkpoint")
    with open(run / "metrics.jsonl", "a") as f:
        f.write(torn)  # a line the crash cut short, maybe just before its newline
    assert [r["step"] for r in read_metrics(str(run))] == [10, 20]  # gpubp plot reads the run as it is
    logged = []
    t = trainer(run, resume=str(run / "last.npz"), log=logged.append)
    assert logged == [f"removed .tmp-last.npz-k1ll3d, left in {run} by an interrupted write"]
    assert not (run / ".tmp-last.npz-k1ll3d").exists()
    t.train()
    trainer(tmp_path / "b").train()
    same_run(run, tmp_path / "b")


# --------------------------------------------------------------------------- out of memory


def test_out_of_memory_names_batch_size_and_memory_needed(tmp_path, monkeypatch):
    def forward_backward(self, x, target, input_grad=False, **kw):
        raise MemoryError

    monkeypatch.setattr(MLP, "forward_backward", forward_backward)
    t = trainer(tmp_path / "a", ["train.batch_size=64"])
    with pytest.raises(DeviceRuntimeError) as e:
        t.train()
    est = T.memory_estimate(t.cfg, t.model.sizes, 64, 300, t.run.backend)
    assert str(e.value).startswith(
        f"out of memory on cpu (NumPy {np.__version__}) with train.batch_size = 64 and model [2, 8, 3]: "
        f"the run needs about {format_size(sum(est.values()))} ("
    )
    assert str(e.value).endswith("use a smaller train.batch_size (e.g. 16)")
    assert e.value.exit_code == 1


@pytest.mark.parametrize(
    "overrides,dominant",
    [
        (["model.hidden=[1024, 1024]", "train.batch_size=8"], "params"),
        (["model.hidden=[256, 256]", "model.activation=silu", "train.batch_size=1000", "data.n_samples=1250"], "batch"),
    ],
)
def test_memory_estimate_matches_what_numpy_allocates(tmp_path, overrides, dominant):
    """The estimate against tracemalloc's count of the bytes NumPy holds after a few
    steps (the model, optimizer, data and workspaces; not the temporaries of an op).
    Only NumPy's array buffers count (its tracemalloc domain): the modules that train()
    imports the first time (numba's, where installed: some 20 MiB) are not the run's."""
    import gc
    import tracemalloc

    cfg = load_config(None, SMALL + overrides + ["train.steps=3", "train.eval_every=0", "train.eval_batch_size=16"])
    tracemalloc.start()
    try:
        t = T.Trainer(cfg, str(tmp_path / "a"), device="cpu", quiet=True)
        t.train()
        gc.collect()  # what the run holds: not its garbage in reference cycles not yet collected
        arrays = tracemalloc.DomainFilter(True, np.lib.tracemalloc_domain)
        held = sum(s.size for s in tracemalloc.take_snapshot().filter_traces([arrays]).statistics("filename"))
    finally:
        tracemalloc.stop()
    n_rows = sum(part.n for part in t.run.splits.values() if part is not None)
    est = T.memory_estimate(cfg, t.model.sizes, min(cfg.train.batch_size, t.n_train), n_rows, t.run.backend)
    assert max(est, key=est.get) == dominant
    assert 0.8 <= sum(est.values()) / held <= 1.25, (est, held)


@pytest.mark.gpu
def test_gpu_out_of_memory_gives_batch_size_and_advice(tmp_path):
    """A batch whose activations (2**22 rows x 2 x 16384 x 4 bytes = 512 GiB) fit on no GPU."""
    r = run_cli("train", "--config", "configs/regression.toml", "--device", "gpu", "--quiet", "--out",
                str(tmp_path / "o"), "--set", "data.n_samples=8388608", "--set", "model.hidden=[16384]",
                "--set", "train.batch_size=4194304", "--set", "data.test_fraction=0.0")  # fmt: skip
    assert r.returncode == 1, r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith("gpubp: error: out of memory on ") and "train.batch_size = 4194304" in line
    assert line.endswith("use a smaller train.batch_size (e.g. 1048576)")
    needed = float(re.search(r"the run needs about ([0-9.]+) GiB", line)[1])
    assert 512 <= needed < 600  # a_k and D_k of the hidden layer: 2 x 2**22 x 16384 x 4 bytes, plus a little


# --------------------------------------------------------------------------- unexpected errors


BOOM = (
    "import sys, gpubp.trainer as t\n"
    "def boom(*a, **k): raise RuntimeError('a bug\\nover two lines')\n"
    "t.prepare = boom\n"
    "from gpubp.cli import main\n"
    "main(sys.argv[1:], prog_name='gpubp')\n"
)


@pytest.mark.parametrize("debug", [False, True])
def test_an_unexpected_exception_is_one_line_unless_debugging(tmp_path, debug):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("GPUBP_DEBUG", None)
    if debug:
        env["GPUBP_DEBUG"] = "1"
    args = ["train", "--config", "configs/digits.toml", "--device", "cpu", "--out", str(tmp_path / "o")]
    r = subprocess.run([sys.executable, "-c", BOOM, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 1
    if debug:
        assert "Traceback" in r.stderr and r.stderr.rstrip().endswith("RuntimeError: a bug\nover two lines")
    else:
        assert r.stderr.splitlines() == [
            "gpubp: internal error: RuntimeError: a bug over two lines (set GPUBP_DEBUG=1 for the traceback)"
        ]


# --------------------------------------------------------------------------- SIGKILL


KILL_CONFIG = """
[data]
dataset = "spirals"
n_samples = 200
val_fraction = 0.2
[model]
hidden = [8]
[train]
steps = 600
batch_size = 16
eval_every = 1   # evaluate and write last.npz (and often best.npz) after every step
checkpoint_every_s = 0
"""


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing(tmp_path):
    """24 SIGKILLs at seeded random moments of a run that writes checkpoints after every
    step (most kills land in a write). After each: every checkpoint on disk loads. Then
    resuming reaches bitwise the run an uninterrupted process makes."""
    import random

    rng = random.Random(20240605)
    config = tmp_path / "kill.toml"
    config.write_text(KILL_CONFIG)
    out = tmp_path / "run"
    base = [sys.executable, "-m", "gpubp.cli", "train", "--device", "cpu", "--quiet"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    kills, leftovers, started = 0, 0, time.monotonic()
    while kills < 24:
        if (out / "last.npz").exists():
            cmd = base + ["--resume", str(out / "last.npz")]
        else:
            cmd = base + ["--config", str(config), "--out", str(out), "--overwrite"]
        log = out / "metrics.jsonl"
        size = log.stat().st_size if log.exists() else 0
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while not (log.exists() and log.stat().st_size > size) and proc.poll() is None:
            time.sleep(0.001)  # until it is training: a new evaluation was logged
        time.sleep(rng.uniform(0.0, 0.03))
        assert proc.poll() is None, f"the run ended before kill {kills + 1}: {proc.stderr.read()}"
        proc.kill()
        proc.wait()
        proc.stderr.close()
        kills += 1
        leftovers += len([n for n in os.listdir(out) if n.startswith(".tmp-")])
        for name in ("last.npz", "best.npz"):
            if (out / name).exists():
                load_checkpoint(str(out / name))  # raises if half-written or corrupt
    r = subprocess.run(base + ["--resume", str(out / "last.npz")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    print(f"{kills} kills in {time.monotonic() - started:.1f} s, {leftovers} left a temporary file")
    assert leftovers > 0  # some kills did land inside a checkpoint write
    T.Trainer(load_config(str(config)), str(tmp_path / "ref"), device="cpu", quiet=True).train()
    same_run(out, tmp_path / "ref")


# --------------------------------------------------------------------------- feedback, run directories


def test_one_log_line_per_evaluation_without_a_terminal(tmp_path):
    """stderr is a pipe here: one line per evaluation naming epoch, step, losses, metrics, time."""
    r = run_cli("train", "--config", "configs/spirals.toml", "--device", "cpu", "--out", str(tmp_path / "r"),
                "--set", "data.n_samples=300", "--set", "train.steps=40", "--set", "train.eval_every=10",
                "--set", "train.batch_size=32")  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 4, r.stderr
    assert re.fullmatch(r"epoch 2/\d+ step 10/40 train_loss \S+ val_loss \S+ val_accuracy \S+ elapsed \S+s", lines[0])
    summary = json.loads(r.stdout)
    assert summary["run_dir"] == str(tmp_path / "r")
    assert 0 < summary["eval_seconds"] <= summary["seconds"]


def test_early_stopping_line_goes_around_the_bar(tmp_path):
    """On a terminal the line is written with tqdm's write (above the bar), not print."""
    t = trainer(tmp_path / "r", ["train.steps=400", "train.early_stopping_patience=1", "optimizer.lr=0.5"])
    t.quiet = False
    written = []
    import tqdm

    class Bar(tqdm.tqdm):
        def __init__(self, *a, **kw):
            super().__init__(*a, **{**kw, "disable": False, "file": open(os.devnull, "w")})

        def write(self, s, *a, **kw):
            written.append(s)

    t.log = lambda m: pytest.fail(f"printed around the bar: {m}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tqdm, "tqdm", Bar)
        summary = t.train()
    assert summary["stopped_early"] and len(written) == 1 and written[0].startswith("early stopping at step ")


@pytest.mark.parametrize("when", ["diverged", "killed"])
def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_directory(tmp_path, monkeypatch, when):
    def fail_soon():
        if when == "diverged":
            poison_step(monkeypatch, 3, "loss")
        else:
            monkeypatch.setattr(T.Trainer, "_log_eval", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))

    fail_soon()
    t = trainer(tmp_path / "r", ["train.checkpoint_every_s=60"])
    assert (tmp_path / "r").is_dir()
    with pytest.raises((TrainingError, RuntimeError)) as e:
        t.train()
    assert not (tmp_path / "r").exists()
    if when == "diverged":
        assert "no checkpoint had been written yet (run directory removed)" in str(e.value)
    # a folder that held other files keeps them: only the run's own files go
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("mine")
    fail_soon()
    t = trainer(tmp_path / "s", ["train.checkpoint_every_s=60"], overwrite=True)
    with pytest.raises((TrainingError, RuntimeError)):
        t.train()
    assert sorted(os.listdir(tmp_path / "s")) == ["notes.txt"]


def test_checkpoints_come_at_a_bounded_rate_and_at_the_end(tmp_path, monkeypatch):
    """A fake clock that moves 10 s per reading: with checkpoint_every_s = 25, of four
    evaluations only the third is due (30 s after the start); the end always writes.
    best.npz goes with them, holding the best evaluation, never a later one."""
    import itertools

    ticks = itertools.count(0.0, 10.0)
    monkeypatch.setattr(T.time, "monotonic", lambda: next(ticks))
    writes = []
    original = T.save_checkpoint

    def save_checkpoint(path, meta, arrays):
        writes.append((os.path.basename(path), meta["step"]))
        original(path, meta, arrays)

    monkeypatch.setattr(T, "save_checkpoint", save_checkpoint)
    t = trainer(tmp_path / "r", ["train.checkpoint_every_s=25", "train.early_stopping_patience=0"])
    summary = t.train()
    monkeypatch.undo()
    assert [w for w in writes if w[0] == "last.npz"] == [("last.npz", 30), ("last.npz", 40)]
    best = [step for name, step in writes if name == "best.npz"]
    assert best and best[-1] == summary["best_step"] and all(step <= 30 for step in best[:-1])
    assert load_checkpoint(str(tmp_path / "r" / "best.npz"))[0]["step"] == summary["best_step"]
