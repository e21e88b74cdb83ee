"""`gpubp bench`: training-step throughput of gpubp and of PyTorch, measured in one run.

For each case (configs/bench/*.toml) and precision, on one device:
  - gpubp: warm-up, then the median of many timed steps (CUDA events on the GPU, the
    host clock on the CPU); samples/s; achieved TFLOP/s, counting 6 x weights x batch
    per step (2 for the forward GEMM, 4 for the two backward ones); the share of the
    step spent in GEMMs, in our other ops, and on the host (a second, instrumented
    pass); the peak memory of the step.
  - PyTorch, the same model, data shape, dtype and optimizer: eager, and torch.compile
    where it works (each skipped with the reason when it cannot run).
  - The device's own peak in the same run: a large GEMM of the same precision, and a
    device-to-device (or memory-to-memory) copy for bandwidth.
A step is forward, loss, backward and update on a batch resident on the device.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import platform
import sys
from dataclasses import asdict, dataclass, field

import numpy as np

from .checkpoint import atomic_write_text
from .config import read_raw
from .errors import ConfigError

PRECISIONS = ("float32", "tf32", "bf16", "float64")


@dataclass
class Case:
    name: str
    sizes: list
    batch: int
    activation: str = "relu"
    loss: str = "softmax_cross_entropy"
    optimizer: str = "adam"
    dtypes: list = field(default_factory=lambda: ["float32"])
    warmup: int = 10
    steps: int = 100
    cpu_warmup: int | None = None  # fewer steps where a CPU step takes seconds
    cpu_steps: int | None = None
    # the stream case (gpubp/stream_bench.py): a dataset of stream_gib GiB under a device budget of
    # budget_gib GiB, against the resident case; on the CPU cpu_stream_mib MiB under a quarter of it
    stream_gib: float = 0.0
    budget_gib: float = 0.0
    cpu_stream_mib: float = 4.0

    @property
    def weights(self) -> int:
        return sum(a * b for a, b in zip(self.sizes[:-1], self.sizes[1:]))

    @property
    def flops_per_step(self) -> int:
        return 6 * self.weights * self.batch

    def counts(self, device: str) -> tuple[int, int]:
        if device == "cpu":
            return (self.cpu_warmup if self.cpu_warmup is not None else self.warmup,
                    self.cpu_steps if self.cpu_steps is not None else self.steps)  # fmt: skip
        return self.warmup, self.steps


def load_case(path: str) -> Case:
    raw = read_raw(path)
    known = set(Case.__dataclass_fields__)
    for key in raw:
        if key not in known:
            raise ConfigError(f"{path}: unknown key {key!r} (bench cases take {', '.join(sorted(known))})")
    try:
        case = Case(**raw)
    except TypeError as e:
        raise ConfigError(f"{path}: {e}") from None
    if len(case.sizes) < 2 or any(not isinstance(s, int) or s < 1 for s in case.sizes):
        raise ConfigError(f"{path}: sizes must be a list of at least two positive integers")
    bad = [d for d in case.dtypes if d not in PRECISIONS]
    if bad:
        raise ConfigError(f"{path}: unknown precision {bad[0]!r} (choose from {', '.join(PRECISIONS)})")
    return case


def bench_dir() -> str:
    """The folder of the bench cases: configs/bench of the checkout beside gpubp/, else the
    installed package's copy `gpubp/bench_cases` (pyproject.toml ships configs/bench as that
    package), so `gpubp bench` works from any folder after `pip install .`."""
    package = os.path.dirname(os.path.abspath(__file__))
    for folder in (os.path.join(os.path.dirname(package), "configs", "bench"), os.path.join(package, "bench_cases")):
        if os.path.isfile(os.path.join(folder, "tiny.toml")):
            return folder
    raise ConfigError(
        "no benchmark cases: configs/bench (gpubp/bench_cases when installed) is missing; reinstall gpubp"
    )


def find_cases(names=()) -> list[Case]:
    """The named cases of configs/bench (all of them when no name is given)."""
    folder = bench_dir()
    available = {os.path.splitext(f)[0]: os.path.join(folder, f) for f in sorted(os.listdir(folder))
                 if f.endswith(".toml")}  # fmt: skip
    for name in names:
        if name not in available:
            raise ConfigError(f"--case {name!r}: no such case; choose from {', '.join(available)}")
    return [load_case(available[n]) for n in (names or available)]


# --------------------------------------------------------------------------- timing


def median_ms(step, backend, warmup: int, steps: int) -> float:
    """Median time of `step()` over `steps` calls after `warmup` calls, each timed by the
    backend's stopwatch (CUDA events on the GPU)."""
    for _ in range(warmup):
        step()
    backend.synchronize()
    timer = backend.timer()
    times = []
    for _ in range(steps):
        timer.start()
        step()
        times.append(timer.stop())
    return float(np.median(times))


