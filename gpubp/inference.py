"""New data read the way a checkpoint's model was trained, and its outputs in user terms
(`gpubp predict`, `gpubp eval --data`).

Columns are matched by name: the checkpoint's meta record holds the feature names in
training order, the label column and the class names in output order. A CSV may hold
its columns in any order and extra ones (ignored, with a note); one that lacks a trained
feature is refused, naming it. A CSV without a header row is read only when asked
(`--no-header`): a first row of numbers is never taken for column names. A model
trained without column names (digits, MNIST, npz) takes a CSV's columns by position.

Outputs: for classes, the predicted class by name and one probability per class,
p_<class> (targets.class_probabilities: softmax(z) for softmax_cross_entropy, sigmoid(z)
for binary_cross_entropy; for mse and huber the outputs clipped to [0, 1] and
normalised, scores rather than calibrated probabilities); `logits` gives z itself. For
regression, `to_user_units` maps outputs to the target's units.
"""

from __future__ import annotations

import numpy as np

from .csvfile import read_table
from .data import Dataset, check_arrays, read_numpy_file
from .errors import DataError
from .targets import TargetScaler, class_probabilities, predicted_classes, user_outputs

PROBABILISTIC = {"softmax_cross_entropy", "binary_cross_entropy"}


# --------------------------------------------------------------------------- reading


def _csv_policy(cfg, for_predict: bool) -> tuple[str, str]:
    """(policy, hint) for missing values in new data: the trained data.missing, except
    that predict never drops a row."""
    missing = cfg.data.missing
    if missing == "mean":
        return "mean", ""
    if for_predict:
        why = "predict never drops a row" if missing == "drop" else 'the model was trained with data.missing = "error"'
        return "error", f"fill it ({why})"
    return missing, 'fill it, or train with data.missing = "drop" or "mean"'


def _read_csv(path, where, meta, cfg, checkpoint, log, label_required, no_header=False, for_predict=True):
    n_features = meta["n_features"]
    names = meta.get("feature_names") or []
    label = meta.get("label_column") or cfg.data.label_column
    policy, hint = _csv_policy(cfg, for_predict)
    common = dict(delimiter=cfg.data.delimiter, missing=policy, missing_hint=hint)
    if no_header:
        features = names or [f"column {i + 1}" for i in range(n_features)]
        return read_table(path, where, header=False, features=features, **common)
    order = ", ".join(names) if names else f"{n_features} columns"
    table = read_table(path, where, label=label, label_required=label_required, features=names or None,
                       features_from=f"a feature of the model in {checkpoint} (trained on {order})",
                       no_header_hint=(f"does it lack a header row? pass --no-header to read every row as data "
                                       f"(columns in training order: {order}), or add a header row"
                                       if not label_required else "add a header row naming the columns"),
                       **common)  # fmt: skip
    if not names:
        log(f"{where}: the model has no feature names (trained on data.dataset {cfg.data.dataset!r}): "
            "columns are taken by position")  # fmt: skip
        if table.x.shape[1] != n_features:
            raise DataError(f"{where}: {table.x.shape[1]} feature columns, but the model takes {n_features}")
    elif table.ignored:
        log(f"{where}: ignored the columns the model does not use: {', '.join(table.ignored)}")
    if table.dropped:
        log(f'{where}: dropped {table.dropped} rows with a missing value (data.missing = "drop")')
    return table


def read_features(path, meta, cfg, checkpoint, fill, log, no_header=False) -> np.ndarray:
    """Features (N, F) float64 from .npy, .npz (array 'x') or .csv; NaN marks a missing
    value only when the model fills them (`fill`, data.missing = "mean")."""
    where = f"--input {path}"
    if path.endswith(".csv"):
        x = _read_csv(path, where, meta, cfg, checkpoint, log, label_required=False, no_header=no_header).x
    else:
        if no_header:
            raise DataError(f"--no-header applies to a .csv --input, not {path}")
        x = read_numpy_file(path, DataError, ".npy/.npz/.csv file")
        if isinstance(x, dict):
            if "x" not in x:
                raise DataError(f"{where}: no array 'x' (found {sorted(x)})")
            x = x["x"]
    x = np.asarray(x)
    x, _, _ = check_arrays(x, np.zeros(x.shape[:1]), where, False, missing_ok=fill is not None)
    if x.shape[1] != meta["n_features"]:
        raise DataError(f"{where}: {x.shape[1]} features per sample, but the model takes {meta['n_features']}")
    return x


