"""Ensembles of a sweep run's models: `gpubp predict --ensemble`, `gpubp eval --ensemble`.

The ensemble's prediction is the mean over the M models of
    softmax(x) for softmax_cross_entropy, sigmoid(x) for binary_cross_entropy
    (class probabilities), the raw outputs otherwise (regression, one-hot mse/huber);
each model standardises the input with its own checkpoint's statistics.
"""

from __future__ import annotations

import glob
import os

import numpy as np

from .errors import UsageError


def member_checkpoints(run_dir: str) -> list[str]:
    """models/mNNN/best.npz (last.npz where no best was written) of a sweep run, in model order."""
    if not os.path.isdir(run_dir):
        raise UsageError(
            f"--ensemble needs the directory of a sweep run (gpubp train with a [sweep] table); {run_dir!r} is not a directory"
        )
    found = []
    for folder in sorted(glob.glob(os.path.join(run_dir, "models", "m[0-9][0-9][0-9]*"))):
        if _diverged(folder):  # frozen by the guard: not a member worth averaging
            continue
        for name in ("best.npz", "last.npz"):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                found.append(path)
                break
    if not found:
        raise UsageError(f"--ensemble: {run_dir!r} holds no models/mNNN/best.npz; give the directory of a sweep run")
    return found


def _diverged(folder: str) -> bool:
    import json

    try:
        with open(os.path.join(folder, "summary.json")) as f:
            return str(json.load(f).get("status", "")).startswith("diverged")
    except (OSError, ValueError):
        return False


def probabilities(out: np.ndarray, loss: str) -> np.ndarray:
    """What the ensemble averages: class probabilities from logits, or the outputs themselves."""
    if loss == "softmax_cross_entropy":
        e = np.exp(out - out.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    if loss == "binary_cross_entropy":
        return 0.5 * (1.0 + np.tanh(0.5 * out))  # sigmoid, without overflow
    return out


def _user_outputs(path: str, meta: dict, cfg, model, x_std: np.ndarray) -> np.ndarray:
    """What member `path` predicts, in the units the ensemble averages: probabilities, or
    regression values mapped back to the targets' units (its checkpoint's target.* statistics)."""
    out = _forward(model, x_std)
    if meta["n_classes"] is not None:
        return probabilities(out, cfg.loss.name)
    from .checkpoint import load_checkpoint
    from .targets import TargetScaler

    return TargetScaler.from_arrays(load_checkpoint(path)[1], out.shape[1]).inverse(out)


def _forward(model, x_std: np.ndarray) -> np.ndarray:
    xd = model.backend.asarray(x_std, dtype=model.dtype)
    chunks = [model.backend.to_numpy(model.forward(xd[i : i + 4096])) for i in range(0, len(xd), 4096)]
    return np.concatenate(chunks).astype(np.float64)


def load_members(run_dir: str, device: str, load):
    """[(path, meta, cfg, model, std)] for every member; `load` is cli._load_for_inference."""
    members = []
    for path in member_checkpoints(run_dir):
        meta, cfg, model, std = load(path, device, False)[:4]
        members.append((path, meta, cfg, model, std))
    widths = {m[1]["model"]["sizes"][-1] for m in members}
    features = {m[1]["n_features"] for m in members}
    if len(widths) > 1 or len(features) > 1:
        raise UsageError(f"--ensemble: the models of {run_dir!r} differ in inputs or outputs; they cannot be averaged")
    return members


def predict(members, x: np.ndarray) -> np.ndarray:
    """The ensemble's mean prediction (N, n_out) for raw features x (N, F)."""
    total = None
    for path, meta, cfg, model, std in members:
        p = _user_outputs(path, meta, cfg, model, std(x))
        total = p if total is None else total + p
    return total / len(members)


def evaluate(members, split: str) -> dict:
    """The ensemble's and each member's metrics on `split` of the first member's data
    (its seed's split): accuracy (classification) and the loss of the averaged
    prediction (negative log likelihood of the mean probabilities, or the mean squared error)."""
    from . import data as D
    from .trainer import load_dataset, loss_targets

    cfg0, width = members[0][2], members[0][1]["model"]["sizes"][-1]
    d = cfg0.data
    ds = load_dataset(cfg0)
    part = getattr(D.split_dataset(ds, d.val_fraction, d.test_fraction, cfg0.train.seed, d.stratify), split)
    if part is None:
        raise UsageError(f"--split {split}: the first model's run has no {split} split")
    loss_name = cfg0.loss.name
    labels = part.y if ds.is_classification else None
    target = loss_targets(part, loss_name, width) if ds.is_classification else part.y.reshape(len(part), -1)
    per_member, total = [], None
    for path, meta, cfg, model, std in members:
        p = _user_outputs(path, meta, cfg, model, std(part.x))
        total = p if total is None else total + p
        per_member.append({"checkpoint": path, **_metrics(p, labels, target, loss_name)})
    result = {"split": split, "rows": len(part), "ensemble": _metrics(total / len(members), labels, target, loss_name)}
    if len({m[2].train.seed for m in members}) > 1:
        result["note"] = (
            f"evaluated on the {split} split of train.seed {cfg0.train.seed}; members with another seed "
            "were trained on a different split of the same data"
        )
    result["members"] = per_member
    return result


def _metrics(p: np.ndarray, labels, target, loss_name: str) -> dict:
    out = {}
    if labels is not None:
        pred = p.argmax(axis=1) if p.shape[1] > 1 else (p[:, 0] > _threshold(loss_name)).astype(int)
        out["accuracy"] = float(np.mean(pred == labels))
    if loss_name == "softmax_cross_entropy":
        out["nll"] = float(-np.mean(np.log(np.maximum(p[np.arange(len(p)), labels], 1e-300))))
    else:
        out["mse"] = float(np.mean((p - target.reshape(p.shape)) ** 2))
    return out


def _threshold(loss_name: str) -> float:
    return 0.5  # probabilities (bce) and one-hot / 0-1 outputs alike split at 0.5
