"""The training loop: data to the device, batches, steps, evaluation, logs, checkpoints.

One step on device arrays only (gpubp/step.py): gather batch -> model.forward_backward
-> guard + clip -> optimizer update, every per-step number read from device state, so
that on the GPU the step is captured once per batch shape as a CUDA graph and replayed.
The host reads numbers back only when it logs (every eval_every steps or once per
epoch): the running training loss and the validation metrics.

Everything a resumed run needs is a function of the checkpoint: the parameters and
optimizer state, the step (hence the epoch and the batch within it; the epoch's order
is a function of (seed, epoch)), the running training loss since the last evaluation,
and the early-stopping record. A resumed run therefore repeats an uninterrupted one
exactly (bitwise on the CPU), from a regular checkpoint or from one saved by Ctrl-C.

Reliability: a non-finite loss or gradient is noticed on the device (`FiniteGuard`)
and reported at the next evaluation with its exact step; checkpoints are only ever
written from finite parameters. Ctrl-C finishes the current step, saves last.npz and
raises `Interrupted`. The backend's out-of-memory errors become DeviceRuntimeError
with the batch size and an estimate of the memory the run needs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from . import data as D
from . import distributed, precision, shard
from . import metrics as M
from . import targets as T
from .activations import ACTIVATIONS, SAVES_INPUT
from .backend import resolve_device
from .checkpoint import (
    atomic_write_text,
    best_for_resume,
    folder_sync_once,
    load_checkpoint,
    remove_temporaries,
    save_checkpoint,
)
from .config import Config, dump_toml, format_size, validate
from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DeviceRuntimeError,
    Interrupted,
    TrainingError,
    UsageError,
)
from .model import MLP
from .optim import OPTIMIZER_CLASSES, make_optimizer
from .precision import get_precision
from .schedules import lr_schedule
from .step import Step, StepState
from .stream import StreamSplit
from .stream import budget as stream_budget
from .stream import plan as stream_plan

MIN_EVAL_STEPS = 25  # train.eval_every = 0: whole epochs of at least this many steps between evaluations
RUN_FILES = ("metrics.jsonl", "summary.json", "last.npz", "best.npz", "config.toml")
# [train] keys a resumed run may change; anything else must match the checkpoint
RESUMABLE_CHANGES = {"epochs", "steps", "eval_every", "early_stopping_patience", "device", "eval_batch_size",
                     "restore_best", "checkpoint_every_s", "cuda_graph", "gemm_epilogues", "fused_mlp"}  # fmt: skip


# --------------------------------------------------------------------------- data


def load_dataset(cfg: Config, mapped: bool = False) -> D.Dataset:
    """cfg.data's dataset; `mapped` (a rank of N): the features memory-mapped where the
    file allows it (data.Rows, see gpubp/shard.py), else read whole."""
    d = cfg.data
    task = {"auto": None, "classification": True, "regression": False}[d.task]
    seed = cfg.train.seed
    if d.dataset == "digits":
        ds = D.load_digits()
    elif d.dataset == "mnist":
        ds = (mapped and D.load_mnist_mapped(cfg.data_path())) or D.load_mnist(cfg.data_path())
    elif d.dataset == "npz":
        path = cfg.data_path()
        ds = (mapped and D.load_npz_mapped(path, task, d.missing)) or D.load_npz(path, task, d.missing)
    elif d.dataset == "csv":
        ds = D.load_csv(
            cfg.data_path(), d.label_column, task, d.delimiter, d.feature_columns, d.drop_columns, d.missing
        )
    elif d.dataset == "spirals":
        ds = D.make_spirals(d.n_samples, d.n_classes, d.noise, seed)
    elif d.dataset == "regression":
        ds = D.make_regression(d.n_samples, d.n_features, d.noise, seed)
    else:  # validated before; kept for a clear failure if the registry grows
        raise ConfigError(f"{cfg.source}: data.dataset {d.dataset!r} has no loader")
    if task is False and ds.is_classification:
        ds = D.Dataset(ds.x, ds.y.astype(np.float64).reshape(-1, 1), None, ds.name, ds.test)
    if d.dataset in ("csv", "npz") and ds.is_classification:
        T.check_classes(ds.y, cfg.data_path())
    return ds


def resolve_auto(cfg: Config, ds: D.Dataset) -> Config:
    """The config with data.task and loss.name "auto" made concrete for this data
    (stored so: eval, predict and a resumed run see what training did)."""
    raw = cfg.to_dict()
    task = "classification" if ds.is_classification else "regression"
    raw["data"]["task"] = task
    if ds.label_column is not None:  # a CSV's label column, "auto" resolved
        raw["data"]["label_column"] = ds.label_column
    if raw["loss"]["name"] == "auto":
        raw["loss"]["name"] = "softmax_cross_entropy" if ds.is_classification else "mse"
    if cfg.data.val_fraction == 0:  # no validation split: no early stopping (the default patience is moot)
        raw["train"]["early_stopping_patience"] = 0
    return Config(raw, cfg.source, cfg.base_dir)


def output_width(ds: D.Dataset, loss: str) -> int:
    """The network's output width for this data and loss."""
    if not ds.is_classification:
        if loss == "softmax_cross_entropy":
            raise ConfigError(
                f"loss.name 'softmax_cross_entropy' needs class labels, but {ds.name} has real-valued targets; "
                "use mse or huber"
            )
        if loss == "binary_cross_entropy" and (ds.y.min() < 0 or ds.y.max() > 1):
            raise DataError(
                f"{ds.name}: binary_cross_entropy needs targets in [0, 1], found {ds.y.min():g}..{ds.y.max():g}"
            )
        return ds.y.shape[1]
    if loss == "softmax_cross_entropy":
        return ds.n_classes
    return 1 if ds.n_classes <= 2 else ds.n_classes  # 0/1 target, or one-hot


