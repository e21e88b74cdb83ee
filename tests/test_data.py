"""Loaders, splits, standardisation and the per-epoch shuffle."""

import gzip
import hashlib
import struct
from importlib import resources

import numpy as np
import pytest

from gpubp import data as D
from gpubp.errors import DataError


def test_digits_is_the_vendored_uci_file():
    raw = resources.files("gpubp.vendored").joinpath("digits.csv.gz").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"
    ds = D.load_digits()
    assert ds.x.shape == (1797, 64) and ds.y.shape == (1797,)
    assert ds.x.min() == 0 and ds.x.max() == 16
    assert np.bincount(ds.y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def write_idx(path, array, gz):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files(tmp_path, gz):
    rng = np.random.default_rng(0)
    xtr = rng.integers(0, 256, size=(20, 28, 28))
    ytr = np.arange(20) % 10
    xte = rng.integers(0, 256, size=(7, 28, 28))
    yte = np.arange(7)
    sfx = ".gz" if gz else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{sfx}", xtr, gz)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{sfx}", ytr, gz)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{sfx}", xte, gz)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{sfx}", yte, gz)
    ds = D.load_mnist(str(tmp_path))
    assert ds.x.shape == (20, 784) and ds.n_classes == 10
    assert np.allclose(ds.x, xtr.reshape(20, -1) / 255.0)
    assert np.array_equal(ds.test.y, yte)
    # truncate one file: a clear error, not a crash
    p = tmp_path / f"t10k-labels-idx1-ubyte{sfx}"
    data = (gzip.open if gz else open)(p, "rb").read()
    with (gzip.open if gz else open)(p, "wb") as f:
        f.write(data[:-2])
    with pytest.raises(DataError, match="expected 7 bytes"):
        D.load_mnist(str(tmp_path))


def test_npz_and_csv(tmp_path):
    x = np.arange(12.0).reshape(6, 2)
    np.savez(tmp_path / "a.npz", x=x, y=np.array([0, 1, 2, 0, 1, 2]))
    ds = D.load_npz(str(tmp_path / "a.npz"), None)
    assert ds.n_classes == 3 and np.array_equal(ds.x, x)
    np.savez(tmp_path / "r.npz", x_train=x, y_train=np.linspace(0, 1, 6), x_test=x[:2], y_test=np.zeros(2))
    ds = D.load_npz(str(tmp_path / "r.npz"), None)
    assert ds.n_classes is None and ds.y.shape == (6, 1) and len(ds.test) == 2
    (tmp_path / "c.csv").write_text("a,species,b\n1,cat,2\n3,dog,4\n5,cat,6\n")
    ds = D.load_csv(str(tmp_path / "c.csv"), "species", None)
    assert ds.class_names == ["cat", "dog"] and ds.y.tolist() == [0, 1, 0]
    assert ds.x.tolist() == [[1, 2], [3, 4], [5, 6]]
    (tmp_path / "m.csv").write_text("a,label\n1,0\n,1\n")
    with pytest.raises(DataError, match=r"m.csv:3: missing value in column 'a'"):
        D.load_csv(str(tmp_path / "m.csv"), "label", None)
    with pytest.raises(DataError, match="no column named 'y'"):
        D.load_csv(str(tmp_path / "c.csv"), "y", None)


@pytest.mark.parametrize(
    "x,y,classification,match",
    [
        (np.zeros((3, 2)), np.zeros(4, dtype=int), None, "x has 3 samples but y has 4"),
        (np.array([[1.0, np.nan]]), np.zeros(1, dtype=int), None, "feature 1 of sample 0 is nan"),
        (np.zeros((2, 2)), np.array([0, -1]), None, "negative"),
        (np.zeros((2, 2)), np.array([0.0, 1.5]), True, "not an integer"),
        (np.zeros((2, 2)), np.array([0.0, np.inf]), False, "target of sample 1 is not finite"),
        (np.zeros((0, 2)), np.zeros(0, dtype=int), None, "empty"),
    ],
)
def test_check_arrays_refuses_bad_data(x, y, classification, match):
    with pytest.raises(DataError, match=match):
        D.check_arrays(x, y, "test.npz", classification)


