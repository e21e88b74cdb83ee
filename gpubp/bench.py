"""`gpubp bench`: training-step throughput of gpubp and of PyTorch, measured in one run.

For each case (configs/bench/*.toml) and precision, on one device:
  - gpubp: its training step as `gpubp train` runs it: a Trainer over random data of the
    case's shape, resident on the device (two batches), and its Step (gpubp/step.py,
    Trainer.make_step: gather, forward, loss, backward, guard, update), captured as a
    CUDA graph per batch shape where the backend can (the GPU's default), and the same
    step uncaptured (train.cuda_graph = false), timed in the same rounds, so the graph's
    gain is a ratio of one run. Per step: time, samples/s, achieved TFLOP/s (6 x weights
    x batch: 2 for the forward GEMM, 4 for the two backward ones), the peak memory; from
    a further, instrumented pass of the uncaptured step: each op's time, the sum of the
    GEMM times and the step's ratio to it, and the shares of GEMMs, other ops and host.
  - PyTorch, the same model, data shape, dtype and optimizer: eager, and torch.compile
    in each mode, the fastest kept (each skipped with the reason when it cannot run).
  - The device's own peak in the same run: a large GEMM of the same precision, and a
    device-to-device (or memory-to-memory) copy for bandwidth.
Step times (steps_ms): blocks of consecutive steps, host clock from a drained device to
the end of a device synchronize; the median of the blocks' per-step means.
"""

from __future__ import annotations

import datetime
import functools
import inspect
import json
import math
import os
import platform
import sys
from dataclasses import asdict, dataclass, field

import numpy as np