class OpProfile:
    """Wraps a backend's ops to time each one (CUDA events on the GPU): totals by
    category ("gemm" or "kernels") and by op name, in milliseconds."""

    OPS = ("bias_act_forward", "act_backward", "bias_grad", "loss_forward_backward", "sgd_step", "adam_step",
           "sum_squares", "accuracy_count")  # fmt: skip
    # the optimizers run the stacked update (a model is a stack of one): timed under the update's name
    ALIASES = {"sgd_step_batched": "sgd_step", "adam_step_batched": "adam_step"}

    def __init__(self, backend):
        self.backend = backend
        self.totals = {"gemm": 0.0, "kernels": 0.0}
        self.per_op = dict.fromkeys(("gemm", *self.OPS), 0.0)
        self._saved = {}

    def __enter__(self):
        be = self.backend
        for name in ("gemm", *self.OPS, *self.ALIASES):
            original = getattr(be, name)
            self._saved[name] = be.__dict__.get(name)
            setattr(
                be, name, self._wrap(original, self.ALIASES.get(name, name), "gemm" if name == "gemm" else "kernels")
            )
        return self

    def _wrap(self, fn, name, category):
        timer = self.backend.timer()

        def timed(*args, **kwargs):
            timer.start()
            out = fn(*args, **kwargs)
            ms = timer.stop()
            self.totals[category] += ms
            self.per_op[name] += ms
            return out

        return timed

    def __exit__(self, *exc):
        for name, value in self._saved.items():
            if value is None:
                delattr(self.backend, name)
            else:
                setattr(self.backend, name, value)


# --------------------------------------------------------------------------- gpubp


def _data(case: Case, rng):
    x = rng.standard_normal((case.batch, case.sizes[0])).astype(np.float32)
    if case.loss == "softmax_cross_entropy":
        y = rng.integers(0, case.sizes[-1], size=case.batch)
    else:
        y = rng.standard_normal((case.batch, case.sizes[-1])).astype(np.float32)
    return x, y


def bench_gpubp(case: Case, backend, precision: str) -> dict:
    from .model import MLP
    from .optim import make_optimizer

    if precision == "bf16" and backend.name != "gpu":
        return {"skipped": "bf16 on the CPU is an exact emulation (the GPU path's reference), not a speed figure"}
    if precision == "tf32" and backend.name != "gpu":
        return {"skipped": "tf32 exists on NVIDIA GPUs only"}
    dtype = {"float64": "float64", "bf16": "bf16"}.get(precision, "float32")  # bf16: mixed precision
    if backend.name == "gpu":
        backend.tf32 = precision == "tf32"
    try:
        backend.memory_reset()
        model = MLP(case.sizes, case.activation, "identity", case.loss, dtype=dtype, backend=backend, seed=0)
        opt = make_optimizer(model, case.optimizer, 1e-3)
        x, y = _data(case, np.random.default_rng(0))
        xd, yd = model.as_input(x), model.as_target(y, case.batch)

        def step():
            model.forward_backward(xd, yd)
            opt.step()

        warmup, steps = case.counts(backend.name)
        ms = median_ms(step, backend, warmup, steps)
        peak = backend.memory_peak()
        # a second pass, instrumented: where the time of a step goes
        n_prof = max(1, min(steps, 20))
        timer = backend.timer()
        with OpProfile(backend) as prof:
            timer.start()
            for _ in range(n_prof):
                step()
            total = timer.stop()
        gemm, kern = prof.totals["gemm"], prof.totals["kernels"]
        share = {"gemm": gemm / total, "kernels": kern / total, "host": max(0.0, 1.0 - (gemm + kern) / total)}
        # microseconds per step of each op (each timed alone), and the rest of the step
        ops_us = {name: 1e3 * t / n_prof for name, t in prof.per_op.items() if t > 0}
        ops_us["host and launch"] = max(0.0, 1e3 * total / n_prof - sum(ops_us.values()))
    finally:
        if backend.name == "gpu":
            backend.tf32 = False
    return _figures(case, ms) | {"share": share, "ops_us": ops_us, "peak_mem_mib": peak / 2**20}


