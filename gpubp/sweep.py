"""Hyperparameter sweeps: the `[sweep]` config table, its expansion and its groups.

    [sweep]
    mode = "grid"                              # or "zip": the i-th values together
    "optimizer.lr" = [1e-3, 3e-3, 1e-2]
    "train.seed" = [0, 1, 2, 3]

A grid of lists of lengths n_1..n_k has n_1 * ... * n_k members, the last key varying
fastest (itertools.product order); a zip has n members (every list of length n).
Member i is the base config with member i's values set: a plain Config, the one a
single run with those settings would use.

Members whose parameters have equal shapes and whose step runs the same ops are
trained together as one stack (`gpubp.stack`): they may differ in the BATCHED keys
(per-model device vectors) and in nothing else. Any other difference (model.hidden,
data.*, the optimizer's kind, batch size, ...) splits the sweep into groups, run one
after another.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from .config import SCHEMA, Config, _closest, _coerce, validate
from .errors import ConfigError

MODES = ("grid", "zip")

# keys whose values become per-model vectors of one stack (same shapes, same ops)
BATCHED = frozenset(
    {
        "optimizer.lr", "optimizer.weight_decay", "optimizer.momentum", "optimizer.dampening",
        "optimizer.betas", "optimizer.eps", "optimizer.clip_grad_norm",
        "schedule.name", "schedule.warmup_steps", "schedule.step_size", "schedule.gamma", "schedule.min_lr",
        "train.seed", "model.init",
    }
)  # fmt: skip
# keys that may not be swept: they say where and how the run goes, not what it trains
NOT_SWEPT = frozenset({"train.device", "train.eval_every", "train.eval_batch_size"})


@dataclass
class Member:
    """One model of a sweep: its index, the swept values it takes, its full config."""

    index: int
    values: dict  # "section.key" -> value (canonical form)
    cfg: Config

    def label(self) -> str:
        return " ".join(f"{k}={_short(v)}" for k, v in self.values.items())


@dataclass
class Sweep:
    mode: str
    keys: dict  # "section.key" -> list of canonical values
    members: list  # Member, in expansion order

    def groups(self) -> list[list[Member]]:
        """Members that can share one stack, in order of their first member."""
        out: dict = {}
        for m in self.members:
            out.setdefault(group_signature(m.cfg), []).append(m)
        return list(out.values())


def _short(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v).replace(" ", "")


def _flatten(table: dict, source: str) -> dict:
    """{"optimizer.lr": [...]} from either quoted dotted keys or nested tables."""
    flat = {}
    for key, value in table.items():
        if key == "mode":
            continue
        if isinstance(value, dict):  # [sweep.optimizer] lr = [...], or optimizer.lr = [...] unquoted
            for sub, v in value.items():
                flat[f"{key}.{sub}"] = v
        else:
            flat[key] = value
    return flat


def parse_table(table, source: str) -> tuple[str, dict]:
    """(mode, {"section.key": [canonical values]}) from a raw [sweep] table; ConfigError
    naming the key and the value at the first fault."""
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [sweep] must be a table of 'section.key' = [values], got {table!r}")
    mode = table.get("mode", "grid")
    if mode not in MODES:
        raise ConfigError(f"{source}: sweep.mode: unknown value {mode!r} (choose one of: {', '.join(MODES)})")
    keys = {}
    for key, values in _flatten(table, source).items():
        section, _, name = key.partition(".")
        if section not in SCHEMA or name not in SCHEMA[section]:
            options = [f"{s}.{k}" for s in SCHEMA for k in SCHEMA[s]]
            raise ConfigError(f"{source}: [sweep] unknown key {key!r}{_closest(key, options)}")
        if key in NOT_SWEPT:
            raise ConfigError(f"{source}: [sweep] {key} cannot be swept; set it once in [{section}]")
        if not isinstance(values, list) or not values:
            raise ConfigError(
                f"{source}: [sweep] {key}: expected a non-empty list of values such as [1e-3, 1e-2], got {values!r}"
            )
        field = SCHEMA[section][name]
        keys[key] = [_coerce(f"{source}: [sweep] {key}[{i}]", field, v) for i, v in enumerate(values)]
    if not keys:
        raise ConfigError(f'{source}: [sweep] lists no keys; add e.g. "optimizer.lr" = [1e-3, 1e-2]')
    if mode == "zip":
        lengths = {k: len(v) for k, v in keys.items()}
        if len(set(lengths.values())) > 1:
            desc = ", ".join(f"{k} has {n}" for k, n in lengths.items())
            raise ConfigError(f"{source}: sweep.mode = 'zip' needs lists of one length ({desc})")
    return mode, keys


def expand(raw: dict, source: str, base_dir: str = ".") -> Sweep:
    """The sweep of a raw config mapping that holds a [sweep] table: every member
    validated as a config of its own (errors name the member's swept values)."""
    base = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items() if k != "sweep"}
    mode, keys = parse_table(raw["sweep"], source)
    names = list(keys)
    combos = zip(*keys.values()) if mode == "zip" else itertools.product(*keys.values())
    members = []
    for i, combo in enumerate(combos):
        member_raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
        values = dict(zip(names, combo))
        for key, value in values.items():
            section, _, name = key.partition(".")
            if section in member_raw and not isinstance(member_raw[section], dict):
                raise ConfigError(f"{source}: [{section}] must be a table of keys")
            member_raw.setdefault(section, {})[name] = value
        label = " ".join(f"{k}={_short(v)}" for k, v in values.items())
        cfg = validate(member_raw, f"{source} (sweep member {i}: {label})", base_dir)
        members.append(Member(i, values, cfg))
    return Sweep(mode, keys, members)


def group_signature(cfg: Config) -> tuple:
    """What must be equal for two configs to train in one stack: every key but the
    BATCHED ones, and two facts about batched ones that change which ops run
    (momentum on or off; clipping on or off is handled per model)."""
    sig = []
    for section, fields in SCHEMA.items():
        for key in fields:
            if f"{section}.{key}" not in BATCHED:
                value = cfg.sections[section][key]
                sig.append((section, key, tuple(value) if isinstance(value, list) else value))
    sig.append(("momentum_on", cfg.optimizer.momentum > 0))
    return tuple(sig)


def format_table(sweep: Sweep) -> str:
    """The expanded grid as a text table: member, group, one column per swept key."""
    groups = sweep.groups()
    group_of = {m.index: g for g, members in enumerate(groups) for m in members}
    header = ["model", "group", *sweep.keys]
    rows = [[str(m.index), str(group_of[m.index]), *(_short(v) for v in m.values.values())] for m in sweep.members]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = [
        f"# sweep: mode = {sweep.mode!r}, {len(sweep.members)} models in {len(groups)} "
        f"group{'s' if len(groups) != 1 else ''} (a group trains as one stack)"
    ]
    for r in [header, *rows]:
        lines.append("# " + "  ".join(c.rjust(w) for c, w in zip(r, widths)))
    return "\n".join(lines) + "\n"


def dump_sweep_toml(sweep: Sweep) -> str:
    """The [sweep] table as TOML (config.toml of a sweep run ends with it)."""
    from .config import _toml_value

    lines = ["[sweep]", f'mode = "{sweep.mode}"']
    lines += [f'"{k}" = {_toml_value(v)}' for k, v in sweep.keys.items()]
    return "\n".join(lines) + "\n"