def loss_targets(ds: D.Dataset, loss: str, width: int) -> np.ndarray:
    """Targets in the form the loss takes: labels, a 0/1 column, one-hot rows, or values."""
    if not ds.is_classification:
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
    data: D.Splits | None = None  # the same splits on the host, in the user's units
    target_scaler: T.TargetScaler | None = None  # regression: targets (y - mean) / std on the device
    feature_names: list = field(default_factory=list)  # CSV column names, [] for other data


def build_model(cfg: Config, n_features: int, n_out: int, backend) -> MLP:
    m = cfg.model
    return MLP(
        [n_features, *m.hidden, n_out], m.activation, m.output_activation, cfg.loss.name,
        dtype=m.dtype, seed=cfg.train.seed, init=m.init, leaky_relu_slope=m.leaky_relu_slope,
        label_smoothing=cfg.loss.label_smoothing, huber_delta=cfg.loss.huber_delta,
        residual=m.residual, backend=backend, gemm_epilogues=epilogues(cfg.train.gemm_epilogues, backend),
        fused_mlp=cfg.train.fused_mlp,
    )  # fmt: skip


def epilogues(setting, backend) -> bool | None:
    """MLP's gemm_epilogues for train.gemm_epilogues: "auto" -> None (the backend's default,
    16-bit precisions only), true -> the backend's default in every precision (the CPU's
    is off), false -> off."""
    if setting == "auto":
        return None
    return bool(setting) and bool(getattr(backend, "gemm_epilogues", False))


_NOTES_SHOWN = set()  # device notes already printed by this process: each once


def prepare(cfg: Config, device: str, log=None, standardizer: D.Standardizer | None = None,
            checkpoint: tuple[dict, str] | None = None, target_scaler: T.TargetScaler | None = None,
            dataset: D.Dataset | None = None, dist=None, stream: bool = False) -> Run:  # fmt: skip
    """Backend, data (split, standardised, on the device) and a freshly initialised
    model. `standardizer`, `target_scaler` replace the statistics fitted on the
    training split (a checkpoint's own, for eval); `checkpoint` (meta, path): the
    model stored there, which must fit this data (a resumed run, eval); `dataset`:
    data given in memory (the estimators), used instead of cfg.data's loader. Run.cfg
    has "auto" resolved (see resolve_auto). `dist`: this rank of N (distributed.py);
    with N > 1 a memory-mapped file's splits are `shard.MappedSplit`s, holding only
    this rank's rows, and the statistics come later, from every rank (shard.finish).
    `stream` (the trainer's runs): a training split over data.device_memory streams from
    host memory (gpubp/stream.py); elsewhere (sweeps, gradcheck) every split is resident."""
    backend, note = resolve_device(device)
    if note and log and note not in _NOTES_SHOWN:
        _NOTES_SHOWN.add(note)
        log(note)
    ranks = (dist.rank, dist.size) if dist is not None and dist.size > 1 and standardizer is None else None
    ds = load_dataset(cfg, mapped=ranks is not None) if dataset is None else dataset
    for line in ds.notes if log else ():
        log(line)
    mapped = isinstance(ds.x, D.Rows)
    auto_task = cfg.data.task == "auto" and cfg.data.dataset in ("csv", "npz")
    cfg = resolve_auto(cfg, ds)
    d = cfg.data
    splits = D.split_dataset(ds, d.val_fraction, d.test_fraction, cfg.train.seed, d.stratify)
    if cfg.train.early_stopping_metric == "val_accuracy" and not ds.is_classification:
        raise ConfigError(f"{cfg.source}: train.early_stopping_metric 'val_accuracy' needs a classification dataset")
    if standardizer is not None:
        std = standardizer
    elif mapped and (d.standardize or d.missing == "mean"):
        std = None  # from every rank's share of the training rows, in shard.finish
    elif mapped:
        std = D.Standardizer.identity(ds.x.shape[1])
    else:  # with data.missing = "mean", also the training means that fill missing values
        std = D.Standardizer.fit(splits.train.x, d.standardize, ds.feature_names, fill_missing=d.missing == "mean")
    width = output_width(ds, cfg.loss.name)
    if checkpoint is not None:
        check_data_fits(cfg, ds, width, *checkpoint)
    if target_scaler is None:
        scaled = not ds.is_classification and cfg.loss.name in T.SCALED_LOSSES and d.standardize_targets
        target_scaler = T.TargetScaler.fit(splits.train.y) if scaled else T.TargetScaler.identity(width)
    single = not mapped and (dist is None or dist.size == 1)  # "free": measured before the model is built
    limit = stream_budget(cfg.data.device_memory, backend) if stream and single else None
    try:
        model = build_model(cfg, ds.x.shape[1], width, backend)
        chunk = stream_chunk(cfg, backend, model, splits, limit, log)
        dev = {}
        for name in ("train", "val", "test"):
            part = getattr(splits, name)
            if part is not None:
                target = loss_targets(part, cfg.loss.name, width)
                target = target if part.is_classification else target_scaler.transform(target)
                if mapped:
                    dev[name] = shard.MappedSplit(model, part, target, *ranks)
                elif name == "train" and chunk is not None:  # over data.device_memory: from host memory
                    order_of = functools.partial(D.epoch_permutation, cfg.train.seed, n=len(part))  # (epoch)
                    dev[name] = StreamSplit(model, part, std, target, chunk, cfg.train.batch_size, order_of)
                else:
                    dev[name] = D.DeviceSplit(model, part, std, target)
            else:
                dev[name] = None
    except backend.out_of_memory_errors:
        sizes = [ds.x.shape[1], *cfg.model.hidden, width]
        n_rows = sum(len(p) for p in (splits.train, splits.val, splits.test) if p is not None)
        raise out_of_memory(backend, cfg, sizes, min(cfg.train.batch_size, len(splits.train)), n_rows) from None
    if auto_task and log:  # what "auto" chose for a file of the user's, once all is well
        log(T.describe_choice(ds.y, ds.is_classification, bool(ds.class_names)))
    run = Run(cfg, backend, model, std, ds.x.shape[1], ds.n_classes, ds.class_names, dev, splits,
              feature_names=ds.feature_names)  # fmt: skip
    run.target_scaler = None if ds.is_classification else target_scaler
    return run


