"""Property-based tests: the config loader, --set overrides and the data loaders, fed
random documents, strings and arrays, return a valid result or raise the project's own
error (a GpubpError), never anything else."""

# ruff: noqa: E402  (hypothesis is imported after the importorskip that guards it)

from __future__ import annotations

import json
import math
import os
import tempfile

import numpy as np
import pytest

pytest.importorskip("hypothesis")  # optional test dependency: without it these tests skip, the rest still run

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gpubp.config import SCHEMA, Config, load_config
from gpubp.data import Dataset, load_csv, load_npz
from gpubp.errors import ConfigError, DataError, GpubpError

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- values


def plausible(field) -> st.SearchStrategy:
    """Values a user might mean for a field: mostly in its domain, near its bounds."""
    lo = field.min if field.min is not None else -10
    if field.choices:
        return st.sampled_from(field.choices)
    if field.kind == "bool":
        return st.booleans()
    if field.kind == "int":
        return st.integers(int(lo) - 1, int(lo) + 100)
    if field.kind == "float":
        hi = field.max if field.max is not None else lo + 10
        return st.floats(lo - 1, hi + 1, allow_nan=False) | st.integers(10**300, 10**400)  # ints too large for a float
    if field.kind == "int_list":
        return st.lists(st.integers(-1, 64), max_size=3)
    return st.lists(st.floats(-0.5, 1.5, allow_nan=False), min_size=1, max_size=3)  # float_pair


scalars = st.one_of(
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**300, max_value=10**320),  # larger than any float
    st.floats(),  # nan and inf included
    st.text(max_size=12),
)
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5),
                        inner, max_size=3), max_leaves=6)  # fmt: skip


@st.composite
def documents(draw) -> dict:
    """A config mapping: known and unknown sections and keys, plausible and wild values."""
    doc = {}
    for name in draw(st.lists(st.sampled_from([*SCHEMA, "trian", "extra"]), max_size=4, unique=True)):
        if name not in SCHEMA or draw(st.integers(0, 9)) == 0:
            doc[name] = draw(anything)
            continue
        fields = SCHEMA[name]
        keys = draw(st.lists(st.sampled_from([*fields, "bogus"]), max_size=4, unique=True))
        doc[name] = {k: draw(plausible(fields[k]) if k in fields and draw(st.booleans()) else anything) for k in keys}
    return doc


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v).replace("\x7f", "\\u007f")  # TOML escapes DEL too
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


def to_toml(doc: dict) -> str:
    """TOML text for a mapping; a section whose value is not a table becomes a plain key."""
    plain = [f"{json.dumps(k)} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    tables = [f"[{json.dumps(k)}]\n" + "".join(f"{json.dumps(key)} = {toml_value(x)}\n" for key, x in v.items())
              for k, v in doc.items() if isinstance(v, dict)]  # fmt: skip
    return "\n".join(plain) + "\n" + "\n".join(tables)


def valid_config(cfg) -> None:
    assert isinstance(cfg, Config)
    for section, fields in SCHEMA.items():
        assert set(cfg.sections[section]) == set(fields)


def load_or_error(path, overrides=()):
    try:
        cfg = load_config(path, overrides)
    except ConfigError as e:
        assert "\n" not in str(e)
        return None
    valid_config(cfg)
    return cfg


# --------------------------------------------------------------------------- config


@SETTINGS
@given(doc=documents(), as_json=st.booleans())
def test_config_loader_on_random_documents(doc, as_json):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "c.json" if as_json else "c.toml")
        with open(path, "w") as f:
            f.write(json.dumps(doc) if as_json else to_toml(doc))
        cfg = load_or_error(path)
    if cfg is not None:  # what it accepted is what the file said
        for section, values in doc.items():
            for key, value in values.items():
                assert cfg.sections[section][key] == value


@SETTINGS
@given(text=st.text(max_size=200), suffix=st.sampled_from([".toml", ".json"]))
def test_config_loader_on_random_text(text, suffix):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "c" + suffix)
        with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(text)
        load_or_error(path)


@SETTINGS
@given(overrides=st.lists(st.text(max_size=30), max_size=3))
def test_set_overrides_on_random_strings(overrides):
    load_or_error(None, overrides)


@SETTINGS
@given(
    items=st.lists(st.tuples(st.sampled_from([(s, k) for s in SCHEMA for k in SCHEMA[s]] + [("train", "epoch")]),
                             st.one_of(anything.map(toml_value), st.text(max_size=10))), max_size=3)
)  # fmt: skip
def test_set_overrides_on_random_values(items):
    overrides = [f"{s}.{k}={v}" for (s, k), v in items]
    load_or_error(None, overrides)