def class_index(labels: np.ndarray, class_names: list, where: str, column: str) -> np.ndarray:
    """Labels (raw cells or numbers) -> indices into class_names, by name; a label that
    is no class of the model is refused."""
    index = {name: i for i, name in enumerate(class_names)}
    out = np.empty(len(labels), dtype=np.int64)
    for r, value in enumerate(labels.tolist()):
        key = str(value)
        if key not in index:  # the same number written another way: 1.0 for class "1"
            try:
                number = float(value)
                key = str(int(number)) if number.is_integer() else key
            except (ValueError, OverflowError):
                pass
        if key not in index:
            raise DataError(
                f"{where}: label {value!r} in column {column!r} (row {r + 1}) is not a class of the model "
                f"(classes: {', '.join(class_names)})"
            )
        out[r] = index[key]
    return out


def read_labelled(path, meta, cfg, checkpoint, fill, log) -> Dataset:
    """A labelled file for `eval --data`: .csv (columns by name, the label column too)
    or .npz (arrays x, y). Class labels are mapped by name to the model's classes."""
    where = f"--data {path}"
    n_classes = meta["n_classes"]
    names = meta.get("class_names") or ([str(c) for c in range(n_classes)] if n_classes else [])
    label = meta.get("label_column") or cfg.data.label_column
    if path.endswith(".csv"):
        table = _read_csv(path, where, meta, cfg, checkpoint, log, label_required=True, for_predict=False)
        x, labels = table.x, table.labels
    elif path.endswith(".npz"):
        arrays = read_numpy_file(path, DataError, ".npz file")
        if not isinstance(arrays, dict) or not {"x", "y"} <= arrays.keys():
            raise DataError(f"{where}: expected arrays 'x' and 'y'")
        x, labels, label = arrays["x"], np.asarray(arrays["y"]), "y"
    else:
        raise DataError(f"{where}: give a labelled .csv (with column {label!r}) or an .npz with arrays x and y")
    if n_classes is not None:
        y = class_index(labels, names, where, label)
    else:
        if labels.dtype.kind not in "biuf":
            raise DataError(f"{where}: the targets in {label!r} must be numbers for this regression model")
        y = labels.astype(np.float64)
    x, y, _ = check_arrays(x, y, where, n_classes is not None, missing_ok=fill is not None)
    if x.shape[1] != meta["n_features"]:
        raise DataError(f"{where}: {x.shape[1]} features per sample, but the model takes {meta['n_features']}")
    return Dataset(x, y, n_classes, path, class_names=names)


# --------------------------------------------------------------------------- outputs


def to_user_units(out: np.ndarray, meta: dict, arrays: dict) -> np.ndarray:
    """Regression outputs (N, T) of the network -> predictions in the target's units:
    the one place predict maps them (targets standardized with training statistics,
    stored in the checkpoint, are mapped back by gpubp/targets.py)."""
    scaler = TargetScaler.from_arrays(arrays, out.shape[1])
    return user_outputs(out, meta["model"]["loss"], False, scaler)


def class_outputs(out: np.ndarray, loss: str, class_names: list, threshold: float, logits: bool):
    """(predicted class index (N,), column names, values (N, k)) for network outputs
    `out` (N, n_out) of a classifier: probabilities p_<class> (gpubp/targets.py, as the
    estimators' predict_proba), or raw outputs with `logits` (logit_<class>;
    output_<class> for a loss without probabilities; one output: about the second class)."""
    pred = predicted_classes(out, threshold)
    if logits:
        raw = "logit" if loss in PROBABILISTIC else "output"
        shown = class_names[-1:] if out.shape[1] == 1 else class_names
        return pred, [f"{raw}_{c}" for c in shown], out
    return pred, [f"p_{c}" for c in class_names], class_probabilities(out, loss)


def decimal(values: np.ndarray) -> list[list[str]]:
    """Each value in plain positional decimal, as short as its dtype allows (no exponent)."""
    fmt = np.format_float_positional
    return [[fmt(v, unique=True, trim="-") for v in row] for row in values]


def csv_text(first: list[str], header: list[str], values: np.ndarray) -> str:
    """Rows 'first[i],values[i,0],...' under the header; cells holding the delimiter or a
    quote are quoted."""

    def cell(text: str) -> str:
        return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n\r') else text

    lines = [",".join(cell(h) for h in header)]
    for label, row in zip(first, decimal(values)):
        lines.append(",".join([cell(label), *row] if label is not None else row))
    return "".join(line + "\n" for line in lines)