def stream_chunk(cfg: Config, backend, model: MLP, splits: D.Splits, limit: int | None, log=None) -> int | None:
    """Rows per chunk when the training split streams from host memory (gpubp/stream.py):
    the run's memory estimate is over `limit` bytes (data.device_memory); None when it
    fits or there is no limit. Says so once."""
    if limit is None:
        return None
    parts = [p for p in (splits.train, splits.val, splits.test) if p is not None]
    n_rows, n_train = sum(len(p) for p in parts), len(splits.train)
    batch = min(cfg.train.batch_size, n_train)
    est = memory_estimate(cfg, model.sizes, batch, n_rows, backend)
    item = np.dtype(model.dtype).itemsize
    row_bytes = model.sizes[0] * item + (4 if model.loss.info.target == "labels" else model.sizes[-1] * item)
    where = f"data.device_memory = {cfg.data.device_memory!r}"
    if cfg.data.device_memory == "free":
        where = "the device's free memory (data.device_memory = 'free')"
    try:
        chunk, note = stream_plan(est, n_rows, n_train, row_bytes, batch, min(cfg.train.eval_batch_size, n_train),
                                  limit, where)  # fmt: skip
    except ConfigError:
        if cfg.data.device_memory != "free":
            raise  # a budget the user set: a config error (exit 2)
        # the device's own memory is too small, not a setting: out of memory (exit 1), with a smaller batch
        raise out_of_memory(backend, cfg, model.sizes, batch, n_rows) from None
    if chunk is not None and log:
        log(note)
    return chunk


def check_data_fits(cfg: Config, ds: D.Dataset, width: int, meta: dict, path: str) -> None:
    """The data must fit the model stored in checkpoint `path`: as many features, as
    many outputs (classes or target columns)."""
    stored = meta["model"]["sizes"]
    where = cfg.data_path() or f"data.dataset {cfg.data.dataset!r}"
    if ds.x.shape[1] != stored[0]:
        raise DataError(
            f"{where}: {ds.x.shape[1]} features per sample, but the model in {path} takes {stored[0]}; "
            "use the data it was trained on"
        )
    if width != stored[-1]:
        have = f"labels 0..{ds.n_classes - 1}" if ds.is_classification else f"{width} target columns"
        raise DataError(
            f"{where}: the data has {have}, but the model in {path} has {stored[-1]} outputs; "
            "use the data it was trained on"
        )


# --------------------------------------------------------------------------- device memory


def memory_estimate(cfg: Config, sizes: list, batch: int, n_rows: int, backend) -> dict:
    """Bytes a training run holds on the device, roughly, by kind: `params` (parameters,
    gradients, optimizer state and its scratch rows: one flat buffer each; on the CPU
    also the host copy of the best evaluation's parameters and state), `batch`
    (the activations and their gradients that the forward and backward pass of one
    training batch keep, and the gathered batch), `eval` (the same for one evaluation chunk) and `data` (the splits:
    features, targets, labels)."""
    precision = get_precision(cfg.model.dtype)
    item = precision.param_dtype.itemsize  # params, data; activations in store_dtype (16 bits: half)
    act_item = precision.store_dtype.itemsize
    n_params = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    scratch = backend.optimizer_scratch_rows  # the optimizer's working rows of P
    n_state = len(OPTIMIZER_CLASSES[cfg.optimizer.name].state_names)
    n_buffers = 2 + scratch + n_state
    if backend.name == "cpu" and cfg.data.val_fraction > 0:  # the best evaluation's state, kept on the host
        n_buffers += 1 + n_state
    acts = [cfg.model.activation] * (len(sizes) - 2) + [cfg.model.output_activation]
    # per row: x_0 and dLoss/dx_0 (n_in each); per layer a_k and D_k (+ z_k when f' reads it)
    per_row = 2 * sizes[0] + sum(w * (2 + (ACTIVATIONS[a].saves == SAVES_INPUT)) for w, a in zip(sizes[1:], acts))
    per_row += sizes[-1]  # the batch's targets
    eval_rows = min(cfg.train.eval_batch_size, n_rows)
    return {
        "params": n_params * n_buffers * item,
        "batch": batch * per_row * act_item,
        "eval": eval_rows * per_row * act_item,
        "data": n_rows * ((sizes[0] + sizes[-1]) * item + 4),
    }


def out_of_memory(backend, cfg: Config, sizes: list, batch: int, n_rows: int) -> DeviceRuntimeError:
    """The error for running out of device memory; `batch`: the rows of a training batch
    (train.batch_size, or fewer when the training split is smaller)."""
    est = memory_estimate(cfg, sizes, batch, n_rows, backend)
    smaller = f"e.g. {max(1, batch // 4)}" if batch > 1 else "or narrower model.hidden layers"
    return DeviceRuntimeError(
        f"out of memory on {backend.describe()} with train.batch_size = {cfg.train.batch_size} and model {sizes}: "
        f"the run needs about {format_size(sum(est.values()))} ({format_size(est['batch'])} for one batch's activations, "
        f"{format_size(est['params'])} for parameters, gradients and optimizer state, {format_size(est['data'])} for the data, "
        f"{format_size(est['eval'])} for evaluation); use a smaller train.batch_size ({smaller})"
    )


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
        remove_temporaries(out_dir)
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


def predict_outputs(model: MLP, x, batch_size: int) -> np.ndarray:
    """The model's outputs (N, width) on device features x, in chunks, as float64 on the host."""
    be = model.backend
    chunks = [np.array(be.to_numpy(model.forward(x[i : i + batch_size])), dtype=np.float64)  # a copy: the
              for i in range(0, x.shape[0], batch_size)]  # fmt: skip  # workspace is reused
    return np.concatenate(chunks) if chunks else np.zeros((0, model.sizes[-1]))


