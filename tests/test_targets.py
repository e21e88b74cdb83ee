"""data.task = "auto", refused labels, standardised regression targets in user units."""

import json

import numpy as np
import pytest

from gpubp import targets as T
from gpubp.data import load_csv, load_npz
from gpubp.errors import DataError

from .conftest import run_cli


def write_csv(path, x, y):
    with open(path, "w") as f:
        f.write(",".join([f"f{j}" for j in range(x.shape[1])] + ["target"]) + "\n")
        for row, t in zip(x, y):
            f.write(",".join(repr(float(v)) for v in row) + f",{t}\n")


@pytest.mark.parametrize(
    "y,classes",
    [
        (np.repeat([0, 1, 2], 10), True),  # 3 <= max(2, min(50, 30 // 10))
        (np.repeat([1.0, 2.0, 5.0], 10), True),  # whole floats count as whole numbers
        (np.arange(30) % 4, True),  # codes 0..3: classes although 4 > 30 // 10
        (np.arange(30) % 4 + 1, False),  # 1..4 are not codes and 4 > 3
        (np.array([0.5, 1.0] * 20), False),  # not whole numbers
        (np.arange(442) % 214 + 25, False),  # diabetes-like: 214 whole numbers in 442 rows
        (np.array([True, False] * 5), True),
        (np.zeros((20, 2)), False),  # two target columns
    ],
)
def test_auto_rule(y, classes):
    assert T.auto_is_classification(y) is classes


def test_diabetes_target_is_regression_and_wine_classes():
    datasets = pytest.importorskip("sklearn.datasets")
    assert not T.auto_is_classification(datasets.load_diabetes().target)
    assert T.auto_is_classification(datasets.load_wine().target)
    assert T.auto_is_classification(datasets.load_breast_cancer().target)


def test_csv_whole_numbers_become_regression_with_auto(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 2))
    write_csv(tmp_path / "d.csv", x, (x[:, 0] * 40 + 100).round().astype(int))
    ds = load_csv(str(tmp_path / "d.csv"), "target", None)
    assert not ds.is_classification and ds.y.shape == (200, 1)
    np.savez(tmp_path / "d.npz", x=x, y=(x[:, 0] * 40 + 100).round().astype(np.int64))
    assert not load_npz(str(tmp_path / "d.npz"), None).is_classification


@pytest.mark.parametrize(
    "labels,message",
    [
        (np.zeros(20, dtype=int), "a single class"),
        (np.arange(20), "20 distinct labels in 20 rows cannot be classes"),
    ],
)
def test_labels_that_cannot_be_classes_are_refused(labels, message):
    with pytest.raises(DataError, match=message):
        T.check_classes(labels, "d.csv")


def test_refused_labels_exit_2_with_one_line(tmp_path):
    x = np.random.default_rng(0).normal(size=(40, 2))
    write_csv(tmp_path / "d.csv", x, [f"id{i}" for i in range(40)])  # text: classes, one per row
    (tmp_path / "c.toml").write_text('[data]\ndataset = "csv"\npath = "d.csv"\nlabel_column = "target"\n')
    r = run_cli("train", "--config", str(tmp_path / "c.toml"), "--device", "cpu", "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "40 distinct labels in 40 rows cannot be classes" in r.stderr and "data.task = 'regression'" in r.stderr
    assert not (tmp_path / "r").exists()


def test_scaler_round_trip_and_checkpoint_arrays():
    y = np.random.default_rng(1).normal(5.0, 3.0, size=(50, 2))
    s = T.TargetScaler.fit(y)
    t = s.transform(y)
    # float64: a few ulps of |y| ~ 10
    assert np.allclose(t.mean(axis=0), 0.0, atol=1e-12) and np.allclose(t.std(axis=0), 1.0, atol=1e-12)
    assert np.allclose(s.inverse(t), y, rtol=1e-13, atol=1e-12)
    again = T.TargetScaler.from_arrays(s.arrays())
    assert np.array_equal(again.mean, s.mean) and np.array_equal(again.std, s.std)
    ident = T.TargetScaler.from_arrays({}, 2)  # a checkpoint without them: identity
    assert np.array_equal(ident.inverse(y), y)


def test_class_probabilities_closed_forms():
    out = np.array([[0.0, np.log(3.0)], [2.0, 2.0]])
    # softmax: [1, 3] / 4 and [1/2, 1/2]
    assert np.allclose(T.class_probabilities(out, "softmax_cross_entropy"), [[0.25, 0.75], [0.5, 0.5]], atol=1e-15)
    # one logit: sigmoid(log 3) = 3/4 is class 1's probability
    p = T.class_probabilities(np.array([[np.log(3.0)]]), "binary_cross_entropy")
    assert np.allclose(p, [[0.25, 0.75]], atol=1e-15)
    assert T.predicted_classes(np.array([[0.2], [-0.1]]), 0.0).tolist() == [1, 0]
    assert T.predicted_classes(out[:1], 0.0).tolist() == [1]


def test_regression_csv_trains_on_standardised_targets_and_reports_user_units(tmp_path):
    """Targets around 1000 with spread 50: the summary's RMSE and predict's values are in
    those units (checked against predictions computed here from predict's output)."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(400, 3))
    y = 1000.0 + 50.0 * (x @ [1.0, -0.5, 0.25]) + rng.normal(0, 1.0, 400)
    write_csv(tmp_path / "d.csv", x, [f"{v:.6f}" for v in y])
    (tmp_path / "c.toml").write_text(
        '[data]\ndataset = "csv"\npath = "d.csv"\nlabel_column = "target"\n[model]\nhidden = []\n'
        "[train]\nepochs = 150\nbatch_size = 32\n[optimizer]\nlr = 0.01\n"
    )
    out = tmp_path / "run"
    r = run_cli("train", "--config", str(tmp_path / "c.toml"), "--device", "cpu", "--out", str(out), cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "data.task auto: regression" in r.stderr and "--set data.task=classification" in r.stderr
    s = json.loads(r.stdout)
    assert s["task"] == "regression" and s["loss"] == "mse"
    assert s["test_r2"] > 0.99 and s["test_rmse"] < 2.0  # noise sd 1 in the targets' units
    config = (out / "config.toml").read_text()
    assert 'task = "regression"' in config and 'name = "mse"' in config  # "auto" as resolved
    r = run_cli("predict", "--checkpoint", str(out / "best.npz"), "--input", str(tmp_path / "d.csv"),
                "--output", str(tmp_path / "p.npy"), "--device", "cpu")  # fmt: skip
    assert r.returncode == 0, r.stderr
    pred = np.load(tmp_path / "p.npy")[:, 0]
    assert np.sqrt(np.mean((pred - y) ** 2)) < 2.0  # values in the targets' units, not standardised ones
    r = run_cli("eval", "--checkpoint", str(out / "best.npz"), "--device", "cpu")
    ev = json.loads(r.stdout)
    # the same weights (restore_best) and the same split: the same metrics, to float32 rounding of outputs
    assert abs(ev["test_rmse"] - s["test_rmse"]) <= 1e-6 * s["test_rmse"]
    assert abs(ev["test_r2"] - s["test_r2"]) <= 1e-6
