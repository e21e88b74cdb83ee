"""What an evaluation costs, counted (not timed): one forward pass over a split per
evaluation, whatever metrics it reports, and no second pass over the validation split
at the end when the last (or best) evaluation already measured the same weights."""

from __future__ import annotations

import json
import math
import sys

import pytest

import gpubp.trainer as T
from gpubp.config import load_config
from gpubp.model import MLP

# small runs: 160 training rows in batches of 32 (5 steps an epoch), evaluated in chunks of 16 rows
BASE = ["data.n_samples=300", "data.val_fraction=0.2", "data.test_fraction=0.25", "model.hidden=[8]",
        "train.batch_size=32", "train.eval_batch_size=16", "train.eval_every=5", "train.steps=30",
        "optimizer.lr=0.01"]  # fmt: skip
TASKS = {
    "regression": ["data.dataset=regression", "data.n_features=4"],
    "classification": ["data.dataset=spirals"],
}


@pytest.fixture
def forwards(monkeypatch):
    """Counts the model's forward passes over a chunk of rows (training steps and
    evaluations alike go through MLP._forward)."""
    calls = []
    inner = MLP._forward

    def counted(self, x, ws, window=None):
        calls.append(x.shape[0] if window is None else ws.a[0].shape[0])  # (a window: x is a split)
        return inner(self, x, ws, window)

    monkeypatch.setattr(MLP, "_forward", counted)
    return calls


def chunks(trainer, split):
    return math.ceil(trainer.run.splits[split].n / trainer.cfg.train.eval_batch_size)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("report", [False, True])
def test_one_forward_pass_per_evaluation(tmp_path, forwards, task, report):
    trainer = T.Trainer(load_config(None, BASE + TASKS[task]), None, device="cpu", quiet=True)
    for split in ("train", "val", "test"):
        forwards.clear()
        result = trainer.evaluate(split, report=report)
        # each row passes forward once: the loss, the accuracy and the metrics of the outputs
        # (R^2, RMSE, MAE; the per-class report) come from the same pass
        assert len(forwards) == chunks(trainer, split) >= 2 and sum(forwards) == trainer.run.splits[split].n
        assert (f"{split}_r2" in result) == (task == "regression")
        assert (f"{split}_report" in result) == (task == "classification" and report)


# an early stop ends on the best weights, of an evaluation before the last; the other ends on the last
ENDINGS = {"early_stop": ["train.early_stopping_patience=2", "train.steps=200", "optimizer.lr=0.3"],
           "last": ["train.early_stopping_patience=0", "train.restore_best=false"]}  # fmt: skip


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("ending", ENDINGS)
def test_a_run_passes_forward_once_per_step_and_evaluation(tmp_path, forwards, task, ending):
    cfg = load_config(None, BASE + TASKS[task] + ENDINGS[ending])
    trainer = T.Trainer(cfg, str(tmp_path / "run"), device="cpu", quiet=True)
    summary = trainer.train()
    assert summary["stopped_early"] == (ending == "early_stop")
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    val, train, test = (chunks(trainer, s) for s in ("val", "train", "test"))
    # the final evaluation measures the validation split again only for weights that no evaluation
    # with every reported metric measured: regression's are all in each evaluation, the report of
    # classes only in the last one, so only an early stop of classes (best weights) needs the pass
    again = ending == "early_stop" and task == "classification"
    assert len(forwards) == summary["steps"] + len(records) * val + train + test + again * val
    # what summary.json reports of the validation split is what evaluating its weights gives now
    fresh = trainer.evaluate("val", report=True)
    assert {k: summary[k] for k in fresh} == fresh
    # metrics.jsonl holds the same keys at every evaluation: no report in the last line
    assert all(r.keys() == records[0].keys() for r in records) and "val_report" not in records[-1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="names the fsynced files through /proc/self/fd")
def test_best_and_last_written_together_cost_three_fsyncs(tmp_path, monkeypatch):
    """Each file is fsynced before its rename; the run directory once, after both
    renames (it was fsynced after each: four fsyncs for the pair at every checkpoint)."""
    import os

    from gpubp.checkpoint import load_checkpoint

    run = tmp_path / "run"
    trainer = T.Trainer(load_config(None, BASE + TASKS["regression"]), str(run), device="cpu", quiet=True)
    trainer.best, trainer.best_written = trainer.checkpoint(), False  # a better evaluation not yet on disk
    synced, real = [], os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    trainer._write_checkpoints()
    monkeypatch.undo()
    names = [os.path.basename(p) for p in synced]
    assert len(names) == 3 and names[0].startswith(".tmp-best.npz-") and names[1].startswith(".tmp-last.npz-")
    assert synced[2] == str(run.resolve())
    for name in ("best.npz", "last.npz"):
        assert load_checkpoint(str(run / name))[0]["step"] == 0