def test_stratified_split_keeps_class_proportions_and_is_seeded():
    ds = D.load_digits()
    s = D.split_dataset(ds, 0.1, 0.25, seed=0)
    assert len(s.train) + len(s.val) + len(s.test) == len(ds)
    assert abs(len(s.test) - 0.25 * len(ds)) <= 10  # one rounding per class
    for c in range(10):
        share = np.mean(s.test.y == c) / np.mean(ds.y == c)
        assert 0.9 < share < 1.1
    again = D.split_dataset(ds, 0.1, 0.25, seed=0)
    assert np.array_equal(s.test.x, again.test.x)
    other = D.split_dataset(ds, 0.1, 0.25, seed=1)
    assert not np.array_equal(s.test.x, other.test.x)
    # the splits are disjoint: no sample appears twice
    rows = {r.tobytes() + bytes([int(lab)]) for part in (s.train, s.val, s.test) for r, lab in zip(part.x, part.y)}
    assert len(rows) == len({r.tobytes() + bytes([int(lab)]) for r, lab in zip(ds.x, ds.y)})


def test_standardizer_uses_training_statistics_only():
    train = np.array([[1.0, 5.0], [3.0, 5.0]])
    std = D.Standardizer.fit(train)
    assert np.allclose(std(train), [[-1.0, 0.0], [1.0, 0.0]])  # constant column: centred only
    assert np.allclose(std(np.array([[5.0, 6.0]])), [[3.0, 1.0]])


def test_epoch_permutation_depends_on_seed_and_epoch_only():
    a = D.epoch_permutation(0, 3, 100)
    assert np.array_equal(a, D.epoch_permutation(0, 3, 100))
    assert sorted(a) == list(range(100))
    assert not np.array_equal(a, D.epoch_permutation(0, 4, 100))
    assert not np.array_equal(a, D.epoch_permutation(1, 3, 100))


def test_synthetic_sets():
    s = D.make_spirals(301, 3, 0.1, 0)
    assert s.x.shape == (301, 2) and np.bincount(s.y).tolist() == [101, 100, 100]
    r = D.make_regression(50, 3, 0.0, 0)
    expect = np.sin(np.pi * r.x).sum(1) / np.sqrt(3) + 0.5 * r.x[:, 0] * r.x[:, 2]
    assert np.allclose(r.y[:, 0], expect)


def test_label_column_auto_picks_a_known_name_else_the_last(tmp_path):
    """data.label_column = "auto" (the default): label, target, y or class, in that order,
    else the last column (a scikit-learn frame written out ends with 'target'); one note."""
    from gpubp.data import load_csv

    cases = {"a,target,b\n": ("target", [[1.0, 3.0], [4.0, 6.0]]), "a,b,label,y\n": ("label", [[1.0, 2.0, 4.0], [4.0, 5.0, 7.0]]),
             "a,b,out\n": ("out", [[1.0, 2.0], [4.0, 5.0]])}  # fmt: skip
    for header, (chosen, x) in cases.items():
        p = tmp_path / "d.csv"
        n_cols = header.count(",") + 1
        p.write_text(
            header + "".join(",".join(str(float(r * 3 + c + 1)) for c in range(n_cols)) + "\n" for r in range(2))
        )
        ds = load_csv(str(p), "auto", False)
        assert ds.label_column == chosen
        np.testing.assert_array_equal(ds.x, x)
        assert sum(f"using column {chosen!r} as the label" in n for n in ds.notes) == (chosen != "label")
    explicit = load_csv(str(p), "a", False)  # a named column: no note, no guessing
    assert explicit.label_column == "a" and not any("as the label" in n for n in explicit.notes)


def test_label_column_auto_skips_excluded_columns_and_resumes(tmp_path):
    """auto never picks a column listed in drop_columns / feature_columns, and a run whose
    config says auto resumes (the checkpoint holds the column auto chose)."""
    from gpubp.data import load_csv

    from .conftest import run_cli

    p = tmp_path / "d.csv"
    rng = np.random.default_rng(0)
    rows = "".join(f"{a:.3f},{b:.3f},{int(a > b)},{i}\n" for i, (a, b) in enumerate(rng.normal(size=(40, 2))))
    p.write_text("a,b,cls,id\n" + rows)
    assert load_csv(str(p), "auto", None, drop_columns=("id",)).label_column == "cls"
    (tmp_path / "c.toml").write_text('[data]\ndataset = "csv"\npath = "d.csv"\ndrop_columns = ["id"]\n'
                                     "[model]\nhidden = [4]\n[train]\nepochs = 2\n")  # fmt: skip
    out = str(tmp_path / "run")
    r = run_cli("train", "--config", str(tmp_path / "c.toml"), "--out", out, "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    r = run_cli("train", "--config", str(tmp_path / "c.toml"), "--out", out, "--device", "cpu", "--quiet",
                "--resume", f"{out}/last.npz", "--set", "train.epochs=4")  # fmt: skip
    assert r.returncode == 0, r.stderr
