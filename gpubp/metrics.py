"""Metrics on the host, in NumPy: what people expect from scikit-learn's `metrics`.

Regression (y, p of shape (N,) or (N, T); multi-column results are the mean over the
columns, as scikit-learn's multioutput='uniform_average'):

    RMSE = sqrt(mean_i (y_i - p_i)^2)      MAE = mean_i |y_i - p_i|
    R^2  = 1 - sum_i (y_i - p_i)^2 / sum_i (y_i - mean(y))^2
           (a constant column: 1 when predicted exactly, else 0, as scikit-learn)

Classification (integer labels 0..C-1):

    confusion[i, j] = #{n : y_n = i and p_n = j}          (rows: true, columns: predicted)
    precision_c = confusion[c, c] / sum_i confusion[i, c]  (0 when nothing is predicted c)
    recall_c    = confusion[c, c] / sum_j confusion[c, j]  (0 when no sample is c)
    F1_c        = 2 P R / (P + R)                          (0 when P + R = 0)
"""

from __future__ import annotations

import json
import re

import numpy as np


def _columns(y, p) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    y = y.reshape(y.shape[0], -1)  # (N, T)
    p = p.reshape(p.shape[0], -1)
    if y.shape != p.shape:
        raise ValueError(f"targets {y.shape} and predictions {p.shape} differ in shape")
    return y, p


def rmse(y, p) -> float:
    y, p = _columns(y, p)
    return float(np.mean(np.sqrt(np.mean((y - p) ** 2, axis=0))))


def mae(y, p) -> float:
    y, p = _columns(y, p)
    return float(np.mean(np.mean(np.abs(y - p), axis=0)))


def r2(y, p) -> float:
    y, p = _columns(y, p)
    ss_res = np.sum((y - p) ** 2, axis=0)  # (T,)
    ss_tot = np.sum((y - y.mean(axis=0)) ** 2, axis=0)
    safe = np.where(ss_tot > 0, ss_tot, 1.0)
    score = np.where(ss_tot > 0, 1.0 - ss_res / safe, np.where(ss_res == 0, 1.0, 0.0))
    return float(np.mean(score))


def regression_report(y, p) -> dict:
    """{r2, rmse, mae} of predictions p against targets y, both in the targets' units:
    the values of r2, rmse and mae (the same operations, bit for bit), the residuals
    computed once (it runs at every evaluation). np.mean(v) = np.add.reduce(v) / v.size."""
    y, p = _columns(y, p)
    n, t = y.shape
    add = np.add.reduce
    err = y - p  # (N, T)
    ss_res = add(err * err, axis=0)  # (T,) = np.sum((y - p) ** 2, axis=0)
    dev = y - add(y, axis=0) / n  # y - y.mean(axis=0)
    ss_tot = add(dev * dev, axis=0)
    if (ss_tot > 0).all():  # no constant column: r2's np.where picks 1 - ss_res / ss_tot everywhere
        score = 1.0 - ss_res / ss_tot
    else:
        safe = np.where(ss_tot > 0, ss_tot, 1.0)
        score = np.where(ss_tot > 0, 1.0 - ss_res / safe, np.where(ss_res == 0, 1.0, 0.0))
    return {
        "r2": float(add(score) / t),
        "rmse": float(add(np.sqrt(ss_res / n)) / t),
        "mae": float(add(add(np.abs(err), axis=0) / n) / t),
    }


def confusion_matrix(y, p, n_classes: int) -> np.ndarray:
    """(C, C) int64 counts; row = true class, column = predicted class."""
    y = np.asarray(y, dtype=np.int64).ravel()
    p = np.asarray(p, dtype=np.int64).ravel()
    return np.bincount(y * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(num.shape, dtype=np.float64), where=den > 0)


def per_class(confusion: np.ndarray) -> dict:
    """Per-class precision, recall, F1 and support (lists of C) from a confusion matrix."""
    c = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(c)
    precision = _ratio(tp, c.sum(axis=0))
    recall = _ratio(tp, c.sum(axis=1))
    f1 = _ratio(2 * precision * recall, precision + recall)
    return {
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "f1": f1.tolist(),
        "support": c.sum(axis=1).astype(np.int64).tolist(),
    }


def classification_report(y, p, n_classes: int, class_names=None) -> dict:
    """{accuracy, macro_f1, classes, precision, recall, f1, support, confusion_matrix}."""
    cm = confusion_matrix(y, p, n_classes)
    out = {"accuracy": float(np.trace(cm) / max(cm.sum(), 1))}
    scores = per_class(cm)
    out["macro_f1"] = float(np.mean(scores["f1"]))
    out["classes"] = [str(c) for c in class_names] if class_names else list(range(n_classes))
    out.update(scores)
    out["confusion_matrix"] = cm.tolist()
    return out


def format_classification(report: dict, title: str) -> str:
    """The report as aligned text: one line per class, then the confusion matrix."""
    names = [str(c) for c in report["classes"]]
    w = max(8, *(len(n) for n in names))
    lines = [f"{title}: accuracy {report['accuracy']:.4f}, macro F1 {report['macro_f1']:.4f}",
             f"  {'class':>{w}}  precision  recall      f1  support"]  # fmt: skip
    for i, name in enumerate(names):
        lines.append(f"  {name:>{w}}  {report['precision'][i]:9.4f}  {report['recall'][i]:6.4f}  "
                     f"{report['f1'][i]:6.4f}  {report['support'][i]:7d}")  # fmt: skip
    lines.append(f"  confusion matrix (rows true, columns predicted: {' '.join(names)})")
    for name, row in zip(names, report["confusion_matrix"]):
        lines.append(f"  {name:>{w}}  " + " ".join(f"{v:6d}" for v in row))
    return "\n".join(lines)


# a JSON list that holds no list or object, spread over lines by json.dumps(indent=2); compiled
# once at import, not in the summary's write at the end of each run
_FLAT_LIST = re.compile(r"\[\s+([^\[\]{}]*?)\s+\]")


def to_json(obj) -> str:
    """JSON with two-space indents, but each list of plain numbers or strings on one
    line (a confusion matrix reads as a matrix)."""
    text = json.dumps(obj, indent=2)
    return _FLAT_LIST.sub(lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
