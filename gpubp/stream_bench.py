"""`gpubp bench` case `stream`: samples/s of a training split streamed from host memory
(gpubp/stream.py) against the same model on a resident split.

    streamed   a synthetic dataset of case.stream_gib GiB (float32 features, int labels)
               under a device-memory budget of case.budget_gib GiB: stream.plan picks
               the chunk rows, as for a run with data.device_memory = budget
    resident   the same model, optimizer and batch on a dataset of half the budget,
               resident on the device (a DeviceSplit)

Each is the trainer's step (gpubp/step.py: the CUDA graph on the GPU, epoch orders,
the device-side tables), timed by the host clock over `steps` steps after `warmup`
(the streamed steps include every chunk's host gather and copy: they cross several
chunks), synchronised at both ends. Target (issue 11): streamed >= 0.8 x resident.
On the CPU the case is scaled down: case.cpu_stream_mib MiB, a quarter of which fits
the budget beside the model, a hidden layer of 32 and batches of 64: a check that the
path runs, not a speed figure (the note says so).

The features are a random block of rows tiled over the dataset (generating 16 GiB of
random numbers would take minutes; the step's time does not depend on the values).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from . import data as D
from . import distributed, stream
from .config import format_size, load_config
from .step import Step, StepState

CPU_HIDDEN, CPU_BATCH = [32], 64
CPU_NOTE = ("scaled down on the CPU ({} MiB under a {} MiB budget, hidden {}, batch {}): checks the path, "
            "not a speed figure")  # fmt: skip


def synthetic(rows: int, features: int, classes: int, seed: int = 0) -> D.Dataset:
    """A classification dataset: (rows, features) float32 (a tiled random block), labels."""
    rng = np.random.default_rng(seed)
    block = rng.standard_normal((min(rows, 4096), features)).astype(np.float32)
    x = np.empty((rows, features), np.float32)
    for start in range(0, rows, block.shape[0]):
        k = min(block.shape[0], rows - start)
        x[start : start + k] = block[:k]
    y = rng.integers(0, classes, size=rows)
    return D.Dataset(x, y, classes, "stream-bench")


def _config(case, rows: int):
    return load_config(None, [f"model.hidden={list(case.sizes[1:-1])}", f"model.activation={case.activation}",
                              f"loss.name={case.loss}", f"optimizer.name={case.optimizer}",
                              f"train.batch_size={case.batch}", f"train.eval_batch_size={case.batch}",
                              "data.val_fraction=0.0", "data.test_fraction=0.0"])  # fmt: skip


def make_step(model, opt, split, batch: int, total_steps: int) -> Step:
    """The trainer's step (Trainer.make_step) over `split`, without a Trainer: captured
    where the backend offers a graph capturer, learning rate 1e-3, no clipping."""
    from .trainer import FiniteGuard

    be = model.backend
    spe = -(-split.n // batch)
    streamed = isinstance(split, stream.StreamSplit)
    offset = split.ring_offset if streamed else (lambda s: (s % spe) * batch)
    state = StepState(be, opt.rule_opt, lambda s, k: [[1e-3]] * k, offset, total_steps)
    buffer = D.batch_buffers(be)
    capturer = getattr(be, "graph_capturer", None)
    guard = FiniteGuard(be, model.dtype, model.loss_scale)
    return Step(model, opt, guard, be.zeros((), np.float64), split, batch, split.n, 0.0, state, buffer,
                distributed.LOCAL, lambda: False, capturer() if capturer is not None else None)  # fmt: skip


def timed(step: Step, warmup: int, steps: int, seed: int = 0) -> float:
    """Seconds of `steps` steps after `warmup` (host clock, device synchronised)."""
    be, n, spe = step.backend, step.n_train, step.steps_per_epoch

    def go(a, b):
        for s in range(a, b):
            if s % spe == 0:
                step.new_epoch(D.epoch_permutation(seed, s // spe, n), s // spe)
            step.run(s)

    go(0, warmup)
    be.synchronize()
    start = time.perf_counter()
    go(warmup, warmup + steps)
    be.synchronize()
    return time.perf_counter() - start


def bench_stream(case, backend, precision: str) -> dict:
    """The streamed and the resident case (module docstring): samples/s of each, ratio."""
    from .model import MLP
    from .optim import make_optimizer
    from .trainer import memory_estimate

    if precision != "float32":
        return {"skipped": "the stream case runs in float32"}
    gpu = backend.name == "gpu"
    features, classes = case.sizes[0], case.sizes[-1]
    if not gpu:  # a CPU step of the GPU's model takes seconds: a small one, small batches
        case = dataclasses.replace(case, sizes=[features, *CPU_HIDDEN, classes], batch=CPU_BATCH)
    row_bytes = features * 4 + 4  # float32 features, int32 label
    total = case.stream_gib * 2**30 if gpu else case.cpu_stream_mib * 2**20
    rows = int(total // row_bytes)
    est = memory_estimate(_config(case, rows), case.sizes, case.batch, rows, backend)
    # the CPU: room for the model, one batch and an evaluation buffer, and a quarter of the data
    rest = est["params"] + est["batch"] + est["eval"] + case.batch * row_bytes
    limit = int(case.budget_gib * 2**30 if gpu else rest + total / 4)
    warmup, steps = case.counts(backend.name)
    out = {"dataset_bytes": rows * row_bytes, "budget_bytes": limit}

    def model_and_opt():
        model = MLP(case.sizes, case.activation, "identity", case.loss, dtype="float32", backend=backend, seed=0)
        return model, make_optimizer(model, case.optimizer, 1e-3)

    # streamed
    ds = synthetic(rows, features, classes)
    model, opt = model_and_opt()
    chunk, note = stream.plan(est, rows, rows, row_bytes, case.batch, case.batch, limit, "the stream case's budget")
    if chunk is None:
        return {"skipped": f"{rows} rows fit the budget of {limit} bytes: nothing streams"}
    split = stream.StreamSplit(model, ds, None, ds.y, chunk, case.batch, lambda e: D.epoch_permutation(0, e, rows))
    seconds = timed(make_step(model, opt, split, case.batch, warmup + steps), warmup, steps)
    out.update(chunk_rows=chunk, chunks_copied=split.loads, chunk_waits=split.waits, plan=note)
    del split, ds
    backend.memory_reset()
    # resident: half the budget
    res_rows = rows if not gpu else int(limit // 2 // row_bytes)
    ds = synthetic(res_rows, features, classes)
    model, opt = model_and_opt()
    resident = D.DeviceSplit.__new__(D.DeviceSplit)  # ds.x is already the model's input: no standardizer
    resident.backend, resident.n, resident.labels = backend, res_rows, None
    resident.x, resident.target = model.as_input(ds.x), model.as_target(ds.y, res_rows)
    res_seconds = timed(make_step(model, opt, resident, case.batch, warmup + steps), warmup, steps)
    del resident, ds
    samples = steps * case.batch
    ms = 1e3 * seconds / steps
    out.update(ms_per_step=ms, samples_per_s=samples / seconds, tflops=case.flops_per_step / (ms / 1e3) / 1e12,
               resident_ms_per_step=1e3 * res_seconds / steps, resident_samples_per_s=samples / res_seconds,
               resident_rows=res_rows, vs_resident=res_seconds / seconds)  # fmt: skip
    if not gpu:
        out["note"] = CPU_NOTE.format(round(total / 2**20), round(limit / 2**20, 2), CPU_HIDDEN, CPU_BATCH)
    return out


def format_row(row: dict) -> str:
    """One line of the bench's console table for the stream case (us/step, then words)."""
    g = row["gpubp"]
    if "skipped" in g:
        return f"{row['case']:<11} {row['precision']:<8} skipped: {g['skipped']}"
    line = (f"{row['case']:<11} {row['precision']:<8} {1e3 * g['ms_per_step']:>9.0f}  {g['samples_per_s']:.4g} "
            f"samples/s streamed {format_size(g['dataset_bytes'])} under {format_size(g['budget_bytes'])} "
            f"(chunks of {g['chunk_rows']} rows): {g['vs_resident']:.2f} x the resident "
            f"{g['resident_samples_per_s']:.4g} samples/s (target >= 0.8)")  # fmt: skip
    return line + (f"; {g['note']}" if "note" in g else "")


def markdown_row(row: dict) -> str:
    """The stream case's row of bench.markdown's table (18 columns; the comparison with the
    resident case in the GEMM / ops / host column)."""
    g = row["gpubp"]
    if "skipped" in g:
        return f"| {row['case']} | {row['precision']} | skipped: {g['skipped']} |" + " |" * 15
    what = (f"streamed {format_size(g['dataset_bytes'])} under a {format_size(g['budget_bytes'])} budget: "
            f"{g['vs_resident']:.2f} x resident ({g['resident_samples_per_s']:.4g} samples/s)")  # fmt: skip
    what += f"; {g['note']}" if "note" in g else ""
    return (f"| {row['case']} | {row['precision']} | {1e3 * g['ms_per_step']:.0f} | - | - | - | - | {g['samples_per_s']:.4g} | "
            f"{g['tflops']:.3g} | - | - | - | n/a | n/a | - | - | {what} | - |")  # fmt: skip