from .checkpoint import atomic_write_text
from .config import read_raw
from .errors import ConfigError, UsageError

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
    backend's stopwatch (CUDA events on the GPU): for single ops (the device's peak)."""
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


ROUNDS = 5  # timed blocks per measurement: the median of their per-step means


def steps_ms(steps: dict, synchronize, warmup: int, n_steps: int, rounds: int = ROUNDS) -> dict:
    """Per-step time (ms) of each callable of `steps` (name -> one training step), as a
    training loop sees it: each runs `warmup` steps, then `rounds` rounds in which each in
    turn runs a block of n_steps // rounds consecutive steps (so that a change of load
    hits every one alike), timed by the host clock from a drained device to the end of a
    device synchronize (host overhead, launch gaps and all streams included); the median
    over the rounds of each block's mean."""
    import time

    for fn in steps.values():
        for _ in range(warmup):
            fn()
    rounds = max(1, min(rounds, n_steps))
    block = max(1, n_steps // rounds)
    times: dict = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            synchronize()
            t0 = time.perf_counter()
            for _ in range(block):
                fn()
            synchronize()
            times[name].append((time.perf_counter() - t0) * 1e3 / block)
    return {name: float(np.median(t)) for name, t in times.items()}


class OpProfile:
    """Wraps a backend's ops to time each one (CUDA events on the GPU): totals by
    category ("gemm" or "kernels") and by op name, in milliseconds."""

    OPS = ("gemm_bias_relu", "gemm_bias", "gemm_drelu_bias_grad", "gemm_bias_grad", "gemm_bias_act", "layer_backward", "bias_act_forward", "act_backward",
           "bias_grad", "act_backward_bias_grad", "loss_forward_backward", "sgd_step", "adam_step", "sum_squares", "step_guard", "step_guard_norm",
           "step_guard_scaled", "step_guard_scaled_norm", "cast", "add", "gather_rows", "gather_windows", "select_rows", "index_window", "step_advance",
           "accuracy_count", "mlp_forward_backward", "sum_shares")  # fmt: skip
    # products: cuBLAS, cuBLASLt with a fused epilogue, and a narrow layer's own kernel (layer.cu)
    GEMMS = ("gemm", "gemm_bias_relu", "gemm_bias", "gemm_drelu_bias_grad", "gemm_bias_grad", "gemm_bias_act",
             "layer_backward")  # fmt: skip
    # the optimizers run the stacked update (a model is a stack of one): timed under the update's name
    ALIASES = {"sgd_step_batched": "sgd_step", "adam_step_batched": "adam_step"}

    def __init__(self, backend):
        self.backend = backend
        self.totals = {"gemm": 0.0, "kernels": 0.0}
        self.per_op = dict.fromkeys(("gemm", *self.OPS), 0.0)
        # each product by its op and shape (product_shape): [milliseconds, calls]
        self.per_product: dict[str, list] = {}
        self._saved = {}

    def __enter__(self):
        be = self.backend
        for name in ("gemm", *self.OPS, *self.ALIASES):
            original = getattr(be, name, None)
            if original is None:
                continue
            self._saved[name] = be.__dict__.get(name)
            setattr(
                be,
                name,
                self._wrap(original, self.ALIASES.get(name, name), "gemm" if name in self.GEMMS else "kernels"),
            )
        return self

    def _wrap(self, fn, name, category):
        timer = self.backend.timer()
        signature = inspect.signature(fn) if category == "gemm" else None

        def timed(*args, **kwargs):
            out, ms = self.measure(fn, args, kwargs, timer)
            self.totals[category] += ms
            self.per_op[name] += ms
            if signature is not None and ms > 0:
                entry = self.per_product.setdefault(
                    f"{name} {product_shape(signature.bind(*args, **kwargs))}", [0.0, 0]
                )
                entry[0] += ms
                entry[1] += 1
            return out

        return timed

    def measure(self, fn, args, kwargs, timer):
        """(the op's result, its milliseconds): the op between the stopwatch's marks."""
        timer.start()
        out = fn(*args, **kwargs)
        return out, timer.stop()

    def __exit__(self, *exc):
        for name, value in self._saved.items():
            if value is None:
                delattr(self.backend, name)
            else:
                setattr(self.backend, name, value)


def product_shape(bound) -> str:
    """'NT 262144x64x64': a product's transposes (op(a), op(b)) and m x n x k, out = op(a)
    op(b) an (m, n) matrix summed over k, from the bound arguments of a GEMM op (a, b,
    out, trans_a, trans_b: every one of OpProfile.GEMMS but layer_backward, whose two
    products are named by the layer's rows, inputs and outputs). A weight gradient is the
    one whose k is the batch."""
    args = bound.arguments
    if "out" not in args:  # layer_backward: x^T D' and D' W^T of a layer, 'layer 262144x64x64' (rows x in x out)
        rows, (n_in, n_out) = args["d"].shape[0], args["w"].shape  # (x: a split's where a window is given)
        return f"layer {rows}x{n_in}x{n_out}"
    a, out = args["a"], args["out"]
    ta, tb = bool(args.get("trans_a", False)), bool(args.get("trans_b", False))
    m, n = out.shape
    k = a.shape[0] if ta else a.shape[1]
    return f"{'TN'[not ta]}{'TN'[not tb]} {m}x{n}x{k}"


class GraphOpProfile(OpProfile):
    """Each op of a step timed as a CUDA graph of its own, for the per-op table of a
    captured step (a whole-step graph cannot be split, and the uncaptured profile's times
    carry each launch's host cost, which a graph does not pay): the op runs once plainly
    on the capturer's stream (its warm-up), is captured r times into one graph, and the
    graph is replayed once between the stopwatch's marks; its time / r is the op's device
    time with a graph's gaps between kernels. r = REPEAT, fewer for a long op (the plain
    run timed first: about BUDGET_MS a graph, so that wide's products do not stretch the
    bench). Then the op runs once more for the step to go on with. An op is so applied
    r + 3 times to the same buffers (an update too): a timing pass, not a training step.
    An op another op calls is timed in its caller."""

    REPEAT = 20
    BUDGET_MS = 2.0

    def __init__(self, backend):
        super().__init__(backend)
        self.capturer = backend.graph_capturer()
        self._inside = False
        self._keys = 0

    def measure(self, fn, args, kwargs, timer):
        if self._inside:
            return fn(*args, **kwargs), 0.0
        self._inside = True
        try:
            key, self._keys = ("op", self._keys), self._keys + 1
            timer.start()
            fn(*args, **kwargs)
            plain_ms = timer.stop()
            repeat = max(1, min(self.REPEAT, int(self.BUDGET_MS / max(plain_ms, 1e-6))))
            self.capturer.warmup(key, lambda: fn(*args, **kwargs))

            def repeated():
                for _ in range(repeat):
                    fn(*args, **kwargs)

            replay = self.capturer.capture(key, repeated)
            self.backend.synchronize()
            timer.start()
            replay()
            ms = timer.stop() / repeat
            return fn(*args, **kwargs), ms
        finally:
            self._inside = False


# where the bench also profiles a captured step op by op (GraphOpProfile): the GPU's
GRAPH_PROFILE_DEVICES = ("gpu",)


# --------------------------------------------------------------------------- gpubp


def _data(case: Case, rng, rows: int | None = None):
    """Random features (rows, n_in) float32 and targets of the case's loss (rows = batch)."""
    rows = case.batch if rows is None else rows
    x = rng.standard_normal((rows, case.sizes[0]), dtype=np.float32)
    if case.loss == "softmax_cross_entropy":
        y = rng.integers(0, case.sizes[-1], size=rows)
    elif case.loss == "binary_cross_entropy":
        y = rng.random((rows, case.sizes[-1]), dtype=np.float32)
    else:
        y = rng.standard_normal((rows, case.sizes[-1]), dtype=np.float32)
    return x, y


DATA_BATCHES = 2  # the resident training split: this many full batches (one batch shape)


def _dataset(case: Case):
    from .data import Dataset

    x, y = _data(case, np.random.default_rng(0), DATA_BATCHES * case.batch)
    n_classes = case.sizes[-1] if case.loss == "softmax_cross_entropy" else None
    return Dataset(x, y, n_classes, f"bench {case.name}")


class TrainerStep:
    """One training step of gpubp as `gpubp train` runs it: a Trainer over `dataset`
    (resident on the device), its Step (gpubp/step.py, Trainer.make_step), captured as a
    CUDA graph per batch shape when `graph` and the backend can (the first two steps of
    a shape run plainly and capture; `graph_note` says why not otherwise). Calling it
    runs the next step. The epoch's order is set once (training sets it once an epoch:
    one copy of n_train indices to the device, left out of the timed steps)."""

    def __init__(self, case: Case, backend, dtype: str, graph: bool, total_steps: int, dataset, epilogues=None,
                 fused_mlp="auto"):  # fmt: skip
        from .config import load_config
        from .data import epoch_permutation
        from .trainer import Trainer

        epilogues = str(EPILOGUES if epilogues is None else epilogues).lower()
        overrides = [f"model.hidden={list(case.sizes[1:-1])}", f"model.activation={case.activation}",
                     "model.output_activation=identity", f"model.dtype={dtype}", f"loss.name={case.loss}",
                     f"optimizer.name={case.optimizer}", "optimizer.lr=0.001", f"train.batch_size={case.batch}",
                     f"train.steps={int(total_steps)}", "train.seed=0", "train.early_stopping_patience=0",
                     f"train.cuda_graph={str(bool(graph)).lower()}", f"train.gemm_epilogues={epilogues}",
                     f"train.fused_mlp={str(fused_mlp).lower()}", "data.val_fraction=0", "data.test_fraction=0",
                     "data.standardize=false", "data.standardize_targets=false"]  # fmt: skip
        self.trainer = Trainer(load_config(None, overrides), None, device=backend, quiet=True, dataset=dataset)
        self.step_fn = self.trainer.make_step()
        self.graph_note = self.trainer.graph_note
        self.step_fn.new_epoch(epoch_permutation(0, 0, self.trainer.n_train))
        self.steps = 0

    def __call__(self) -> None:
        self.step_fn.run(self.steps)
        self.steps += 1

    def graph_bytes(self) -> int:
        """Device bytes of the graphs' own memory pools (CudaGraphCapturer.pools; 0 without)."""
        pools = getattr(self.step_fn.capturer, "pools", None) or {}
        return int(sum(p.total_bytes() for p in pools.values()))


# train.gemm_epilogues of the bench's step (and of `gpubp train`): "auto", fused products in
# bf16 and fp16 only (tests force true to time a fusing float32 model on the CPU)
EPILOGUES = "auto"

# where the bench times the fused MLP (train.fused_mlp) beside the default step: its kernel's
# device (the CPU runs the NumPy reference op there, no speed figure)
FUSED_MLP_DEVICES = ("gpu",)


def bench_gpubp(case: Case, backend, precision: str, with_fused_mlp: bool = True) -> dict:
    """gpubp's training step (TrainerStep): the captured step (the default on the GPU),
    the uncaptured one (train.cuda_graph = false) and, where the model fuses products
    (the GPU's default), the captured step without (train.gemm_epilogues
    = false), and on the GPU, where the network fits the fused MLP kernel, the captured
    step the other way (train.fused_mlp true where "auto" left it out, false where "auto"
    took it), timed in the same rounds (steps_ms); then a
    profiled pass of the uncaptured step (each op timed alone)."""
    import gc

    if precision == "bf16" and backend.name != "gpu":
        return {"skipped": "bf16 on the CPU is an exact emulation (the GPU path's reference), not a speed figure"}
    if precision == "tf32" and backend.name != "gpu":
        return {"skipped": "tf32 exists on NVIDIA GPUs only"}
    warmup, steps = case.counts(backend.name)
    warmup = max(warmup, 3)  # plain, capture, and at least one replay before timing
    n_prof = max(1, min(steps, 20))
    total = 2 * warmup + steps + n_prof  # the captured run warms up twice (alone, then in steps_ms)
    dataset = _dataset(case)
    runs, graph, plain = {}, None, None
    try:
        backend.memory_reset()
        runs["graph"] = graph = TrainerStep(case, backend, precision, True, total, dataset)
        for _ in range(warmup):
            graph()
        backend.synchronize()
        peak = backend.memory_peak() + graph.graph_bytes()  # the captured run: data, model, workspace, graph
        captured = graph.graph_note is None
        if captured:  # the same step uncaptured, timed in the same rounds
            runs["plain"] = TrainerStep(case, backend, precision, False, total, dataset)
        fused = graph.trainer.model.fuses_products
        if fused:  # the same step without the fused products, timed in the same rounds
            runs["unfused"] = TrainerStep(case, backend, precision, True, total, dataset, epilogues=False)
        # does the default step ("auto") run the fused MLP? then the other way is the separate ops
        mlp_default = graph.trainer.model.runs_fused_mlp(case.batch)
        if with_fused_mlp and backend.name in FUSED_MLP_DEVICES and graph.trainer.model.fused_mlp_fits(case.batch):
            runs["mlp"] = TrainerStep(case, backend, precision, True, total, dataset, fused_mlp=not mlp_default)
        ms = steps_ms(runs, backend.synchronize, warmup, steps)
        plain = runs.get("plain", graph)
        # a further pass of the uncaptured step, instrumented: where the time of a step goes
        timer = backend.timer()
        backend.synchronize()
        with OpProfile(backend) as prof:
            timer.start()
            for _ in range(n_prof):
                plain()
            prof_total = timer.stop()
        # a step that diverged would time NaN arithmetic (and skipped updates): said beside the row
        finite = all(np.isfinite(backend.to_float(r.trainer.running_loss)) for r in runs.values())
        note = graph.graph_note
        # where the captured step's time goes: each op as a graph of its own (the default
        # step, and the fused MLP's where it was timed), one timing pass each
        graph_ops = {}
        if captured and backend.name in GRAPH_PROFILE_DEVICES:
            for label, fused_mlp in (("separate ops", False), ("fused MLP", True)):
                if fused_mlp and "mlp" not in runs:
                    continue
                step = TrainerStep(case, backend, precision, False, total, dataset, fused_mlp=fused_mlp)
                step()  # its buffers, its kernels compiled
                with GraphOpProfile(backend) as gprof:
                    step()
                graph_ops[label] = {name: 1e3 * t for name, t in gprof.per_op.items() if t > 0}
                del step, gprof
    finally:
        runs.clear()
        graph = plain = None
        gc.collect()  # the trainers' device memory (and graphs) back before the next measurement
    gemm, kern = prof.totals["gemm"], prof.totals["kernels"]
    share = {"gemm": gemm / prof_total, "kernels": kern / prof_total,
             "host": max(0.0, 1.0 - (gemm + kern) / prof_total)}  # fmt: skip
    # microseconds per step of each op (each timed alone), and the rest of the step
    ops_us = {name: 1e3 * t / n_prof for name, t in prof.per_op.items() if t > 0}
    ops_us["host and launch"] = max(0.0, 1e3 * prof_total / n_prof - sum(ops_us.values()))
    # the products by op and shape, slowest first: microseconds per step, and per call
    products_us = {key: {"us": 1e3 * t / n_prof, "calls_per_step": calls / n_prof, "us_per_call": 1e3 * t / calls}
                   for key, (t, calls) in sorted(prof.per_product.items(), key=lambda kv: -kv[1][0])}  # fmt: skip
    out = _figures(case, ms["graph"])
    no_graph, unfused, other = ms.get("plain"), ms.get("unfused"), ms.get("mlp")
    # the captured step with the fused MLP and without (one of them the default step)
    mlp, separate = (ms["graph"], other) if mlp_default else (other, ms["graph"])
    gemm_us = sum(ops_us.get(name, 0.0) for name in OpProfile.GEMMS) or None
    out |= {
        "captured": captured,
        "finite_loss": finite,
        "graph_note": note,
        "ms_per_step_no_graph": no_graph,
        "graph_speedup": no_graph / ms["graph"] if no_graph else None,
        "fused_products": fused,
        "ms_per_step_unfused": unfused,
        "fusion_speedup": unfused / ms["graph"] if unfused else None,
        "fused_mlp_default": mlp_default,  # the default step ("auto") is the fused MLP's
        "ms_per_step_fused_mlp": mlp if other else None,
        "fused_mlp_speedup": separate / mlp if other else None,  # > 1: the fused MLP is the faster
        "gemm_us": gemm_us,  # the sum of the step's GEMM times, fused ones too (each timed alone), per step
        "step_over_gemm": 1e3 * ms["graph"] / gemm_us if gemm_us else None,
        "share": share,
        "ops_us": ops_us,
        "products_us": products_us,  # {"gemm NT 262144x64x64": {us, calls_per_step, us_per_call}}
        "graph_ops_us": graph_ops,  # {"separate ops"/"fused MLP": {op: us}} of each op as a graph of its own
        "peak_mem_mib": peak / 2**20,
    }
    return out


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
    x, y = _data(case, np.random.default_rng(0))  # one batch, resident
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

    def sync():
        if tdev == "cuda":
            torch.cuda.synchronize()

    warmup, steps = case.counts(device)
    try:
        if tdev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ms = steps_ms({"torch": step}, sync, warmup + (3 if compiled else 0), steps)["torch"]
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


def bench_device(backend) -> str:
    """The backend as a bench reports it; on the CPU with which optimizer updates run
    (gpubp.backend.cpu_kernels: numba's compiled ones, or NumPy's)."""
    if backend.name != "cpu":
        return backend.describe()
    from .backend import cpu_kernels

    return f"{backend.describe()}, optimizer updates: {cpu_kernels.describe()}"


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
        progress=None, precisions=(), compile_precisions=(), partial=None, with_fused_mlp: bool = True) -> dict:  # fmt: skip
    """Measure every case and precision; log(row) for the table, progress(line) before each
    measurement. `precisions`: only these of each case's dtypes (all when empty);
    `compile_precisions`: torch.compile only in rows of these (all when empty);
    partial(report): after each row but the last, the report so far (its "partial" key
    says how far), so that a run cut short by a time limit leaves its rows behind;
    with_fused_mlp: time the other way of train.fused_mlp beside the default step where the
    network fits the fused MLP (bench_gpubp)."""
    device = backend.name
    reason = torch_unavailable() if with_torch else "--no-torch"
    if reason and with_torch:
        log(reason)
    results, peaks = [], {}
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": bench_device(backend),
        "versions": versions(),
        "command": " ".join(["gpubp", *sys.argv[1:]]) if sys.argv and "bench" in sys.argv else "gpubp bench",
        "device_peak": peaks,
        "results": results,
    }
    todo = [(case, p) for case in cases for p in case.dtypes if not precisions or p in precisions]
    if not todo:
        raise UsageError(f"--precision {', '.join(precisions)}: none of the chosen cases lists it in its dtypes")
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
            if partial is not None and i < len(todo):
                partial(report | {"partial": f"{i} of {len(todo)} rows"})
            continue
        row["gpubp"] = _new_path(precision, functools.partial(bench_gpubp, case, backend, precision, with_fused_mlp))
        for key, compiled in (("torch_eager", False), ("torch_compile", True)):
            if reason:
                row[key] = {"skipped": reason}
            elif compiled and not with_compile:
                row[key] = {"skipped": "--no-compile"}
            elif compiled and compile_precisions and precision not in compile_precisions:
                row[key] = {"skipped": f"--compile-precision {' '.join(compile_precisions)}"}
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
        if partial is not None and i < len(todo):
            partial(report | {"partial": f"{i} of {len(todo)} rows"})
    return report


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def _mlp_x(g: dict, spec: str) -> str:
    """The row's "mlp x", starred where the default step is the fused MLP's (a blank beside it else)."""
    return _fmt(g.get("fused_mlp_speedup"), spec) + ("*" if g.get("fused_mlp_default") else " ")


