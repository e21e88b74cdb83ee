"""Finite-difference checks of the backward pass.

The analytic gradient of the model (reverse mode) is compared with the fourth-order
central difference

    dL/dp ~ (L(p - 2h) - 8 L(p - h) + 8 L(p + h) - L(p + 2h)) / (12 h)

whose truncation error is O(h^4) and rounding error about eps |L| / h; with h = 1e-3
in float64 both stay near 1e-12. The error of an entry is
|analytic - numeric| / max(|analytic|, |numeric|, floor): relative where the gradient
is not tiny, absolute (over `floor`) where it is.

Piecewise functions (relu, leaky_relu, elu's second derivative, huber) have kinks;
a difference taken across a kink is meaningless, so `kink_margin` reports how far
every pre-activation stays from the nearest kink, and callers pick inputs with a
margin above 2h.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINKED = {"relu", "leaky_relu", "elu"}  # kinks (or a jump in f'') at z = 0


def numeric_jacobian(fn, p: np.ndarray, h: float = 1e-3, progress=None) -> np.ndarray:
    """d fn / d p (m, p.size) for fn() returning (m,) (or a scalar: (p.size,)), by the
    fourth-order central difference; fn() reads p, which is perturbed in place one
    entry at a time and restored. Column i belongs to p.reshape(-1)[i]. `progress(1)`
    is called after each entry."""
    flat = p.reshape(-1)
    columns = []
    for i in range(flat.size):
        if progress is not None and i:
            progress(1)
        old = flat[i]
        values = []
        for step in (-2.0, -1.0, 1.0, 2.0):
            flat[i] = old + step * h
            values.append(np.asarray(fn(), dtype=np.float64))
        flat[i] = old
        columns.append((values[0] - 8.0 * values[1] + 8.0 * values[2] - values[3]) / (12.0 * h))
    if progress is not None and flat.size:
        progress(1)
    if not columns:
        return np.empty(0, dtype=np.float64)
    return np.stack(columns, axis=-1)


def numeric_grad(fn, p: np.ndarray, h: float = 1e-3, progress=None) -> np.ndarray:
    """d fn / d p, p's shape, for a scalar fn() (see numeric_jacobian)."""
    return numeric_jacobian(fn, p, h, progress).reshape(p.shape)


def max_rel_error(analytic, numeric, floor: float = 1e-6) -> float:
    a = np.asarray(analytic, dtype=np.float64)
    n = np.asarray(numeric, dtype=np.float64)
    if a.size == 0:
        return 0.0
    denom = np.maximum(np.maximum(np.abs(a), np.abs(n)), floor)
    return float(np.max(np.abs(a - n) / denom))


def rounding_floor(loss: float, h: float = 1e-3, rel: float = 1e-7) -> float:
    """A `floor` for max_rel_error at which rounding stays below rel: each of the four
    values of L carries ~eps |L|, weighted 1, 8, 8, 1 over 12 h, so the difference
    quotient is off by ~1.5 eps |L| / h (~1e-12 for |L| ~ 3) whatever the entry; an
    entry smaller than that over rel is judged by its absolute error. At least 1e-6."""
    return max(1e-6, 1.5 * float(np.finfo(np.float64).eps) * abs(loss) / h / rel)


@dataclass
class LayerReport:
    layer: int
    weight_error: float
    bias_error: float


def check_model(model, x, y, h: float = 1e-3, floor: float = 1e-6, progress=None) -> list[LayerReport]:
    """Per-layer max error of the model's parameter gradients against finite
    differences, at batch (x, y). The model should be float64 and on the CPU; a GPU
    model works too (each perturbation is a small copy)."""
    be = model.backend
    x = model.as_input(x)
    target = model.as_target(y, x.shape[0])
    model.forward_backward(x, target)
    analytic = [be.to_numpy(g).copy() for g in model.grads]
    host = be.to_numpy(model.flat_params).astype(np.float64).copy()

    def loss_at() -> float:
        model.set_flat_params(host)
        return model.evaluate(x, target, batch_size=x.shape[0])[0]  # forward and loss only

    numeric_flat = numeric_grad(loss_at, host, h, progress)
    model.set_flat_params(host)
    numeric = []
    for w_off, b_off, fan_in, fan_out in model.layout:
        numeric.append(numeric_flat[w_off:b_off].reshape(fan_in, fan_out))
        numeric.append(numeric_flat[b_off : b_off + fan_out])
    reports = []
    for k in range(model.n_layers):
        reports.append(
            LayerReport(
                k + 1,
                max_rel_error(analytic[2 * k], numeric[2 * k], floor),
                max_rel_error(analytic[2 * k + 1], numeric[2 * k + 1], floor),
            )
        )
    return reports


def kink_margin(model, x, y=None) -> float:
    """The smallest distance of any quantity from a kink of its function: pre-activations
    of relu/leaky_relu/elu layers from 0, and huber residuals from +-delta. inf if none."""
    be = model.backend
    x = model.as_input(x)
    ws = model._workspace(x.shape[0])
    out = model._forward(x, ws)
    margin = np.inf
    for k, act in enumerate(model.activations):
        if act.name in KINKED:
            # z_k = x_k W_k + b_k, recomputed: the forward pass may have overwritten it
            W, b = model.layer_params(k)
            z = be.to_numpy(ws.x[k]) @ be.to_numpy(W) + be.to_numpy(b)
            margin = min(margin, float(np.min(np.abs(z))))
    if y is not None and model.loss.name == "huber":
        r = be.to_numpy(out) - np.asarray(y, dtype=np.float64).reshape(out.shape)
        margin = min(margin, float(np.min(np.abs(np.abs(r) - model.loss.huber_delta))))
    return margin


def pick_samples(model, x, y, n: int, h: float = 1e-3):
    """Up to n rows of (x, y), in order, whose kink margin (see kink_margin) exceeds
    10 times the largest move of a first-layer pre-activation in the difference,
    2h max(1, |x_i|): a difference across a kink would measure the jump, not f'.

    x: (N, n_in) and y on the host. Returns (row indices, the smallest margin among
    them, the number of rows looked at); every row counts when the model has no kinks."""
    chosen, smallest, seen = [], np.inf, 0
    for i in range(x.shape[0]):
        if len(chosen) == n:
            break
        seen += 1
        xi = x[i : i + 1]
        margin = kink_margin(model, xi, None if y is None else y[i : i + 1])
        if margin > 20.0 * h * max(1.0, float(np.max(np.abs(xi)))):
            chosen.append(i)
            smallest = min(smallest, margin)
    return chosen, smallest, seen