def evaluate_split(model: MLP, part: D.DeviceSplit, name: str, batch_size: int, host: D.Dataset | None = None,
                   scaler: T.TargetScaler | None = None, report: bool = False) -> dict:  # fmt: skip
    """{name_loss, name_accuracy (classification)} over a whole split. With `host` (the
    split on the host): regression adds name_r2, name_rmse, name_mae in the targets'
    own units (`scaler` maps outputs back); classification with `report` adds
    name_report (per-class precision, recall, F1, support, confusion matrix)."""
    # one forward pass over the split: the loss, and the outputs when a metric needs them
    outputs = np.empty((part.n, model.sizes[-1])) if wants_outputs(host, report) else None
    if getattr(part, "streams", False):  # stream.StreamSplit: its rows copied batch by batch
        loss, correct = part.evaluate(model, batch_size, outputs)
    else:
        loss, correct = model.evaluate(part.x, part.target, part.labels, batch_size, outputs)
    out = {f"{name}_loss": loss}
    if correct is not None:
        out[f"{name}_accuracy"] = correct / part.n
    if outputs is not None:
        out.update(output_metrics(model, outputs, name, host, scaler))
    return out


def wants_outputs(host: D.Dataset | None, report: bool) -> bool:
    """Whether evaluate_split's metrics need the outputs on the host: regression's R^2,
    RMSE, MAE (always), classification's report (when asked)."""
    return host is not None and (not host.is_classification or report)


def output_metrics(model: MLP, outputs: np.ndarray, name: str, host: D.Dataset, scaler) -> dict:
    """The metrics of a split's outputs (N, width) on the host: name_r2, name_rmse,
    name_mae in the targets' units (`scaler` maps outputs back), or name_report."""
    if not host.is_classification:
        pred = T.user_outputs(outputs, model.loss.name, False, scaler)
        return {f"{name}_{k}": v for k, v in M.regression_report(host.y, pred).items()}
    labels = T.predicted_classes(outputs, model.decision_threshold)
    n_classes = max(host.n_classes, outputs.shape[1] if outputs.shape[1] > 1 else 2)
    return {f"{name}_report": M.classification_report(host.y, labels, n_classes, host.class_names)}


# --------------------------------------------------------------------------- checkpoints


def checkpoint_arrays(run: Run, opt) -> dict:
    arrays = {"params": run.backend.to_numpy(run.model.flat_params)}
    for name, value in opt.state_dict().items():
        if name != "steps":
            arrays[f"opt.{name}"] = value
    arrays["std.mean"] = run.standardizer.mean
    arrays["std.std"] = run.standardizer.std
    if run.standardizer.fill is not None:
        arrays["missing.mean"] = run.standardizer.fill
    if run.target_scaler is not None:
        arrays.update(run.target_scaler.arrays())
    return arrays


def data_meta(cfg: Config, run: Run) -> dict:
    """What predict and eval need to read new data as the model was trained: the
    feature names in order ([] when the data had none), the label column (CSV) and
    the class names in output order ("0", "1", ... for integer labels)."""
    names = run.class_names or ([str(c) for c in range(run.n_classes)] if run.n_classes else [])
    return {
        "feature_names": list(run.feature_names),
        "label_column": cfg.data.label_column if cfg.data.dataset == "csv" else None,
        "class_names": names,
    }


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


class FiniteGuard:
    """Watches each step for a non-finite loss or gradient without reading anything back
    to the host: the index of the first bad step (-1 while all is well) is a 0-d array
    on the device, read only when the host logs. From that step on `skip` is true and
    the fused update leaves parameters and optimizer state as they are, so a
    checkpoint never gets NaN or inf. The same launch computes the gradient norm and
    the clipping scale (`norm`, `scale`); see numpy_ops.step_guard.

    fp16 (`loss_scale`, the model's dynamic loss scale on the device): a non-finite
    gradient skips that step only (no update: gpubp/step.py counts the updates taken)
    and halves the scale, counted in `skipped`; a non-finite loss still stops the run;
    see numpy_ops.step_guard_scaled."""

    def __init__(self, backend, dtype, loss_scale=None):
        self.backend = backend
        self.first_bad = backend.zeros((), np.int64)
        self.first_bad[...] = -1
        self.skip = backend.zeros((), np.bool_)
        self.norm = backend.zeros((), dtype)
        self.scale = backend.zeros((), dtype)
        self.loss_scale = loss_scale
        if loss_scale is not None:
            self.good_steps = backend.zeros((), np.int64)  # finite steps since the scale last changed
            self.skipped = backend.zeros((), np.int64)  # steps skipped for an overflowing gradient
            self.interval = precision.LOSS_SCALE_INTERVAL  # finite steps before the scale doubles

    def check(self, step: int, loss, grads, grad_sq, max_norm: float, shares=None, advance=None) -> None:
        """Before the update of step `step` (0-based): the loss (0-d) and the flat gradients
        (P,), whose squared norm goes to grad_sq (0-d); max_norm > 0 clips the gradient to
        that global norm (through `scale`). shares: the gradient still in shares (S, P)
        (the fused MLP's), summed into grads first; advance (running, pos, now, ahead): the
        step's step_advance_selecting in the same launch (StepState.guard_advance). One
        launch on the GPU (step_guard_norm; fp16: step_guard_scaled_norm, which never has
        shares nor advance)."""
        be = self.backend
        if self.loss_scale is not None:
            assert shares is None and advance is None, "fp16's guard neither sums shares nor advances"
            be.step_guard_scaled_norm(loss, grads, grad_sq, step, max_norm, self.first_bad, self.skip, self.norm,
                                      self.scale, self.loss_scale, self.good_steps, self.skipped,
                                      interval=self.interval)  # fmt: skip
            return
        be.step_guard_norm(loss, grads, grad_sq, step, max_norm, self.first_bad, self.skip, self.norm, self.scale,
                           shares=shares, advance=advance)  # fmt: skip

    def scaler_record(self) -> dict:
        """fp16: {"skipped_steps", "loss_scale"} (two reads from the device); else {}."""
        if self.loss_scale is None:
            return {}
        to_float = self.backend.to_float
        return {"skipped_steps": int(to_float(self.skipped)), "loss_scale": to_float(self.loss_scale)}

    def scaler_arrays(self) -> dict:
        """fp16: the scaler's state for a checkpoint (amp.*); else {}."""
        if self.loss_scale is None:
            return {}
        be = self.backend
        return {f"amp.{k}": np.array(be.to_numpy(getattr(self, k))) for k in ("loss_scale", "good_steps", "skipped")}

    def load_scaler(self, arrays: dict) -> None:
        """Restore the scaler's state from a checkpoint's amp.* arrays (when it has them)."""
        if self.loss_scale is None:
            return
        for k in ("loss_scale", "good_steps", "skipped"):
            if f"amp.{k}" in arrays:
                getattr(self, k)[...] = self.backend.asarray(arrays[f"amp.{k}"], dtype=getattr(self, k).dtype)

    def first_bad_step(self) -> int | None:
        """0-based index of the first non-finite step, or None (one read from the device)."""
        value = int(self.backend.to_float(self.first_bad))
        return None if value < 0 else value


