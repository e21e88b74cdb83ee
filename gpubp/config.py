"""The config schema (every key, its type, default, range and meaning in one place),
loading from TOML or JSON, `--set section.key=value` overrides, and validation.

Every problem raises ConfigError with one line that names the file, the key, what
was expected and what was given, and, for a misspelt name, the closest valid one.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

from .activations import ACTIVATIONS
from .data import DATASETS
from .errors import ConfigError
from .init import INITS
from .losses import LOSSES
from .optim import OPTIMIZERS
from .precision import DTYPES
from .schedules import SCHEDULES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEVICE_CHOICES = ("auto", "cpu", "gpu")


@dataclass(frozen=True)
class Field:
    kind: str  # "int", "float", "bool", "auto_bool", "str", "int_list", "float_pair", "str_list", "size"
    default: Any
    doc: str
    choices: tuple = ()
    min: float | None = None  # inclusive lower bound
    max: float | None = None  # inclusive upper bound
    min_exclusive: bool = False
    max_exclusive: bool = False


def _f(kind, default, doc, choices=(), min=None, max=None, min_exclusive=False, max_exclusive=False):
    return Field(kind, default, doc, tuple(choices), min, max, min_exclusive, max_exclusive)


SCHEMA: dict[str, dict[str, Field]] = {
    "data": {
        "dataset": _f("str", "digits", "which data to train on", DATASETS),
        "path": _f("str", "", "file (npz, csv) or folder (mnist); relative paths start at the config file's folder"),
        "label_column": _f(
            "str", "auto", "csv: the column holding the targets; auto: label, target, y or class, else the last"
        ),
        "delimiter": _f("str", ",", 'csv: the one character between fields, e.g. ",", ";" or "\\t"'),
        "feature_columns": _f("str_list", [], "csv: the feature columns by name; [] takes every other column"),
        "drop_columns": _f("str_list", [], "csv: columns to leave out of the features (ids, leaks)"),
        "missing": _f(
            "str",
            "error",
            "csv, npz: a missing value (csv: empty, NA, NaN, null, ?; npz: NaN): error names it, drop skips its "
            "row, mean fills the training mean",
            ("error", "drop", "mean"),
        ),  # fmt: skip
        "task": _f(
            "str",
            "auto",
            "auto: text labels, and whole numbers with few distinct values (at most max(2, min(50, rows/10)), "
            "or exactly 0..K-1), are classes; other targets are regression values",
            ("auto", "classification", "regression"),
        ),  # fmt: skip
        "val_fraction": _f(
            "float",
            0.1,
            "share held out for validation (early stopping, best.npz); 0 trains on it too",
            min=0.0,
            max=1.0,
            max_exclusive=True,
        ),
        "test_fraction": _f(
            "float",
            0.25,
            "share held out for testing (ignored when the data has its own test set)",
            min=0.0,
            max=1.0,
            max_exclusive=True,
        ),  # fmt: skip
        "stratify": _f("bool", True, "split each class in the same proportions"),
        "standardize": _f("bool", True, "scale features to mean 0, std 1 with training-split statistics"),
        "standardize_targets": _f(
            "bool", True, "regression with mse/huber: fit (y - mean) / std of the training split; results in y's units"
        ),
        "n_samples": _f("int", 1500, "spirals, regression: number of samples", min=1),
        "n_classes": _f("int", 3, "spirals: number of arms", min=2),
        "n_features": _f("int", 2, "regression: input dimension", min=1),
        "noise": _f("float", 0.1, "spirals, regression: noise level", min=0.0),
        "device_memory": _f(
            "size",
            "free",
            'device memory the run may use, bytes or e.g. "4GiB"; free: the device\'s free memory (no limit on the '
            "CPU); a training split that does not fit streams from host memory in chunks",
        ),  # fmt: skip
    },
    "model": {
        "hidden": _f("int_list", [128], "widths of the hidden layers, e.g. [256, 128]; [] for a linear model", min=1),
        "activation": _f("str", "relu", "hidden-layer activation", ACTIVATIONS),
        "output_activation": _f(
            "str", "identity", "activation of the last layer (the loss sees its output)", ACTIVATIONS
        ),
        "init": _f("str", "he_normal", "weight initialisation", INITS),
        "leaky_relu_slope": _f("float", 0.01, "negative slope of leaky_relu", min=0.0),
        "residual": _f("bool", False, "x_{k+1} = x_k + f(x_k W_k + b_k) between hidden layers of equal width"),
        "dtype": _f(
            "str",
            "float32",
            "precision: float32, float64; tf32 (float32 GEMMs on TF32 tensor cores); bf16, fp16 (16-bit activations "
            "and GEMM inputs, float32 accumulation, master weights and optimizer state; fp16 with dynamic loss scaling)",
            DTYPES,
        ),
    },
    "loss": {
        "name": _f(
            "str",
            "auto",
            "the loss (as PyTorch's functional, mean reduction); auto: softmax_cross_entropy for classes, mse for values",
            ("auto", *LOSSES),
        ),
        "label_smoothing": _f("float", 0.0, "softmax_cross_entropy: label smoothing", min=0.0, max=1.0),
        "huber_delta": _f("float", 1.0, "huber: where the loss turns linear", min=0.0, min_exclusive=True),
    },
    "optimizer": {
        "name": _f("str", "adam", "update rule (torch.optim's)", OPTIMIZERS),
        "lr": _f("float", 1e-3, "learning rate", min=0.0, min_exclusive=True),
        "momentum": _f("float", 0.0, "sgd: momentum", min=0.0),
        "dampening": _f("float", 0.0, "sgd: dampening of the momentum", min=0.0, max=1.0),
        "nesterov": _f("bool", False, "sgd: Nesterov momentum (needs momentum > 0, dampening 0)"),
        "betas": _f(
            "float_pair", [0.9, 0.999], "adam, adamw: moment decay rates", min=0.0, max=1.0, max_exclusive=True
        ),
        "eps": _f("float", 1e-8, "adam, adamw: denominator epsilon", min=0.0, min_exclusive=True),
        "weight_decay": _f("float", 0.0, "L2 (sgd, adam) or decoupled (adamw) weight decay", min=0.0),
        "clip_grad_norm": _f("float", 0.0, "clip gradients to this global 2-norm; 0 turns clipping off", min=0.0),
    },
    "schedule": {
        "name": _f("str", "constant", "learning-rate schedule", SCHEDULES),
        "warmup_steps": _f("int", 0, "linear warmup over this many steps", min=0),
        "step_size": _f("int", 1000, "step: multiply the rate by gamma every step_size steps", min=1),
        "gamma": _f("float", 0.1, "step: decay factor", min=0.0, min_exclusive=True),
        "min_lr": _f("float", 0.0, "cosine: final learning rate", min=0.0),
    },
    "train": {
        "epochs": _f("int", 200, "passes over the training split (at most: early stopping may end sooner)", min=1),
        "steps": _f("int", 0, "train for this many steps instead of epochs; 0 uses epochs", min=0),
        "batch_size": _f("int", 64, "samples per step (the last batch of an epoch may be smaller)", min=1),
        "eval_every": _f(
            "int",
            0,
            "evaluate and log every N steps; 0: at the end of each epoch, or of every k-th epoch when an epoch "
            "has fewer than 25 steps (k = ceil(25 / steps per epoch), so that evaluating costs under 10% of a small-data run)",
            min=0,
        ),
        "early_stopping_patience": _f(
            "int", 10, "stop after this many evaluations without a better validation metric; 0 never", min=0
        ),
        "restore_best": _f("bool", True, "end with the weights of best.npz (best validation metric), as Keras does"),
        "checkpoint_every_s": _f(
            "float", 30.0, "write last.npz/best.npz at most this often (and at the end); 0 at every evaluation", min=0.0
        ),
        "early_stopping_metric": _f(
            "str", "val_loss", "what 'improvement' means (best checkpoint too)", ("val_loss", "val_accuracy")
        ),  # fmt: skip
        "eval_batch_size": _f("int", 4096, "rows per chunk when evaluating", min=1),
        "seed": _f("int", 0, "seeds the split, the initial weights and the shuffle", min=0),
        "device": _f("str", "auto", "auto, cpu or gpu (overridden by --device)", DEVICE_CHOICES),
        "cuda_graph": _f(
            "bool",
            True,
            "GPU: capture the training step (a sweep's stacked step too) as a CUDA graph per batch shape and "
            "replay it (off: launch each op); data-parallel runs launch each op",
        ),
        "gemm_epilogues": _f(
            "auto_bool",
            "auto",
            "GPU: run each layer's bias and ReLU inside its forward GEMM, its ReLU gradient and bias gradient inside "
            "the backward GEMMs (cuBLASLt epilogues); auto: where they pay, bf16 and fp16 (float32 and tf32 measured "
            "no faster on an H100), a ReLU layer's backward only up to 2048 outputs (wider, it cost more than its "
            "GEMM on an H100), and in float32 and bf16 a layer of at most 64 inputs and outputs as one kernel "
            "forward and one backward (kernels/layer.cu; bf16 on the tensor cores, layer_tc.cu); true: cuBLASLt's "
            "epilogues for every layer, every precision but float64; false: separate kernels",
        ),
        "fused_mlp": _f(
            "auto_bool",
            "auto",
            "GPU: run the whole forward pass, loss and backward pass as one kernel (kernels/mlp.cu, as tiny-cuda-nn's "
            "fully fused MLP) where the network fits it: at most 8 layers of width <= 128, no residual layers, "
            "float32 or float64; other networks and precisions keep the separate ops. auto: in float32 where the batch "
            "is small enough that every tile of rows runs at once, on a multiprocessor of its own, with a few "
            "microseconds of products each (tiny's 128 rows, not narrow's 262144); true: wherever it fits; "
            "false: never",
        ),
    },
}


class Section(dict):
    """A config section: a dict whose keys also read as attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Config:
    """A validated config: every section and key present, defaults filled in.
    `source` names where it came from; `base_dir` anchors relative paths."""

    def __init__(self, sections: dict, source: str = "<defaults>", base_dir: str = "."):
        self.sections = {name: Section(values) for name, values in sections.items()}
        self.source = source
        self.base_dir = base_dir
        self.sweep = None  # a gpubp.sweep.Sweep when the config has a [sweep] table

    def __getattr__(self, name) -> Section:
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(name)

    def to_dict(self) -> dict:
        return {name: dict(values) for name, values in self.sections.items()}

    def data_path(self) -> str:
        """data.path resolved against the config file's folder ('' stays '')."""
        path = self.data.path
        if not path:
            return ""
        path = os.path.expanduser(path)
        return path if os.path.isabs(path) else os.path.normpath(os.path.join(self.base_dir, path))


