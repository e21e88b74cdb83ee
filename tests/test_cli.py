"""The command line through real subprocesses: training, eval, predict, config, plot, errors."""

import json

import numpy as np
import pytest

from .conftest import run_cli


def test_digits_default_job_reaches_097(tmp_path):
    out = tmp_path / "run"
    r = run_cli("--config", "configs/digits.toml", "--device", "cpu", "--out", str(out), module="train.py")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    print(f"digits test accuracy: {summary['test_accuracy']:.4f} ({summary['seconds']} s)")
    assert summary["test_accuracy"] >= 0.97
    for name in ("metrics.jsonl", "summary.json", "last.npz", "config.toml"):
        assert (out / name).exists(), name
    assert not (out / "best.npz").exists()  # val_fraction = 0: nothing to choose a best on (never the training loss)
    assert json.loads((out / "summary.json").read_text()) == summary
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 30 and json.loads(lines[-1])["step"] == summary["steps"]

    # eval of the last checkpoint agrees with the summary
    r = run_cli("eval", "--checkpoint", str(out / "last.npz"), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout)
    assert ev["test_accuracy"] == summary["test_accuracy"]
    assert abs(ev["test_loss"] - summary["test_loss"]) <= 1e-6 * summary["test_loss"]
    # per-class report: the confusion matrix holds every test sample, its trace the correct ones
    cm = np.array(ev["test_report"]["confusion_matrix"])
    assert cm.shape == (10, 10) and np.trace(cm) / cm.sum() == ev["test_accuracy"]
    assert ev["test_report"] == summary["test_report"] and "confusion matrix" in r.stderr
    assert summary["run_dir"] == str(out)

    # predict on raw (unstandardised) digits, as a user would feed them
    from gpubp.data import load_digits

    ds = load_digits()
    np.save(tmp_path / "x.npy", ds.x[:50])
    r = run_cli("predict", "--checkpoint", str(out / "last.npz"), "--input", str(tmp_path / "x.npy"),
                "--output", str(tmp_path / "p.csv"), "--device", "cpu")  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0] == "prediction," + ",".join(f"p_{c}" for c in range(10)) and len(rows) == 51
    pred = np.array([int(line.split(",")[0]) for line in rows[1:]])
    assert np.mean(pred == ds.y[:50]) >= 0.9
    p = np.array([[float(v) for v in line.split(",")[1:]] for line in rows[1:]])
    assert np.allclose(p.sum(axis=1), 1.0, atol=1e-5) and np.array_equal(p.argmax(axis=1), pred)
    # the output exists now: refused without --overwrite, nothing changed
    before = (tmp_path / "p.csv").read_bytes()
    r = run_cli("predict", "--checkpoint", str(out / "last.npz"), "--input", str(tmp_path / "x.npy"),
                "--output", str(tmp_path / "p.csv"), "--device", "cpu")  # fmt: skip
    assert r.returncode == 2 and "exists; pass --overwrite" in r.stderr
    assert (tmp_path / "p.csv").read_bytes() == before

    # an existing run directory is never overwritten silently
    r = run_cli("--config", "configs/digits.toml", "--device", "cpu", "--out", str(out), module="train.py")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"gpubp: error: output directory {str(out)!r} already holds a run; pass --overwrite to replace it, "
        "--resume to continue it, or --out to choose another directory"
    ]


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    r = run_cli("train", "--config", "configs/spirals.toml", "--device", "cpu", "--out", str(out), "--quiet",
                "--set", "train.epochs=3", "--set", "train.early_stopping_patience=0")  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = run_cli("plot", str(out))
    assert r.returncode == 0, r.stderr
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # never over an existing PNG without --overwrite
    r = run_cli("plot", str(out))
    assert r.returncode == 2 and "exists; pass --overwrite" in r.stderr
    assert (out / "curves.png").read_bytes() == png
    r = run_cli("plot", str(out), "--overwrite", "--output", str(tmp_path / "again.png"))
    assert r.returncode == 0 and (tmp_path / "again.png").read_bytes()[:4] == b"\x89PNG"


