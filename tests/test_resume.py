"""Resuming from a checkpoint repeats an uninterrupted run bit for bit (CPU)."""

import json

import numpy as np
import pytest

from gpubp.checkpoint import load_checkpoint
from gpubp.config import load_config
from gpubp.errors import ConfigError
from gpubp.trainer import Trainer

# step schedule with warmup: the rate depends on the step only, not on the run length
BASE = ["data.val_fraction=0.1", "train.eval_every=7", "schedule.name=step", "schedule.step_size=20",
        "schedule.gamma=0.5", "schedule.warmup_steps=5", "model.hidden=[32, 32]", "train.batch_size=50",
        "optimizer.clip_grad_norm=1.0"]  # fmt: skip


def run(tmp_path, name, overrides, resume=None, out=None):
    cfg = load_config("configs/digits.toml", BASE + overrides)
    trainer = Trainer(cfg, str(out or tmp_path / name), device="cpu", quiet=True, resume=resume)
    summary = trainer.train()
    return trainer, summary


def metrics(path):
    lines = [json.loads(line) for line in open(path)]
    for rec in lines:
        rec.pop("elapsed_s")
    return lines


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_resume_is_bitwise_exact(tmp_path, optimizer):
    opt = [f"optimizer.name={optimizer}", "optimizer.momentum=0.0" if optimizer == "adam" else "optimizer.momentum=0.9"]
    full, full_summary = run(tmp_path, "full", opt + ["train.steps=60"])
    # stop after 28 steps (mid-epoch: 28 batches of 50 is not a whole epoch of 1436), then resume to 60
    part, _ = run(tmp_path, "part", opt + ["train.steps=28"])
    assert part.step == 28
    resumed, resumed_summary = run(
        tmp_path, "part", opt + ["train.steps=60"], resume=str(tmp_path / "part" / "last.npz")
    )
    assert np.array_equal(resumed.model.flat_params, full.model.flat_params)
    for name in full.opt.state_names:
        assert np.array_equal(getattr(resumed.opt, name), getattr(full.opt, name))
    assert metrics(tmp_path / "part" / "metrics.jsonl") == metrics(tmp_path / "full" / "metrics.jsonl")
    for key in ("train_loss", "val_loss", "test_loss", "test_accuracy", "best_step"):
        assert resumed_summary[key] == full_summary[key]


def test_checkpoint_contents(tmp_path):
    trainer, _ = run(tmp_path, "r", ["train.steps=14"])
    meta, arrays = load_checkpoint(str(tmp_path / "r" / "last.npz"))
    assert meta["step"] == 14 and meta["rng"]["batch"] == 14 and meta["rng"]["epoch"] == 0
    assert np.array_equal(arrays["params"], trainer.model.flat_params)
    assert {"opt.exp_avg", "opt.exp_avg_sq", "std.mean", "std.std"} <= arrays.keys()
    assert meta["config"]["model"]["hidden"] == [32, 32]


def test_resume_refuses_a_different_model(tmp_path):
    run(tmp_path, "r", ["train.steps=7"])
    with pytest.raises(ConfigError, match="model.hidden is .* in the config but .* in the checkpoint"):
        run(tmp_path, "r2", ["train.steps=14", "model.hidden=[16]"], resume=str(tmp_path / "r" / "last.npz"))
