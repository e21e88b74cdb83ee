"""predict and eval --data through real subprocesses: columns matched by name, no row
ever dropped or eaten as a header, classes by name with their probabilities."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gpubp.checkpoint import load_checkpoint

from .conftest import run_cli

CLASSES = ["setosa", "versicolor", "virginica"]


def write_csv(path, header, rows):
    with open(path, "w") as f:
        f.write(",".join(header) + "\n" if header else "")
        for row in rows:
            f.write(",".join(str(v) for v in row) + "\n")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A 3-class model trained on a CSV with text labels and an id column left out."""
    tmp = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 3)).round(4)
    y = np.argmax(x @ np.array([[2.0, -1, 0], [0, 2, -1], [-1, 0, 2]]), axis=1)
    write_csv(tmp / "train.csv", ["id", "a", "b", "species", "c"],
              [[i, *x[i, :2], CLASSES[y[i]], x[i, 2]] for i in range(len(x))])  # fmt: skip
    (tmp / "c.toml").write_text('[data]\ndataset = "csv"\npath = "train.csv"\nlabel_column = "species"\n'
                                'drop_columns = ["id"]\n[train]\nepochs = 15\n')  # fmt: skip
    r = run_cli("train", "--config", str(tmp / "c.toml"), "--out", str(tmp / "run"), "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    return tmp, x, y


def predict(tmp, *args):
    return run_cli("predict", "--checkpoint", str(tmp / "run" / "best.npz"), "--device", "cpu", *args)


def read_out(path):
    lines = path.read_text().splitlines()
    rows = [line.split(",") for line in lines[1:]]
    return lines[0].split(","), [r[0] for r in rows], np.array([[float(v) for v in r[1:]] for r in rows])


def test_checkpoint_records_names(classifier):
    tmp, _, _ = classifier
    meta, arrays = load_checkpoint(str(tmp / "run" / "best.npz"))
    assert meta["feature_names"] == ["a", "b", "c"] and meta["label_column"] == "species"
    assert meta["class_names"] == CLASSES and "missing.mean" not in arrays


def test_columns_by_name_any_order(classifier):
    tmp, x, y = classifier
    write_csv(tmp / "same.csv", ["a", "b", "c"], x[:30])
    # the label column, blank or not, is read past like any extra column
    write_csv(tmp / "shuffled.csv", ["c", "note", "a", "species", "b"],
              [[r[2], "n", r[0], "" if i % 2 else "setosa", r[1]] for i, r in enumerate(x[:30])])  # fmt: skip
    np.save(tmp / "x.npy", x[:30])
    r = predict(tmp, "--input", str(tmp / "same.csv"), "--output", str(tmp / "same_p.csv"))
    assert r.returncode == 0, r.stderr
    r = predict(tmp, "--input", str(tmp / "shuffled.csv"), "--output", str(tmp / "shuffled_p.csv"))
    assert r.returncode == 0, r.stderr
    assert "ignored the columns the model does not use: note, species" in r.stderr
    assert (tmp / "same_p.csv").read_bytes() == (tmp / "shuffled_p.csv").read_bytes()
    header, labels, p = read_out(tmp / "same_p.csv")
    assert header == ["prediction"] + [f"p_{c}" for c in CLASSES] and len(labels) == 30
    assert labels == [CLASSES[i] for i in p.argmax(axis=1)]
    assert np.mean(np.array(labels) == np.array(CLASSES)[y[:30]]) >= 0.8
    # probabilities are the softmax of the raw outputs (--logits), computed here independently
    r = predict(tmp, "--input", str(tmp / "x.npy"), "--output", str(tmp / "logits.csv"), "--logits")
    assert r.returncode == 0, r.stderr
    header, labels_l, z = read_out(tmp / "logits.csv")
    assert header == ["prediction"] + [f"logit_{c}" for c in CLASSES] and labels_l == labels
    ref = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    assert np.allclose(p, ref, rtol=1e-5, atol=1e-6)  # float32 outputs written at float32 precision
    cells = [c for line in (tmp / "same_p.csv").read_text().splitlines()[1:] for c in line.split(",")[1:]]
    assert not any("e" in c.lower() for c in cells)  # plain decimal, never 1e-05


def test_missing_feature_and_headless_files_are_refused(classifier):
    tmp, x, _ = classifier
    write_csv(tmp / "lacks.csv", ["a", "c"], x[:5, [0, 2]])
    out = tmp / "never.csv"
    r = predict(tmp, "--input", str(tmp / "lacks.csv"), "--output", str(out))
    assert r.returncode == 2 and not out.exists()
    assert "no column named 'b', a feature of the model" in r.stderr and len(r.stderr.splitlines()) == 1
    write_csv(tmp / "headless.csv", None, x[:7])
    r = predict(tmp, "--input", str(tmp / "headless.csv"), "--output", str(out))
    assert r.returncode == 2 and not out.exists()
    assert "holds numbers, not column names" in r.stderr and "pass --no-header" in r.stderr
    r = predict(tmp, "--input", str(tmp / "headless.csv"), "--output", str(out), "--no-header")
    assert r.returncode == 0, r.stderr
    write_csv(tmp / "headed.csv", ["a", "b", "c"], x[:7])
    r = predict(tmp, "--input", str(tmp / "headed.csv"), "--output", str(tmp / "headed_p.csv"))
    assert out.read_bytes() == (tmp / "headed_p.csv").read_bytes()  # all 7 rows, the first one too


def test_eval_on_a_new_labelled_file(classifier):
    tmp, x, y = classifier
    names = np.array(CLASSES)[y[:50]]
    write_csv(tmp / "labelled.csv", ["species", "c", "b", "a"], [[names[i], *x[i, ::-1]] for i in range(50)])
    r = run_cli("eval", "--checkpoint", str(tmp / "run" / "best.npz"), "--data", str(tmp / "labelled.csv"),
                "--device", "cpu")  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    write_csv(tmp / "features.csv", ["a", "b", "c"], x[:50])
    predict(tmp, "--input", str(tmp / "features.csv"), "--output", str(tmp / "f_p.csv"))
    _, labels, p = read_out(tmp / "f_p.csv")
    assert result["data_rows"] == 50
    assert result["data_accuracy"] == np.mean(np.array(labels) == names)
    # cross-entropy from the written probabilities (float32-rounded: loose tolerance)
    ce = -np.mean(np.log(p[np.arange(50), [CLASSES.index(n) for n in names]]))
    assert abs(result["data_loss"] - ce) <= 1e-4 * max(ce, 1.0)
    write_csv(tmp / "alien.csv", ["species", "a", "b", "c"], [["daisy", *x[0]]])
    r = run_cli("eval", "--checkpoint", str(tmp / "run" / "best.npz"), "--data", str(tmp / "alien.csv"))
    assert r.returncode == 2 and "label 'daisy' in column 'species' (row 1) is not a class of the model" in r.stderr


def test_regression_output_in_plain_decimal_and_mean_fill(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, size=(200, 2))
    t = 1e-5 * (x @ [1.0, -2.0])  # tiny values: scientific notation would show
    rows = [[f"{a:.6f}", "" if i % 17 == 3 else f"{b:.6f}", f"{v:.10f}"] for i, ((a, b), v) in enumerate(zip(x, t))]
    write_csv(tmp_path / "r.csv", ["a", "b", "target"], rows)
    (tmp_path / "c.toml").write_text('[data]\ndataset = "csv"\npath = "r.csv"\nlabel_column = "target"\n'
                                     'task = "regression"\nmissing = "mean"\nval_fraction = 0.0\n'
                                     'test_fraction = 0.25\n[loss]\nname = "mse"\n'
                                     '[train]\nepochs = 2\n')  # fmt: skip
    r = run_cli("train", "--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "run"), "--device", "cpu",
                "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr
    ckpt = str(tmp_path / "run" / "last.npz")
    _, arrays = load_checkpoint(ckpt)
    fill = arrays["missing.mean"]
    # the fill is the mean over the training split's present values only (same seeded split)
    from gpubp import data as D

    ds = D.load_csv(str(tmp_path / "r.csv"), "target", False, missing="mean")
    train = D.split_dataset(ds, 0.0, 0.25, 0, True).train.x
    assert np.allclose(fill, np.nanmean(train, axis=0), rtol=1e-12, atol=0)  # float64 on both sides
    assert not np.allclose(fill, np.nanmean(ds.x, axis=0), rtol=1e-12, atol=0)
    write_csv(tmp_path / "new.csv", ["b", "a"], [["", "0.5"], [repr(float(fill[1])), "0.5"]])
    r = run_cli("predict", "--checkpoint", ckpt, "--input", str(tmp_path / "new.csv"), "--output",
                str(tmp_path / "p.csv"), "--device", "cpu")  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "target" and len(lines) == 3
    assert lines[1] == lines[2]  # the empty cell is filled with the stored training mean
    assert "e" not in lines[1] and float(lines[1]) == float(lines[1])
