"""gpubp/csvfile.py: both reading paths against numpy.loadtxt, the column rules, the
missing-value policies and the header rules."""

from __future__ import annotations

import os
import tempfile

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

from gpubp import csvfile
from gpubp import data as D
from gpubp.csvfile import read_table
from gpubp.errors import DataError


def write(tmp_path, text, name="d.csv", encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return str(path)


@pytest.fixture
def numeric(tmp_path):
    rng = np.random.default_rng(1)
    table = np.column_stack([rng.normal(size=(40, 3)).round(6), rng.integers(0, 3, 40)])
    text = "a,b,c,label\n" + "".join(",".join(repr(float(v)) for v in row) + "\n" for row in table)
    return text, table


def test_fast_and_exact_paths_read_what_loadtxt_reads(tmp_path, numeric):
    text, table = numeric
    fast = read_table(write(tmp_path, text), "d.csv", label="label")
    # a whitespace-only line makes numpy.loadtxt refuse the file: the exact path reads it
    lines = text.splitlines(keepends=True)
    exact = read_table(write(tmp_path, "".join(lines[:5] + ["  \n"] + lines[5:]), "e.csv"), "e.csv", label="label")
    ref = np.loadtxt(write(tmp_path, text, "r.csv"), delimiter=",", skiprows=1)
    for t in (fast, exact):
        assert t.feature_names == ["a", "b", "c"] and t.ignored == []
        assert np.array_equal(t.x, ref[:, :3]) and np.array_equal(t.labels, ref[:, 3])  # exact: same decimal text


def test_bom_delimiter_quotes_and_text_labels(tmp_path):
    text = 'a;"b";kind\n1;2.5;"x; y"\n3;4;z\n'
    t = read_table(write(tmp_path, "\ufeff" + text), "d.csv", delimiter=";", label="kind")
    assert t.feature_names == ["a", "b"]  # no BOM glued to 'a'
    assert t.x.tolist() == [[1, 2.5], [3, 4]] and t.labels.tolist() == ["x; y", "z"]
    tsv = read_table(write(tmp_path, "a\tb\tlabel\n1\t2\t0\n", "t.tsv"), "t.tsv", delimiter="\t", label="label")
    assert tsv.x.tolist() == [[1, 2]]
    with pytest.raises(DataError, match=r"header looks ';'-separated: set data.delimiter = ';'"):
        read_table(write(tmp_path, text, "s.csv"), "s.csv", label="kind")


def test_column_selection(tmp_path):
    path = write(tmp_path, "id,a,b,c,label\n7,1,2,3,0\n8,4,5,6,1\n")
    t = read_table(path, "d.csv", label="label", features=["c", "a"])
    assert t.feature_names == ["c", "a"] and t.x.tolist() == [[3, 1], [6, 4]] and t.ignored == ["id", "b"]
    t = read_table(path, "d.csv", label="label", drop=["id"])
    assert t.feature_names == ["a", "b", "c"] and t.x.tolist() == [[1, 2, 3], [4, 5, 6]]
    with pytest.raises(DataError, match="data.drop_columns names 'ID', which is not a column"):
        read_table(path, "d.csv", label="label", drop=["ID"])
    with pytest.raises(DataError, match="no column named 'd', data.feature_columns"):
        read_table(path, "d.csv", label="label", features=["a", "d"])
    with pytest.raises(DataError, match=r"column name 'a' appears twice \(columns 1 and 3\)"):
        read_table(write(tmp_path, "a,b,a,label\n1,2,3,0\n", "dup.csv"), "dup.csv", label="label")


def test_missing_value_policies(tmp_path):
    path = write(tmp_path, "a,b,label\n1,2,0\n3,,1\n5,NA,0\n7,8,1\n,?,\n")
    with pytest.raises(DataError, match=r"d.csv:3: missing value in column 'b'; fill it, or set data.missing"):
        read_table(path, "d.csv", label="label")
    t = read_table(path, "d.csv", label="label", missing="drop")
    assert t.x.tolist() == [[1, 2], [7, 8]] and t.labels.tolist() == [0, 1] and t.dropped == 3
    with pytest.raises(DataError, match=r"d.csv:6: missing label in column 'label'"):
        read_table(path, "d.csv", label="label", missing="mean")
    t = read_table(write(tmp_path, "a,b,label\n1,2,0\n3,,1\n5,NA,0\n7,8,1\n", "m.csv"), "m.csv", label="label",
                   missing="mean")  # fmt: skip
    assert np.array_equal(np.isnan(t.x), [[0, 0], [0, 1], [0, 1], [0, 0]])
    # a blank line is no row; a line of empty fields is a row of missing values, never skipped unasked
    t = read_table(write(tmp_path, "a,b\n1,2\n\n ,\n3,4\n", "b.csv"), "b.csv", label="b", missing="drop")
    assert t.x.tolist() == [[1], [3]] and t.dropped == 1
    with pytest.raises(DataError, match=r"b.csv:4: missing value in column 'a'"):
        read_table(str(tmp_path / "b.csv"), "b.csv", label="b")
    with pytest.raises(DataError, match=r"d.csv:2: column 'b' holds 'inf', not a finite number"):
        read_table(write(tmp_path, "a,b,label\n1,inf,0\n"), "d.csv", label="label")
    with pytest.raises(DataError, match=r"d.csv:3: 3 fields but the header has 2"):
        read_table(write(tmp_path, "a,label\n1,0\n2,1,5\n"), "d.csv", label="label")


def test_mean_fill_uses_training_rows_only():
    x = np.array([[1.0, np.nan], [3.0, 4.0], [np.nan, 8.0]])
    std = D.Standardizer.fit(x, scale=True)
    assert std.fill.tolist() == [2.0, 6.0]  # (1 + 3) / 2, (4 + 8) / 2
    filled = np.array([[1.0, 6.0], [3.0, 4.0], [2.0, 8.0]])
    assert np.allclose(std.mean, filled.mean(axis=0)) and np.allclose(std.std, filled.std(axis=0))
    assert np.allclose(std(np.array([[np.nan, np.nan]])), (std.fill - std.mean) / std.std)
    only = D.Standardizer.fit(x, scale=False)
    assert only(np.array([[np.nan, 1.0]])).tolist() == [[2.0, 1.0]]
    with pytest.raises(DataError, match="column 'b' has no value in the training split"):
        D.Standardizer.fit(np.array([[1.0, np.nan]]), names=["a", "b"])


def test_headers(tmp_path):
    path = write(tmp_path, "1.5,2,0\n3,4,1\n")
    with pytest.raises(DataError, match=r"the first row \(1.5,2,0\) holds numbers, not column names; add a header"):
        read_table(path, "d.csv", label="label")
    t = read_table(path, "d.csv", header=False, features=["a", "b", "c"])
    assert t.x.tolist() == [[1.5, 2, 0], [3, 4, 1]]  # every row is data: none eaten as a header
    with pytest.raises(DataError, match="3 columns in the first row, but the model takes 2 features"):
        read_table(path, "d.csv", header=False, features=["a", "b"])
    # numeric column names are fine when they are the names asked for
    t = read_table(write(tmp_path, "1,2,label\n5,6,0\n", "n.csv"), "n.csv", label="label", features=["2", "1"])
    assert t.x.tolist() == [[6, 5]]


def test_load_csv_dataset(tmp_path):
    path = write(tmp_path, "id,x1,x2,y\n1,0.5,1,cat\n2,0.25,2,dog\n3,1,3,cat\n")
    ds = D.load_csv(path, "y", None, drop_columns=["id"])
    assert ds.feature_names == ["x1", "x2"] and ds.class_names == ["cat", "dog"] and ds.y.tolist() == [0, 1, 0]
    assert ds.x.tolist() == [[0.5, 1], [0.25, 2], [1, 3]]
    ds = D.load_csv(write(tmp_path, "a,y\n1,2\n,3\n4,5\n", "m.csv"), "y", False, missing="drop")
    assert ds.x.tolist() == [[1], [4]] and any("dropped 1 rows" in n for n in ds.notes)


@settings(max_examples=40, deadline=None)
@given(
    table=hnp.arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(2, 4)),
                     elements=st.floats(-1e300, 1e300, allow_nan=False, allow_infinity=False)),
    label=st.integers(0, 3),
)  # fmt: skip
def test_fast_path_equals_exact_path(table, label):
    """Any table of finite numbers, written with repr (exact round trip): both paths give
    back exactly the numbers written."""
    label %= table.shape[1]
    names = [f"c{j}" for j in range(table.shape[1])]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t.csv")
        with open(path, "w") as f:
            f.write(",".join(names) + "\n" + "".join(",".join(repr(float(v)) for v in r) + "\n" for r in table))
        feat = [j for j in range(table.shape[1]) if j != label]
        fast = read_table(path, "t.csv", label=names[label])
        exact = csvfile._exact(path, "t.csv", ",", True, names, feat, label, "error", "")
    for t in (fast, exact):
        assert np.array_equal(t.x, table[:, feat]) and np.array_equal(t.labels, table[:, label])


def test_text_labels_and_text_columns_take_the_fast_path(tmp_path):
    text = 'name,a,kind,b\nann,1,"x, y",2\nbob,3,z,4\ncy,5,"x, y",6\n'
    path = write(tmp_path, text)
    names = ["name", "a", "kind", "b"]
    fast = csvfile._fast(path, ",", True, 4, [1, 3], 2)
    exact = csvfile._exact(path, "d.csv", ",", True, names, [1, 3], 2, "error", "")
    assert fast is not None  # not handed to the exact path
    for t in (fast, exact):
        assert t.x.tolist() == [[1, 2], [3, 4], [5, 6]]
        assert t.labels.tolist() == ["x, y", "z", "x, y"]
    # a text feature, or a label that turns to text after numbers, is left to the exact path
    assert csvfile._fast(path, ",", True, 4, [0, 1], 2) is None
    assert csvfile._fast(write(tmp_path, "a,l\n1,0\n2,cat\n", "m.csv"), ",", True, 2, [0], 1) is None