@SETTINGS
@given(size=st.integers(1, 10**6), lr=st.floats(1e-9, 10.0), hidden=st.lists(st.integers(1, 4096), max_size=4))
def test_set_overrides_take_effect(size, lr, hidden):
    cfg = load_config(None, [f"train.batch_size={size}", f"optimizer.lr={lr!r}", f"model.hidden={hidden}"])
    assert (cfg.train.batch_size, cfg.optimizer.lr, cfg.model.hidden) == (size, lr, hidden)


# --------------------------------------------------------------------------- data


def check_dataset(ds: Dataset) -> None:
    assert ds.x.dtype == np.float64 and ds.x.ndim == 2 and ds.x.shape[0] >= 1 and ds.x.shape[1] >= 1
    assert np.isfinite(ds.x).all() and len(ds.y) == len(ds.x)
    if ds.is_classification:
        assert ds.y.dtype == np.int64 and ds.y.ndim == 1 and ds.y.min() >= 0 and ds.n_classes == ds.y.max() + 1
    else:
        assert ds.y.dtype == np.float64 and ds.y.ndim == 2 and ds.y.shape[1] >= 1 and np.isfinite(ds.y).all()


def load_or_data_error(loader, *args):
    try:
        ds = loader(*args)
    except DataError as e:
        assert "\n" not in str(e)
        return
    check_dataset(ds)


cells = st.one_of(st.sampled_from(["", " ", "nan", "inf", "-1", "0", "1", "2", "1e999", "1e20", "0.5", "x", '"a,b"',
                                   "\x00", '"'] + ["0", "1", "2", "0.5", "1e20"] * 3),
                  st.floats().map(repr), st.integers(-3, 3).map(str), st.text(max_size=4))  # fmt: skip


@SETTINGS
@given(
    header=st.just(["a", "b", "label"]) | st.lists(st.sampled_from(["label", "a", "b", ""]), max_size=4),
    rows=st.lists(st.lists(cells, min_size=3, max_size=3) | st.lists(cells, max_size=4), max_size=6),
    task=st.sampled_from([None, True, False]),
)
def test_csv_loader_on_random_tables(header, rows, task):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "d.csv")
        with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write("\n".join(",".join(r) for r in [header, *rows]))
        load_or_data_error(load_csv, path, "label", task)


@SETTINGS
@given(text=st.text(max_size=300), task=st.sampled_from([None, True, False]))
def test_csv_loader_on_random_text(text, task):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "d.csv")
        with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(text)
        load_or_data_error(load_csv, path, "label", task)


dtypes = st.one_of(hnp.boolean_dtypes(), hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(), hnp.floating_dtypes(),
                   hnp.complex_number_dtypes(), hnp.unicode_string_dtypes(max_len=3), hnp.datetime64_dtypes())  # fmt: skip
random_arrays = dtypes.flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
)


@SETTINGS
@given(
    arrays=st.dictionaries(st.sampled_from(["x", "y", "x_train", "y_train", "x_test", "y_test", "w"]), random_arrays,
                           max_size=4),
    task=st.sampled_from([None, True, False]),
)  # fmt: skip
def test_npz_loader_on_random_arrays(arrays, task):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "d.npz")
        np.savez(path, **arrays)
        load_or_data_error(load_npz, path, task)


@SETTINGS
@given(n=st.integers(1, 6), f=st.integers(1, 3), labels=st.sampled_from(["int", "float", "bool"]),
       task=st.sampled_from([None, True, False]), data=st.data())  # fmt: skip
def test_npz_loader_on_numeric_data(n, f, labels, task, data):
    """Well-shaped numbers (some non-finite, some huge): the common case, explored."""
    x = data.draw(hnp.arrays(np.float64, (n, f), elements=st.floats(-1e6, 1e6) | st.floats()))
    dtype = {"int": np.int64, "float": np.float64, "bool": np.bool_}[labels]
    whole = st.integers(0, 3) | st.integers(-(2**63), 2**63 - 1) | st.sampled_from([1e20, 2.0**31])
    y = data.draw(hnp.arrays(dtype, (n,), elements=(whole.map(float) | st.floats()) if labels == "float" else None))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "d.npz")
        np.savez(path, x=x, y=y)
        load_or_data_error(load_npz, path, task)


@SETTINGS
@given(blob=st.binary(max_size=300))
def test_npz_loader_on_random_bytes(blob):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "d.npz")
        with open(path, "wb") as f:
            f.write(blob)
        try:
            load_npz(path, None)
        except GpubpError:
            pass