@contextlib.contextmanager
def catch_sigint():
    """While active, Ctrl-C (SIGINT) only raises a flag: yields a function that says
    whether it came. A second Ctrl-C interrupts at once (KeyboardInterrupt), as usual.
    Outside the main thread, or where SIGINT is ignored, nothing changes."""
    hits = []
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) in (
        signal.SIG_IGN,
        None,
    ):
        yield lambda: False
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        hits.append(signum)
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(hits)
    finally:
        signal.signal(signal.SIGINT, previous)


class Trainer:
    """The loop over one config. `out_dir` None trains in memory (see `train_in_memory`):
    no run directory, no files; the evaluations collect in `history`. `dist`: this
    process's place in a data-parallel run (gpubp.distributed; one process by default)."""

    def __init__(self, cfg: Config, out_dir: str | None, device: str | None = None, quiet: bool = False,
                 overwrite: bool = False, resume: str | None = None, log=None, dataset: D.Dataset | None = None,
                 standardizer: D.Standardizer | None = None, warm_start: tuple | None = None,
                 dist=None):  # fmt: skip
        self.dist = dist if dist is not None else distributed.LOCAL  # one process, or this rank of N
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
        fits = (self.resume_meta, resume) if resume is not None else None
        self.run = prepare(cfg, device or cfg.train.device, self.log, standardizer, checkpoint=fits, dataset=dataset,
                           dist=self.dist, stream=True)  # fmt: skip
        self.cfg = cfg = self.run.cfg  # "auto" resolved
        self.model = self.run.model
        o = cfg.optimizer
        self.opt = make_optimizer(self.model, o.name, o.lr, o.momentum, o.dampening, o.nesterov,
                                  tuple(o.betas), o.eps, o.weight_decay)  # fmt: skip
        self.n_train = self.run.splits["train"].n
        t = cfg.train
        self.steps_per_epoch = math.ceil(self.n_train / t.batch_size)
        self.total_steps = t.steps if t.steps > 0 else t.epochs * self.steps_per_epoch
        self._lr_table = lr_schedule(o, cfg.schedule, self.total_steps)  # steps (0-based) -> their learning rates
        self.step = 0
        self.best_value = None
        self.best_step = None
        self.bad_evals = 0
        # the training loss summed on the device since the last evaluation, and over how many steps
        self.running_loss = self.run.backend.zeros((), np.float64)
        self.n_running = 0
        self.saved_step = None  # step of the last.npz this process wrote
        self.saved_at = -math.inf  # time.monotonic() of that write (or of the start of training)
        self.best = None  # (meta, arrays) of the best evaluation, on the host
        self.best_written = True  # best.npz on disk holds self.best
        self.eval_seconds = 0.0  # spent in evaluations and checkpoint writes
        # (step, metrics) of the validation split at the last and at the best evaluation, when they hold
        # every metric _finish reports (it reuses them for the same weights instead of evaluating again)
        self.val_at_last = self.val_at_best = None
        # a run failing before its first checkpoint removes its run directory (a new one: not resumed in place)
        self.created_dir = out_dir is not None and not (
            resume is not None and _same_dir(out_dir, os.path.dirname(os.path.abspath(resume)))
        )
        self.guard = FiniteGuard(self.run.backend, self.model.dtype, self.model.loss_scale)
        self.history = []  # in memory: the evaluation records metrics.jsonl would hold
        self.min_eval_steps = MIN_EVAL_STEPS  # train.eval_every = 0: evaluate after whole epochs of >= this
        self.dist.attach(self)
        if warm_start is not None:  # (flat parameters, optimizer state_dict) to continue from
            self.model.set_flat_params(warm_start[0])
            self.opt.load_state_dict(warm_start[1])
        if resume is not None:
            self._restore(resume, resume_arrays)
        self.created_dir = self.created_dir and self.dist.is_root  # only rank 0's run directory
        if out_dir is None or not self.dist.is_root:
            return  # in memory, or not rank 0 (rank 0 alone writes the run's files)
        if resume is not None and _same_dir(out_dir, os.path.dirname(os.path.abspath(resume))):
            for name in remove_temporaries(out_dir):
                self.log(f"removed {name}, left in {out_dir} by an interrupted write")
            self._trim_log()
        else:  # a new run, or a resumed one continued in another directory
            prepare_out_dir(out_dir, overwrite)
        atomic_write_text(os.path.join(out_dir, "config.toml"), dump_toml(self.cfg))

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
        best = best_for_resume(path, meta, self.model.n_params, self.model.sizes)  # None, or the best it records
        if best is not None:  # the weights restore_best returns to
            self.best, self.best_written = best, False
        self.guard.load_scaler(arrays)  # fp16: the loss scale and skipped-step count
        if "train.running_loss" in arrays:  # saved mid-interval (Ctrl-C): the loss summed so far
            self.running_loss[...] = float(arrays["train.running_loss"])  # float64: exact
            self.n_running = int(meta["running_steps"])

    def _trim_log(self) -> None:
        """Drop log lines past the checkpoint (they will be written again) and a line torn by a crash."""
        metrics = os.path.join(self.out_dir, "metrics.jsonl")
        if os.path.exists(metrics):
            with open(metrics) as f:
                keep = [line for line in f if line.endswith("\n") and _logged_step(line) <= self.step]
            atomic_write_text(metrics, "".join(keep))

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
            "running_steps": self.n_running,
            "best_value": self.best_value,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
            **self._fixed_meta(),
        }

    def _fixed_meta(self) -> dict:
        """The part of a checkpoint's meta that does not change during the run (built once)."""
        if "_fixed" not in self.__dict__:
            self._fixed = {"model": self.model.config_dict(), "config": config_for_checkpoint(self.cfg),
                           "n_features": self.run.n_features, "n_classes": self.run.n_classes,
                           "device": self.run.backend.describe(),  # eval/predict: note a GPU model on the CPU
                           **data_meta(self.cfg, self.run)}  # fmt: skip
        return self._fixed

    def checkpoint(self) -> tuple[dict, dict]:
        """(meta, arrays) of the current state: what `save` writes."""
        if getattr(self, "step_fn", None) is not None:
            self.step_fn.sync_updates()  # fp16 counts the updates taken on the device
        arrays = checkpoint_arrays(self.run, self.opt)
        arrays["params"] = np.array(arrays["params"])  # a copy: NumPy's to_numpy is a view of the live buffer
        arrays["train.running_loss"] = np.array(self.run.backend.to_numpy(self.running_loss))
        arrays.update(self.guard.scaler_arrays())
        return self._meta(), arrays

    def save(self, name: str) -> None:
        if self.out_dir is None:  # in memory: no files
            return
        if not self.dist.is_root:  # rank 0 writes; the others keep its record of the last save
            if name == "last.npz":
                self.saved_step, self.saved_at = self.step, time.monotonic()
            return
        save_checkpoint(os.path.join(self.out_dir, name), *self.checkpoint())
        if name == "last.npz":
            self.saved_step, self.saved_at = self.step, time.monotonic()

    def _write_checkpoints(self) -> None:
        """best.npz (if a better evaluation came since it was written), then last.npz.
        Best before last: a crash between the two leaves a last.npz whose record of
        the best step matches best.npz, or an older last.npz that repeats the step."""
        if self.out_dir is None:  # in memory: the best state stays in self.best
            return
        with folder_sync_once():  # both files, then one fsync of the run directory
            if not self.best_written:
                if self.dist.is_root:
                    save_checkpoint(os.path.join(self.out_dir, "best.npz"), *self.best)
                self.best_written = True
            self.save("last.npz")

    # ---- evaluation

    def evaluate(self, split: str, report: bool = False) -> dict:
        part = self.run.splits[split]
        if part is None:
            return {}
        host = getattr(self.run.data, split)
        # with N ranks: each evaluates its share of the rows, the sums are all-reduced
        return self.dist.evaluate(self.model, part, split, self.cfg.train.eval_batch_size, host,
                                  self.run.target_scaler, report)  # fmt: skip

    def _monitor(self, record: dict) -> tuple[str, float, bool] | None:
        """(name, value, higher is better) of the validation metric that picks best.npz
        and stops early; None without a validation split (never the training loss)."""
        metric = self.cfg.train.early_stopping_metric
        if metric in record:
            return metric, record[metric], metric.endswith("accuracy")
        return None

    # ---- loop

    def train(self) -> dict:
        from tqdm import tqdm

        be, model, cfg = self.run.backend, self.model, self.cfg
        t = cfg.train
        eval_every = t.eval_every or self.steps_per_epoch * math.ceil(self.min_eval_steps / self.steps_per_epoch)
        perm_epoch = None
        stopped_early = False
        start = time.perf_counter()
        self.saved_at = time.monotonic()  # the first checkpoint comes after checkpoint_every_s, or at the end
        # a terminal gets a bar (epochs in its label, steps counted); logs get one line per evaluation
        self.bar = bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                              disable=self.quiet or not self.dist.is_root or not sys.stderr.isatty(),
                              desc=self._epoch_label())  # fmt: skip
        scope = contextlib.ExitStack()
        interrupted = scope.enter_context(catch_sigint())
        if self.out_dir is not None and self.dist.is_root:
            self.metrics_file = scope.enter_context(open(os.path.join(self.out_dir, "metrics.jsonl"), "a", buffering=1))
        scope.enter_context(np.errstate(all="ignore"))  # NumPy's overflow warnings: the guard reports it once
        try:
            self.step_fn = step_fn = self.make_step(interrupted)
            while self.step < self.total_steps:
                epoch = self.step // self.steps_per_epoch
                if perm_epoch != epoch:
                    step_fn.new_epoch(D.epoch_permutation(t.seed, epoch, self.n_train), epoch)
                    perm_epoch = epoch
                # gather, forward, loss, backward (with N ranks: one all-reduce), guard + clip,
                # update: one step of device work (a replayed CUDA graph on the GPU)
                stop = step_fn.run(self.step)
                self.n_running += 1
                self.step += 1
                bar.update(1)
                if self.step % self.steps_per_epoch == 0:
                    bar.set_description(self._epoch_label(), refresh=False)
                if self.step % eval_every == 0 or self.step == self.total_steps:
                    record = self._log_eval(epoch, start)
                    self._progress(record)
                    if self._early_stop(record):
                        stopped_early = True
                        name = self._monitor(record)[0]
                        self._say(f"early stopping at step {self.step}: {t.early_stopping_patience} evaluations "
                                  f"without a better {name} (best at step {self.best_step})")  # fmt: skip
                        break
                if stop:
                    raise self._interrupt()
            return self._finish(stopped_early, time.perf_counter() - start)
        except be.out_of_memory_errors:
            n_rows = sum(part.n for part in self.run.splits.values() if part is not None)
            self._remove_if_empty()
            raise out_of_memory(be, cfg, model.sizes, min(t.batch_size, self.n_train), n_rows) from None
        except BaseException:
            self._remove_if_empty()
            raise
        finally:
            scope.close()
            bar.close()

    def make_step(self, interrupted=lambda: False) -> Step:
        """The step function (gpubp/step.py) over this run's buffers: captured as a CUDA
        graph per batch shape on the GPU unless train.cuda_graph is false or the run
        cannot be captured (`graph_note` says why; printed once on the GPU)."""
        be, t = self.run.backend, self.cfg.train
        train = self.run.splits["train"]
        host_batch = self.dist.size > 1 or not isinstance(train, (D.DeviceSplit, StreamSplit))
        capturer = getattr(be, "graph_capturer", None)
        if not t.cuda_graph:
            self.graph_note = "train.cuda_graph = false"
        elif host_batch:
            self.graph_note = f"{self.dist.size} data-parallel ranks" if self.dist.size > 1 else "a mapped split"
        elif capturer is None:
            self.graph_note = f"the {be.name} backend runs the step uncaptured"
        else:
            self.graph_note = None
        if self.graph_note is not None and t.cuda_graph and be.name == "gpu" and self.dist.is_root:
            self.log(f"CUDA graph off: {self.graph_note}")
        bs = t.batch_size
        offset = lambda s: (s % self.steps_per_epoch) * bs  # noqa: E731  where step s's batch starts in the order
        if isinstance(train, StreamSplit) and not host_batch:  # in the ring of a streamed split's chunks
            offset = train.ring_offset
        state = StepState(
            be, self.opt.rule_opt, lambda s, k: self._lr_table(np.arange(s, s + k))[:, None], offset, self.total_steps
        )
        return Step(self.model, self.opt, self.guard, self.running_loss, train, bs, self.n_train,
                    self.cfg.optimizer.clip_grad_norm, state, self._batch_buffer, self.dist, interrupted,
                    capturer() if self.graph_note is None else None, host_batch)  # fmt: skip

    def _epoch_label(self) -> str:
        n_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        return f"epoch {min(self.step // self.steps_per_epoch + 1, n_epochs)}/{n_epochs}"

    def _say(self, message: str) -> None:
        """A line to the user that does not break the progress bar."""
        if not self.bar.disable:
            self.bar.write(message, file=sys.stderr)
        else:
            self.log(message)

    def _progress(self, record: dict) -> None:
        """The bar's numbers, or (no terminal) one line per evaluation."""
        shown = {k: v for k, v in record.items() if k in ("train_loss", "skipped_steps") or k.startswith("val_")}
        if not self.bar.disable:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()})
        else:
            values = " ".join(f"{k} {v:.4g}" for k, v in shown.items())
            n_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
            self.log(f"epoch {record['epoch']}/{n_epochs} step {self.step}/{self.total_steps} {values} "
                     f"elapsed {record['elapsed_s']:.1f}s")  # fmt: skip

    def _remove_if_empty(self) -> None:
        """A new run that fails before its first checkpoint leaves no run directory
        (only the files it wrote are removed; a folder holding others stays)."""
        if not self.created_dir or self.saved_step is not None:
            return
        for name in RUN_FILES:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.out_dir, name))
        remove_temporaries(self.out_dir)
        with contextlib.suppress(OSError):
            os.rmdir(self.out_dir)

    def _batch_buffer(self, name, src, n, dtype=None):
        """The step's batch buffers (data.batch_buffers), made on first use."""
        if "_buffers" not in self.__dict__:
            self._buffers = D.batch_buffers(self.run.backend)
        return self._buffers(name, src, n, dtype)

    def _check_finite(self) -> None:
        """TrainingError naming the first non-finite step, if there was one."""
        bad = self.guard.first_bad_step()
        if bad is None:
            return
        epoch, batch = divmod(bad, self.steps_per_epoch)
        last = os.path.join(self.out_dir or "", "last.npz")
        if self.out_dir is None:
            kept = "nothing was saved (in memory)"
        elif self.saved_step is not None:
            kept = f"the last good checkpoint {last} (step {self.saved_step}) is kept"
        elif os.path.exists(last):
            kept = f"the last good checkpoint {last} is kept"
        else:
            kept = "no checkpoint had been written yet" + (" (run directory removed)" if self.created_dir else "")
        o = self.cfg.optimizer
        clip = (
            f"lower optimizer.clip_grad_norm (now {o.clip_grad_norm:g})"
            if o.clip_grad_norm > 0
            else "set optimizer.clip_grad_norm (e.g. 1.0)"
        )
        raise TrainingError(
            f"training diverged: the loss or gradient became non-finite at step {bad + 1} "
            f"(epoch {epoch + 1}, batch {batch + 1}); {kept}. Lower optimizer.lr (now {o.lr:g}) or {clip}"
        )

    def _interrupt(self) -> Interrupted:
        """Ctrl-C came: save the checkpoints at the current step (if all is finite)."""
        self._check_finite()
        if self.out_dir is None:
            return Interrupted(f"interrupted at step {self.step}", self.step, None)
        self._write_checkpoints()  # a better evaluation not yet on disk first, as at any checkpoint
        path = os.path.join(self.out_dir, "last.npz")
        return Interrupted(f"interrupted at step {self.step}; saved {path}", self.step, path)

    def _log_eval(self, epoch, start) -> dict:
        """Log one evaluation; note a better validation metric (a host copy of the state,
        written as best.npz with the next checkpoint); write checkpoints when due: at
        most every train.checkpoint_every_s seconds (and at the end, by _finish)."""
        began = time.perf_counter()
        self._check_finite()
        train_loss = self.run.backend.to_float(self.running_loss) / max(self.n_running, 1)
        self.running_loss[...] = 0.0
        self.n_running = 0
        self.opt.lr = float(self._lr_table(self.step - 1))  # the rate of the step just taken
        record = {"step": self.step, "epoch": epoch + 1, "lr": self.opt.lr, "train_loss": train_loss}
        record.update(self.guard.scaler_record())  # fp16: skipped steps so far, the loss scale
        val = self.evaluate("val", report=self.step == self.total_steps)  # the last one with the report
        record.update({k: v for k, v in val.items() if not k.endswith("_report")})
        full = (self.step, val) if "val_report" in val or "val_r2" in val else None  # all that _finish reports
        self.val_at_last = full
        record["elapsed_s"] = round(time.perf_counter() - start, 4)
        if self.out_dir is None:
            self.history.append(record)
        elif self.dist.is_root:
            self.metrics_file.write(json.dumps(record) + "\n")  # line-buffered: each line reaches the file
        monitor = self._monitor(record)
        if monitor is not None:
            name, value, higher = monitor
            improved = self.best_value is None or (value > self.best_value if higher else value < self.best_value)
            if improved:
                self.best_value, self.best_step, self.bad_evals = value, self.step, 0
                self.best, self.best_written = self.checkpoint(), False
                self.val_at_best = full
            else:
                self.bad_evals += 1
        if time.monotonic() - self.saved_at >= self.cfg.train.checkpoint_every_s:
            self._write_checkpoints()
        self.eval_seconds += time.perf_counter() - began
        return record

    def _early_stop(self, record) -> bool:
        patience = self.cfg.train.early_stopping_patience
        return patience > 0 and self._monitor(record) is not None and self.bad_evals >= patience

    def _finish(self, stopped_early: bool, seconds: float) -> dict:
        """Final checkpoints, then (train.restore_best) the best weights, evaluated on
        every split with full metrics into summary.json."""
        began = time.perf_counter()
        if self.saved_step != self.step or not self.best_written:
            self._write_checkpoints()
        weights, at = "last", self.step  # the step whose weights are evaluated
        if self.cfg.train.restore_best and self.best is not None:
            restore_params(self.model, self.best[1], os.path.join(self.out_dir or "(in memory)", "best.npz"))
            weights, at = f"best.npz (step {self.best_step})", self.best_step
        summary = {"steps": self.step, "epochs": self.step / self.steps_per_epoch, "stopped_early": stopped_early,
                   "best_step": self.best_step, "best_metric": self._monitor_name(), "best_value": self.best_value,
                   "weights": weights, "task": self.cfg.data.task, "loss": self.cfg.loss.name,
                   "device": self.run.backend.describe(), "run_dir": self.out_dir and os.path.abspath(self.out_dir),
                   "seconds": None}  # fmt: skip
        summary.update(self.guard.scaler_record())  # fp16: skipped steps, the final loss scale
        known = dict(filter(None, (self.val_at_best, self.val_at_last)))  # step -> validation metrics
        for split in ("train", "val", "test"):
            summary.update(known[at] if split == "val" and at in known else self.evaluate(split, report=True))
        summary["seconds"] = round(seconds + time.perf_counter() - began, 3)  # the whole run, this end included
        summary["eval_seconds"] = round(self.eval_seconds + time.perf_counter() - began, 3)
        if self.out_dir is None or not self.dist.is_root:
            return summary
        atomic_write_text(os.path.join(self.out_dir, "summary.json"), M.to_json(summary) + "\n")
        return summary

    def _monitor_name(self) -> str | None:
        return self.cfg.train.early_stopping_metric if self.run.splits["val"] is not None else None


