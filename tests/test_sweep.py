"""Sweeps: model i of a sweep run is the single run with model i's settings (bitwise on
the CPU, 200 steps), a diverging member is frozen while the others go on, and the
per-model checkpoints work with eval, predict and --resume."""

from __future__ import annotations

import contextlib
import csv
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from gpubp.checkpoint import load_checkpoint
from gpubp.cli import main
from gpubp.config import load_config
from gpubp.sweep_trainer import SweepTrainer, model_dir
from gpubp.trainer import Trainer

BASE = """
[data]
dataset = "digits"
val_fraction = 0.2
[model]
hidden = [{hidden}]
residual = {residual}
dtype = "{dtype}"
[optimizer]
name = "{opt}"
momentum = {momentum}
[schedule]
name = "cosine"
warmup_steps = 10
[train]
steps = 200
batch_size = 32
eval_every = 50
device = "cpu"
"""


def _config(tmp_path, sweep, opt="sgd", momentum=0.9, hidden="16", residual="false", dtype="float64"):
    path = tmp_path / "sweep.toml"
    path.write_text(BASE.format(opt=opt, momentum=momentum, hidden=hidden, residual=residual, dtype=dtype) + sweep)
    return str(path)


def _single(tmp_path, member, name):
    out = str(tmp_path / name)
    cfg = member.cfg
    trainer = Trainer(cfg, out, device="cpu", quiet=True)
    trainer.train()
    return out


def _params(path):
    return load_checkpoint(path)[1]["params"]


def _check_equal_to_single_runs(tmp_path, path, members_to_check=None):
    cfg = load_config(path)
    run = str(tmp_path / "sweep-run")
    summary = SweepTrainer(cfg, run, device="cpu", quiet=True).train()
    members = cfg.sweep.members if members_to_check is None else [cfg.sweep.members[i] for i in members_to_check]
    for m in members:
        single = _single(tmp_path, m, f"single-{m.index}")
        for name in ("last.npz", "best.npz"):
            a, b = (
                load_checkpoint(os.path.join(model_dir(run, m.index), name)),
                load_checkpoint(os.path.join(single, name)),
            )
            assert a[0]["step"] == b[0]["step"] and a[0]["best_step"] == b[0]["best_step"], (m.index, name)
            for key in b[1]:
                np.testing.assert_array_equal(a[1][key], b[1][key], err_msg=f"model {m.index} {name} {key}")
        # the logged rows of model i are the single run's (but for the time)
        mine = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
        mine = [
            {k: v for k, v in r.items() if k not in ("model", "group", "elapsed_s")}
            for r in mine
            if r["model"] == m.index
        ]
        theirs = [
            {k: v for k, v in json.loads(line).items() if k != "elapsed_s"}
            for line in open(os.path.join(single, "metrics.jsonl"))
        ]
        assert mine == theirs
        ssum = json.load(open(os.path.join(single, "summary.json")))
        msum = json.load(open(os.path.join(model_dir(run, m.index), "summary.json")))
        for key in ("test_loss", "test_accuracy", "val_loss", "train_loss", "best_step"):
            assert msum[key] == ssum[key], (m.index, key)
    return run, summary


def ctrl_c_at(group: int, step: int):
    """A stand-in for sweep_trainer.catch_sigint: Ctrl-C comes at step `step` of the
    `group`-th group the sweep trains (both 1-based)."""
    calls = {"n": 0}

    @contextlib.contextmanager
    def fake():
        calls["n"] += 1
        counter = {"step": 0}

        def hit():
            counter["step"] += 1
            return calls["n"] == group and counter["step"] == step

        yield hit

    return fake


def test_sgd_momentum_grid_lr_seed_wd_is_bitwise_the_single_runs(tmp_path):
    path = _config(
        tmp_path,
        '[sweep]\n"optimizer.lr" = [0.01, 0.05]\n"train.seed" = [0, 3]\n"optimizer.weight_decay" = [0, 1e-3]\n',
    )
    run, summary = _check_equal_to_single_runs(tmp_path, path, members_to_check=[0, 3, 5, 6])
    assert summary["models"] == 8 and summary["groups"] == 1 and summary["diverged"] == []
    rows = list(csv.DictReader(open(os.path.join(run, "sweep.csv"))))
    assert [int(r["model"]) for r in rows] == list(range(8))
    best = min(rows, key=lambda r: float(r["best_value"]))
    assert summary["best_model"] == int(best["model"])
    np.testing.assert_array_equal(
        _params(os.path.join(run, "best.npz")), _params(os.path.join(model_dir(run, summary["best_model"]), "best.npz"))
    )