def _closest(word: str, options, prefix: str = "") -> str:
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f"; did you mean '{prefix}{match[0]}'?" if match else ""


def _key_hint(section: str, key: str) -> str:
    """'; did you mean ...?' for a misspelt key, else the keys the section has."""
    return _closest(key, SCHEMA[section], prefix=f"{section}.") or f" ([{section}] keys: {', '.join(SCHEMA[section])})"


def _describe(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def _check_range(where: str, f: Field, v: float) -> None:
    if f.min is not None and (v < f.min or (f.min_exclusive and v == f.min)):
        raise ConfigError(f"{where}: must be {'>' if f.min_exclusive else '>='} {f.min:g}, got {v!r}")
    if f.max is not None and (v > f.max or (f.max_exclusive and v == f.max)):
        raise ConfigError(f"{where}: must be {'<' if f.max_exclusive else '<='} {f.max:g}, got {v!r}")


def _coerce(where: str, f: Field, value):
    """Check one value against its field; returns it in canonical form."""
    kind = f.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_describe(value)}")
        return value
    if kind == "auto_bool":
        if not isinstance(value, bool) and value != "auto":
            raise ConfigError(f'{where}: expected "auto", true or false, got {_describe(value)}')
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {_describe(value)}")
        _check_range(where, f, value)
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {_describe(value)}")
        if isinstance(value, int) and abs(value) > sys.float_info.max:
            raise ConfigError(f"{where}: {value} is too large for a number")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        _check_range(where, f, float(value))
        return float(value)
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_describe(value)}")
        if f.choices and value not in f.choices:
            raise ConfigError(
                f"{where}: unknown value {value!r}{_closest(value, f.choices)} (choose one of: {', '.join(f.choices)})"
            )
        return value
    if kind == "int_list":
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list of integers such as [128, 64], got {_describe(value)}")
        for i, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, int):
                raise ConfigError(f"{where}[{i}]: expected an integer, got {_describe(item)}")
            _check_range(f"{where}[{i}]", f, item)
        return list(value)
    if kind == "str_list":
        if not isinstance(value, list):
            raise ConfigError(f'{where}: expected a list of strings such as ["age", "income"], got {_describe(value)}')
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise ConfigError(f"{where}[{i}]: expected a string, got {_describe(item)}")
        if len(set(value)) != len(value):
            twice = next(v for v in value if value.count(v) > 1)
            raise ConfigError(f"{where}: {twice!r} is listed twice")
        return list(value)
    if kind == "float_pair":
        if not isinstance(value, list) or len(value) != 2:
            raise ConfigError(f"{where}: expected a list of two numbers such as [0.9, 0.999], got {_describe(value)}")
        out = []
        for i, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                raise ConfigError(f"{where}[{i}]: expected a number, got {_describe(item)}")
            if isinstance(item, int) and abs(item) > sys.float_info.max:
                raise ConfigError(f"{where}[{i}]: {item} is too large for a number")
            _check_range(f"{where}[{i}]", f, float(item))
            out.append(float(item))
        return out
    if kind == "size":
        if parse_size(value) is None and value != "free":
            raise ConfigError(
                f'{where}: expected a number of bytes, a size such as "4GiB" or "512MiB", or "free", got {_describe(value)}'
            )
        return value
    raise AssertionError(kind)


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def format_size(n: float) -> str:
    """A byte count as people read it: "512 bytes", "3.2 MiB", "16.0 GiB" (parse_size reads it back)."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def parse_size(value) -> int | None:
    """Bytes of a size: a positive integer, or a string "<number> <unit>" with unit one of
    B, kB, MB, GB, TB (powers of 10) or KiB, MiB, GiB, TiB (powers of 2), any case, e.g.
    "4GiB" = 4 * 2^30, "1.5 GB" = 1.5e9. None for anything else ("free" included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value > 0 else None
    if not isinstance(value, str):
        return None
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", value)
    if m is None or m.group(2).lower() not in _SIZE_UNITS:
        return None
    n = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    return n if n > 0 else None


def _cross_checks(cfg: Config, source: str, raw: dict) -> None:
    """Rules that involve more than one key."""
    o, d, t = cfg.optimizer, cfg.data, cfg.train
    if o.nesterov and (o.name != "sgd" or o.momentum <= 0 or o.dampening != 0):
        raise ConfigError(f"{source}: optimizer.nesterov needs optimizer.name = 'sgd', momentum > 0 and dampening = 0")
    if d.val_fraction + d.test_fraction >= 1.0:
        raise ConfigError(
            f"{source}: data.val_fraction + data.test_fraction = {d.val_fraction + d.test_fraction:g} "
            "leaves no training data; keep their sum below 1"
        )
    if d.dataset in ("mnist", "npz", "csv") and not d.path:
        raise ConfigError(f"{source}: data.dataset = {d.dataset!r} needs data.path (the file or folder to read)")
    if t.early_stopping_patience > 0 and d.val_fraction == 0 and "early_stopping_patience" in raw.get("train", {}):
        raise ConfigError(
            f"{source}: train.early_stopping_patience needs a validation split; set data.val_fraction > 0"
        )
    if len(d.delimiter) != 1 or d.delimiter in '"\r\n':
        raise ConfigError(
            f'{source}: data.delimiter must be one character other than a quote or newline, e.g. ",", ";" '
            f'or "\\t", got {d.delimiter!r}'
        )
    if d.feature_columns and d.drop_columns:
        raise ConfigError(f"{source}: give data.feature_columns or data.drop_columns, not both")
    if d.label_column in d.feature_columns or d.label_column in d.drop_columns:
        which = "feature_columns" if d.label_column in d.feature_columns else "drop_columns"
        raise ConfigError(f"{source}: data.{which} lists the label column {d.label_column!r}; leave it out")
    if cfg.loss.name == "softmax_cross_entropy" and d.task == "regression":
        raise ConfigError(
            f"{source}: loss.name 'softmax_cross_entropy' needs class labels, but data.task is 'regression'"
        )


def _require_table(raw, source: str) -> None:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a table of sections, got {type(raw).__name__}")


def validate(raw: dict, source: str, base_dir: str = ".") -> Config:
    """Check a raw mapping against SCHEMA; fill defaults; raise ConfigError at the first fault."""
    _require_table(raw, source)
    sections = {}
    for name, values in raw.items():
        if name == "sweep":  # checked by gpubp.sweep.expand below
            continue
        if name not in SCHEMA:
            raise ConfigError(
                f"{source}: unknown section [{name}]{_closest(name, SCHEMA)} (sections: {', '.join(SCHEMA)})"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{name}] must be a table of keys, got {_describe(values)}")
        for key in values:
            if key not in SCHEMA[name]:
                raise ConfigError(f"{source}: unknown key '{name}.{key}'{_key_hint(name, key)}")
    for name, fields in SCHEMA.items():
        given = raw.get(name, {})
        sections[name] = {
            key: _coerce(f"{source}: {name}.{key}", f, given[key]) if key in given else _copy_default(f.default)
            for key, f in fields.items()
        }
    cfg = Config(sections, source, base_dir)
    _cross_checks(cfg, source, raw)
    if "sweep" in raw:
        from .sweep import expand

        cfg.sweep = expand(raw, source, base_dir)
        if cfg.model.dtype not in ("float32", "float64"):  # gpubp.stack has no mixed precision yet
            raise ConfigError(
                f"{source}: model.dtype {cfg.model.dtype!r}: a [sweep] trains its stacked models in float32 or "
                'float64 only; set model.dtype = "float32" or train the runs one by one'
            )
    return cfg


def _copy_default(value):
    return list(value) if isinstance(value, list) else value


def parse_override(text: str) -> tuple[str, str, Any]:
    """'section.key=value' -> (section, key, value); the value is read as a TOML value
    (numbers, true/false, [lists], "strings"), and a bare word as a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. --set optimizer.lr=0.01")
    path, _, value_text = text.partition("=")
    path = path.strip()
    if path.count(".") != 1:
        raise ConfigError(f"--set {text!r}: the key must be section.key, e.g. optimizer.lr")
    section, key = path.split(".")
    value_text = value_text.strip()
    try:
        value = tomllib.loads(f"v = {value_text}")["v"]
    except tomllib.TOMLDecodeError:
        value = value_text
    return section, key, value


def read_raw(path: str) -> dict:
    """The raw mapping of a TOML (.toml) or JSON (.json) file."""
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} not found; check the path (see configs/ for examples)")
    if os.path.isdir(path):
        raise ConfigError(f"config file {path!r} is a directory; give a .toml or .json file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"config file {path!r} cannot be read ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; a config is a TOML or JSON text file") from None
    is_json = path.endswith(".json")
    fmt, parse, error = (
        ("JSON", json.loads, json.JSONDecodeError) if is_json else ("TOML", tomllib.loads, tomllib.TOMLDecodeError)
    )
    try:
        return parse(text)
    except error as e:
        where, why = (f"{path}:{e.lineno}", e.msg) if is_json else (path, e)
        raise ConfigError(f"{where}: invalid {fmt}: {why}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid {fmt}: nested too deeply") from None


def load_config(path: str | None, overrides=()) -> Config:
    """Load, apply `--set` overrides, validate. path None gives the defaults."""
    raw = read_raw(path) if path is not None else {}
    source = path if path is not None else "<defaults>"
    _require_table(raw, source)
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in SCHEMA:
            raise ConfigError(f"--set {text!r}: unknown section {section!r}{_closest(section, SCHEMA)}")
        if key not in SCHEMA[section]:
            raise ConfigError(f"--set {text!r}: unknown key '{section}.{key}'{_key_hint(section, key)}")
        if not isinstance(raw.get(section, {}), dict):
            raise ConfigError(f"{source}: [{section}] must be a table of keys")
        raw.setdefault(section, {})[key] = value
    base_dir = os.path.dirname(os.path.abspath(path)) if path is not None else os.getcwd()
    return validate(raw, source, base_dir)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string uses JSON's escapes
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(type(value))


def dump_toml(cfg: Config, comments: bool = True) -> str:
    """The config as TOML, every key present; with comments giving each key's meaning."""
    lines = []
    for name, fields in SCHEMA.items():
        lines.append(f"[{name}]")
        for key, f in fields.items():
            entry = f"{key} = {_toml_value(cfg.sections[name][key])}"
            if comments:
                entry = f"{entry:<40} # {f.doc}"
            lines.append(entry)
        lines.append("")
    return "\n".join(lines)


def reference_markdown() -> str:
    """The config reference as Markdown tables (README.md embeds it; a test keeps them equal)."""
    out = []
    for name, fields in SCHEMA.items():
        out.append(f"**[{name}]**\n")
        out.append("| key | default | allowed | meaning |")
        out.append("|---|---|---|---|")
        for key, f in fields.items():
            allowed = ", ".join(f.choices) if f.choices else _allowed(f)
            out.append(f"| `{key}` | `{_toml_value(f.default)}` | {allowed} | {f.doc} |")
        out.append("")
    return "\n".join(out)


def _allowed(f: Field) -> str:
    kind = {"int": "integer", "float": "number", "bool": "true/false", "auto_bool": "auto/true/false", "str": "string",
            "int_list": "list of integers", "float_pair": "two numbers", "str_list": "list of strings",
            "size": 'bytes, a size such as "4GiB", or "free"'}[f.kind]  # fmt: skip
    bounds = []
    if f.min is not None:
        bounds.append(f"{'>' if f.min_exclusive else '>='} {f.min:g}")
    if f.max is not None:
        bounds.append(f"{'<' if f.max_exclusive else '<='} {f.max:g}")
    return kind + (f" ({', '.join(bounds)})" if bounds else "")