def _new_path(precision: str, measure, failed=None):
    """measure(); for bf16 (mixed precision, new on the GPU) a failure becomes a skipped
    row naming the error, so that the float32 and tf32 rows of the same run survive it."""
    if precision != "bf16":
        return measure()
    try:
        return measure()
    except Exception as e:
        line = (str(e).strip().splitlines() or [""])[0][:200]
        return failed if failed is not None else {"skipped": f"bf16 failed: {type(e).__name__}: {line}"}


def _figures(case: Case, ms: float) -> dict:
    return {"ms_per_step": ms, "samples_per_s": case.batch / (ms / 1e3),
            "tflops": case.flops_per_step / (ms / 1e3) / 1e12}  # fmt: skip


# --------------------------------------------------------------------------- PyTorch


def torch_unavailable() -> str | None:
    try:
        import torch  # noqa: F401
    except ImportError:
        return "PyTorch is not installed (pip install torch) - its columns are skipped"
    return None


COMPILE_MODES = ("default", "reduce-overhead")


def bench_torch(case: Case, device: str, precision: str, compiled: bool) -> dict:
    """PyTorch eager, or torch.compile in each of COMPILE_MODES keeping the fastest (so
    the comparison is against PyTorch at its best); the mode is in the result."""
    if not compiled:
        return _bench_torch(case, device, precision, None)
    best = None
    for mode in COMPILE_MODES:
        r = _bench_torch(case, device, precision, mode)
        if "skipped" not in r and (best is None or r["ms_per_step"] < best["ms_per_step"]):
            best = r | {"mode": mode}
    return best or r