def test_config_show_prints_every_default():
    r = run_cli("config", "show", "configs/regression.toml", "--set", "optimizer.lr=0.5")
    assert r.returncode == 0, r.stderr
    assert "lr = 0.5" in r.stdout and "clip_grad_norm = 0.0" in r.stdout and "[schedule]" in r.stdout


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["train", "--config", "missing.toml"], 2, "gpubp: error: config file 'missing.toml' not found"),
        (
            ["train", "--config", "configs/digits.toml", "--set", "optimizer.lrr=1"],
            2,
            "unknown key 'optimizer.lrr'; did you mean 'optimizer.lr'?",
        ),
        (
            ["train", "--config", "configs/digits.toml", "--set", "train.batch_size=0"],
            2,
            "train.batch_size: must be >= 1, got 0",
        ),
        (
            ["train", "--config", "configs/digits.toml", "--set", "train.epochs=x"],
            2,
            "train.epochs: expected an integer, got 'x' (str)",
        ),
        (["train"], 2, "give --config FILE"),
        (["eval", "--checkpoint", "nothing.npz"], 2, "checkpoint 'nothing.npz' not found"),
    ],
)
def test_errors_are_one_line_with_exit_code(args, code, message, tmp_path):
    r = run_cli(*args, "--out", str(tmp_path / "o")) if args[0] == "train" else run_cli(*args)
    assert r.returncode == code
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_gpu_device_is_refused_without_a_gpu(tmp_path):
    from .conftest import has_gpu

    if has_gpu():
        pytest.skip("this machine has a GPU")
    r = run_cli("train", "--config", "configs/digits.toml", "--device", "gpu", "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert r.stderr.startswith("gpubp: error: --device gpu: no usable GPU")
    assert not (tmp_path / "o").exists()


def test_help_on_every_command():
    for cmd in ([], ["train"], ["eval"], ["predict"], ["config", "show"], ["plot"]):
        r = run_cli(*cmd, "--help")
        assert r.returncode == 0 and "Usage:" in r.stdout, cmd
    r = run_cli("--help", module="train.py")
    assert r.returncode == 0 and "--config" in r.stdout


def test_regression_csv_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(300, 3))
    y = x @ [1.0, -2.0, 0.5] + 0.1
    with open(tmp_path / "d.csv", "w") as f:
        f.write("a,b,c,target\n")
        for row, t in zip(x, y):
            f.write(",".join(f"{v:.6f}" for v in row) + f",{t:.6f}\n")
    (tmp_path / "c.toml").write_text(
        '[data]\ndataset = "csv"\npath = "d.csv"\nlabel_column = "target"\ntask = "regression"\n'
        '[model]\nhidden = []\n[loss]\nname = "mse"\n[optimizer]\nname = "sgd"\nlr = 0.1\n[train]\nepochs = 40\n'
    )
    out = tmp_path / "run"
    r = run_cli("train", "--config", str(tmp_path / "c.toml"), "--device", "cpu", "--out", str(out), "--quiet",
                cwd=str(tmp_path))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["test_loss"] < 1e-4  # a linear target, a linear model
    r = run_cli("predict", "--checkpoint", str(out / "best.npz"), "--input", str(tmp_path / "d.csv"),
                "--output", str(tmp_path / "p.npy"), "--device", "cpu")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert np.allclose(np.load(tmp_path / "p.npy")[:, 0], y, atol=0.02)


def test_device_note_once_per_run_not_per_command(tmp_path):
    """--device auto without a GPU: train says so once per run; eval and predict say
    nothing about a device chosen as usual, and one line (once per command) when the
    model was trained on a GPU and now runs on the CPU, a fallback the user must know."""
    from gpubp.checkpoint import load_checkpoint, save_checkpoint

    from .conftest import has_gpu

    if has_gpu():
        pytest.skip("--device auto takes the GPU here: there is no fallback to note")
    out = tmp_path / "run"
    r = run_cli("train", "--config", "configs/spirals.toml", "--out", str(out), "--set", "train.epochs=2",
                "--set", "train.early_stopping_patience=0")  # fmt: skip  # --device auto, the default
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if line.startswith("device")]
    assert len(notes) == 1 and notes[0].startswith("device auto: using the CPU (")
    np.save(tmp_path / "x.npy", np.zeros((3, 2)))

    def device_lines(checkpoint, *device):
        lines = []
        for cmd in (["eval", "--checkpoint", checkpoint],
                    ["predict", "--checkpoint", checkpoint, "--input", str(tmp_path / "x.npy"),
                     "--output", str(tmp_path / "p.csv"), "--overwrite"]):  # fmt: skip
            r = run_cli(*cmd, *device)
            assert r.returncode == 0, r.stderr
            lines.append([line for line in r.stderr.splitlines() if line.startswith("device")])
        return lines

    assert device_lines(str(out / "last.npz")) == [[], []]  # trained on the CPU, evaluated on the CPU: no news
    # the same model as a GPU wrote it (its meta names the device), read where auto finds no GPU
    meta, arrays = load_checkpoint(str(out / "last.npz"))
    meta["device"] = "gpu (NVIDIA H100 80GB HBM3, CuPy 13.6.0)"
    save_checkpoint(str(tmp_path / "gpu.npz"), meta, arrays)
    for lines in device_lines(str(tmp_path / "gpu.npz")):
        assert len(lines) == 1 and lines[0].startswith("device auto: using the CPU (")
        assert lines[0].endswith("; the model was trained on gpu (NVIDIA H100 80GB HBM3, CuPy 13.6.0)")
    assert device_lines(str(tmp_path / "gpu.npz"), "--device", "cpu") == [[], []]  # the CPU asked for: no news