def test_each_distinct_schedule_is_computed_once_per_table_of_steps(tmp_path, monkeypatch):
    """The step tables' learning rates (Group.lr_rows, 1024 steps per upload): one
    schedule call per distinct (rate, schedule) for the whole chunk, not one per model and
    step (a 64-model sweep once spent about half a second of Python per upload there);
    each model still gets its own rates, those of a single run (lr_at, step by step)."""
    from gpubp import schedules
    from gpubp.sweep_group import Group

    path = _config(tmp_path, '[sweep]\n"optimizer.lr" = [0.01, 0.05, 0.2]\n"train.seed" = [0, 1, 2, 3]\n')
    cfg = load_config(path)
    (members,) = cfg.sweep.groups()
    group = Group(0, members, "cpu", lambda *a: None)
    calls = []
    real = schedules.lr_table
    monkeypatch.setattr(schedules, "lr_table", lambda t, *a, **kw: calls.append(len(t)) or real(t, *a, **kw))
    group.schedules = [  # the group's own schedules, their calls counted
        type(lr)(schedules.lr_table, *lr.args, **lr.keywords) for lr in group.schedules
    ]
    rows = group.lr_rows(5, 1024)
    assert calls == [1024] * 3 and rows.shape == (1024, 12)
    for i, m in enumerate(members):
        s = m.cfg.schedule
        expected = [schedules.lr_at(t, m.cfg.optimizer.lr, s.name, group.total_steps, s.warmup_steps, s.step_size,
                                    s.gamma, s.min_lr) for t in range(5, 5 + 1024)]  # fmt: skip
        assert rows[:, i].tolist() == expected, i


def test_adamw_grid_with_residual_layers_float32_is_bitwise_the_single_runs(tmp_path):
    path = _config(tmp_path, '[sweep]\n"optimizer.lr" = [1e-3, 1e-2]\n"train.seed" = [1, 2]\n"optimizer.weight_decay" = [0, 0.1]\n',
                   opt="adamw", momentum=0.0, hidden="16, 16", residual="true", dtype="float32")  # fmt: skip
    _check_equal_to_single_runs(tmp_path, path, members_to_check=[1, 2, 7])


def test_clipping_a_float64_model_of_over_10000_parameters_is_bitwise_the_single_run(tmp_path):
    """The clipping norm's DOT: OpenBLAS splits a float64 DOT of over 10,000 elements over
    its threads, with other bits; the sweep's blocks and the single run both take it on
    one thread (sum_squares), so clipping keeps a member bitwise its single run whatever
    the thread count (12,010 parameters here)."""
    path = _config(tmp_path, '[sweep]\n"optimizer.lr" = [0.01, 0.05]\n"optimizer.clip_grad_norm" = [0.1]\n',
                   hidden="160", dtype="float64")  # fmt: skip
    _check_equal_to_single_runs(tmp_path, path)


def test_a_diverging_member_is_frozen_and_reported_the_others_go_on(tmp_path):
    path = _config(
        tmp_path,
        '[sweep]\nmode = "zip"\n"optimizer.lr" = [0.05, 1e6, 0.02]\n"train.seed" = [0, 0, 1]\n"optimizer.clip_grad_norm" = [0.5, 0, 0]\n',
    )
    cfg = load_config(path)
    run = str(tmp_path / "run")
    logs = []
    summary = SweepTrainer(cfg, run, device="cpu", log=logs.append).train()
    assert summary["diverged"] == [1]
    # the single run with lr 1e6 stops with the step the sweep reports
    from gpubp.errors import TrainingError

    with pytest.raises(TrainingError) as e:
        Trainer(cfg.sweep.members[1].cfg, str(tmp_path / "single-1"), device="cpu", quiet=True).train()
    step = str(e.value).split("non-finite at step ")[1].split(" ")[0]
    assert any(
        f"model 1 (optimizer.lr=1e+06 train.seed=0 optimizer.clip_grad_norm=0) diverged: non-finite loss or gradient at step {step} "
        in m
        for m in logs
    )
    rows = {int(r["model"]): r for r in csv.DictReader(open(os.path.join(run, "sweep.csv")))}
    assert rows[1]["status"] == f"diverged at step {step}" and rows[0]["status"] == rows[2]["status"] == "ok"
    for i in (0, 2):  # the others: as if the diverging model had never been there
        single = _single(tmp_path, cfg.sweep.members[i], f"single-{i}")
        np.testing.assert_array_equal(
            _params(os.path.join(model_dir(run, i), "last.npz")), _params(os.path.join(single, "last.npz"))
        )
        assert summary["best_model"] in (0, 2)
    steps = [
        json.loads(line)["step"] for line in open(os.path.join(run, "metrics.jsonl")) if json.loads(line)["model"] == 1
    ]
    assert all(s < int(step) for s in steps)


