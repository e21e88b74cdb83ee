"""Host time of one step-table upload (gpubp/step.py StepState.ensure: 1024 steps' learning
rates, optimizer numbers and batch offsets, built in Python and copied to the device), on
the NumPy backend: what a training run pays every 1024 steps on the host, on any machine.

A host-side measurement, not a speed claim for the GPU: on the GPU the same Python runs
between two replays of the captured step while the device waits for the next one.

    PYTHONPATH=. python3 tests/step_table_timing.py
"""

from __future__ import annotations

import os
import tempfile
import time

SWEEP = """
[data]
dataset = "digits"
[model]
hidden = [128]
[optimizer]
name = "adam"
[schedule]
name = "cosine"
warmup_steps = 100
[train]
steps = 5000
batch_size = 32
[sweep]
mode = "grid"
"optimizer.lr" = [3e-4, 1e-3, 3e-3, 1e-2]
"train.seed" = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
"""


def best_ms(state, reps: int = 5) -> float:
    """The fastest of `reps` uploads of CHUNK rows, in milliseconds."""
    best = float("inf")
    for i in range(reps):
        state.host_pos = -1  # the next ensure() uploads
        t0 = time.perf_counter()
        state.ensure(1024 * i, 1024 * i)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> list[tuple[str, float]]:
    from gpubp import bench as B
    from gpubp.backend import NumpyBackend
    from gpubp.config import load_config
    from gpubp.step import StepState
    from gpubp.sweep_group import Group

    (case,) = B.find_cases(["tiny"])
    single = B.TrainerStep(case, NumpyBackend(), "float32", True, 100_000, B._dataset(case))
    out = [("tiny (Adam), a single run", best_ms(single.step_fn.state))]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "sweep.toml")
        with open(path, "w") as f:
            f.write(SWEEP)
        (members,) = load_config(path).sweep.groups()
        g = Group(0, members, "cpu", lambda *a: None)
        state = StepState(g.backend, g.opt, g.lr_rows, lambda s: (s % g.steps_per_epoch) * 32, g.total_steps)
        out.append((f"a sweep of {len(members)} models (Adam, 4 rates x 16 seeds, cosine)", best_ms(state)))
    for label, ms in out:
        print(f"{label}: {ms:.2f} ms per upload of 1024 steps", flush=True)
    return out


if __name__ == "__main__":
    main()
