"""The per-kernel table of the captured training step (the GPU speed issue's "profile
before optimising", for the step as `gpubp bench` times it: CUDA graph, fused products),
from Nsight Systems. Run by tests/run_gpu_profile.sh, in two modes:

    python3 tests/graph_kernel_profile.py run CASE PRECISION STEPS
        under `nsys profile --capture-range=cudaProfilerApi --cuda-graph-trace=node`:
        gpubp bench's step of CASE (bench.TrainerStep), 20 steps of warm-up (plain,
        capture, replays), then STEPS steps between cudaProfilerStart and Stop, so the
        report holds those steps' kernels alone, each graph node on its own.
        PROFILE_FUSED_MLP=1 in the environment: the step with train.fused_mlp = true;
        else false (the separate ops, whatever "auto" would take).
    python3 tests/graph_kernel_profile.py table CASE STEPS KERN_SUM.csv TRACE.csv
        the table from `nsys stats -r cuda_gpu_kern_sum,cuda_gpu_trace --format csv`:
        per kernel, launches and microseconds per step and its share of the kernel
        time; then the step's GPU span (first kernel start to last kernel end, over
        STEPS) against the sum of its kernels: the difference is the time between
        kernels (launch gaps inside the graph, and the host between replays).
"""

from __future__ import annotations

import csv
import os
import sys


def run(case_name: str, precision: str, steps: int) -> None:
    import cupy

    from gpubp import bench as B
    from gpubp.backend.cupy_backend import CupyBackend

    case = B.find_cases([case_name])[0]
    backend = CupyBackend()
    fused_mlp = os.environ.get("PROFILE_FUSED_MLP") == "1"  # train.fused_mlp (kernels/mlp.cu)
    step = B.TrainerStep(case, backend, precision, True, 20 + steps, B._dataset(case), fused_mlp=fused_mlp)
    print(f"{case.name} {precision}: graph {step.graph_note or 'on'}; fused products {backend.gemm_epilogues}; "
          f"fused MLP {fused_mlp and step.trainer.model.fused_mlp_fits(case.batch)}")  # fmt: skip
    for _ in range(20):
        step()
    backend.synchronize()
    cupy.cuda.profiler.start()
    for _ in range(steps):
        step()
    backend.synchronize()
    cupy.cuda.profiler.stop()


def _rows(path: str) -> list[dict]:
    with open(path, newline="") as f:
        lines = [line for line in f if line.strip() and "," in line]  # nsys prints notes before the header
    return list(csv.DictReader(lines))


def _column(row: dict, *words: str) -> str:
    """The first column whose header holds every word (nsys versions name them a little differently)."""
    for key in row:
        if all(w.lower() in key.lower() for w in words):
            return key
    raise KeyError(f"no column with {words} among {list(row)}")


def table(case_name: str, steps: int, kern_sum: str, trace: str) -> str:
    kernels = _rows(kern_sum)
    if not kernels:
        return f"{case_name}: no kernels in the report (was the profiler range captured?)"
    k_total, k_count, k_name = (_column(kernels[0], *w) for w in (("total", "time"), ("instances",), ("name",)))
    total_ns = sum(float(r[k_total]) for r in kernels)
    lines = [f"### {case_name}: {steps} captured steps", "",
             "| kernel | launches / step | us / step | % of kernel time |", "|---|---|---|---|"]  # fmt: skip
    for r in sorted(kernels, key=lambda r: -float(r[k_total])):
        name = r[k_name] if len(r[k_name]) <= 70 else r[k_name][:67] + "..."
        lines.append(f"| `{name}` | {float(r[k_count]) / steps:.2f} | {float(r[k_total]) / 1e3 / steps:.2f} | "
                     f"{100 * float(r[k_total]) / total_ns:.1f} |")  # fmt: skip
    events = _rows(trace)
    t_start, t_dur, t_name = (_column(events[0], *w) for w in (("start",), ("duration",), ("name",)))
    # kernels only: nsys names copies and memsets "[CUDA memcpy ...]", "[CUDA memset]"
    kernel_events = [(float(e[t_start]), float(e[t_dur])) for e in events if not e[t_name].startswith("[CUDA")]
    first = min(s for s, _ in kernel_events)
    last = max(s + d for s, d in kernel_events)
    span_us = (last - first) / 1e3 / steps
    lines += ["", f"GPU span per step {span_us:.2f} us; its kernels {total_ns / 1e3 / steps:.2f} us; "
                  f"between kernels {span_us - total_ns / 1e3 / steps:.2f} us "
                  f"({sum(float(r[k_count]) for r in kernels) / steps:.1f} kernels a step)"]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "run":
        run(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif mode == "table":
        print(table(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]))
    else:
        sys.exit(f"unknown mode {mode!r}: run or table")