def _us(ms) -> str:
    """Milliseconds as microseconds: one decimal below 10 ms, whole above."""
    if ms is None:
        return "-"
    return f"{1e3 * ms:.1f}" if ms < 10 else f"{1e3 * ms:.0f}"


def _torch_ms(row: dict, key: str):
    return row[key].get("ms_per_step") if "skipped" not in row[key] else None


HEADER = (f"{'case':<11} {'prec':<8} {'us/step':>9} {'no graph':>9} {'graph x':>7} {'fused x':>7} {'mlp x':>6} "
          f"{'samples/s':>10} "
          f"{'TFLOP/s':>8} {'%peak':>6} {'GEMM us':>9} {'/GEMM':>6} {'eager us':>9} {'compile us':>10} "
          f"{'x eager':>7} {'x comp':>6} {'gemm/kern/host %':>16} {'MiB':>8}")  # fmt: skip


def format_row(row: dict) -> str:
    """One line of the console table (times in microseconds; see `markdown` for the columns)."""
    if row.get("stream"):
        from .stream_bench import format_row as stream_row

        return stream_row(row)
    g = row["gpubp"]
    if "skipped" in g:
        return f"{row['case']:<11} {row['precision']:<8} skipped: {g['skipped']}"
    s = g["share"]
    share = f"{100 * s['gemm']:.0f}/{100 * s['kernels']:.0f}/{100 * s['host']:.0f}"
    pk = row.get("share_of_gemm_peak")
    return (f"{row['case']:<11} {row['precision']:<8} {_us(g['ms_per_step']):>9} {_us(g['ms_per_step_no_graph']):>9} "
            f"{_fmt(g['graph_speedup'], '>7.2f')} {_fmt(g.get('fusion_speedup'), '>7.2f')} "
            f"{_mlp_x(g, '>5.2f')} {g['samples_per_s']:>10.4g} "
            f"{g['tflops']:>8.3g} "
            f"{_fmt(pk and 100 * pk, '>6.1f')} {_fmt(g['gemm_us'], '>9.1f')} {_fmt(g['step_over_gemm'], '>6.2f')} "
            f"{_us(_torch_ms(row, 'torch_eager')):>9} {_us(_torch_ms(row, 'torch_compile')):>10} "
            f"{_fmt(row['speedup_vs_torch_eager'], '>7.2f')} {_fmt(row['speedup_vs_torch_compile'], '>6.2f')} "
            f"{share:>16} {g['peak_mem_mib']:>8.1f}")  # fmt: skip


