"""The cost model of one data-parallel step on N GPUs (docs/scaling.md).

Weak scaling: every GPU keeps the bench case's batch b, so N GPUs train a global
batch of N b in the time of

    t_N = max(t_backward_end, t_comm_end)            (overlapped, gpubp's default)
    t_N = t_c + T(P)                                  (GPUBP_NCCL_OVERLAP=0)

where t_c is one GPU's measured step (`gpubp bench`), and the ring all-reduce of B
bytes over N GPUs takes

    T(B) = alpha + 2 (N - 1) / N * B / beta           (beta: NCCL's bus bandwidth)

Overlap: t_c is split over the step's GEMMs in proportion to their FLOPs (forward
2 b fi fo per layer; backward dW 2 b fi fo, then dX 2 b fi fo except for layer 0).
Layer k's bucket (its W_k, b_k; fi fo + fo values of 4 bytes) is ready once dW_k
is done; one communication stream reduces the buckets in order, each starting when
it is ready and the previous one is done; layer 0's bucket and the loss go as one
call. Weak-scaling efficiency is t_c / t_N.

    python -m gpubp.scaling [--bench-json report.json] [--precision float32]

prints the table of docs/scaling.md from the step times of a `gpubp bench --json`
report, or from the H200 run recorded in docs/gpu-runs/2026-11-26-h200/bench.md.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass

# gpubp bench --device gpu, 2026-11-26 on an H200 (docs/gpu-runs/2026-11-26-h200/bench.md):
# ms per step by (case, precision)
MEASURED_H200 = {
    ("tiny", "float32"): 0.219, ("tiny", "tf32"): 0.322,
    ("mnist-100", "float32"): 0.401, ("mnist-100", "tf32"): 0.322,
    ("mnist-1024", "float32"): 0.402, ("mnist-1024", "tf32"): 0.401,
    ("narrow", "float32"): 1.854, ("narrow", "tf32"): 1.454,
    ("wide", "float32"): 76.829, ("wide", "tf32"): 13.746,
}  # fmt: skip
MEASURED_SOURCE = "gpubp bench --device gpu on an H200, 2026-11-26 (docs/gpu-runs/2026-11-26-h200/bench.md)"
TARGET = 0.90
GRAD_BYTES = 4  # float32 gradients (tf32 computes in float32 too)


@dataclass(frozen=True)
class Link:
    """An all-reduce fabric: N GPUs, NCCL's bus bandwidth beta (bytes/s) and the fixed
    cost alpha (s) of one all-reduce call."""

    name: str
    n_gpus: int
    bus_bandwidth: float
    latency: float

    def allreduce_s(self, nbytes: float) -> float:
        """Ring all-reduce: alpha + 2 (N-1)/N * bytes / beta."""
        n = self.n_gpus
        return self.latency + 2 * (n - 1) / n * nbytes / self.bus_bandwidth


# 8 x H100 SXM in one node: NVLink 4 through NVSwitch, 450 GB/s each way per GPU; NCCL's
# all-reduce bus bandwidth on such a node is ~450 GB/s at large sizes and its small-message
# time ~15 us.
NVLINK_8 = Link("8 x H100, NVLink", 8, 450e9, 15e-6)
# 2 nodes of 8 H100, one 400 Gb/s (50 GB/s) NIC per GPU (the DGX H100 layout): the rings
# cross the network, so the bus bandwidth is the NIC's; ~35 us per small all-reduce.
IB_2X8 = Link("2 nodes x 8 H100, 400 Gb/s per GPU", 16, 50e9, 35e-6)
LINKS = (NVLINK_8, IB_2X8)


def layer_sizes(sizes) -> list[tuple[int, int]]:
    return list(zip(sizes[:-1], sizes[1:]))


def n_params(sizes) -> int:
    return sum(fi * fo + fo for fi, fo in layer_sizes(sizes))


def step_time(sizes, batch: int, t_compute: float, link: Link, overlap: bool = True) -> float:
    """Seconds per step on link.n_gpus GPUs, each with `batch` rows; t_compute: one GPU's step."""
    layers = layer_sizes(sizes)
    bucket_bytes = [GRAD_BYTES * (fi * fo + fo) for fi, fo in layers]
    if not overlap:
        return t_compute + link.allreduce_s(sum(bucket_bytes))
    gemm = 2.0 * batch  # FLOPs per weight of one GEMM
    forward = [gemm * fi * fo for fi, fo in layers]
    d_weight = forward
    d_input = [gemm * fi * fo if k > 0 else 0.0 for k, (fi, fo) in enumerate(layers)]
    per_flop = t_compute / (sum(forward) + sum(d_weight) + sum(d_input))
    t = sum(forward) * per_flop
    ready = {}
    for k in reversed(range(len(layers))):
        t += d_weight[k] * per_flop
        ready[k] = t  # dW_k, db_k issued: the bucket can go
        t += d_input[k] * per_flop
    backward_end = t
    comm_end = 0.0
    for k in reversed(range(len(layers))):
        comm_end = max(ready[k], comm_end) + link.allreduce_s(bucket_bytes[k])
    return max(backward_end, comm_end)


