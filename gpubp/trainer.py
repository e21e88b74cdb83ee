"""The training loop: data to the device, batches, steps, evaluation, logs, checkpoints.

One step on device arrays only:  gather batch -> model.forward_backward -> (clip) ->
optimizer.step. The host reads numbers back only when it logs (every eval_every
steps or once per epoch): the running training loss and the validation metrics.

Everything a resumed run needs is a function of the checkpoint: the parameters and
optimizer state, the step (hence the epoch and the batch within it; the epoch's order
is a function of (seed, epoch)), and the early-stopping record. A resumed run
therefore repeats an uninterrupted one exactly (bitwise on the CPU).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from . import data as D
from .backend import resolve_device
from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config, dump_toml, validate
from .errors import CheckpointError, ConfigError, DataError, TrainingError, UsageError
from .model import MLP
from .optim import clip_scale, make_optimizer
from .schedules import lr_at

RUN_FILES = ("metrics.jsonl", "summary.json", "last.npz", "best.npz", "config.toml")
# [train] keys a resumed run may change; anything else must match the checkpoint
RESUMABLE_CHANGES = {"epochs", "steps", "eval_every", "early_stopping_patience", "device", "eval_batch_size"}


# --------------------------------------------------------------------------- data


def load_dataset(cfg: Config) -> D.Dataset:
    d = cfg.data
    task = {"auto": None, "classification": True, "regression": False}[d.task]
    seed = cfg.train.seed
    if d.dataset == "digits":
        ds = D.load_digits()
    elif d.dataset == "mnist":
        ds = D.load_mnist(cfg.data_path())
    elif d.dataset == "npz":
        ds = D.load_npz(cfg.data_path(), task)
    elif d.dataset == "csv":
        ds = D.load_csv(cfg.data_path(), d.label_column, task)
    elif d.dataset == "spirals":
        ds = D.make_spirals(d.n_samples, d.n_classes, d.noise, seed)
    elif d.dataset == "regression":
        ds = D.make_regression(d.n_samples, d.n_features, d.noise, seed)
    else:  # validated before; kept for a clear failure if the registry grows
        raise ConfigError(f"{cfg.source}: data.dataset {d.dataset!r} has no loader")
    if task is False and ds.is_classification:
        ds = D.Dataset(ds.x, ds.y.astype(np.float64).reshape(-1, 1), None, ds.name, ds.test)
    return ds


def output_width(ds: D.Dataset, loss: str) -> int:
    """The network's output width for this data and loss."""
    if not ds.is_classification:
        if loss == "softmax_cross_entropy":
            raise ConfigError(
                f"loss.name 'softmax_cross_entropy' needs class labels, but {ds.name} has real-valued targets; "
                "use mse or huber"
            )
        return ds.y.shape[1]
    if loss == "softmax_cross_entropy":
        return ds.n_classes
    return 1 if ds.n_classes <= 2 else ds.n_classes  # 0/1 target, or one-hot


def loss_targets(ds: D.Dataset, loss: str, width: int) -> np.ndarray:
    """Targets in the form the loss takes: labels, a 0/1 column, one-hot rows, or values."""
    if not ds.is_classification:
        if loss == "binary_cross_entropy" and (ds.y.min() < 0 or ds.y.max() > 1):
            raise DataError(
                f"{ds.name}: binary_cross_entropy needs targets in [0, 1], found {ds.y.min():g}..{ds.y.max():g}"
            )
        return ds.y
    if loss == "softmax_cross_entropy":
        return ds.y
    if width == 1:
        return ds.y.astype(np.float64).reshape(-1, 1)
    return np.eye(width)[ds.y]


# --------------------------------------------------------------------------- run setup


@dataclass
class Run:
    """Everything built from a config: backend, model, device data, optimizer."""

    cfg: Config
    backend: object
    model: MLP
    standardizer: D.Standardizer
    n_features: int
    n_classes: int | None
    class_names: list
    splits: dict  # name -> DeviceSplit or None


def build_model(cfg: Config, n_features: int, n_out: int, backend) -> MLP:
    m = cfg.model
    return MLP(
        [n_features, *m.hidden, n_out], m.activation, m.output_activation, cfg.loss.name,
        dtype=m.dtype, seed=cfg.train.seed, init=m.init, leaky_relu_slope=m.leaky_relu_slope,
        label_smoothing=cfg.loss.label_smoothing, huber_delta=cfg.loss.huber_delta,
        residual=m.residual, backend=backend,
    )  # fmt: skip


