"""`gpubp plot`: a run's loss and accuracy curves from metrics.jsonl, as a PNG.
matplotlib is an optional extra: pip install 'gpubp[plot]'."""

from __future__ import annotations

import json
import os

from .errors import UsageError


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UsageError(f"{run_dir!r} holds no metrics.jsonl; give the directory of a gpubp run")
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip() and line.endswith("\n")]  # not one a crash cut
    if not records:
        raise UsageError(f"{path} is empty: the run logged no evaluation yet")
    return records


def pyplot(what: str):
    """matplotlib.pyplot on the file-only Agg backend, or a UsageError saying how to get it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError(f"{what} needs matplotlib: pip install 'gpubp[plot]'") from None
    return plt


def plot_run(run_dir: str, output: str | None = None) -> str:
    records = read_metrics(run_dir)
    plt = pyplot("gpubp plot")
    steps = [r["step"] for r in records]
    acc_keys = [k for k in ("val_accuracy",) if any(k in r for r in records)]
    fig, axes = plt.subplots(1, 1 + len(acc_keys), figsize=(6 + 5 * len(acc_keys), 4), squeeze=False)
    ax = axes[0][0]
    for key in ("train_loss", "val_loss"):
        if any(key in r for r in records):
            ax.plot(steps, [r.get(key) for r in records], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    for i, key in enumerate(acc_keys, start=1):
        ax = axes[0][i]
        ax.plot(steps, [r.get(key) for r in records], label=key, color="C2")
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    fig.tight_layout()
    output = output or os.path.join(run_dir, "curves.png")
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output
