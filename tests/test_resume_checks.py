"""What --resume accepts of the files beside a checkpoint, the same for a single run and
a sweep: best.npz must be the best checkpoint that last.npz records (or one written
just before a crash that came before last.npz); a run resumed into a new --out that
fails before its first checkpoint leaves no run directory, nor does a new sweep."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

import gpubp.sweep_trainer as ST
import gpubp.trainer as T
from gpubp.checkpoint import load_checkpoint, save_checkpoint
from gpubp.cli import main
from gpubp.config import load_config
from gpubp.errors import TrainingError
from gpubp.sweep_trainer import SweepTrainer, model_dir

# 240 training samples, batches of 32, an evaluation (and checkpoints) every 10 steps
SMALL = ["data.dataset=spirals", "data.n_samples=300", "data.val_fraction=0.2", "data.test_fraction=0.0",
         "model.hidden=[8]", "train.batch_size=32", "train.eval_every=10", "train.steps=40",
         "optimizer.lr=0.01", "train.checkpoint_every_s=0", "train.device=cpu"]  # fmt: skip


def _single(path, overrides=(), **kw) -> T.Trainer:
    return T.Trainer(load_config(None, SMALL + list(overrides)), str(path), quiet=True, **kw)


def _rewrite(path, step=None, params=None):
    """best.npz as another run would have left it: another step, other weights."""
    meta, arrays = load_checkpoint(str(path))
    meta.pop("format"), meta.pop("version")
    if step is not None:
        meta["step"] = step
    if params is not None:
        arrays["params"] = params
    save_checkpoint(str(path), meta, arrays)


def _one_line(result, code=2):
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == code and len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


# --------------------------------------------------------------------------- single runs


def test_a_foreign_best_npz_is_refused_by_a_resumed_single_run(tmp_path):
    _single(tmp_path / "run").train()
    last = tmp_path / "run" / "last.npz"
    best_step = load_checkpoint(str(last))[0]["best_step"]
    assert best_step is not None
    _rewrite(tmp_path / "run" / "best.npz", step=7)  # no evaluation at step 7: not this run's best
    r = CliRunner().invoke(main, ["train", "--resume", str(last), "--set", "train.steps=60", "--quiet"])
    line = _one_line(r)
    assert str(tmp_path / "run" / "best.npz") in line and "step 7" in line and f"step {best_step}" in line
    # the right step, but weights of another architecture: refused now, not at the end of training
    _single(tmp_path / "other", ["model.hidden=[5]"]).train()
    shutil.copy(tmp_path / "other" / "best.npz", tmp_path / "run" / "best.npz")
    _rewrite(tmp_path / "run" / "best.npz", step=best_step)
    r = CliRunner().invoke(main, ["train", "--resume", str(last), "--set", "train.steps=60", "--quiet"])
    assert "parameters" in _one_line(r) and str(tmp_path / "run" / "best.npz") in r.output


def test_a_best_npz_written_just_before_a_crash_is_accepted(tmp_path):
    """best.npz is written before last.npz: a crash between the two leaves a best.npz of
    a later step than last.npz; the resumed run writes it again when it gets there."""
    _single(tmp_path / "ref", ["train.steps=30"]).train()
    last = tmp_path / "ref" / "last.npz"
    _rewrite(tmp_path / "ref" / "best.npz", step=35)  # past last.npz's step 30
    t = _single(tmp_path / "ref", ["train.steps=40"], resume=str(last))
    assert t.best is None  # not the best that last.npz records: no best weights to return to yet
    t.train()


# --------------------------------------------------------------------------- sweeps

SWEEP = """
[data]
dataset = "spirals"
n_samples = 300
val_fraction = 0.2
[model]
hidden = [8]
[train]
steps = 40
batch_size = 32
eval_every = 10
device = "cpu"
[sweep]
"optimizer.lr" = [0.01, 0.03]
"""


def _sweep_config(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text(SWEEP)
    return str(path)


def test_a_foreign_best_npz_is_refused_by_a_resumed_sweep(tmp_path):
    path = _sweep_config(tmp_path)
    run = str(tmp_path / "run")
    SweepTrainer(load_config(path), run, device="cpu", quiet=True).train()
    best = os.path.join(model_dir(run, 1), "best.npz")
    best_step = load_checkpoint(os.path.join(model_dir(run, 1), "last.npz"))[0]["best_step"]
    _rewrite(best, step=7)
    r = CliRunner().invoke(main, ["train", "--resume", run, "--quiet"])
    line = _one_line(r)
    assert best in line and "step 7" in line and f"step {best_step}" in line
    # another architecture's weights in last.npz or best.npz: one line naming the file, no traceback
    _rewrite(best, step=best_step, params=np.zeros(5))
    r = CliRunner().invoke(main, ["train", "--resume", run, "--quiet"])
    assert "parameters" in _one_line(r) and best in r.output
    last = os.path.join(model_dir(run, 0), "last.npz")
    _rewrite(last, params=np.zeros(5))
    r = CliRunner().invoke(main, ["train", "--resume", run, "--quiet"])
    assert "parameters" in _one_line(r) and last in r.output


def test_a_sweep_crashed_between_best_and_last_resumes_to_the_same_results(tmp_path, monkeypatch):
    """As a single run: model 0's best.npz is written, then the process dies before its
    last.npz; the resumed sweep ends as an uninterrupted one, bitwise."""
    path = _sweep_config(tmp_path)
    whole = str(tmp_path / "whole")
    SweepTrainer(load_config(path), whole, device="cpu", quiet=True).train()
    original, writes = ST.SweepTrainer._save, []

    def save(self, g, i, name, step, params, running=None):
        writes.append((i, name, step))
        if (i, name) == (0, "last.npz") and step > 10 and writes[-2] == (0, "best.npz", step):
            raise SystemExit("killed")
        original(self, g, i, name, step, params, running)

    monkeypatch.setattr(ST.SweepTrainer, "_save", save)
    run = str(tmp_path / "run")
    with pytest.raises(SystemExit):
        SweepTrainer(load_config(path), run, device="cpu", quiet=True).train()
    monkeypatch.undo()
    crashed = writes[-1][2]
    assert load_checkpoint(os.path.join(model_dir(run, 0), "best.npz"))[0]["step"] == crashed
    assert load_checkpoint(os.path.join(model_dir(run, 0), "last.npz"))[0]["step"] < crashed
    r = CliRunner().invoke(main, ["train", "--resume", run, "--quiet"])
    assert r.exit_code == 0, r.output
    for m in range(2):
        for name in ("last.npz", "best.npz"):
            a = load_checkpoint(os.path.join(model_dir(run, m), name))[1]["params"]
            b = load_checkpoint(os.path.join(model_dir(whole, m), name))[1]["params"]
            np.testing.assert_array_equal(a, b, err_msg=f"model {m} {name}")
    assert open(os.path.join(run, "sweep.csv")).read() == open(os.path.join(whole, "sweep.csv")).read()


# --------------------------------------------------------------------------- failing before the first checkpoint


def test_a_resumed_run_in_a_new_directory_that_fails_before_its_first_checkpoint_leaves_none(tmp_path, monkeypatch):
    _single(tmp_path / "run", ["train.steps=20"]).train()
    before = sorted(os.listdir(tmp_path / "run"))
    monkeypatch.setattr(T.Trainer, "_log_eval", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    t = _single(tmp_path / "new", ["train.steps=40"], resume=str(tmp_path / "run" / "last.npz"))
    assert (tmp_path / "new").is_dir()
    with pytest.raises(RuntimeError):
        t.train()
    assert not (tmp_path / "new").exists()
    assert sorted(os.listdir(tmp_path / "run")) == before  # the run it resumed from is untouched
    # resumed in its own directory: the directory stays, whatever happens
    t = _single(tmp_path / "run", ["train.steps=40"], resume=str(tmp_path / "run" / "last.npz"))
    with pytest.raises(RuntimeError):
        t.train()
    assert sorted(os.listdir(tmp_path / "run")) == before


def test_a_diverged_resumed_run_in_a_new_directory_says_its_checkpoint_is_kept(tmp_path, monkeypatch):
    _single(tmp_path / "run", ["train.steps=20"]).train()
    monkeypatch.setattr(T.FiniteGuard, "first_bad_step", lambda self: 24)  # step 25 was not finite
    t = _single(tmp_path / "new", ["train.steps=40"], resume=str(tmp_path / "run" / "last.npz"))
    with pytest.raises(TrainingError) as e:
        t.train()
    assert not (tmp_path / "new").exists()
    assert "no checkpoint had been written yet (run directory removed)" in str(e.value)
    assert (tmp_path / "run" / "last.npz").exists()


def test_a_new_sweep_that_fails_before_its_first_checkpoint_leaves_no_directory(tmp_path, monkeypatch):
    from gpubp.stack import MLPStack

    def no_memory(self, *args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(MLPStack, "forward_backward", no_memory)
    run = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", "--config", _sweep_config(tmp_path), "--out", str(run), "--quiet"])
    assert "out of memory" in _one_line(r, 1)
    assert not run.exists()
    # a folder that held other files keeps them: only the sweep's own files go
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    r = CliRunner().invoke(main, ["train", "--config", _sweep_config(tmp_path), "--out", str(run), "--overwrite",
                                  "--quiet"])  # fmt: skip
    assert r.exit_code == 1 and sorted(os.listdir(run)) == ["notes.txt"]


def test_a_sweep_whose_models_all_diverged_before_ctrl_c_keeps_the_directory_it_names(tmp_path, monkeypatch):
    """Ctrl-C before the first checkpoint, every model already frozen (diverged): nothing
    to save, but the message tells to resume from the run directory, so it stays (its
    state file records the divergences) and the resumed sweep ends with them reported."""
    import contextlib

    @contextlib.contextmanager
    def ctrl_c_at_step_5():
        counter = {"step": 0}

        def hit():
            counter["step"] += 1
            return counter["step"] == 5

        yield hit

    path = tmp_path / "sweep.toml"
    path.write_text(SWEEP.replace('"optimizer.lr" = [0.01, 0.03]', '"optimizer.lr" = [1e300, 1e301]'))
    monkeypatch.setattr(ST, "catch_sigint", ctrl_c_at_step_5)
    run = str(tmp_path / "run")
    r = CliRunner().invoke(main, ["train", "--config", str(path), "--out", run, "--quiet"])
    assert r.exit_code == 130 and f"--resume {run}" in r.output, r.output
    assert os.path.isdir(run)
    monkeypatch.undo()
    r = CliRunner().invoke(main, ["train", "--resume", run, "--quiet"])
    assert r.exit_code == 0, r.output
    rows = open(os.path.join(run, "sweep.csv")).read().splitlines()[1:]
    assert len(rows) == 2 and all("diverged at step" in row for row in rows)