def train_in_memory(cfg: Config, dataset: D.Dataset, device: str | None = None, log=None,
                    standardizer: D.Standardizer | None = None, warm_start: tuple | None = None) -> Trainer:  # fmt: skip
    """Arrays in, trained model out, no files: the scikit-learn estimators' entry point
    (the same loop as `gpubp train`). `dataset` replaces cfg.data's loader (it is still
    split by data.val_fraction / test_fraction); `standardizer` replaces the statistics
    fitted on its training split; `warm_start` (flat parameters, optimizer state_dict)
    continues an earlier model. Returns the Trainer, its `summary` set; `history` holds
    the evaluation records and `checkpoint()` what a checkpoint file would."""
    trainer = Trainer(cfg, None, device, quiet=log is None, log=log, dataset=dataset,
                      standardizer=standardizer, warm_start=warm_start)  # fmt: skip
    # scikit-learn's convention: an evaluation (a loss_curve_ entry, a patience tick) every epoch
    trainer.min_eval_steps = 1
    trainer.summary = trainer.train()
    return trainer


def _same_dir(a: str, b: str) -> bool:
    return os.path.isdir(a) and os.path.isdir(b) and os.path.samefile(a, b)


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for one a crash tore (a torn line that
    still parses lacks its newline, which the caller checks)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def _check_resume_compatible(stored: Config, given: Config, path: str) -> None:
    a, b = stored.to_dict(), given.to_dict()
    a["data"]["path"], b["data"]["path"] = stored.data_path(), given.data_path()
    for section, values in a.items():
        for key, value in values.items():
            if section == "train" and key in RESUMABLE_CHANGES or (section, key) == ("data", "device_memory"):
                continue
            if (section, key) in (("data", "task"), ("data", "label_column"), ("loss", "name")) and b[section][
                key
            ] == "auto":
                continue  # the checkpoint holds what "auto" chose; the same data chooses it again
            if b[section][key] != value:
                raise ConfigError(
                    f"--resume {path}: {section}.{key} is {b[section][key]!r} in the config but {value!r} in the checkpoint; "
                    "a resumed run must keep the model, data, loss, optimizer and schedule"
                )