def prepare(cfg: Config, device: str, log=None, standardizer: D.Standardizer | None = None) -> Run:
    """Backend, data (split, standardised, on the device) and a freshly initialised
    model. `standardizer` replaces the statistics fitted on the training split (a
    checkpoint's own, for eval)."""
    backend, note = resolve_device(device)
    if note and log:
        log(note)
    ds = load_dataset(cfg)
    d = cfg.data
    splits = D.split_dataset(ds, d.val_fraction, d.test_fraction, cfg.train.seed, d.stratify)
    if cfg.train.early_stopping_metric == "val_accuracy" and not ds.is_classification:
        raise ConfigError(f"{cfg.source}: train.early_stopping_metric 'val_accuracy' needs a classification dataset")
    if standardizer is not None:
        std = standardizer
    elif d.standardize:
        std = D.Standardizer.fit(splits.train.x)
    else:
        std = D.Standardizer.identity(ds.x.shape[1])
    width = output_width(ds, cfg.loss.name)
    model = build_model(cfg, ds.x.shape[1], width, backend)
    dev = {}
    for name in ("train", "val", "test"):
        part = getattr(splits, name)
        dev[name] = D.DeviceSplit(model, part, std, loss_targets(part, cfg.loss.name, width)) if part else None
    return Run(cfg, backend, model, std, ds.x.shape[1], ds.n_classes, ds.class_names, dev)


