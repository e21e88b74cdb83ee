"""Where a small captured step's time goes: the host or the device (a GPU-visit aid, no speed claim).

The H100 visit of 2026-11-26 measured tiny's captured step at 55 us with 10 kernels and
50 us with the fused MLP's 4: the kernel count barely moves it, so something else sets
the pace. Per bench case and step (separate ops, fused MLP), three loops of N steps:
- issue: the host's time to issue them (step_fn.run, graph launch included), no sync;
- total: issue to the device's end (a synchronize after the loop);
- replay only: the shape's graph launched N times by itself (no step bookkeeping; the
  bench's data are whole batches, so every replay reads a batch within bounds);
- host only: the step loop with the graph's launch replaced by nothing (Python alone).
issue ~ total: the host sets the pace; total >> issue: the device does.

    PYTHONPATH=. python3 tests/step_issue_timing.py [CASE ...]   (default: tiny mnist-100)
"""

from __future__ import annotations

import sys
import time


def loops(step, n: int, sync) -> tuple[float, float]:
    """(issue, total) microseconds per step over n steps."""
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    t1 = time.perf_counter()
    sync()
    t2 = time.perf_counter()
    return (t1 - t0) / n * 1e6, (t2 - t0) / n * 1e6


def main(names, backend=None, n: int = 300) -> None:
    """The loops of each case in `names` on `backend` (a CupyBackend; the tests pass the
    recording backend), n steps each."""
    from gpubp import bench as B

    if backend is None:
        from gpubp.backend.cupy_backend import CupyBackend

        backend = CupyBackend()
    sync = backend.synchronize
    for case in B.find_cases(names):
        dataset = B._dataset(case)
        for label, fused in (("separate ops", False), ("fused MLP", True)):
            # replays first, on a step of their own: the device's position in the step
            # tables (StepState, CHUNK rows) advances with each replay and nothing but
            # Step.run uploads the next rows, so 5 steps and 3 n replays must fit the rows
            step = B.TrainerStep(case, backend, "float32", True, 100_000, dataset, fused_mlp=fused)
            for _ in range(5):
                step()
            assert 5 + 3 * n <= step.step_fn.state.rows, "too many replays for one table upload"
            (replay,) = step.step_fn.graphs.values()
            r_issue, r_total = min(loops(replay, n, sync) for _ in range(3))
            step = B.TrainerStep(case, backend, "float32", True, 100_000, dataset, fused_mlp=fused)
            for _ in range(5):
                step()
            issue, total = min(loops(step, n, sync) for _ in range(3))
            graphs = step.step_fn.graphs
            kept = dict(graphs)
            for key in graphs:
                graphs[key] = lambda: None
            host, _ = min(loops(step, n, sync) for _ in range(3))
            graphs.update(kept)
            print(f"{case.name:10s} {label:12s}: issue {issue:7.1f} us/step, total {total:7.1f} us/step; replay only: "
                  f"issue {r_issue:6.1f}, total {r_total:6.1f} us/step; host only {host:6.1f} us/step "
                  f"(graph note: {step.graph_note})", flush=True)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:] or ["tiny", "mnist-100"])
