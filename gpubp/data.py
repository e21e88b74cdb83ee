"""Datasets, splits, standardisation and the per-epoch shuffle.

Every loader returns a `Dataset` of float64 features (N, F) and targets: int64
labels (N,) for classification, float64 values (N, T) for regression. Data leaves
the host once: `DeviceSplit` holds a split on the backend, and batches are gathered
there from a permutation drawn on the host from a seeded generator.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from importlib import resources

import numpy as np

from .csvfile import looks_headless, read_first_row, read_table
from .errors import DataError
from .targets import auto_is_classification

DATASETS = ("digits", "mnist", "npz", "csv", "spirals", "regression")
MAX_LABEL = 2**31 - 1  # class labels go to the device as int32


@dataclass
class Dataset:
    x: np.ndarray  # (N, F) float64
    y: np.ndarray  # (N,) int64 labels, or (N, T) float64 values
    n_classes: int | None  # None for regression
    name: str
    test: Dataset | None = None  # a test split that comes with the data (MNIST's t10k)
    class_names: list = field(default_factory=list)
    feature_names: list = field(default_factory=list)  # CSV: the feature columns, in order
    notes: list = field(default_factory=list)  # one line each, for the user (rows dropped, ...)
    label_column: str | None = None  # CSV: the column the targets came from

    @property
    def is_classification(self) -> bool:
        return self.n_classes is not None

    def __len__(self) -> int:
        return self.x.shape[0]


# --------------------------------------------------------------------------- checks


def check_arrays(
    x, y, where: str, classification: bool | None, missing_ok: bool = False
) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Validate and convert raw arrays; returns (x float64 (N, F), y, n_classes).
    `missing_ok`: NaN features are missing values (data.missing = "mean"), not errors."""
    x = np.asarray(x)
    y = np.asarray(y)
    if x.dtype == object or y.dtype == object:
        raise DataError(f"{where}: arrays of Python objects are not supported; store numbers")
    if x.ndim == 0 or y.ndim == 0:
        raise DataError(f"{where}: x and y must be arrays with one row per sample, got a single number")
    if x.ndim == 1:
        x = x.reshape(-1, 1)
    if x.ndim > 2:
        x = x.reshape(x.shape[0], math.prod(x.shape[1:]))
    if x.shape[0] == 0:
        raise DataError(f"{where}: the dataset is empty (0 samples)")
    if x.shape[1] == 0:
        raise DataError(f"{where}: the samples have no features")
    if y.shape[0] != x.shape[0]:
        raise DataError(f"{where}: x has {x.shape[0]} samples but y has {y.shape[0]}; they must match")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise DataError(f"{where}: features must be real numbers, got dtype {x.dtype}")
    x = x.astype(np.float64, copy=False)
    bad = np.isinf(x) if missing_ok else ~np.isfinite(x)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DataError(f"{where}: feature {col} of sample {row} is {x[row, col]}; remove or impute non-finite values")
    y, n_classes = check_targets(y, where, classification)
    return x, y, n_classes


def check_targets(y, where: str, classification: bool | None) -> tuple[np.ndarray, int | None]:
    """Validate and convert targets (the y half of `check_arrays`); returns (y, n_classes)."""
    y = np.asarray(y)
    if y.dtype == object:
        raise DataError(f"{where}: arrays of Python objects are not supported; store numbers")
    if y.ndim == 0:
        raise DataError(f"{where}: x and y must be arrays with one row per sample, got a single number")
    if classification is None:  # data.task = "auto": the rule of gpubp/targets.py
        classification = auto_is_classification(y)
    if classification:
        if y.ndim != 1:
            y = y.reshape(y.shape[0], -1)
            if y.shape[1] != 1:
                raise DataError(f"{where}: class labels must be one integer per sample, got shape {y.shape}")
            y = y[:, 0]
        if not np.issubdtype(y.dtype, np.number) and y.dtype != bool:
            raise DataError(f"{where}: class labels must be integers, got dtype {y.dtype}")
        yf = y.astype(np.float64)
        if not np.all(np.isfinite(yf)):
            raise DataError(f"{where}: a class label is NaN or infinite; labels must be integers 0..C-1")
        if np.any(yf != np.round(yf)):
            i = int(np.argmax(yf != np.round(yf)))
            raise DataError(f"{where}: label {y[i]} of sample {i} is not an integer; class labels must be 0..C-1")
        if yf.min() < 0:
            i = int(np.argmin(yf))
            raise DataError(f"{where}: label {y[i]} of sample {i} is negative; class labels must be 0..C-1")
        if yf.max() > MAX_LABEL:
            i = int(np.argmax(yf))
            raise DataError(
                f"{where}: label {y[i]} of sample {i} is too large for a class index (at most {MAX_LABEL}); "
                "class labels must be 0..C-1 (set data.task = 'regression' if these are values)"
            )
        y = yf.astype(np.int64)
        return y, int(y.max()) + 1
    if (not np.issubdtype(y.dtype, np.number) and y.dtype != bool) or np.issubdtype(y.dtype, np.complexfloating):
        raise DataError(f"{where}: regression targets must be real numbers, got dtype {y.dtype}")
    y = y.astype(np.float64).reshape(y.shape[0], -1)
    if y.shape[1] == 0:
        raise DataError(f"{where}: the targets have no columns (y has shape {y.shape})")
    bad = ~np.isfinite(y)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise DataError(f"{where}: target of sample {row} is not finite; remove or fix it")
    return y, None


