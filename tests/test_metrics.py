"""gpubp.metrics against closed forms and scikit-learn's metrics (where installed)."""

import numpy as np
import pytest

from gpubp import metrics as M

# float64 sums over a few hundred terms: agreement to ~1e-12 relative (order of summation only)
ATOL, RTOL = 1e-12, 1e-10


def close(a, b):
    return abs(a - b) <= ATOL + RTOL * abs(b)


def test_regression_closed_forms():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    p = np.array([1.0, 3.0, 3.0, 2.0])  # residuals 0, -1, 0, 2
    assert close(M.rmse(y, p), np.sqrt(5 / 4))
    assert close(M.mae(y, p), 3 / 4)
    assert close(M.r2(y, p), 1 - 5 / 5)  # sum (y - mean)^2 = 2.25 + 0.25 + 0.25 + 2.25 = 5
    assert M.r2(y, y) == 1.0 and M.r2(y, np.full(4, y.mean())) == 0.0
    # a constant target: 1 when met exactly, 0 otherwise (scikit-learn's convention)
    assert M.r2([2.0, 2.0], [2.0, 2.0]) == 1.0 and M.r2([2.0, 2.0], [1.0, 2.0]) == 0.0
    # several columns: the mean of the per-column values
    Y, P = np.stack([y, 2 * y], 1), np.stack([p, 2 * y], 1)
    assert close(M.rmse(Y, P), np.sqrt(5 / 4) / 2) and close(M.r2(Y, P), 0.5)


def test_classification_closed_form():
    y = [0, 0, 1, 1, 2, 2]
    p = [0, 1, 1, 1, 0, 2]
    cm = M.confusion_matrix(y, p, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    r = M.classification_report(y, p, 3, ["a", "b", "c"])
    assert r["precision"] == [0.5, 2 / 3, 1.0] and r["recall"] == [0.5, 1.0, 0.5]
    assert close(r["f1"][1], 2 * (2 / 3) / (2 / 3 + 1)) and r["support"] == [2, 2, 2]
    assert r["accuracy"] == 4 / 6 and r["classes"] == ["a", "b", "c"]
    # a class never predicted and never present: zeros, not NaN
    r = M.classification_report([0, 1], [0, 1], 3)
    assert r["precision"][2] == 0.0 and r["recall"][2] == 0.0 and r["f1"][2] == 0.0


def test_against_sklearn():
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y, p = rng.normal(size=(200, 3)), rng.normal(size=(200, 3))
    assert close(M.r2(y, p), skm.r2_score(y, p))
    assert close(M.mae(y, p), skm.mean_absolute_error(y, p))
    assert close(M.rmse(y, p), np.mean(np.sqrt(skm.mean_squared_error(y, p, multioutput="raw_values"))))
    labels, pred = rng.integers(0, 4, 300), rng.integers(0, 4, 300)
    pred[pred == 3] = 2  # class 3 never predicted: precision 0 (zero_division=0)
    r = M.classification_report(labels, pred, 4)
    assert np.array_equal(r["confusion_matrix"], skm.confusion_matrix(labels, pred, labels=range(4)))
    P, R, F, S = skm.precision_recall_fscore_support(labels, pred, labels=range(4), zero_division=0)
    for mine, ref in ((r["precision"], P), (r["recall"], R), (r["f1"], F)):
        assert all(close(a, b) for a, b in zip(mine, ref))
    assert r["support"] == S.tolist()
    assert close(r["macro_f1"], skm.f1_score(labels, pred, average="macro", labels=range(4), zero_division=0))


def test_json_keeps_matrices_readable():
    text = M.to_json({"a": [[1, 2], [3, 4]], "b": ["x", "y"], "c": 1.5})
    assert "[1, 2]" in text and '["x", "y"]' in text
    import json

    assert json.loads(text) == {"a": [[1, 2], [3, 4]], "b": ["x", "y"], "c": 1.5}


def test_regression_report_is_the_three_metrics_bit_for_bit():
    # the report computes the residuals once (it runs at every evaluation); its numbers
    # must be those of r2, rmse and mae exactly, constant columns included
    rng = np.random.default_rng(1)
    cases = [rng.normal(size=s) * rng.uniform(0.1, 100) for s in [(45, 1), (200, 3), (7,), (1, 1)] for _ in range(5)]
    cases.append(np.array([[2.0, 1.0], [2.0, 3.0]]))  # first column constant
    for y in cases:
        for p in (y + rng.normal(size=y.shape), y.copy()):
            assert M.regression_report(y, p) == {"r2": M.r2(y, p), "rmse": M.rmse(y, p), "mae": M.mae(y, p)}
