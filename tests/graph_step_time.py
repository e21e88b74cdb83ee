"""Time per training step of the trainer's step function (gpubp/step.py), with and
without the whole-step CUDA graph, in one process (run by tests/run_gpu_graph_checks.sh;
DEVICE=cpu runs it on the NumPy backend, uncaptured, as a smoke test).

For each bench-like case: a Trainer over random data of that shape, its Step, 30
warm-up steps (the first two of a shape run plainly and capture), then the median over
5 repeats of the mean time of 200 steps, each measured from the host (the step's
Python included) with a device sync at the end. Prints one table."""

from __future__ import annotations

import os
import sys
import time

import numpy as np

import gpubp.trainer as T
from gpubp import data as D
from gpubp.config import load_config

DEVICE = os.environ.get("DEVICE", "gpu")
STEPS = int(os.environ.get("STEPS", "200"))
CASES = [  # name, n_in, hidden, n_out, batch, optimizer
    ("tiny 64-128-10 @128", 64, [128], 10, 128, "adam"),
    ("mnist-100 784-512-512-10 @100", 784, [512, 512], 10, 100, "adam"),
    ("mnist-1024 784-512-512-10 @1024", 784, [512, 512], 10, 1024, "adam"),
    ("wide 4096x5 @8192", 4096, [4096] * 4, 4096, 8192, "adamw"),
]


def step_time(case, graph: bool) -> tuple[float, str | None]:
    name, n_in, hidden, n_out, batch, opt = case
    rows = batch * 8  # eight full batches an epoch: one batch shape
    rng = np.random.default_rng(0)
    ds = D.Dataset(rng.standard_normal((rows, n_in)), rng.integers(0, n_out, rows), n_out, "random")
    cfg = load_config(None, [f"model.hidden={hidden}", f"train.batch_size={batch}", f"optimizer.name={opt}",
                             "data.val_fraction=0", "data.test_fraction=0", "data.standardize=false",
                             "schedule.name=cosine", "schedule.warmup_steps=10", "optimizer.clip_grad_norm=1.0",
                             f"train.steps={STEPS * 6 + 30}", f"train.cuda_graph={str(graph).lower()}"])  # fmt: skip
    trainer = T.Trainer(cfg, None, device=DEVICE, quiet=True, dataset=ds)
    be = trainer.run.backend
    step_fn = trainer.make_step()
    step_fn.new_epoch(D.epoch_permutation(0, 0, trainer.n_train))
    s = 0

    def run(n):
        nonlocal s
        for _ in range(n):
            if s % trainer.steps_per_epoch == 0:
                step_fn.new_epoch(D.epoch_permutation(0, s // trainer.steps_per_epoch, trainer.n_train))
            step_fn.run(s)
            s += 1
        be.synchronize()

    run(30)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        run(STEPS)
        times.append((time.perf_counter() - t0) / STEPS * 1e6)
    assert np.isfinite(be.to_float(trainer.running_loss)), "non-finite training loss"
    return float(np.median(times)), trainer.graph_note


def main() -> int:
    print(f"device {DEVICE}; microseconds per step, median of 5 x {STEPS} steps")
    print("| case | no graph (us) | graph (us) | speed-up | graph note |")
    print("|---|---|---|---|---|")
    for case in CASES:
        if DEVICE == "cpu" and case[1] > 1000:
            continue
        try:
            plain, _ = step_time(case, False)
            captured, note = step_time(case, True)
            print(f"| {case[0]} | {plain:.1f} | {captured:.1f} | {plain / captured:.2f}x | {note or ''} |", flush=True)
        except Exception as e:  # one failing case does not hide the others
            print(f"| {case[0]} | failed: {type(e).__name__}: {str(e).splitlines()[0][:200]} | | | |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