COLUMNS = """Columns: **us/step**, gpubp's training step as `gpubp train` runs it (gpubp/step.py
through Trainer.make_step; the batch gathered on the device from a resident split of
two batches), captured as a CUDA graph where the backend can (the GPU's default; the
first two steps of a shape run plainly and capture, both in the warm-up); **no graph**,
the same step uncaptured (`train.cuda_graph = false`), timed in the same rounds; **graph
x**, no graph / us/step; **fused x**, the captured step without fused products
(`train.gemm_epilogues = false`: bias and ReLU, ReLU' and the bias gradient as kernels of
their own) over us/step, timed in the same rounds (empty: no layer fuses); **mlp x**,
the captured step with the separate ops over the captured step with the fused MLP kernel
(the forward pass, loss and backward pass as one kernel, kernels/mlp.cu), both timed in the
same rounds, one of them the default step (`train.fused_mlp = "auto"`; marked * where that
is the fused MLP's); > 1: the fused MLP is the faster (GPU only; empty: the network does
not fit the kernel). Times: blocks of consecutive steps from a drained device to the
end of a device synchronize, host clock (host overhead and launch gaps included), the
median of the blocks' means; PyTorch's the same way, on one resident batch.
**TFLOP/s** counts 6 x weights x batch per step (of the captured step); **% peak**, of a
large GEMM of the same precision timed in this run. **GEMM us**, the sum of the step's
GEMM times, fused ones included (each timed alone, in the profiled uncaptured pass below); **step /
GEMM**, us/step over it. **x eager**, **x compile**: PyTorch's time over ours (captured).
**GEMM / ops / host**: shares of the profiled uncaptured step."""


