"""`gpubp jacobian`: forward- against reverse-mode cost, counted and timed, as the
output width and the parameter count vary around a config's architecture.

Two sweeps, both at the config's first training sample:

- output width (wrt input): n_in -> config hidden -> n_out for n_out = n_in/8 .. 8 n_in.
  Forward mode carries n_in tangent rows, reverse mode n_out adjoint rows through the
  same GEMMs, so the cheaper mode changes where n_out passes n_in.
- hidden width (wrt params): every hidden width scaled by 1/8 .. 1. Forward mode
  carries one row per parameter of the layers behind it, reverse mode n_out rows:
  the gap grows with the parameter count. This is why training uses reverse mode.

FLOPs come from jacobian_flops (docs/jacobian.md derives them); times are the median
of `repeats` calls of device_jacobian after one warm-up, the clock read after
backend.synchronize().
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from .jacobians import MODES, device_jacobian, jacobian_bytes, jacobian_flops

OUTPUT_FACTORS = (1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8)
HIDDEN_FACTORS = (1 / 8, 1 / 4, 1 / 2, 1)


@dataclass
class Row:
    sweep: str  # "output width" (wrt input) or "hidden width" (wrt params)
    wrt: str
    sizes: list
    n_params: int
    flops: dict = field(default_factory=dict)  # mode -> FLOPs of one Jacobian
    seconds: dict = field(default_factory=dict)  # mode -> median seconds, None if skipped


def _scaled(width: int, factor: float) -> int:
    return max(1, round(width * factor))


def architectures(n_in: int, hidden: list, n_out: int):
    """[(sweep, wrt, sizes)]: the two sweeps around [n_in, *hidden, n_out]."""
    outs = sorted({_scaled(n_in, f) for f in OUTPUT_FACTORS})
    hiddens = [] if not hidden else sorted({tuple(_scaled(h, f) for h in hidden) for f in HIDDEN_FACTORS})
    return [("output width", "input", [n_in, *hidden, o]) for o in outs] + [
        ("hidden width", "params", [n_in, *h, n_out]) for h in (hiddens or [()])
    ]


def median_seconds(fn, backend, repeats: int) -> float:
    fn()  # warm-up: first-call allocations
    times = []
    for _ in range(repeats):
        backend.synchronize()
        start = time.perf_counter()
        fn()
        backend.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_sweeps(cfg, device: str, modes, repeats: int = 5, max_bytes: float = 2**31, log=None) -> dict:
    """Count and time every (architecture, mode); a mode whose buffers would pass
    max_bytes is counted but not run (seconds None)."""
    from .config import validate
    from .errors import ConfigError
    from .trainer import build_model, prepare

    if cfg.model.dtype in ("bf16", "fp16"):
        raise ConfigError(f"{cfg.source}: model.dtype {cfg.model.dtype!r}: Jacobians are computed in float32 or "
                          "float64 only; --set model.dtype=float32")  # fmt: skip
    run = prepare(cfg, device, log=log)
    cfg, be, base = run.cfg, run.backend, run.model  # run.cfg: loss.name "auto" resolved
    x = run.splits["train"].x[0]  # (n_in,) one training sample
    rows = []
    for sweep, wrt, sizes in architectures(base.sizes[0], list(cfg.model.hidden), base.sizes[-1]):
        raw = cfg.to_dict()
        raw["model"]["hidden"] = sizes[1:-1]
        model = build_model(validate(raw, cfg.source, cfg.base_dir), sizes[0], sizes[-1], be)
        row = Row(sweep, wrt, sizes, model.n_params)
        for mode in modes:
            row.flops[mode] = jacobian_flops(sizes, model.is_residual, wrt, mode).total
            if jacobian_bytes(sizes, wrt, mode, model.dtype.itemsize) > max_bytes:
                row.seconds[mode] = None
                continue
            row.seconds[mode] = median_seconds(lambda: device_jacobian(model, x, wrt, mode), be, repeats)  # noqa: B023
        rows.append(row)
    return {"config": cfg.source, "device": be.describe(), "dtype": base.dtype.name, "n_in": base.sizes[0],
            "hidden": list(cfg.model.hidden), "n_out": base.sizes[-1], "residual": base.residual,
            "repeats": repeats, "rows": rows}  # fmt: skip


def _ratio(a, b) -> str:
    return f"{a / b:.3g}" if a is not None and b else "-"


def format_table(result: dict, modes) -> str:
    """The two sweeps as aligned text tables, one line per architecture."""
    both = tuple(modes) == MODES
    lines = [f"Jacobian cost: {result['config']}, {result['dtype']} on {result['device']}, "
             f"median of {result['repeats']} (times in ms, FLOPs in millions)"]  # fmt: skip
    for sweep, wrt in (("output width", "input"), ("hidden width", "params")):
        rows = [r for r in result["rows"] if r.sweep == sweep]
        lines.append("")
        lines.append(f"wrt={wrt}, {sweep} varies: sizes [n_in, hidden..., n_out]")
        head = f"{'sizes':>22} {'params':>8}"
        for mode in modes:
            short = "fwd" if mode == "forward" else "rev"
            head += f" {short + ' MFLOP':>11} {short + ' ms':>9}"
        if both:
            head += f" {'fwd/rev FLOP':>12} {'fwd/rev time':>12}"
        lines.append(head)
        for r in rows:
            line = f"{str(r.sizes):>22} {r.n_params:>8}"
            for mode in modes:
                s = r.seconds[mode]
                line += f" {r.flops[mode] / 1e6:>11.4g} {'skipped' if s is None else f'{s * 1e3:.4g}':>9}"
            if both:
                line += f" {_ratio(r.flops['forward'], r.flops['reverse']):>12}"
                line += f" {_ratio(r.seconds['forward'], r.seconds['reverse']):>12}"
            lines.append(line)
    return "\n".join(lines)


def as_json(result: dict) -> dict:
    out = dict(result)
    out["rows"] = [vars(r) for r in result["rows"]]
    return out


def plot(result: dict, modes, path: str, plt) -> None:
    """FLOPs (top) and time (bottom) of each mode: against n_out for wrt=input (the
    line marks n_out = n_in), against the parameter count for wrt=params."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for col, (sweep, wrt) in enumerate((("output width", "input"), ("hidden width", "params"))):
        rows = [r for r in result["rows"] if r.sweep == sweep]
        xs = [r.sizes[-1] if wrt == "input" else r.n_params for r in rows]
        for top, (key, label, scale) in enumerate((("flops", "MFLOP", 1e-6), ("seconds", "ms", 1e3))):
            ax = axes[top][col]
            for mode in modes:
                ys = [None if getattr(r, key)[mode] is None else getattr(r, key)[mode] * scale for r in rows]
                ax.plot(xs, ys, "o-", label=f"{mode} mode")
            if wrt == "input":
                ax.axvline(result["n_in"], color="gray", ls=":", label=f"n_out = n_in = {result['n_in']}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("output width n_out" if wrt == "input" else "parameters (hidden width varies)")
            ax.set_ylabel(f"{label} per Jacobian")
            ax.set_title(f"wrt={wrt}: {label}")
            ax.grid(alpha=0.3, which="both")
            ax.legend()
    fig.suptitle(f"Jacobian cost, forward vs reverse mode: {result['config']} ({result['dtype']}, {result['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
