"""`gpubp plot`: a run's curves from metrics.jsonl (losses; accuracy, or R2 and
RMSE/MAE for regression) and, from summary.json, the confusion matrix of its test
(or validation) split, as one PNG. matplotlib is an optional extra:
pip install 'gpubp[plot]'."""

from __future__ import annotations

import json
import os

from .errors import UsageError

# panels of curves: (y-axis label, keys of metrics.jsonl, log scale)
PANELS = [
    ("loss", ("train_loss", "val_loss"), True),
    ("accuracy", ("val_accuracy",), False),
    ("R2", ("val_r2",), False),
    ("error (target units)", ("val_rmse", "val_mae"), False),
]


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UsageError(f"{run_dir!r} holds no metrics.jsonl; give the directory of a gpubp run")
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip() and line.endswith("\n")]  # not one a crash cut
    if not records:
        raise UsageError(f"{path} is empty: the run logged no evaluation yet")
    return records


def read_report(run_dir: str) -> tuple[str, dict] | None:
    """(split, classification report) of summary.json's test split, else its val split."""
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    for split in ("test", "val"):
        if isinstance(summary.get(f"{split}_report"), dict):
            return split, summary[f"{split}_report"]
    return None


def pyplot(what: str):
    """matplotlib.pyplot on the file-only Agg backend, or a UsageError saying how to get it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError(f"{what} needs matplotlib: pip install 'gpubp[plot]'") from None
    return plt


def plot_run(run_dir: str, output: str | None = None, overwrite: bool = False) -> str:
    output = output or os.path.join(run_dir, "curves.png")
    if os.path.exists(output) and not overwrite:
        raise UsageError(f"{output!r} exists; pass --overwrite to replace it, or --output to choose another file")
    records = read_metrics(run_dir)
    if any("model" in r for r in records):
        return plot_sweep(run_dir, records, output)
    report = read_report(run_dir)
    plt = pyplot("gpubp plot")
    steps = [r["step"] for r in records]
    panels = [(label, [k for k in keys if any(k in r for r in records)], log) for label, keys, log in PANELS]
    panels = [p for p in panels if p[1]]
    n = len(panels) + (report is not None)
    fig, axes = plt.subplots(1, n, figsize=(5 * n + 1, 4), squeeze=False)
    for ax, (label, keys, log) in zip(axes[0], panels):
        for key in keys:
            ax.plot(steps, [r.get(key) for r in records], label=key)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
    if report is not None:
        split, rep = report
        ax = axes[0][-1]
        cm = rep["confusion_matrix"]
        names = [str(c) for c in rep["classes"]]
        ax.imshow(cm, cmap="Blues")
        if len(names) <= 20:  # counts and names stay legible
            for i, row in enumerate(cm):
                for j, v in enumerate(row):
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(names)), names, rotation=90 if len(names) > 6 else 0)
            ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{split}: accuracy {rep['accuracy']:.3f}, macro F1 {rep['macro_f1']:.3f}")
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output


def plot_sweep(run_dir: str, records: list[dict], output: str | None = None) -> str:
    """A sweep run: one curve per model (validation loss, else training loss), and the
    final metric of sweep.csv against each swept key."""
    import csv

    plt = pyplot("gpubp plot")
    key = "val_loss" if any("val_loss" in r for r in records) else "train_loss"
    rows = []
    table = os.path.join(run_dir, "sweep.csv")
    if os.path.isfile(table):
        with open(table, newline="") as f:
            rows = list(csv.DictReader(f))
    fixed = {"model", "group", "status", "best_metric", "best_value", "best_step"}
    swept = [c for c in (rows[0] if rows else {}) if c not in fixed and not c.startswith(("best_", "final_"))]
    final = next(
        (c for c in ("final_val_accuracy", "final_val_loss", "final_train_loss") if rows and c in rows[0]), None
    )
    fig, axes = plt.subplots(1, 1 + len(swept), figsize=(6 + 4 * len(swept), 4), squeeze=False)
    ax = axes[0][0]
    for model in sorted({r["model"] for r in records}):
        mine = [r for r in records if r["model"] == model and r.get(key) is not None]
        ax.plot([r["step"] for r in mine], [r[key] for r in mine], lw=1, alpha=0.8, label=f"model {model}")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len({r["model"] for r in records}) <= 12:
        ax.legend(fontsize=7)
    for i, column in enumerate(swept, start=1):
        ax = axes[0][i]
        points = [(_number(r[column]), _number(r[final])) for r in rows if not r["status"].startswith("diverged")]
        points = [(x, y) for x, y in points if x is not None and y is not None]
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=18)
        if points and all(p[0] > 0 for p in points) and max(p[0] for p in points) / min(p[0] for p in points) > 50:
            ax.set_xscale("log")
        ax.set_xlabel(column)
        ax.set_ylabel(final or "")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{os.path.basename(os.path.abspath(run_dir))}: {len({r['model'] for r in records})} models")
    fig.tight_layout()
    output = output or os.path.join(run_dir, "curves.png")
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output


def _number(text):
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if value == value else None  # NaN: a diverged model's metric