def efficiency(sizes, batch: int, t_compute: float, link: Link, overlap: bool = True) -> float:
    """Weak-scaling efficiency t_c / t_N."""
    return t_compute / step_time(sizes, batch, t_compute, link, overlap)


def compute_time(sizes, batch: int, t_compute: float, rows: int, rate: float) -> float:
    """One GPU's step at `rows` >= batch rows: the measured t_compute is a floor (small
    steps are bound by launches and latencies, not FLOPs: the bench's mnist-100 and
    mnist-1024 take the same time), and the step cannot beat 6 W rows / rate, `rate`
    the best FLOP rate the same bench run reached (its GEMM-bound case)."""
    weights = sum(fi * fo for fi, fo in layer_sizes(sizes))
    return max(t_compute, 6.0 * weights * rows / rate)


def batch_for(sizes, batch: int, t_compute: float, link: Link, rate: float, target: float = TARGET) -> int | None:
    """The smallest per-GPU batch (a multiple of 64 rows) whose predicted efficiency
    reaches `target`, its step time from `compute_time`; None past 2^20 times the batch."""

    def ok(rows: int) -> bool:
        return efficiency(sizes, rows, compute_time(sizes, batch, t_compute, rows, rate), link) >= target

    if ok(batch):
        return batch
    hi = batch
    while not ok(hi):
        hi *= 2
        if hi > batch * 2**20:
            return None
    lo = hi // 2  # ok(lo) is False
    while hi - lo > 64:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return math.ceil(hi / 64) * 64


def cases():
    from .bench import find_cases

    return find_cases()


def best_rate(measured: dict, precision: str) -> float:
    """FLOP/s of the fastest case (6 W b per step) at this precision."""
    by_name = {c.name: c for c in cases()}
    return max(by_name[name].flops_per_step / (ms / 1e3) for (name, p), ms in measured.items()
               if p == precision and name in by_name)  # fmt: skip


def rows(measured: dict, precision: str = "float32") -> list[dict]:
    out = []
    rate = best_rate(measured, precision)
    for case in cases():
        t = measured.get((case.name, precision))
        if t is None:
            continue
        t_c = t / 1e3
        row = {"case": case.name, "batch": case.batch, "params": n_params(case.sizes), "ms": t}
        for link in LINKS:
            row[link.name] = {
                "allreduce_ms": link.allreduce_s(GRAD_BYTES * n_params(case.sizes)) * 1e3,
                "efficiency": efficiency(case.sizes, case.batch, t_c, link),
                "efficiency_no_overlap": efficiency(case.sizes, case.batch, t_c, link, overlap=False),
                "batch_for_target": batch_for(case.sizes, case.batch, t_c, link, rate),
            }
        out.append(row)
    return out


def markdown(table: list[dict], precision: str) -> str:
    head = ["case", "per-GPU batch", "parameters", f"t_c ms ({precision})"]
    for link in LINKS:
        head += [f"{link.name}: all-reduce ms", "efficiency (overlap / none)", "batch for 90%"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [r["case"], str(r["batch"]), f"{r['params']:,}", f"{r['ms']:.3f}"]
        for link in LINKS:
            p = r[link.name]
            need = p["batch_for_target"]
            cells += [
                f"{p['allreduce_ms']:.3f}",
                f"{100 * p['efficiency']:.1f}% / {100 * p['efficiency_no_overlap']:.1f}%",
                "met" if need == r["batch"] else (f"{need:,}" if need else "none"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def measured_from_report(path: str) -> dict:
    """{(case, precision): ms} from a `gpubp bench --json` report."""
    with open(path) as f:
        report = json.load(f)
    return {(r["case"], r["precision"]): r["gpubp"]["ms_per_step"] for r in report["results"]
            if r.get("gpubp", {}).get("ms_per_step")}  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gpubp.scaling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench-json", help="a gpubp bench --json report (default: the recorded H200 run)")
    parser.add_argument("--precision", default="float32", choices=["float32", "tf32"])
    args = parser.parse_args(argv)
    measured = measured_from_report(args.bench_json) if args.bench_json else MEASURED_H200
    print(markdown(rows(measured, args.precision), args.precision), end="")


if __name__ == "__main__":
    main()