def prepare_out_dir(out_dir: str, overwrite: bool) -> None:
    """Refuse to write over an earlier run unless asked; with --overwrite, remove its files."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"--out {out_dir!r} is a file, not a directory; choose another path")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise UsageError(
                f"output directory {out_dir!r} already holds a run; pass --overwrite to replace it, "
                "--resume to continue it, or --out to choose another directory"
            )
        for name in RUN_FILES:
            path = os.path.join(out_dir, name)
            if os.path.exists(path):
                os.unlink(path)
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, ".gpubp-write-test")
        with open(probe, "w"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise UsageError(
            f"output directory {out_dir!r} cannot be written ({e.strerror}); choose another with --out"
        ) from None


def evaluate_split(model: MLP, part: D.DeviceSplit, name: str, batch_size: int) -> dict:
    """{name_loss, name_accuracy (classification)} over a whole split."""
    loss, correct = model.evaluate(part.x, part.target, part.labels, batch_size)
    out = {f"{name}_loss": loss}
    if correct is not None:
        out[f"{name}_accuracy"] = correct / part.n
    return out


# --------------------------------------------------------------------------- checkpoints


def checkpoint_arrays(run: Run, opt) -> dict:
    arrays = {"params": run.backend.to_numpy(run.model.flat_params)}
    for name, value in opt.state_dict().items():
        if name != "steps":
            arrays[f"opt.{name}"] = value
    arrays["std.mean"] = run.standardizer.mean
    arrays["std.std"] = run.standardizer.std
    return arrays


def config_for_checkpoint(cfg: Config) -> dict:
    raw = cfg.to_dict()
    raw["data"]["path"] = cfg.data_path()  # absolute, so the checkpoint works from anywhere
    return raw


def config_from_checkpoint(meta: dict, path: str) -> Config:
    try:
        return validate(meta["config"], f"{path} (stored config)", os.path.dirname(os.path.abspath(path)))
    except (KeyError, TypeError):
        raise CheckpointError(f"{path}: the checkpoint holds no usable config") from None


def restore_params(model: MLP, arrays: dict, path: str) -> None:
    params = arrays.get("params")
    if params is None or params.ndim != 1:
        raise CheckpointError(f"{path}: no flat 'params' array in the checkpoint")
    if params.shape[0] != model.n_params:
        raise CheckpointError(
            f"{path}: holds {params.shape[0]} parameters but the model {model.sizes} has {model.n_params}; "
            "it is from another architecture"
        )
    model.set_flat_params(params)


# --------------------------------------------------------------------------- the loop


class Trainer:
    def __init__(self, cfg: Config, out_dir: str, device: str | None = None, quiet: bool = False,
                 overwrite: bool = False, resume: str | None = None, log=None):  # fmt: skip
        self.quiet = quiet
        self.log = log or (lambda msg: None if quiet else print(msg, file=sys.stderr))
        self.resume_meta = None
        resume_arrays = None
        if resume is not None:
            self.resume_meta, resume_arrays = load_checkpoint(resume)
            stored = config_from_checkpoint(self.resume_meta, resume)
            _check_resume_compatible(stored, cfg, resume)
        self.cfg = cfg
        self.out_dir = out_dir
        self.run = prepare(cfg, device or cfg.train.device, self.log)
        self.model = self.run.model
        o = cfg.optimizer
        self.opt = make_optimizer(self.model, o.name, o.lr, o.momentum, o.dampening, o.nesterov,
                                  tuple(o.betas), o.eps, o.weight_decay)  # fmt: skip
        self.n_train = self.run.splits["train"].n
        t = cfg.train
        self.steps_per_epoch = math.ceil(self.n_train / t.batch_size)
        self.total_steps = t.steps if t.steps > 0 else t.epochs * self.steps_per_epoch
        self.step = 0
        self.best_value = None
        self.best_step = None
        self.bad_evals = 0
        if resume is not None:
            self._restore(resume, resume_arrays)
            if not os.path.isdir(out_dir):
                os.makedirs(out_dir)
        else:
            prepare_out_dir(out_dir, overwrite)
        with open(os.path.join(out_dir, "config.toml"), "w") as f:
            f.write(dump_toml(cfg))

    # ---- state

    def _restore(self, path: str, arrays: dict) -> None:
        meta = self.resume_meta
        restore_params(self.model, arrays, path)
        state = {"steps": meta["optimizer_steps"]}
        state.update({k[4:]: v for k, v in arrays.items() if k.startswith("opt.")})
        try:
            self.opt.load_state_dict(state)
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: optimizer state does not fit this run ({e})") from None
        self.step = int(meta["step"])
        self.best_value, self.best_step = meta["best_value"], meta["best_step"]
        self.bad_evals = int(meta["bad_evals"])
        # drop log lines past the checkpoint: they will be written again
        metrics = os.path.join(self.out_dir, "metrics.jsonl")
        if os.path.exists(metrics):
            with open(metrics) as f:
                keep = [line for line in f if line.strip() and json.loads(line)["step"] <= self.step]
            with open(metrics, "w") as f:
                f.writelines(keep)

    def _meta(self) -> dict:
        epoch, batch = divmod(self.step, self.steps_per_epoch)
        return {
            "step": self.step,
            "epoch": epoch,
            "rng": {
                "scheme": "per-epoch permutation of (seed, epoch)",
                "seed": self.cfg.train.seed,
                "epoch": epoch,
                "batch": batch,
            },  # fmt: skip
            "optimizer_steps": self.opt.steps,
            "best_value": self.best_value,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
            "model": self.model.config_dict(),
            "config": config_for_checkpoint(self.cfg),
            "n_features": self.run.n_features,
            "n_classes": self.run.n_classes,
            "class_names": self.run.class_names,
        }

    def save(self, name: str) -> None:
        save_checkpoint(os.path.join(self.out_dir, name), self._meta(), checkpoint_arrays(self.run, self.opt))

    # ---- evaluation

    def evaluate(self, split: str) -> dict:
        part = self.run.splits[split]
        return evaluate_split(self.model, part, split, self.cfg.train.eval_batch_size) if part else {}

    def _monitor(self, record: dict) -> tuple[str, float, bool]:
        """(name, value, higher is better) of the metric that picks the best checkpoint."""
        metric = self.cfg.train.early_stopping_metric
        if metric in record:
            return metric, record[metric], metric.endswith("accuracy")
        return "train_loss", record["train_loss"], False

    # ---- loop

    def train(self) -> dict:
        from tqdm import tqdm

        be, model, opt, cfg = self.run.backend, self.model, self.opt, self.cfg
        t, sch = cfg.train, cfg.schedule
        xp = be.xp
        train = self.run.splits["train"]
        clip = cfg.optimizer.clip_grad_norm
        eval_every = t.eval_every or self.steps_per_epoch
        running = xp.zeros((), dtype=np.float64)
        n_running = 0
        perm_epoch, perm = None, None
        stopped_early = False
        start = time.perf_counter()
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=self.quiet or not sys.stderr.isatty())  # fmt: skip
        try:
            while self.step < self.total_steps:
                epoch, b = divmod(self.step, self.steps_per_epoch)
                if perm_epoch != epoch:
                    perm = be.asarray(D.epoch_permutation(t.seed, epoch, self.n_train))
                    perm_epoch = epoch
                idx = perm[b * t.batch_size : (b + 1) * t.batch_size]
                xb = be.gather_rows(train.x, idx, self._batch_buffer("x", train.x, idx.shape[0]))
                yb = be.gather_rows(train.target, idx, self._batch_buffer("y", train.target, idx.shape[0]))
                opt.lr = lr_at(self.step, cfg.optimizer.lr, sch.name, self.total_steps, sch.warmup_steps,
                               sch.step_size, sch.gamma, sch.min_lr)  # fmt: skip
                loss = model.forward_backward(xb, yb)
                scale = clip_scale(be, model.flat_grads, clip)[1] if clip > 0 else 1.0
                opt.step(grad_scale=scale)
                running += loss
                n_running += 1
                self.step += 1
                bar.update(1)
                if self.step % eval_every == 0 or self.step == self.total_steps:
                    record = self._log_eval(running, n_running, epoch, start)
                    running[...] = 0.0
                    n_running = 0
                    bar.set_postfix(
                        {k: f"{v:.4g}" for k, v in record.items() if k in ("train_loss", "val_loss", "val_accuracy")}
                    )
                    if self._early_stop(record):
                        stopped_early = True
                        self.log(
                            f"early stopping at step {self.step}: {t.early_stopping_patience} evaluations without improvement"
                        )
                        break
        finally:
            bar.close()
        return self._finish(stopped_early, time.perf_counter() - start)

    def _batch_buffer(self, name, src, n):
        key = (name, n)
        cache = self.__dict__.setdefault("_buffers", {})
        if key not in cache:
            cache[key] = self.run.backend.empty((n, *src.shape[1:]), src.dtype)
        return cache[key]

    def _log_eval(self, running, n_running, epoch, start) -> dict:
        train_loss = self.run.backend.to_float(running) / max(n_running, 1)
        if not math.isfinite(train_loss):
            raise TrainingError(
                f"training diverged: the training loss became {train_loss} before step {self.step} (epoch {epoch + 1}); "
                f"the last good checkpoint is {os.path.join(self.out_dir, 'last.npz')}. "
                "Lower optimizer.lr or set optimizer.clip_grad_norm"
            )
        record = {"step": self.step, "epoch": epoch + 1, "lr": self.opt.lr, "train_loss": train_loss}
        record.update(self.evaluate("val"))
        record["elapsed_s"] = round(time.perf_counter() - start, 4)
        with open(os.path.join(self.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        name, value, higher = self._monitor(record)
        improved = self.best_value is None or (value > self.best_value if higher else value < self.best_value)
        if improved:
            self.best_value, self.best_step, self.bad_evals = value, self.step, 0
        else:
            self.bad_evals += 1
        self.save("last.npz")
        if improved:
            self.save("best.npz")
        return record

    def _early_stop(self, record) -> bool:
        patience = self.cfg.train.early_stopping_patience
        return patience > 0 and self.bad_evals >= patience

    def _finish(self, stopped_early: bool, seconds: float) -> dict:
        summary = {"steps": self.step, "epochs": self.step / self.steps_per_epoch, "stopped_early": stopped_early,
                   "best_step": self.best_step, "best_metric": self._monitor_name(), "best_value": self.best_value,
                   "device": self.run.backend.describe(), "seconds": round(seconds, 3)}  # fmt: skip
        for split in ("train", "val", "test"):
            summary.update(self.evaluate(split))
        path = os.path.join(self.out_dir, "summary.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
        return summary

    def _monitor_name(self) -> str:
        metric = self.cfg.train.early_stopping_metric
        return metric if self.run.splits["val"] is not None else "train_loss"


def _check_resume_compatible(stored: Config, given: Config, path: str) -> None:
    a, b = stored.to_dict(), given.to_dict()
    a["data"]["path"], b["data"]["path"] = stored.data_path(), given.data_path()
    for section, values in a.items():
        for key, value in values.items():
            if section == "train" and key in RESUMABLE_CHANGES:
                continue
            if b[section][key] != value:
                raise ConfigError(
                    f"--resume {path}: {section}.{key} is {b[section][key]!r} in the config but {value!r} in the checkpoint; "
                    "a resumed run must keep the model, data, loss, optimizer and schedule"
                )