def _bench_torch(case: Case, device: str, precision: str, compile_mode: str | None) -> dict:
    import torch

    compiled = compile_mode is not None
    tdev = "cuda" if device == "gpu" else "cpu"
    if precision in ("tf32", "bf16") and tdev == "cpu":
        return {"skipped": f"{precision} is a GPU precision"}
    torch.manual_seed(0)
    acts = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "gelu": torch.nn.GELU, "silu": torch.nn.SiLU,
            "sigmoid": torch.nn.Sigmoid}  # fmt: skip
    if case.activation not in acts:
        return {"skipped": f"no torch module mapped for activation {case.activation}"}
    dtype = torch.float64 if precision == "float64" else torch.float32
    layers = []
    for i, (a, b) in enumerate(zip(case.sizes[:-1], case.sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(case.sizes) - 2:
            layers.append(acts[case.activation]())
    model = torch.nn.Sequential(*layers).to(device=tdev, dtype=dtype)
    x, y = _data(case, np.random.default_rng(0))
    xt = torch.tensor(x, device=tdev, dtype=dtype)
    if case.loss == "softmax_cross_entropy":
        yt = torch.tensor(y, device=tdev)
        loss_fn = torch.nn.functional.cross_entropy
    elif case.loss == "mse":
        yt = torch.tensor(y, device=tdev, dtype=dtype)
        loss_fn = torch.nn.functional.mse_loss
    else:
        return {"skipped": f"no torch loss mapped for {case.loss}"}
    opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[case.optimizer]
    opt = opt_cls(model.parameters(), lr=1e-3)
    fwd = model
    if compiled:
        try:
            fwd = torch.compile(model, mode=compile_mode)
        except Exception as e:  # pragma: no cover - depends on the installation
            return {"skipped": f"torch.compile failed: {type(e).__name__}: {e}".splitlines()[0]}
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(tdev, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn(fwd(xt), yt)
        loss.backward()
        opt.step()

    class Sync:
        name = device

        def synchronize(self):
            if tdev == "cuda":
                torch.cuda.synchronize()

        def timer(self):
            from .backend import HostTimer

            return _TorchEventTimer(torch) if tdev == "cuda" else HostTimer()

    warmup, steps = case.counts(device)
    try:
        if tdev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ms = median_ms(step, Sync(), warmup + (3 if compiled else 0), steps)
    except Exception as e:
        return {
            "skipped": f"{'torch.compile' if compiled else 'torch'} failed: {type(e).__name__}: {e}".splitlines()[0]
        }
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    out = _figures(case, ms)
    if tdev == "cuda":
        out["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


class _TorchEventTimer:
    def __init__(self, torch):
        self._torch = torch
        self._a = torch.cuda.Event(enable_timing=True)
        self._b = torch.cuda.Event(enable_timing=True)

    def start(self):
        self._a.record()

    def stop(self):
        self._b.record()
        self._b.synchronize()
        return float(self._a.elapsed_time(self._b))


# --------------------------------------------------------------------------- device peak


def device_peak(backend, precision: str) -> dict:
    """The device's own rates, measured now: a large GEMM of this precision and a copy."""
    if precision in ("bf16", "tf32") and backend.name != "gpu":
        return {}
    dtype = np.float64 if precision == "float64" else np.float32
    n = 8192 if backend.name == "gpu" else 1536
    rng = np.random.default_rng(0)
    a = backend.asarray(rng.standard_normal((n, n)).astype(dtype))
    b = backend.asarray(rng.standard_normal((n, n)).astype(dtype))
    c = backend.empty((n, n), dtype)
    if precision == "bf16":  # bf16 inputs and output, float32 accumulation (as the training GEMMs)
        from .precision import BF16

        a, b = (backend.cast(m, backend.empty((n, n), BF16)) for m in (a, b))
        c = backend.empty((n, n), BF16)
    if backend.name == "gpu":
        backend.tf32 = precision == "tf32"
    try:
        ms = median_ms(lambda: backend.gemm(a, b, c), backend, 2, 10 if backend.name == "gpu" else 3)
    finally:
        if backend.name == "gpu":
            backend.tf32 = False
    size = (256 if backend.name == "gpu" else 64) * 2**20 // np.dtype(dtype).itemsize
    src = backend.zeros(size, dtype)
    dst = backend.empty(size, dtype)
    copy_ms = median_ms(lambda: backend.xp.copyto(dst, src), backend, 2, 10)
    return {"gemm_tflops": 2 * n**3 / (ms / 1e3) / 1e12, "copy_gb_s": 2 * src.nbytes / (copy_ms / 1e3) / 1e9}


# --------------------------------------------------------------------------- the run


def versions() -> dict:
    out = {"python": platform.python_version(), "numpy": np.__version__, "machine": platform.machine(),
           "cpu_count": os.cpu_count()}  # fmt: skip
    from . import __version__

    out["gpubp"] = __version__
    try:
        import torch

        out["torch"] = torch.__version__
    except ImportError:
        pass
    try:
        import cupy

        out["cupy"] = cupy.__version__
    except Exception:
        pass
    return out


def run(cases: list[Case], backend, with_torch: bool = True, with_compile: bool = True, log=print,
        progress=None) -> dict:  # fmt: skip
    """Measure every case and precision; log(row) for the table, progress(line) before each measurement."""
    device = backend.name
    reason = torch_unavailable() if with_torch else "--no-torch"
    if reason and with_torch:
        log(reason)
    results, peaks = [], {}
    todo = [(case, precision) for case in cases for precision in case.dtypes]
    for i, (case, precision) in enumerate(todo, start=1):
        if progress is not None:
            progress(f"[{i}/{len(todo)}] {case.name} {precision}: measuring")
        if precision not in peaks:
            peaks[precision] = _new_path(precision, functools.partial(device_peak, backend, precision), {})
        row = {"case": case.name, "precision": precision, "batch": case.batch, "sizes": case.sizes,
               "flops_per_step": case.flops_per_step}  # fmt: skip
        if case.stream_gib:  # streamed vs resident gpubp (gpubp/stream_bench.py); PyTorch has no counterpart here
            from . import stream_bench

            row["gpubp"] = stream_bench.bench_stream(case, backend, precision)
            row.update({k: {"skipped": "the stream case compares gpubp streamed with gpubp resident"}
                        for k in ("torch_eager", "torch_compile")}, speedup_vs_torch_eager=None,
                       speedup_vs_torch_compile=None, share_of_gemm_peak=None, stream=True)  # fmt: skip
            results.append(row)
            log(stream_bench.format_row(row))
            continue
        row["gpubp"] = _new_path(precision, functools.partial(bench_gpubp, case, backend, precision))
        for key, compiled in (("torch_eager", False), ("torch_compile", True)):
            if reason:
                row[key] = {"skipped": reason}
            elif compiled and not with_compile:
                row[key] = {"skipped": "--no-compile"}
            else:
                row[key] = bench_torch(case, device, precision, compiled)
        ours = row["gpubp"].get("ms_per_step")
        for key in ("torch_eager", "torch_compile"):
            theirs = row[key].get("ms_per_step")
            row[f"speedup_vs_{key}"] = theirs / ours if ours and theirs else None
        peak = peaks[precision].get("gemm_tflops")
        row["share_of_gemm_peak"] = row["gpubp"]["tflops"] / peak if peak and ours else None
        results.append(row)
        log(format_row(row))
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": backend.describe(),
        "versions": versions(),
        "command": " ".join(["gpubp", *sys.argv[1:]]) if sys.argv and "bench" in sys.argv else "gpubp bench",
        "device_peak": peaks,
        "results": results,
    }


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


HEADER = (f"{'case':<11} {'prec':<8} {'ms/step':>9} {'samples/s':>11} {'TFLOP/s':>8} {'%peak':>6} "
          f"{'eager':>9} {'compile':>9} {'x eager':>8} {'x comp':>7} {'gemm/kern/host %':>17} {'MiB':>8}")  # fmt: skip


def format_row(row: dict) -> str:
    if row.get("stream"):
        from .stream_bench import format_row as stream_row

        return stream_row(row)
    g = row["gpubp"]
    if "skipped" in g:
        return f"{row['case']:<11} {row['precision']:<8} skipped: {g['skipped']}"
    s = g["share"]
    share = f"{100 * s['gemm']:.0f}/{100 * s['kernels']:.0f}/{100 * s['host']:.0f}"
    pk = row.get("share_of_gemm_peak")
    return (f"{row['case']:<11} {row['precision']:<8} {g['ms_per_step']:>9.3f} {g['samples_per_s']:>11.4g} "
            f"{g['tflops']:>8.3g} {_fmt(pk and 100 * pk, '>6.1f')} "
            f"{_fmt(row['torch_eager'].get('ms_per_step'), '>9.3f')} {_fmt(row['torch_compile'].get('ms_per_step'), '>9.3f')} "
            f"{_fmt(row['speedup_vs_torch_eager'], '>8.2f')} {_fmt(row['speedup_vs_torch_compile'], '>7.2f')} "
            f"{share:>17} {g['peak_mem_mib']:>8.1f}")  # fmt: skip


def markdown(report: dict) -> str:
    """The report as a Markdown table (for docs/benchmarks.md)."""
    lines = [f"Device: {report['device']}; {report['date']}; versions: "
             + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
             f"Command: `{report['command']}`", ""]  # fmt: skip
    for prec, peak in report["device_peak"].items():
        if peak:
            lines.append(
                f"- device peak, {prec}: GEMM {peak['gemm_tflops']:.3g} TFLOP/s, copy {peak['copy_gb_s']:.3g} GB/s"
            )
    lines += ["", "| case | precision | gpubp ms/step | samples/s | TFLOP/s | torch eager ms | torch.compile ms "
              "| x eager | x compile | GEMM / ops / host | peak MiB |", "|" + "---|" * 11]  # fmt: skip
    for row in report["results"]:
        g = row["gpubp"]
        if row.get("stream"):
            from .stream_bench import markdown_row

            lines.append(markdown_row(row))
            continue
        if "skipped" in g:
            lines.append(f"| {row['case']} | {row['precision']} | skipped: {g['skipped']} |" + " |" * 8)
            continue
        s = g["share"]

        def t(key, row=row):
            r = row[key]
            return _fmt(r.get("ms_per_step"), ".3f") if "skipped" not in r else "n/a"

        lines.append(
            f"| {row['case']} | {row['precision']} | {g['ms_per_step']:.3f} | {g['samples_per_s']:.4g} | "
            f"{g['tflops']:.3g} | {t('torch_eager')} | {t('torch_compile')} | "
            f"{_fmt(row['speedup_vs_torch_eager'], '.2f')} | {_fmt(row['speedup_vs_torch_compile'], '.2f')} | "
            f"{100 * s['gemm']:.0f} / {100 * s['kernels']:.0f} / {100 * s['host']:.0f} % | {g['peak_mem_mib']:.1f} |"
        )
    lines += per_op_table(report)
    skipped = {f"{row['case']} {row['precision']} {k}: {row[k]['skipped']}" for row in report["results"]
               for k in ("torch_eager", "torch_compile") if "skipped" in row[k]}  # fmt: skip
    if skipped:
        lines += ["", "Skipped: " + "; ".join(sorted(skipped))]
    return "\n".join(lines) + "\n"


def per_op_table(report: dict) -> list[str]:
    """Markdown lines: microseconds per step of each op, per case and precision."""
    rows = [r for r in report["results"] if "ops_us" in r["gpubp"]]
    if not rows:
        return []
    names = [n for n in ("gemm", *OpProfile.OPS, "host and launch") if any(n in r["gpubp"]["ops_us"] for r in rows)]
    lines = ["", "Where a step's time goes, microseconds per step (a second pass with each op timed alone by "
             "the backend's stopwatch; 'host and launch' is the step's time outside the ops):", "",
             "| case | precision | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]  # fmt: skip
    for r in rows:
        ops = r["gpubp"]["ops_us"]
        lines.append(f"| {r['case']} | {r['precision']} | " + " | ".join(_fmt(ops.get(n), ".1f") for n in names) + " |")
    modes = [f"{r['case']} {r['precision']}: {r['torch_compile']['mode']}" for r in report["results"]
             if r["torch_compile"].get("mode")]  # fmt: skip
    if modes:
        lines += ["", "torch.compile mode kept (the fastest of " + ", ".join(COMPILE_MODES) + "): " + "; ".join(modes)]
    return lines


def write_json(report: dict, path: str) -> None:
    text = json.dumps(report, indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
    atomic_write_text(path, text + "\n")


def ratio_summary(report: dict) -> str:
    """Geometric means of the speedups, for one line at the end."""
    out = []
    for key in ("torch_eager", "torch_compile"):
        vals = [r[f"speedup_vs_{key}"] for r in report["results"] if r.get(f"speedup_vs_{key}")]
        if vals:
            out.append(
                f"vs {key.replace('_', ' ')}: geometric mean {math.exp(np.mean(np.log(vals))):.2f}x over {len(vals)}"
            )
    return "; ".join(out)