def markdown(report: dict) -> str:
    """The report as a Markdown table (for docs/benchmarks.md)."""
    lines = [f"Device: {report['device']}; {report['date']}; versions: "
             + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
             f"Command: `{report['command']}`", ""]  # fmt: skip
    if report.get("partial"):
        lines[-1:] = ["", f"**Partial report: {report['partial']} (the run did not finish).**", ""]
    for prec, peak in report["device_peak"].items():
        if peak:
            lines.append(
                f"- device peak, {prec}: GEMM {peak['gemm_tflops']:.3g} TFLOP/s, copy {peak['copy_gb_s']:.3g} GB/s"
            )
    lines += ["", COLUMNS, "",
              "| case | precision | gpubp us/step | no graph us/step | graph x | fused x | mlp x | samples/s | TFLOP/s "
              "| % peak | GEMM us | step / GEMM | torch eager us | torch.compile us | x eager | x compile "
              "| GEMM / ops / host | peak MiB |", "|" + "---|" * 18]  # fmt: skip
    notes = set()
    for row in report["results"]:
        g = row["gpubp"]
        if row.get("stream"):
            from .stream_bench import markdown_row

            lines.append(markdown_row(row))
            continue
        if "skipped" in g:
            lines.append(f"| {row['case']} | {row['precision']} | skipped: {g['skipped']} |" + " |" * 15)
            continue
        if g.get("graph_note"):
            notes.add(f"{row['case']} {row['precision']}: not captured ({g['graph_note']})")
        if not g.get("finite_loss", True):
            notes.add(f"{row['case']} {row['precision']}: the training loss went non-finite (times of NaN arithmetic)")
        s = g["share"]
        pk = row.get("share_of_gemm_peak")

        def t(key, row=row):
            return _us(_torch_ms(row, key)) if "skipped" not in row[key] else "n/a"

        lines.append(
            f"| {row['case']} | {row['precision']} | {_us(g['ms_per_step'])} | {_us(g['ms_per_step_no_graph'])} | "
            f"{_fmt(g['graph_speedup'], '.2f')} | {_fmt(g.get('fusion_speedup'), '.2f')} | "
            f"{_mlp_x(g, '.2f')} | {g['samples_per_s']:.4g} | "
            f"{g['tflops']:.3g} | "
            f"{_fmt(pk and 100 * pk, '.1f')} | {_fmt(g['gemm_us'], '.1f')} | {_fmt(g['step_over_gemm'], '.2f')} | "
            f"{t('torch_eager')} | {t('torch_compile')} | "
            f"{_fmt(row['speedup_vs_torch_eager'], '.2f')} | {_fmt(row['speedup_vs_torch_compile'], '.2f')} | "
            f"{100 * s['gemm']:.0f} / {100 * s['kernels']:.0f} / {100 * s['host']:.0f} % | {g['peak_mem_mib']:.1f} |"
        )
    if notes:
        lines += ["", "Notes: " + "; ".join(sorted(notes))]
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
    lines = ["", "Where a step's time goes, microseconds per step, of the **uncaptured** step (train.cuda_graph "
             "= false; a graph cannot be timed op by op): a further pass with each op timed alone by the "
             "backend's stopwatch; 'host and launch' is the step's time outside the ops. 'gemm' is the "
             "'GEMM us' of the table above:", "",
             "| case | precision | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]  # fmt: skip
    for r in rows:
        ops = r["gpubp"]["ops_us"]
        lines.append(f"| {r['case']} | {r['precision']} | " + " | ".join(_fmt(ops.get(n), ".1f") for n in names) + " |")
    lines += product_table(report)
    lines += graph_op_table(report)
    modes = [f"{r['case']} {r['precision']}: {r['torch_compile']['mode']}" for r in report["results"]
             if r["torch_compile"].get("mode")]  # fmt: skip
    if modes:
        lines += ["", "torch.compile mode kept (the fastest of " + ", ".join(COMPILE_MODES) + "): " + "; ".join(modes)]
    return lines


def product_table(report: dict) -> list[str]:
    """Markdown lines: the products of the per-op pass by op and shape (transposes of a and
    b, m x n x k), per case and precision: microseconds per step, calls per step, per call."""
    rows = [(r, key, v) for r in report["results"] for key, v in (r["gpubp"].get("products_us") or {}).items()]
    if not rows:
        return []
    lines = ["", "The products of that pass by op and shape (out = op(a) op(b), m x n summed over k; N: as "
             "stored, T: transposed; a weight gradient's k is the batch), slowest first:", "",
             "| case | precision | product | us per step | calls per step | us per call |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r, key, v in rows:
        lines.append(f"| {r['case']} | {r['precision']} | {key} | {v['us']:.1f} | {v['calls_per_step']:g} | "
                     f"{v['us_per_call']:.1f} |")  # fmt: skip
    return lines


def graph_op_table(report: dict) -> list[str]:
    """Markdown lines: microseconds of each op of a step as a CUDA graph of its own
    (GraphOpProfile), per case, precision and step (separate ops, fused MLP), and their sum."""
    rows = [(r, label, ops) for r in report["results"] for label, ops in (r["gpubp"].get("graph_ops_us") or {}).items()]
    if not rows:
        return []
    names = [n for n in ("gemm", *OpProfile.OPS) if any(n in ops for _, _, ops in rows)]
    lines = ["", f"Each op of a step as a CUDA graph of its own (the op captured up to {GraphOpProfile.REPEAT} times "
             "into one graph, replayed once: microseconds per op, a graph's gaps between kernels included), one pass of "
             "the uncaptured step; 'sum' against the captured step's us/step says what the ops leave to the graph's "
             "launch and the host:", "",
             "| case | precision | step | " + " | ".join(names) + " | sum |", "|" + "---|" * (len(names) + 4)]  # fmt: skip
    for r, label, ops in rows:
        lines.append(f"| {r['case']} | {r['precision']} | {label} | " + " | ".join(_fmt(ops.get(n), ".1f") for n in names)
                     + f" | {sum(ops.values()):.1f} |")  # fmt: skip
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
