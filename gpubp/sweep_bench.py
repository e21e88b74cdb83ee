"""`gpubp bench --case sweep`: M models trained together (MLPStack) against the same M
models trained one after another by gpubp, and against PyTorch's torch.func ensembling
(stack_module_state + vmap over functional_call, torch.optim on the stacked parameters).

A step trains every one of the M models once on its own batch (x: (M, B, F), as models
of different seeds see different batches), with Adam at lr 1e-3. Times are medians of
timed steps after warm-up (host clock on the CPU, CUDA events on the GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bench import _TorchEventTimer, median_ms, torch_unavailable


@dataclass
class SweepCase:
    name: str
    count: int  # M
    sizes: list
    batch: int
    warmup: int = 5
    steps: int = 40
    cpu_warmup: int = 3
    cpu_steps: int = 20


CASES = [
    SweepCase("sweep-tiny", 64, [64, 128, 10], 128),
    SweepCase("sweep-mnist", 16, [784, 512, 512, 10], 100, cpu_warmup=2, cpu_steps=6),
]


def _data(case: SweepCase):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((case.count, case.batch, case.sizes[0])).astype(np.float32)
    y = rng.integers(0, case.sizes[-1], (case.count, case.batch)).astype(np.int32)
    return x, y


def _counts(case: SweepCase, device: str) -> tuple[int, int]:
    return (case.cpu_warmup, case.cpu_steps) if device == "cpu" else (case.warmup, case.steps)


def bench_stacked(case: SweepCase, backend) -> float:
    from .stack import MLPStack, StackAdam

    stack = MLPStack(case.sizes, case.count, "relu", "identity", "softmax_cross_entropy", backend=backend)
    opt = StackAdam(stack, lr=1e-3)
    x, y = _data(case)
    xd, yd = stack.as_input(x), stack.as_target(y, case.batch)

    def step():
        stack.forward_backward(xd, yd)
        opt.step()

    return median_ms(step, backend, *_counts(case, backend.name))


def bench_sequential(case: SweepCase, backend) -> float:
    from .model import MLP
    from .optim import Adam

    models = [MLP(case.sizes, "relu", "identity", "softmax_cross_entropy", seed=i, backend=backend)
              for i in range(case.count)]  # fmt: skip
    opts = [Adam(m, lr=1e-3) for m in models]
    x, y = _data(case)
    data = [(m.as_input(x[i]), m.as_target(y[i], case.batch)) for i, m in enumerate(models)]

    def step():
        for m, o, (xi, yi) in zip(models, opts, data):
            m.forward_backward(xi, yi)
            o.step()

    return median_ms(step, backend, *_counts(case, backend.name))


def bench_torch_func(case: SweepCase, device: str) -> dict:
    import torch
    from torch.func import functional_call, stack_module_state

    tdev = "cuda" if device == "gpu" else "cpu"
    torch.manual_seed(0)

    def make():
        layers = []
        for i, (a, b) in enumerate(zip(case.sizes[:-1], case.sizes[1:])):
            layers.append(torch.nn.Linear(a, b))
            if i < len(case.sizes) - 2:
                layers.append(torch.nn.ReLU())
        return torch.nn.Sequential(*layers).to(tdev)

    models = [make() for _ in range(case.count)]
    params, buffers = stack_module_state(models)  # leaves (M, ...) with requires_grad
    base = make().to("meta")
    x, y = _data(case)
    xt, yt = torch.tensor(x, device=tdev), torch.tensor(y, device=tdev, dtype=torch.long)

    def loss_of(p, b, xi, yi):
        return torch.nn.functional.cross_entropy(functional_call(base, (p, b), (xi,)), yi)

    batched = torch.vmap(loss_of)
    opt = torch.optim.Adam(list(params.values()), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        batched(params, buffers, xt, yt).sum().backward()  # the sum's gradient is each model's own
        opt.step()

    class Sync:
        name = device

        def synchronize(self):
            if tdev == "cuda":
                torch.cuda.synchronize()

        def timer(self):
            from .backend import HostTimer

            return _TorchEventTimer(torch) if tdev == "cuda" else HostTimer()

    try:
        return {"ms_per_step": median_ms(step, Sync(), *_counts(case, device))}
    except Exception as e:  # pragma: no cover - depends on the installation
        return {"skipped": f"torch.func failed: {type(e).__name__}: {e}".splitlines()[0]}


def run(backend, with_torch: bool = True, cases=None, log=print) -> dict:
    reason = torch_unavailable() if with_torch else "--no-torch"
    rows = []
    for case in cases or CASES:
        stacked = bench_stacked(case, backend)
        sequential = bench_sequential(case, backend)
        torch_row = {"skipped": reason} if reason else bench_torch_func(case, backend.name)
        theirs = torch_row.get("ms_per_step")
        row = {"case": case.name, "models": case.count, "sizes": case.sizes, "batch": case.batch,
               "stacked_ms": stacked, "sequential_ms": sequential, "torch_func": torch_row,
               "x_sequential": sequential / stacked, "x_torch_func": theirs / stacked if theirs else None}  # fmt: skip
        rows.append(row)
        log(format_row(row))
    return {"device": backend.describe(), "results": rows}


HEADER = (
    f"{'case':<12} {'M':>3} {'stacked ms':>11} {'sequential ms':>14} {'torch.func ms':>14} {'x seq':>6} {'x func':>7}"
)


def format_row(row: dict) -> str:
    t = row["torch_func"].get("ms_per_step")
    return (f"{row['case']:<12} {row['models']:>3} {row['stacked_ms']:>11.2f} {row['sequential_ms']:>14.2f} "
            f"{'-' if t is None else format(t, '.2f'):>14} {row['x_sequential']:>6.2f} "
            f"{'-' if row['x_torch_func'] is None else format(row['x_torch_func'], '.2f'):>7}")  # fmt: skip


def markdown(report: dict, command: str) -> str:
    lines = [f"Device: {report['device']}", f"Command: `{command}`", "",
             "| case | models x sizes @ batch | stacked ms/step | sequential ms/step | torch.func ms/step "
             "| x sequential | x torch.func |", "|" + "---|" * 7]  # fmt: skip
    for r in report["results"]:
        t = r["torch_func"].get("ms_per_step")
        lines.append(
            f"| {r['case']} | {r['models']} x {r['sizes']} @ {r['batch']} | {r['stacked_ms']:.2f} | "
            f"{r['sequential_ms']:.2f} | {'n/a' if t is None else format(t, '.2f')} | {r['x_sequential']:.2f} | "
            f"{'n/a' if r['x_torch_func'] is None else format(r['x_torch_func'], '.2f')} |"
        )
    return "\n".join(lines) + "\n"