def test_shape_groups_each_train(tmp_path):
    path = _config(tmp_path, '[sweep]\n"model.hidden" = [[8], [12, 12]]\n"optimizer.lr" = [0.01, 0.02]\n')
    cfg = load_config(path)
    summary = SweepTrainer(cfg, str(tmp_path / "run"), device="cpu", quiet=True).train()
    assert summary["groups"] == 2
    for m in cfg.sweep.members:
        meta, arrays = load_checkpoint(os.path.join(model_dir(str(tmp_path / "run"), m.index), "last.npz"))
        assert meta["model"]["sizes"][1:-1] == m.cfg.model.hidden


def test_cli_train_eval_predict_resume_with_sweep_checkpoints(tmp_path):
    path = _config(tmp_path, '[sweep]\n"optimizer.lr" = [0.01, 0.05]\n"train.seed" = [0, 1]\n')
    run = str(tmp_path / "run")
    runner = CliRunner()
    result = runner.invoke(main, ["train", "--config", path, "--out", run, "--quiet"])
    assert result.exit_code == 0, result.output
    assert "optimizer.lr" in result.output.splitlines()[0] and len(result.output.splitlines()[0].split()) > 4
    again = runner.invoke(main, ["train", "--config", path, "--out", run, "--quiet"])
    assert again.exit_code == 2 and "already holds a run" in again.output
    ckpt = os.path.join(model_dir(run, 3), "best.npz")
    result = runner.invoke(main, ["eval", "--checkpoint", ckpt, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    summary = json.load(open(os.path.join(model_dir(run, 3), "summary.json")))
    # best.npz is the model at its best step; the summary's numbers are the final ones: equal when best is last
    if summary["best_step"] == summary["steps"]:
        assert json.loads(result.stdout)["test_accuracy"] == summary["test_accuracy"]
    x = np.random.default_rng(0).standard_normal((5, 64))
    np.save(tmp_path / "x.npy", x)
    result = runner.invoke(main, ["predict", "--checkpoint", ckpt, "--input", str(tmp_path / "x.npy"),
                                  "--output", str(tmp_path / "p.npy"), "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output and np.load(tmp_path / "p.npy").shape == (5, 10)
    # resume model 2 for 50 more steps = the single run of 200 steps resumed the same way
    cfg = load_config(path).sweep.members[2].cfg
    single = _single(tmp_path, type("M", (), {"cfg": cfg})(), "single-2")
    for src, out in (
        (os.path.join(model_dir(run, 2), "last.npz"), "r"),
        (os.path.join(single, "last.npz"), "r-single"),
    ):
        result = runner.invoke(
            main, ["train", "--resume", src, "--set", "train.steps=250", "--out", str(tmp_path / out), "--quiet"]
        )
        assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(
        _params(str(tmp_path / "r" / "last.npz")), _params(str(tmp_path / "r-single" / "last.npz"))
    )
    last = os.path.join(model_dir(run, 2), "last.npz")
    result = runner.invoke(main, ["train", "--config", path, "--resume", last, "--out", run])
    assert result.exit_code == 2 and "a model continues alone from RUN/models/mNNN/last.npz" in result.output


def _small_sweep(tmp_path, table='[sweep]\n"optimizer.lr" = [0.02, 0.05, 1e6]\n"train.seed" = [0]\n'):
    path = _config(tmp_path, table)
    run = str(tmp_path / "run")
    SweepTrainer(load_config(path, ["train.steps=60"]), run, device="cpu", quiet=True).train()
    return run


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_predict_and_eval_ensemble_average_the_members(tmp_path):
    run = _small_sweep(tmp_path)  # model 2 diverges and is left out of the ensemble
    runner = CliRunner()
    x = np.random.default_rng(1).standard_normal((7, 64))
    np.save(tmp_path / "x.npy", x)
    singles = []
    for i in (0, 1):
        out = str(tmp_path / f"p{i}.npy")
        ckpt = os.path.join(model_dir(run, i), "best.npz")
        r = runner.invoke(main, ["predict", "--checkpoint", ckpt, "--input", str(tmp_path / "x.npy"), "--output", out, "--device", "cpu", "--logits"])  # fmt: skip
        assert r.exit_code == 0, r.output
        singles.append(_softmax(np.load(out)))  # --logits: the raw outputs, softmax taken here
    out = str(tmp_path / "ens.npy")
    r = runner.invoke(main, ["predict", "--checkpoint", run, "--ensemble", "--input", str(tmp_path / "x.npy"), "--output", out, "--device", "cpu"])  # fmt: skip
    assert r.exit_code == 0, r.output
    np.testing.assert_allclose(np.load(out), (singles[0] + singles[1]) / 2, rtol=1e-12, atol=1e-15)
    r = runner.invoke(main, ["eval", "--checkpoint", run, "--ensemble", "--split", "test", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)["splits"][0]
    assert [m["checkpoint"] for m in report["members"]] == [os.path.join(model_dir(run, i), "best.npz") for i in (0, 1)]
    for member in report["members"]:  # one seed: the members' split is their own test split
        single = runner.invoke(
            main, ["eval", "--checkpoint", member["checkpoint"], "--split", "test", "--device", "cpu"]
        )
        assert member["accuracy"] == json.loads(single.stdout)["test_accuracy"]
    assert 0.5 < report["ensemble"]["accuracy"] <= 1.0 and "note" not in report
    r = runner.invoke(main, ["eval", "--checkpoint", str(tmp_path), "--ensemble", "--device", "cpu"])
    assert r.exit_code == 2 and "holds no models/mNNN/best.npz" in r.output


def test_plot_draws_a_sweep(tmp_path):
    pytest.importorskip("matplotlib")
    run = _small_sweep(tmp_path)
    r = CliRunner().invoke(main, ["plot", run])
    assert r.exit_code == 0, r.output
    assert os.path.getsize(os.path.join(run, "curves.png")) > 10_000


def test_the_readme_sweep_runs_in_one_command_and_prints_its_table(tmp_path):
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    assert "gpubp train --config configs/digits-sweep.toml" in readme
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "digits-sweep.toml")
    r = CliRunner().invoke(
        main, ["train", "--config", config, "--set", "train.epochs=1", "--out", str(tmp_path / "r"), "--quiet"]
    )
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split()[:4] == ["model", "optimizer.lr", "train.seed", "best_step"]
    rows = [line.split() for line in lines[1:17]]
    assert [(float(row[1]), int(row[2])) for row in rows] == [
        (lr, s) for lr in (3e-4, 1e-3, 3e-3, 1e-2) for s in range(4)
    ]
    assert all(row[-1] == "ok" for row in rows)


def test_ctrl_c_saves_every_model_and_exits_130(tmp_path, monkeypatch):
    import gpubp.sweep_trainer as ST

    @contextlib.contextmanager
    def flag_after_first_step():
        yield lambda: True  # as if Ctrl-C came during the first step

    monkeypatch.setattr(ST, "catch_sigint", flag_after_first_step)
    path = _config(tmp_path, '[sweep]\n"optimizer.lr" = [0.01, 0.05]\n')
    run = str(tmp_path / "run")
    r = CliRunner().invoke(main, ["train", "--config", path, "--out", run, "--quiet"])
    assert r.exit_code == 130 and "interrupted at step 1 of group 1" in r.output, r.output
    for i in (0, 1):
        meta, arrays = load_checkpoint(os.path.join(model_dir(run, i), "last.npz"))
        assert meta["step"] == 1 and meta["optimizer_steps"] == 1
    # continuing model 1 alone gives the single run's result
    last = os.path.join(model_dir(run, 1), "last.npz")
    r = CliRunner().invoke(main, ["train", "--resume", last, "--out", str(tmp_path / "cont"), "--quiet"])
    assert r.exit_code == 0, r.output
    single = _single(tmp_path, load_config(path).sweep.members[1], "single-1")
    np.testing.assert_array_equal(
        _params(str(tmp_path / "cont" / "last.npz")), _params(os.path.join(single, "last.npz"))
    )

    # and the same first log row: the loss summed before Ctrl-C was saved with the checkpoint
    def first_row(folder):
        row = json.loads(open(os.path.join(folder, "metrics.jsonl")).readline())
        row.pop("elapsed_s")
        return row

    assert first_row(str(tmp_path / "cont")) == first_row(single)


def test_a_sweep_resumed_from_its_directory_ends_as_an_uninterrupted_one(tmp_path, monkeypatch):

    import gpubp.sweep_trainer as ST

    table = '[sweep]\n"optimizer.lr" = [0.05, 1e6, 0.01]\n"train.seed" = [0, 1]\n"model.hidden" = [[8], [12]]\n'
    path = _config(tmp_path, table)
    whole = str(tmp_path / "whole")
    SweepTrainer(load_config(path), whole, device="cpu", quiet=True).train()
    # the same sweep, stopped by Ctrl-C at step 120 of the second group (after a divergence in both)
    monkeypatch.setattr(ST, "catch_sigint", ctrl_c_at(2, 120))
    run = str(tmp_path / "run")
    runner = CliRunner()
    r = runner.invoke(main, ["train", "--config", path, "--out", run, "--quiet"])
    assert r.exit_code == 130 and f"continue the sweep with --resume {run}" in r.output, r.output
    monkeypatch.undo()
    r = runner.invoke(main, ["train", "--resume", run, "--quiet"])
    assert r.exit_code == 0, r.output
    for m in load_config(path).sweep.members:
        for name in ("last.npz", "best.npz"):
            a, b = os.path.join(model_dir(run, m.index), name), os.path.join(model_dir(whole, m.index), name)
            assert os.path.exists(a) == os.path.exists(b), (m.index, name)
            if os.path.exists(b):
                np.testing.assert_array_equal(_params(a), _params(b), err_msg=f"model {m.index} {name}")

    def rows(folder):
        out = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
        return sorted(
            ({k: v for k, v in r.items() if k != "elapsed_s"} for r in out),
            key=lambda r: (r["group"], r["step"], r["model"]),
        )

    assert rows(run) == rows(whole)
    assert open(os.path.join(run, "sweep.csv")).read() == open(os.path.join(whole, "sweep.csv")).read()
    # refusals: another --out, a changed sweep, a folder that holds no sweep
    r = runner.invoke(main, ["train", "--resume", run, "--out", str(tmp_path / "elsewhere")])
    assert r.exit_code == 2 and "continues in its own directory" in r.output
    r = runner.invoke(main, ["train", "--resume", run, "--set", "optimizer.name=adam"])
    assert r.exit_code == 2 and "optimizer.name" in r.output
    r = runner.invoke(main, ["train", "--resume", str(tmp_path)])
    assert r.exit_code == 2, r.output


def test_out_of_memory_names_the_stack_and_what_to_change(tmp_path, monkeypatch):
    from gpubp.stack import MLPStack

    def no_memory(self, *args, **kwargs):
        raise MemoryError

    path = _config(tmp_path, '[sweep]\n"optimizer.lr" = [0.01, 0.05, 0.1]\n')
    monkeypatch.setattr(MLPStack, "forward_backward", no_memory)
    r = CliRunner().invoke(main, ["train", "--config", path, "--out", str(tmp_path / "run"), "--quiet"])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert "out of memory on cpu" in r.output and "training 3 models [64, 16, 10] as one stack" in r.output
    assert "train fewer models at once" in r.output and "Traceback" not in r.output


def test_regression_ensemble_averages_the_members_outputs_in_the_targets_units(tmp_path):
    path = tmp_path / "reg.toml"
    path.write_text(
        '[data]\ndataset = "regression"\nn_samples = 200\nval_fraction = 0.2\n[model]\nhidden = [8]\n[loss]\n'
        'name = "mse"\n[train]\nepochs = 2\ndevice = "cpu"\n[sweep]\n"optimizer.lr" = [1e-3, 1e-2]\n'
    )
    run = str(tmp_path / "run")
    runner = CliRunner()
    assert runner.invoke(main, ["train", "--config", str(path), "--out", run, "--quiet"]).exit_code == 0
    np.save(tmp_path / "x.npy", np.random.default_rng(2).uniform(-1, 1, (6, 2)))
    outs = []
    for i, ckpt in enumerate(
        [os.path.join(model_dir(run, 0), "best.npz"), os.path.join(model_dir(run, 1), "best.npz"), run]
    ):
        extra = ["--ensemble"] if i == 2 else []
        r = runner.invoke(main, ["predict", "--checkpoint", ckpt, *extra, "--input", str(tmp_path / "x.npy"),
                                 "--output", str(tmp_path / f"p{i}.npy"), "--device", "cpu"])  # fmt: skip
        assert r.exit_code == 0, r.output
        outs.append(np.load(tmp_path / f"p{i}.npy"))
    np.testing.assert_allclose(outs[2], (outs[0] + outs[1]) / 2, rtol=1e-12, atol=1e-12)
