"""What the targets are and how model outputs map back to them.

The rule `data.task = "auto"` follows (N rows, K distinct target values):

- text labels are classes;
- targets with more than one column, or any value that is not a whole number, are
  regression values;
- whole numbers are classes when K <= max(2, min(50, N // 10)) (at least ten rows per
  class on average, at most 50 classes), or when they are exactly the codes 0..K-1
  (labels already encoded, e.g. 100 classes of CIFAR-100); otherwise regression
  values (scikit-learn's diabetes target, 214 whole numbers in 442 rows).

Labels that cannot be classes are refused, whatever chose the task: a single class,
or more than N / 2 distinct labels (fewer than two rows per class).

Regression targets are standardised with the training split's statistics,
t = (y - mean) / std, when the loss is mse or huber; `TargetScaler` holds the
statistics (stored in checkpoints as target.mean, target.std) and `user_outputs` maps
the model's outputs back to what the user sees: values in the targets' own units, or
one probability per class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import DataError

MAX_AUTO_CLASSES = 50
SCALED_LOSSES = ("mse", "huber")  # the losses whose targets are standardised


def class_limit(n_rows: int) -> int:
    """The most distinct whole numbers "auto" reads as classes (unless they are 0..K-1)."""
    return max(2, min(MAX_AUTO_CLASSES, n_rows // 10))


def _whole_values(y: np.ndarray) -> np.ndarray | None:
    """The distinct values of a one-column numeric target if all are whole numbers, else None."""
    if y.dtype == bool:
        return np.unique(y.astype(np.int64))
    if not np.issubdtype(y.dtype, np.number) or np.issubdtype(y.dtype, np.complexfloating):
        return None
    if y.ndim > 1 and int(np.prod(y.shape[1:])) != 1:
        return None
    if np.issubdtype(y.dtype, np.integer):
        return np.unique(y)
    yf = y.astype(np.float64).ravel()
    if not np.all(np.isfinite(yf)) or np.any(yf != np.round(yf)):
        return None
    return np.unique(yf)


def auto_is_classification(y) -> bool:
    """The "auto" rule of the module docstring for numeric targets y (N,) or (N, T)."""
    y = np.asarray(y)
    values = _whole_values(y)
    if values is None or y.shape[0] == 0:
        return False
    k = len(values)
    codes = values[0] == 0 and values[-1] == k - 1  # distinct and sorted: exactly 0..K-1
    return k <= class_limit(y.shape[0]) or bool(codes)


def describe_choice(y: np.ndarray, classification: bool, text_labels: bool) -> str:
    """One line naming the task "auto" chose, why, and how to override it."""
    n = y.shape[0]
    if classification:
        k = len(np.unique(y))
        why = "text labels" if text_labels else f"{k} distinct whole numbers in {n} rows"
        return f"data.task auto: classification ({why}); override with --set data.task=regression"
    values = _whole_values(y)
    if values is None:
        why = "values that are not all whole numbers" if y.ndim == 1 or y.shape[1] == 1 else f"{y.shape[1]} columns"
    else:
        why = f"{len(values)} distinct whole numbers in {n} rows, more than the {class_limit(n)} read as classes"
    return f"data.task auto: regression ({why}); override with --set data.task=classification"


def check_classes(labels: np.ndarray, where: str) -> None:
    """Refuse class labels (N,) that cannot be classes: one class, or > N/2 of them."""
    n = labels.shape[0]
    present = np.unique(labels)
    if len(present) < 2:
        raise DataError(
            f"{where}: every row has the same label ({present[0] if len(present) else 'none'}), a single class; "
            "a classifier needs two or more (check data.label_column)"
        )
    if len(present) > n / 2:
        raise DataError(
            f"{where}: {len(present)} distinct labels in {n} rows cannot be classes (fewer than two rows per class); "
            "set data.task = 'regression' if they are values, or choose another data.label_column"
        )


@dataclass
class TargetScaler:
    """t = (y - mean) / std per target column, from the training split; identity for
    classes and for losses whose targets must stay as given (binary_cross_entropy)."""

    mean: np.ndarray  # (T,)
    std: np.ndarray  # (T,)

    @classmethod
    def fit(cls, y: np.ndarray) -> TargetScaler:
        y = np.asarray(y, dtype=np.float64).reshape(y.shape[0], -1)
        std = y.std(axis=0)
        std[std < 1e-12] = 1.0  # a constant target: only centred
        return cls(y.mean(axis=0), std)

    @classmethod
    def identity(cls, n_targets: int = 1) -> TargetScaler:
        return cls(np.zeros(n_targets), np.ones(n_targets))

    @classmethod
    def from_arrays(cls, arrays: dict, n_targets: int = 1) -> TargetScaler:
        """The scaler stored in a checkpoint's arrays; identity for one without (older, or classes)."""
        if "target.mean" in arrays and "target.std" in arrays:
            return cls(np.asarray(arrays["target.mean"], np.float64), np.asarray(arrays["target.std"], np.float64))
        return cls.identity(n_targets)

    def arrays(self) -> dict:
        return {"target.mean": self.mean, "target.std": self.std}

    def transform(self, y: np.ndarray) -> np.ndarray:
        """User units -> the model's: (y - mean) / std, (N, T)."""
        return (np.asarray(y, dtype=np.float64).reshape(y.shape[0], -1) - self.mean) / self.std

    def inverse(self, t: np.ndarray) -> np.ndarray:
        """The model's units -> the user's: t * std + mean, (N, T)."""
        return np.asarray(t, dtype=np.float64) * self.std + self.mean


def class_probabilities(out: np.ndarray, loss: str) -> np.ndarray:
    """(N, C) probabilities from outputs (N, width) of a classifier:
    softmax_cross_entropy: softmax(out); binary_cross_entropy: sigmoid (one column: the
    probability of class 1, so [1 - s, s]; several: normalised to sum to 1);
    mse, huber (0/1 or one-hot targets): the outputs clipped to [0, 1], normalised
    likewise (scores, not calibrated probabilities)."""
    out = np.asarray(out, dtype=np.float64)
    if loss == "softmax_cross_entropy":
        e = np.exp(out - out.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    s = 0.5 * (1.0 + np.tanh(0.5 * out)) if loss == "binary_cross_entropy" else np.clip(out, 0.0, 1.0)
    if s.shape[1] == 1:
        return np.concatenate([1.0 - s, s], axis=1)
    total = s.sum(axis=1, keepdims=True)
    return np.divide(s, total, out=np.full_like(s, 1.0 / s.shape[1]), where=total > 0)


def predicted_classes(out: np.ndarray, threshold: float) -> np.ndarray:
    """(N,) class indices, deciding as training's accuracy does: argmax of several
    outputs, or one output > threshold (0 for logits, 0.5 for 0/1 regression)."""
    out = np.asarray(out)
    if out.shape[1] == 1:
        return (out[:, 0] > threshold).astype(np.int64)
    return out.argmax(axis=1).astype(np.int64)


def user_outputs(out: np.ndarray, loss: str, classification: bool, scaler: TargetScaler | None) -> np.ndarray:
    """Model outputs (N, width) -> what the user sees: class probabilities (N, C) for
    a classifier, values (N, T) in the targets' own units for regression."""
    if classification:
        return class_probabilities(out, loss)
    return scaler.inverse(out) if scaler is not None else np.asarray(out, dtype=np.float64)
