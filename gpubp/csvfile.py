"""CSV tables for train, eval and predict: a header row (or none, when asked), a
one-character delimiter, UTF-8 text (a byte-order mark is stripped), columns chosen by
name, missing values handled by a stated policy.

Two paths read the body and accept the same files:
- fast: numpy.loadtxt's C parser reads the whole body into one float64 array
  (N, n_columns) and the wanted columns are picked from it; a text label (or a text
  column read past) goes through a small converter;
- exact: when that fails (a missing value, a ragged row, a cell that is not a number,
  NaN or inf), Python's csv module reads the file again, applies `missing` and names
  the line and column of the first fault.

A missing value is an empty cell or one of MISSING (any case). Policies: "error" (refuse,
naming line and column), "drop" (skip the row, counted in Table.dropped), "mean" (keep it
as NaN here; the trainer fills it with the training split's column mean).
"""

from __future__ import annotations

import csv
import math
import warnings
from array import array
from dataclasses import dataclass, field

import numpy as np

from .errors import DataError

MISSING = frozenset({"", "na", "n/a", "nan", "null", "none", "?"})  # compared stripped, lower-cased
POLICIES = ("error", "drop", "mean")


@dataclass
class Table:
    x: np.ndarray  # (N, F) float64 features; NaN where missing (policy "mean")
    feature_names: list
    labels: np.ndarray | None  # (N,) float64 when every label is a number, else str; None without a label
    ignored: list = field(default_factory=list)  # columns neither feature nor label
    dropped: int = 0  # rows skipped for a missing value (policy "drop")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_first_row(path: str, delimiter: str, where: str) -> list[str]:
    """The first row's cells, stripped ([] for an empty file)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            row = next(csv.reader(f, delimiter=delimiter), [])
    except FileNotFoundError:
        raise DataError(f"{where}: file not found; check the path") from None
    except IsADirectoryError:
        raise DataError(f"{where}: is a directory; give a .csv file") from None
    except UnicodeDecodeError:
        raise DataError(f"{where}: not UTF-8 text; save the CSV as UTF-8") from None
    except (OSError, csv.Error) as e:
        raise DataError(f"{where}: cannot read CSV ({' '.join(str(e).split())})") from None
    return [cell.strip() for cell in row]


def _delimiter_hint(header: list[str], delimiter: str) -> str:
    if len(header) == 1:
        for d, name in ((";", "';'"), ("\t", "'\\t'"), ("|", "'|'"), (",", "','")):
            if d != delimiter and d in header[0]:
                return f"; the header looks {name}-separated: set data.delimiter = {name}"
    return ""


def check_header(header: list[str], where: str, delimiter: str) -> None:
    """Refuse an empty file and duplicate column names."""
    if not header or header == [""]:
        raise DataError(f"{where}: the file is empty; expected a header row and data")
    seen: dict[str, int] = {}
    for i, name in enumerate(header):
        if name in seen and name:
            raise DataError(
                f"{where}: column name {name!r} appears twice (columns {seen[name] + 1} and {i + 1}); "
                "column names must be unique: rename one"
            )
        seen[name] = i


def looks_headless(header: list[str]) -> bool:
    """True when every cell of the first row is a number: data, not column names."""
    return all(cell and _is_number(cell) for cell in header)


def read_table(
    path: str,
    where: str,
    *,
    delimiter: str = ",",
    label: str | None = None,
    label_required: bool = True,
    features: list | None = None,
    features_from: str = "data.feature_columns",
    drop: tuple | list = (),
    missing: str = "error",
    missing_hint: str = "",
    header: bool = True,
    no_header_hint: str = "add a header row naming the columns",
) -> Table:
    """Read `path` (named `where` in messages).

    With a header: `label` is the label column (required when `label_required`, else
    left out of the features, unread, when present); `features` the feature columns by
    name in this order (None: every other column but `drop`); other columns are read
    past (Table.ignored). A first row
    of numbers is refused (`no_header_hint` says what to do) unless it holds every name
    asked for. Without a header (`header=False`): the columns are `features` in order,
    no label, and the file must have exactly that many."""
    if missing not in POLICIES:
        raise ValueError(missing)
    first = read_first_row(path, delimiter, where)
    if header:
        check_header(first, where, delimiter)
        names = first
        wanted = list(features or []) + ([label] if label and label_required else [])
        if looks_headless(names) and not all(w in names for w in wanted):
            shown = ",".join(names[:4]) + (",..." if len(names) > 4 else "")
            raise DataError(f"{where}: the first row ({shown}) holds numbers, not column names; {no_header_hint}")
        if label is not None and label not in names:
            if label_required:
                raise DataError(
                    f"{where}: no column named {label!r} (set data.label_column to one of {names})"
                    + _delimiter_hint(names, delimiter)
                )
            label = None
        if features is None:
            for name in drop:
                if name not in names:
                    raise DataError(f"{where}: data.drop_columns names {name!r}, which is not a column ({names})")
            features = [n for n in names if n != label and n not in drop]
            if not features:
                raise DataError(f"{where}: no feature columns left besides the label {label!r}")
        else:
            for name in features:
                if name not in names:
                    headless = any(_is_number(n) for n in names) and not any(f in names for f in features)
                    raise DataError(
                        f"{where}: no column named {name!r}, {features_from}; columns: {names}"
                        + _delimiter_hint(names, delimiter)
                        + (f"; the first row holds numbers: {no_header_hint}" if headless else "")
                    )
        feat_idx = [names.index(n) for n in features]
        for i in feat_idx:
            if names[i] == "":
                raise DataError(f"{where}: column {i + 1} has no name; name it in the header row, or list the "
                                "feature columns in data.feature_columns")  # fmt: skip
        label_idx = names.index(label) if label is not None and label_required else None  # else read past it
        used = set(feat_idx) | ({label_idx} if label_idx is not None else set())
        ignored = [n for i, n in enumerate(names) if i not in used]
        n_columns = len(names)
    else:
        if not first:
            raise DataError(f"{where}: the file is empty; expected rows of {len(features)} numbers")
        if len(first) != len(features):
            raise DataError(
                f"{where}: {len(first)} columns in the first row, but the model takes {len(features)} features "
                f"({', '.join(features)}); with --no-header the columns must be exactly those, in that order"
            )
        feat_idx, label_idx, ignored, n_columns = list(range(len(features))), None, [], len(first)
        names = list(features)
    table = _fast(path, delimiter, header, n_columns, feat_idx, label_idx)
    if table is None:
        table = _exact(path, where, delimiter, header, names, feat_idx, label_idx, missing, missing_hint)
    table.feature_names, table.ignored = list(features), ignored
    return table


def _first_data_row(path: str, delimiter: str, header: bool) -> list[str] | None:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            for i, row in enumerate(csv.reader(f, delimiter=delimiter)):
                if (i > 0 or not header) and any(cell.strip() for cell in row):
                    return [cell.strip() for cell in row]
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    return None


def _fast(path, delimiter, header, n_columns, feat_idx, label_idx) -> Table | None:
    """The whole body through numpy.loadtxt as float64, or None when it is not all
    finite numbers in rows of n_columns (the exact path then reads it). Columns whose
    first value is text (a label, a column read past) go through a converter: a label's
    text becomes a code (its order of first appearance), a column read past becomes 0;
    every other column stays in the C parser."""
    first = _first_data_row(path, delimiter, header)
    if first is None or len(first) != n_columns:
        return None
    text = [j for j, cell in enumerate(first) if cell.lower() not in MISSING and not _is_number(cell)]
    if any(j in feat_idx for j in text):
        return None  # a text feature: the exact path names it
    codes: dict[str, int] = {}

    def code(cell: str) -> float:
        cell = cell.strip()
        return math.nan if cell.lower() in MISSING else codes.setdefault(cell, len(codes))

    converters = {j: (code if j == label_idx else (lambda cell: 0.0)) for j in text}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "input contained no data": the exact path says so
            body = np.loadtxt(path, delimiter=delimiter, skiprows=1 if header else 0, comments=None,
                              quotechar='"', ndmin=2, encoding="utf-8-sig", dtype=np.float64,
                              converters=converters or None)  # fmt: skip
    except (ValueError, UnicodeDecodeError):
        return None
    if body.shape[0] == 0 or body.shape[1] != n_columns or not np.isfinite(body.sum()):
        return None  # the sum is NaN or inf when a value is (or, harmlessly, when it overflows)
    if label_idx is None:
        labels = None
    elif label_idx in text:  # codes back to the label text
        labels = np.array(list(codes), dtype=str)[body[:, label_idx].astype(np.intp)]
    else:
        labels = body[:, label_idx].copy()
    lo = feat_idx[0]
    if feat_idx == list(range(lo, lo + len(feat_idx))):
        x = body[:, lo : lo + len(feat_idx)]  # a view: no copy of the table
    else:
        x = body[:, feat_idx]
    return Table(x, [], labels)


def _exact(path, where, delimiter, header, names, feat_idx, label_idx, missing, hint) -> Table:
    """Row by row with the csv module: exact line numbers, missing values per policy."""
    fix = hint or ('fill it, or set data.missing = "drop" (skip such rows) or "mean" (fill with the training mean)')
    values = array("d")  # the features, row after row
    labels: list[str] = []
    dropped = 0
    n_rows = 0
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=delimiter)
            if header:
                next(reader, None)
            for row in reader:
                line = reader.line_num
                if len(row) <= 1 and not "".join(row).strip():
                    continue  # a blank line is not a row (as in pandas); ",," is a row of missing values
                if len(row) != len(names):
                    what = "the header has" if header else "the model takes"
                    raise DataError(f"{where}:{line}: {len(row)} fields but {what} {len(names)}")
                try:  # the common row: every feature a finite number
                    parsed = [float(row[i]) for i in feat_idx]
                    ok = math.isfinite(math.fsum(parsed))  # NaN or inf anywhere makes the sum non-finite
                except (ValueError, OverflowError):
                    ok = False
                skip = False
                if not ok:
                    parsed, skip = _parse_cells(row, feat_idx, names, missing, f"{where}:{line}", fix)
                if label_idx is not None:
                    cell = row[label_idx].strip()
                    if cell.lower() in MISSING:
                        if missing != "drop":
                            raise DataError(
                                f"{where}:{line}: missing label in column {names[label_idx]!r}; fill it, "
                                'or set data.missing = "drop" to skip rows without a label'
                            )
                        skip = True
                if skip:
                    dropped += 1
                    continue
                values.extend(parsed)
                if label_idx is not None:
                    labels.append(cell)
                n_rows += 1
    except UnicodeDecodeError:
        raise DataError(f"{where}: not UTF-8 text; save the CSV as UTF-8") from None
    except (OSError, csv.Error) as e:
        raise DataError(f"{where}: cannot read CSV ({' '.join(str(e).split())})") from None
    if n_rows == 0:
        detail = f" ({dropped} dropped for missing values)" if dropped else ""
        raise DataError(f"{where}: no data rows{' after the header' if header else ''}{detail}")
    x = np.frombuffer(values, dtype=np.float64).reshape(n_rows, len(feat_idx)).copy()
    return Table(x, [], _labels_array(labels) if label_idx is not None else None, dropped=dropped)


def _parse_cells(row, feat_idx, names, missing, where, fix) -> tuple[list, bool]:
    """(values, skip the row) of one row's features, cell by cell: a missing value per
    policy (NaN, or skip with "drop"), anything else that is not a finite number refused."""
    parsed, skip = [], False
    for i in feat_idx:
        cell = row[i].strip()
        if cell.lower() in MISSING:
            if missing == "error":
                raise DataError(f"{where}: missing value in column {names[i]!r}; {fix}")
            skip = skip or missing == "drop"
            parsed.append(math.nan)
            continue
        try:
            v = float(cell)
        except ValueError:
            raise DataError(f"{where}: column {names[i]!r} holds {cell!r}, not a number") from None
        if not math.isfinite(v):
            raise DataError(
                f"{where}: column {names[i]!r} holds {cell!r}, not a finite number; "
                "fix it, or leave the cell empty to mark it missing"
            )
        parsed.append(v)
    return parsed, skip


def _labels_array(cells: list[str]) -> np.ndarray:
    """float64 when every label is a number, else the strings as given."""
    try:
        return np.array([float(c) for c in cells], dtype=np.float64)
    except ValueError:
        return np.array(cells, dtype=str)