# --------------------------------------------------------------------------- files of arrays


def read_numpy_file(path: str, error=DataError, what: str = ".npy/.npz file"):
    """Everything in an .npy (an array) or .npz (a dict of arrays) file, read with
    allow_pickle=False: a pickle, or an array of Python objects, is refused and never
    unpickled. Any other failure raises `error` (a GpubpError type) as one line."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                return {name: loaded[name] for name in loaded.files}
        return loaded
    except FileNotFoundError:
        raise error(f"{path!r} not found; check the path") from None
    except IsADirectoryError:
        raise error(f"{path!r} is a directory; give a {what}") from None
    except ValueError as e:
        if "Object arrays cannot be loaded" in str(e):
            raise error(
                f"{path}: holds an array of Python objects (a pickle), which gpubp never loads; "
                "store plain numeric arrays"
            ) from None
        if "pickled" in str(e):
            with open(path, "rb") as f:
                is_pickle = f.read(1) == b"\x80"
            detail = "it is a Python pickle, which gpubp never loads" if is_pickle else "not a NumPy or zip file"
            raise error(f"{path}: not a readable {what} ({detail})") from None
        raise error(f"{path}: not a readable {what} (truncated or corrupt: {_one_line(e)})") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as e:
        raise error(f"{path}: not a readable {what} (truncated or corrupt: {_one_line(e)})") from None
    except Exception as e:  # a damaged header trips NumPy's parser in many ways (TokenError, SyntaxError, ...)
        raise error(
            f"{path}: not a readable {what} (truncated or corrupt: {type(e).__name__}: {_one_line(e)})"
        ) from None


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _not_found(path: str) -> DataError:
    return DataError(f"data.path {path!r}: file not found; relative paths start at the config file's folder")


# --------------------------------------------------------------------------- loaders


def load_digits() -> Dataset:
    """The UCI optical-recognition digits (1797 8x8 images, pixels 0..16, 10 classes),
    vendored as gpubp/vendored/digits.csv.gz (the copy scikit-learn ships; CC BY 4.0)."""
    with resources.files("gpubp.vendored").joinpath("digits.csv.gz").open("rb") as raw:
        table = np.loadtxt(gzip.open(raw, "rt"), delimiter=",", dtype=np.float64)
    return Dataset(table[:, :-1], table[:, -1].astype(np.int64), 10, "digits")


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read IDX file ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(">" + "I" * ndim, data[4:header])
    if len(data) - header != math.prod(shape):
        raise DataError(
            f"{path}: expected {math.prod(shape)} bytes of data for shape {shape}, found {len(data) - header}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(directory: str, stem: str) -> str:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise DataError(
        f"{directory}: MNIST file {stem}[.gz] not found; point data.path at the folder with the four IDX files"
    )


def load_mnist(directory: str) -> Dataset:
    """MNIST (or Fashion-MNIST) from the four standard IDX files, gzipped or not.
    Pixels are scaled to [0, 1]; the t10k files become the test split."""
    if not os.path.isdir(directory):
        raise DataError(f"data.path {directory!r} is not a directory; give the folder holding the MNIST IDX files")
    parts = {}
    for key, stem in [("xtr", "train-images-idx3-ubyte"), ("ytr", "train-labels-idx1-ubyte"),
                      ("xte", "t10k-images-idx3-ubyte"), ("yte", "t10k-labels-idx1-ubyte")]:  # fmt: skip
        parts[key] = _read_idx(_find_idx(directory, stem))
    xtr, ytr, n_classes = check_arrays(parts["xtr"] / 255.0, parts["ytr"], directory, True)
    xte, yte, _ = check_arrays(parts["xte"] / 255.0, parts["yte"], directory, True)
    test = Dataset(xte, yte, n_classes, "mnist-test")
    return Dataset(xtr, ytr, max(n_classes, int(yte.max()) + 1), "mnist", test=test)


def load_npz(path: str, classification: bool | None, missing: str = "error") -> Dataset:
    """Arrays x and y, or x_train, y_train, x_test, y_test. A NaN feature is a missing
    value (data.missing): "error" names it, "drop" leaves its row out, "mean" keeps it
    for the training means to fill (Standardizer); infinity is always an error."""
    if not os.path.exists(path):
        raise _not_found(path)
    arrays = read_numpy_file(path, DataError, ".npz file")
    if not isinstance(arrays, dict):
        raise DataError(f"{path}: a single .npy array; data.dataset 'npz' needs an .npz file with arrays x and y")
    gaps_ok = missing != "error"
    if {"x", "y"} <= arrays.keys():
        x, y, n_classes = check_arrays(arrays["x"], arrays["y"], path, classification, missing_ok=gaps_ok)
        ds = Dataset(x, y, n_classes, os.path.basename(path))
    elif {"x_train", "y_train", "x_test", "y_test"} <= arrays.keys():
        x, y, n_classes = check_arrays(
            arrays["x_train"], arrays["y_train"], path + " (train)", classification, missing_ok=gaps_ok
        )
        classification = n_classes is not None  # the test part follows the training part's task
        xt, yt, nt = check_arrays(arrays["x_test"], arrays["y_test"], path + " (test)", classification, gaps_ok)
        if xt.shape[1] != x.shape[1]:
            raise DataError(f"{path}: x_test has {xt.shape[1]} features but x_train has {x.shape[1]}")
        if n_classes is not None:
            n_classes = max(n_classes, nt)
        ds = Dataset(x, y, n_classes, os.path.basename(path), test=Dataset(xt, yt, n_classes, "test"))
    else:
        raise DataError(
            f"{path}: expected arrays 'x' and 'y' (or x_train, y_train, x_test, y_test), found {sorted(arrays)}"
        )
    if missing == "drop":
        _drop_rows(ds, path, [~np.isnan(part.x).any(axis=1) for part in (ds, ds.test) if part is not None])
    return ds


def _drop_rows(ds: Dataset, path: str, keeps: list) -> None:
    """data.missing = "drop": keep the rows `keeps` (a boolean (N,) per part: ds, then
    its test part) and note how many went; an empty training part is an error."""
    dropped = 0
    for part, keep in zip((ds, ds.test), keeps):
        dropped += int((~keep).sum())
        part.x, part.y = part.x[keep], part.y[keep]
    if len(ds) == 0:
        raise DataError(
            f'{path}: every row has a missing value; nothing is left to train on with data.missing = "drop"'
        )
    if dropped:
        ds.notes.append(f'{path}: dropped {dropped} rows with a missing value (data.missing = "drop")')


AUTO_LABEL = "auto"
LABEL_NAMES = ("label", "target", "y", "class")  # what data.label_column = "auto" looks for, in order


def choose_label_column(names: list, path: str, excluded=()) -> tuple[str, str | None]:
    """data.label_column = "auto": the first of LABEL_NAMES among the header's names,
    else the last column (scikit-learn's frames end with 'target'); and a line saying so
    when that is not 'label'. A header of one name or of numbers gets 'label', so that
    reading it fails with the reason (a wrong delimiter, no header row). `excluded`
    (data.feature_columns and data.drop_columns) are never chosen."""
    if len(names) < 2 or looks_headless(names):
        return "label", None
    candidates = [n for n in names if n not in excluded]
    if not candidates:
        return "label", None
    chosen = next((n for n in LABEL_NAMES if n in candidates), candidates[-1])
    if chosen == "label":
        return chosen, None
    return chosen, (f"{path}: using column {chosen!r} as the label (data.label_column = \"auto\": "
                    f"the first of {', '.join(LABEL_NAMES)}, else the last column; set data.label_column to choose)")  # fmt: skip


def load_csv(path: str, label_column: str, classification: bool | None, delimiter: str = ",",
             feature_columns=(), drop_columns=(), missing: str = "error") -> Dataset:  # fmt: skip
    """A CSV file with a header row (gpubp/csvfile.py reads it); `label_column` holds the
    targets, the features are `feature_columns` (default: every other column but
    `drop_columns`). Text labels become classes in sorted order."""
    if not os.path.exists(path):
        raise _not_found(path)
    chose = None
    if label_column == AUTO_LABEL:
        label_column, chose = choose_label_column(
            read_first_row(path, delimiter, path), path, (*feature_columns, *drop_columns)
        )
    table = read_table(path, path, delimiter=delimiter, label=label_column, features=list(feature_columns) or None,
                       drop=drop_columns, missing=missing,
                       no_header_hint=f"add a header row naming the columns (the label column {label_column!r} among them)")  # fmt: skip
    labels = table.labels
    class_names: list = []
    if labels.dtype.kind == "f":
        y = labels  # classes or values: check_arrays decides on "auto"
    else:
        if classification is False:
            raise DataError(f"{path}: label column {label_column!r} holds text, but data.task is 'regression'")
        class_names = sorted(set(labels.tolist()))
        y = np.searchsorted(np.array(class_names), labels).astype(np.int64)
        classification = True
    x, y, n_classes = check_arrays(table.x, y, path, classification, missing_ok=missing == "mean")
    notes = [f'{path}: dropped {table.dropped} rows with a missing value (data.missing = "drop")'] * bool(table.dropped)
    if chose:
        notes.append(chose)
    if table.ignored:
        notes.append(f"{path}: columns not used as features: {', '.join(table.ignored)}")
    return Dataset(x, y, n_classes, os.path.basename(path), class_names=class_names,
                   feature_names=table.feature_names, notes=notes, label_column=label_column)  # fmt: skip


def make_spirals(n_samples: int, n_classes: int, noise: float, seed: int) -> Dataset:
    """n_classes interleaved 2-D spiral arms (the CS231n toy problem)."""
    rng = np.random.default_rng(seed)
    per = np.full(n_classes, n_samples // n_classes)
    per[: n_samples % n_classes] += 1
    xs, ys = [], []
    for c in range(n_classes):
        r = np.linspace(0.05, 1.0, per[c])
        theta = np.linspace(c * 2 * np.pi / n_classes, c * 2 * np.pi / n_classes + 4.0, per[c])
        theta = theta + rng.normal(0.0, noise, per[c])
        xs.append(np.stack([r * np.sin(theta), r * np.cos(theta)], axis=1))
        ys.append(np.full(per[c], c))
    return Dataset(np.concatenate(xs), np.concatenate(ys).astype(np.int64), n_classes, "spirals")


def make_regression(n_samples: int, n_features: int, noise: float, seed: int) -> Dataset:
    """y = sum_j sin(pi x_j) / sqrt(F) + 0.5 x_1 x_F + noise, x ~ U(-1, 1)^F: smooth,
    nonlinear, with one interaction term."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, size=(n_samples, n_features))
    y = np.sin(np.pi * x).sum(axis=1) / math.sqrt(n_features) + 0.5 * x[:, 0] * x[:, -1]
    y = y + rng.normal(0.0, noise, n_samples)
    return Dataset(x, y.reshape(-1, 1), None, "regression")


# --------------------------------------------------------------------------- memory-mapped files
# Under an MPI launcher each rank reads only the rows it needs (gpubp/shard.py): the
# features of an .npz file whose members are stored uncompressed (np.savez) and of
# uncompressed MNIST IDX files are memory-mapped, so a page is read only when a rank
# touches its rows. Targets (N x T numbers, small beside N x F features) are read whole.


class Rows:
    """The rows `index` of a memory-mapped feature array (N, ...) as a lazy (n, F)
    matrix: indexing composes the index and reads nothing; `read` reads rows, as
    float64 divided by `divide` (MNIST's 255), and refuses non-finite values (but NaN,
    a missing value, with `gaps_ok`: data.missing = "mean")."""

    def __init__(self, array, where: str, divide: float = 1.0, index: np.ndarray | None = None, gaps_ok=False):
        self.array, self.where, self.divide, self.gaps_ok = array, where, divide, gaps_ok
        self.index = np.arange(array.shape[0]) if index is None else index
        self.shape = (len(self.index), math.prod(array.shape[1:]))

    def __getitem__(self, idx) -> Rows:
        return Rows(self.array, self.where, self.divide, self.index[idx], self.gaps_ok)

    def complete(self, chunk_bytes: int = 1 << 24) -> np.ndarray:
        """(n,) bool: the rows without a NaN, from one pass over the map in chunks of about
        `chunk_bytes` (data.missing = "drop": every rank must know every dropped row)."""
        keep = np.ones(len(self.index), dtype=bool)
        if not np.issubdtype(self.array.dtype, np.floating):
            return keep  # integers hold no NaN
        step = max(1, chunk_bytes // max(1, self.shape[1] * self.array.dtype.itemsize))
        for start in range(0, len(self.index), step):
            rows = self.array[self.index[start : start + step]].reshape(-1, self.shape[1])
            keep[start : start + step] = ~np.isnan(rows).any(axis=1)
        return keep

    def read(self, positions) -> np.ndarray:
        """Rows `positions` (of this view) as float64 (k, F): only their pages are read."""
        rows = self.index[positions]
        x = np.asarray(self.array[rows]).reshape(len(rows), self.shape[1]).astype(np.float64)
        if self.divide != 1.0:
            x = x / self.divide
        bad = np.isinf(x) if self.gaps_ok else ~np.isfinite(x)
        if bad.any():
            i, col = np.argwhere(bad)[0]
            raise DataError(
                f"{self.where}: feature {col} of sample {rows[i]} is {x[i, col]}; remove or impute non-finite values"
            )
        return x


def _mappable(array) -> bool:
    dtype = array.dtype
    return (
        array.ndim >= 1 and array.shape[0] > 0 and math.prod(array.shape[1:]) > 0
        and np.issubdtype(dtype, np.number) and not np.issubdtype(dtype, np.complexfloating)
    )  # fmt: skip


def map_npz_member(path: str, name: str):
    """Member `name` of an .npz file as a read-only np.memmap, or None where it cannot be
    mapped (compressed, Fortran order, not numeric; np.load's mmap_mode maps .npy files
    only, so the member's offset comes from its zip local header)."""
    try:
        with zipfile.ZipFile(path) as z:
            info = z.getinfo(name + ".npy")
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            head = f.read(30)  # the local file header: its name and extra field lengths may differ
            if len(head) < 30 or head[:4] != b"PK\x03\x04":  # from the central directory's
                return None
            n_name, n_extra = struct.unpack("<HH", head[26:30])
            f.seek(info.header_offset + 30 + n_name + n_extra)
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
        if fortran or dtype.hasobject or not shape:
            return None
        array = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    except Exception:  # anything irregular: the whole-file reader says what is wrong
        return None
    return array if _mappable(array) else None


def map_idx(path: str):
    """An uncompressed unsigned-byte IDX file as a read-only np.memmap at its header's
    end, or None (gzipped, or irregular: `_read_idx` reports)."""
    if path.endswith(".gz"):
        return None
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
            if len(magic) < 4 or magic[:3] != b"\x00\x00\x08" or magic[3] == 0:
                return None
            ndim = magic[3]
            shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        header = 4 + 4 * ndim
        if os.path.getsize(path) - header != math.prod(shape) or 0 in shape:
            return None
        return np.memmap(path, dtype=np.uint8, mode="r", offset=header, shape=shape)
    except (OSError, struct.error, ValueError):
        return None


def load_npz_mapped(path: str, classification: bool | None, missing: str = "error") -> Dataset | None:
    """`load_npz` with the features memory-mapped (`Rows`), or None where the file does
    not allow it (then `load_npz` reads it whole and reports any problem). data.missing
    "drop": the rows with a NaN are found in one chunked pass and left out of the view."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception:
        return None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        return None
    with loaded:
        names = set(loaded.files)
        if {"x", "y"} <= names:
            parts = [("x", "y", path)]
        elif {"x_train", "y_train", "x_test", "y_test"} <= names:
            parts = [("x_train", "y_train", path + " (train)"), ("x_test", "y_test", path + " (test)")]
        else:
            return None
        xs = [map_npz_member(path, xn) for xn, _, _ in parts]
        if any(x is None for x in xs):
            return None
        try:
            ys = [loaded[yn] for _, yn, _ in parts]
        except Exception:
            return None
    if any(y.ndim == 0 or y.shape[0] != x.shape[0] for x, y in zip(xs, ys)):
        return None
    gaps_ok = missing == "mean"
    y, n_classes = check_targets(ys[0], parts[0][2], classification)
    ds = Dataset(Rows(xs[0], parts[0][2], gaps_ok=gaps_ok), y, n_classes, os.path.basename(path))
    if len(parts) == 2:
        xt = Rows(xs[1], parts[1][2], gaps_ok=gaps_ok)
        if xt.shape[1] != ds.x.shape[1]:
            return None
        yt, nt = check_targets(ys[1], parts[1][2], n_classes is not None)
        if n_classes is not None:
            ds.n_classes = n_classes = max(n_classes, nt)
        ds.test = Dataset(xt, yt, n_classes, "test")
    if missing == "drop":
        _drop_rows(ds, path, [part.x.complete() for part in (ds, ds.test) if part is not None])
    return ds


def load_mnist_mapped(directory: str) -> Dataset | None:
    """`load_mnist` with the images memory-mapped (`Rows`, scaled to [0, 1] when read),
    or None where a file is gzipped or irregular (then `load_mnist` reads them)."""
    if not os.path.isdir(directory):
        return None
    try:
        images = [map_idx(_find_idx(directory, s)) for s in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte")]
        if any(x is None for x in images):
            return None
        labels = [_read_idx(_find_idx(directory, s)) for s in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte")]
    except DataError:
        return None
    if any(y.shape[0] != x.shape[0] for x, y in zip(images, labels)):
        return None
    ytr, n_classes = check_targets(labels[0], directory, True)
    yte, _ = check_targets(labels[1], directory, True)
    test = Dataset(Rows(images[1], directory, 255.0), yte, n_classes, "mnist-test")
    return Dataset(Rows(images[0], directory, 255.0), ytr, max(n_classes, int(yte.max()) + 1), "mnist", test=test)


# --------------------------------------------------------------------------- splits


@dataclass
class Splits:
    train: Dataset
    val: Dataset | None
    test: Dataset | None


def _subset(ds: Dataset, idx: np.ndarray, name: str) -> Dataset:
    return Dataset(ds.x[idx], ds.y[idx], ds.n_classes, name, class_names=ds.class_names,
                   feature_names=ds.feature_names)  # fmt: skip


def split_dataset(ds: Dataset, val_fraction: float, test_fraction: float, seed: int, stratify: bool = True) -> Splits:
    """Seeded train/val/test split; stratified by class for classification (each
    class split in the same proportions). A test split shipped with the data
    (MNIST's t10k) is used as is, and test_fraction is then ignored."""
    if ds.test is not None:
        test_fraction = 0.0
    rng = np.random.default_rng([seed, 0x5EED])
    n = len(ds)
    if ds.is_classification and stratify:
        groups = [np.flatnonzero(ds.y == c) for c in range(ds.n_classes)]
    else:
        groups = [np.arange(n)]
    tr, va, te = [], [], []
    for g in groups:
        g = rng.permutation(g)
        n_test = int(round(test_fraction * len(g)))
        n_val = int(round(val_fraction * len(g)))
        te.append(g[:n_test])
        va.append(g[n_test : n_test + n_val])
        tr.append(g[n_test + n_val :])
    # shuffle so that classes are interleaved (the order matters only for reading)
    tr, va, te = (rng.permutation(np.concatenate(p)) for p in (tr, va, te))
    if len(tr) == 0:
        raise DataError(
            f"the training split is empty: {n} samples with val_fraction {val_fraction} and test_fraction {test_fraction}"
        )
    val = _subset(ds, va, "val") if len(va) else None
    test = ds.test if ds.test is not None else (_subset(ds, te, "test") if len(te) else None)
    return Splits(_subset(ds, tr, "train"), val, test)


@dataclass
class Standardizer:
    """x -> (x - mean) / std, with statistics from the training split only; a
    constant feature (std 0) is only centred. `fill` (data.missing = "mean"): each
    column's mean over the training split's present values, put where x is NaN first."""

    mean: np.ndarray
    std: np.ndarray
    fill: np.ndarray | None = None

    @classmethod
    def fit(cls, x: np.ndarray, scale: bool = True, names=(), fill_missing: bool = False) -> Standardizer:
        """Statistics of the training split x (N, F); `scale` False: only the fill.
        `fill_missing` (data.missing = "mean"): the fill is fitted even when the training
        split has no gap, for the NaN of the other splits and of new data."""
        fill = None
        gaps = np.isnan(x)
        if fill_missing or gaps.any():
            empty = np.flatnonzero(gaps.all(axis=0))
            if empty.size:
                raise no_value_error(int(empty[0]), names)
            fill = np.nanmean(x, axis=0)  # (F,)
            x = np.where(gaps, fill, x)
        if not scale:
            return cls(np.zeros(x.shape[1]), np.ones(x.shape[1]), fill)
        mean = x.mean(axis=0)
        std = x.std(axis=0)
        std[std < 1e-12] = 1.0
        return cls(mean, std, fill)

    @classmethod
    def identity(cls, n_features: int) -> Standardizer:
        return cls(np.zeros(n_features), np.ones(n_features))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.fill is not None:
            x = np.where(np.isnan(x), self.fill, x)
        return (x - self.mean) / self.std


def no_value_error(column: int, names=()) -> DataError:
    """data.missing = "mean" and a feature column with no value in the training split."""
    name = repr(names[column]) if column < len(names) else str(column)
    return DataError(
        f'data.missing = "mean": column {name} has no value in the training split to take a mean of; '
        "drop it (data.drop_columns) or fill it"
    )


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the training samples in epoch `epoch`: a function of (seed, epoch)
    alone, so a resumed run sees the same batches as an uninterrupted one."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class DeviceSplit:
    """One split on the backend: features (N, F) in the model's dtype, loss targets,
    and int32 labels for accuracy (classification only)."""

    def __init__(self, model, ds: Dataset, standardizer: Standardizer, targets: np.ndarray):
        self.backend = be = model.backend
        self.n = len(ds)
        self.x = be.asarray(standardizer(ds.x), dtype=model.dtype)
        self.target = model.as_target(targets, self.n)
        self.labels = be.asarray(ds.y, dtype=np.int32) if ds.is_classification else None

    def share(self, start: int, stop: int):
        """(x, target, labels) of rows [start, stop): one rank's share in evaluation."""
        labels = self.labels[start:stop] if self.labels is not None else None
        return self.x[start:stop], self.target[start:stop], labels

    def order(self, perm: np.ndarray):
        """An epoch's order (host) where `batch` takes it: on the device."""
        return self.backend.asarray(perm)

    def batch(self, idx, buffer):
        """(x, target) of rows idx, gathered on the device into buffer(name, like, rows)."""
        be, n = self.backend, idx.shape[0]
        xb = be.gather_rows(self.x, idx, buffer("x", self.x, n))
        return xb, be.gather_rows(self.target, idx, buffer("y", self.target, n))

    def batch_window(self, perm, start, n: int, buffer, target: bool = True, x_dtype=None):
        """(x, target) of rows perm[start : start + n] (perm, start on the device): one
        launch for both, into buffer(name, like, rows, dtype); target=False: x alone, (x,
        None); x_dtype: see window_batch."""
        return window_batch(self, perm, start, n, buffer, target, x_dtype)


def batch_buffers(backend):
    """buffer(name, like, rows, dtype=None) -> a kept (rows, *like.shape[1:]) array of dtype
    (like's where None), one per (name, rows, dtype): a step's batch buffers (a captured
    step reads and writes the same ones every replay)."""
    cache: dict = {}

    def buffer(name, like, rows, dtype=None):
        dtype = np.dtype(like.dtype if dtype is None else dtype)
        if (name, rows, dtype) not in cache:
            cache[name, rows, dtype] = backend.empty((rows, *like.shape[1:]), dtype)
        return cache[name, rows, dtype]

    return buffer


def window_batch(split, perm, start, n: int, buffer, target: bool = True, x_dtype=None):
    """A split's (x, target) of rows perm[start : start + n], gathered on the device into
    buffer(name, like, rows, dtype) (DeviceSplit and stream.StreamSplit: their x and
    target); target=False: x alone, (x, None) (the loss reads the targets where they lie).
    x_dtype: x's dtype in the batch (a bf16 or fp16 model's storage: rounded as gathered),
    else the split's."""
    xo = buffer("x", split.x, n, x_dtype)
    if not target:
        (xb,) = split.backend.gather_windows((split.x,), perm, start, (xo,))
        return xb, None
    outs = (xo, buffer("y", split.target, n))
    xb, yb = split.backend.gather_windows((split.x, split.target), perm, start, outs)
    return xb, yb
