"""`gpubp bench --case sweep`: M models trained together (MLPStack) against the same M
models trained one after another by gpubp, and against PyTorch's torch.func ensembling
(stack_module_state + vmap over functional_call, torch.optim on the stacked parameters).

A step trains every one of the M models once on its own batch (x: (M, B, F), as models
of different seeds see different batches), with Adam at lr 1e-3. The three variants are
timed interleaved, in rounds, so that a change of load on a shared machine hits all
three alike; the figures are the medians over the timed steps, and the minimum (the
least disturbed step) beside them. On the GPU a round is one step of each variant
(CUDA events). On the CPU (host clock) it is, per variant, untimed steps for cpu_warm_s,
then cpu_stretch timed steps back to back, then an untimed pause (cpu_settle_s):
training runs its steps back to back, and a thread pool idle for a while (the other
variants' turns, the pause) takes several steps to come back to speed: measured on the
2-core VM, the stacked tiny step took 11.4, 9.9, 9.7, 9.2, 9.4 ms on its first five steps
after a 0.15 s pause and ~7.1 ms from the sixth on; torch.func 10.1 then ~6.5 ms. The
pause itself is for OpenBLAS: its worker threads spin for ~0.1 s after a threaded call
(the sequential models' GEMMs) and would take a core from the variant timed next.

Where the backend captures steps (the GPU: CUDA graphs), two more variants run the
sweep trainer's own step (gpubp/sweep_step.py: each model's batch gathered from its own
order by device index buffers, batched forward/backward, loss into a fixed (M,) buffer,
the per-model guard and clipping, the stacked update from device vectors): `step_plain`
uncaptured and `step_graph` captured once and replayed, so the pair shows what the graph
removes on the same work (it does more than `stacked`: the gather and the guard). Each
model has 8 batches of its own random rows; at each epoch's start (one step in 8) the host
writes the new orders, as in training, so the medians are steps without that upload.
A fifth, `sequential_graph`, is the honest baseline there: the same M models trained as
M single gpubp runs train them, which capture their step too (train.cuda_graph, on by
default), i.e. M single-model trainer Steps (gpubp/step.py) each captured once and
replayed, one after another, on step_graph's rows and orders; `x seq graph` =
sequential_graph / step_graph is what a sweep gains over running its models one by one
(`sequential` steps them uncaptured, which a single run on the GPU does not).

Threads, as a user gets them by default: the stacked step runs blocks of models on
gpubp.backend.threads (GPUBP_THREADS, else OpenBLAS's thread count; OpenBLAS on one
thread meanwhile), the sequential models use OpenBLAS's threads, PyTorch its own
(torch.get_num_threads()). OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 makes all three
single-threaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bench import bench_device, torch_unavailable


@dataclass
class SweepCase:
    name: str
    count: int  # M
    sizes: list
    batch: int
    warmup: int = 5  # rounds (one step of each variant)
    steps: int = 40
    cpu_warmup: int = 3
    cpu_steps: int = 30
    cpu_settle_s: float = 0.15  # untimed pause after each stretch on the CPU (see the module docstring)
    cpu_stretch: int = 5  # timed steps back to back per variant and round on the CPU
    cpu_warm_s: float = 0.1  # untimed steps before each stretch on the CPU (see the module docstring)


CASES = [
    SweepCase("sweep-tiny", 64, [64, 128, 10], 128),
    SweepCase("sweep-mnist", 16, [784, 512, 512, 10], 100, cpu_warmup=2, cpu_steps=10, cpu_stretch=2),
]


def _data(case: SweepCase):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((case.count, case.batch, case.sizes[0])).astype(np.float32)
    y = rng.integers(0, case.sizes[-1], (case.count, case.batch)).astype(np.int32)
    return x, y


def _counts(case: SweepCase, device: str) -> tuple:
    """interleaved_ms's (warmup, rounds, settle_s, stretch, warm_s) on this device."""
    if device == "cpu":
        stretch = case.cpu_stretch
        return case.cpu_warmup, -(-case.cpu_steps // stretch), case.cpu_settle_s, stretch, case.cpu_warm_s
    return case.warmup, case.steps, 0.0, 1, 0.0


def thread_settings(with_torch: bool) -> dict:
    """The threads each variant runs on (None where unknown)."""
    from .backend.threads import blas_threads, num_threads

    out = {"stacked": num_threads(), "openblas": blas_threads(), "torch": None}
    if with_torch:
        import torch

        out["torch"] = torch.get_num_threads()
    return out


def stacked_step(case: SweepCase, backend):
    from .stack import MLPStack, StackAdam

    stack = MLPStack(case.sizes, case.count, "relu", "identity", "softmax_cross_entropy", backend=backend)
    opt = StackAdam(stack, lr=1e-3)
    x, y = _data(case)
    xd, yd = stack.as_input(x), stack.as_target(y, case.batch)

    def step():  # as the sweep trainer's step: each block of models updated right after its backward pass
        opt.begin_step()
        stack.forward_backward(xd, yd, then=lambda sl: opt.update(rows=sl))

    return step


def sweep_step(case: SweepCase, backend, graph: bool, batches: int = 8):
    """The sweep trainer's step (gpubp.sweep_step.SweepStep) over M models with their own
    data (`batches` batches each) and their own orders; captured when `graph`."""
    from types import SimpleNamespace

    from .stack import MLPStack, StackAdam
    from .step import StepState
    from .sweep_step import SweepStep

    m, b = case.count, case.batch
    n = batches * b
    stack = MLPStack(case.sizes, m, "relu", "identity", "softmax_cross_entropy", backend=backend)
    opt = StackAdam(stack, lr=1e-3)
    rng = np.random.default_rng(0)
    train = SimpleNamespace(
        x=backend.asarray(rng.standard_normal((m * n, case.sizes[0])).astype(np.float32)),
        target=backend.asarray(rng.integers(0, case.sizes[-1], m * n).astype(np.int32)),
    )  # model i's rows: i*n .. (i+1)*n, as sweep_group.Concat
    g = SimpleNamespace(
        members=[None] * m, unique_seeds=list(range(m)), seed_index=np.arange(m),
        cfg=SimpleNamespace(train=SimpleNamespace(batch_size=b)), backend=backend, stack=stack, opt=opt,
        n_train=n, steps_per_epoch=batches, data={"train": train},
        max_norm=backend.zeros((m,), stack.dtype), first_bad=backend.asarray(np.full(m, -1, np.int64)),
        skip=backend.zeros((m,), np.bool_), norm=backend.zeros((m,), stack.dtype),
        scale=backend.zeros((m,), stack.dtype), running=backend.zeros((m,), np.float64),
    )  # fmt: skip
    total = 1024  # one table upload (gpubp.step.CHUNK); the steps wrap around after it
    state = StepState(backend, opt, lambda s, k: [[1e-3] * m] * k, lambda s: (s % batches) * b, total)
    fn = SweepStep(g, state, backend.zeros((m,), np.bool_), backend.graph_capturer() if graph else None)
    count = [0]

    def step():
        fn.run(count[0] % total)
        count[0] += 1

    step.sweep_step = fn  # tests look at its captures
    return step


def sequential_step(case: SweepCase, backend):
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

    return step


def sequential_graph_step(case: SweepCase, backend, graph: bool = True, batches: int = 8):
    """M single runs' steps one after another: for each model the Step that `gpubp train`
    runs for one model (gpubp.step.Step: its batch gathered from its own order, forward/
    backward, guard, update), captured once per batch shape and replayed when `graph`
    (a capturer of its own per model, as M runs have), else plain. Model i has the rows
    of sweep_step's model i (`batches` batches), its seed i order and init, Adam at lr 1e-3."""
    from .data import Dataset, DeviceSplit, Standardizer, batch_buffers, epoch_permutation
    from .distributed import LOCAL
    from .model import MLP
    from .optim import Adam
    from .step import Step, StepState
    from .trainer import FiniteGuard

    m, b, f = case.count, case.batch, case.sizes[0]
    n = batches * b
    rng = np.random.default_rng(0)  # sweep_step's rows: model i's are i*n .. (i+1)*n
    x = rng.standard_normal((m * n, f)).astype(np.float32)
    y = rng.integers(0, case.sizes[-1], m * n).astype(np.int32)
    total = 1024  # one table upload (gpubp.step.CHUNK); the steps wrap around after it
    fns = []
    for i in range(m):
        model = MLP(case.sizes, "relu", "identity", "softmax_cross_entropy", seed=i, backend=backend)
        opt = Adam(model, lr=1e-3)
        rows = Dataset(x[i * n : (i + 1) * n].astype(np.float64), y[i * n : (i + 1) * n], case.sizes[-1], "bench")
        train = DeviceSplit(model, rows, Standardizer.identity(f), rows.y)  # x unchanged: (x - 0) / 1
        state = StepState(backend, opt.rule_opt, lambda s, k: [[1e-3]] * k, lambda s: (s % batches) * b, total)
        fns.append(Step(model, opt, FiniteGuard(backend, model.dtype), backend.zeros((), np.float64), train, b, n,
                        0.0, state, batch_buffers(backend), LOCAL, lambda: False,
                        backend.graph_capturer() if graph else None))  # fmt: skip
    count = [0]

    def step():
        s = count[0] % total
        epoch, batch = divmod(s, batches)
        for i, fn in enumerate(fns):
            if batch == 0:  # the epoch's order, written by the host as Trainer.train does
                fn.new_epoch(epoch_permutation(i, epoch, n), epoch)
            fn.run(s)
        count[0] += 1

    step.steps = fns  # tests look at their models and captures
    return step


def torch_func_step(case: SweepCase, device: str):
    """(step, synchronize) of the torch.func ensemble."""
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

    def sync():
        if tdev == "cuda":
            torch.cuda.synchronize()

    return step, sync


def interleaved_ms(steps: dict, syncs: dict, warmup: int, rounds: int, settle_s: float = 0.0, stretch: int = 1,
                   warm_s: float = 0.0) -> dict:  # fmt: skip
    """name -> every timed step (ms). Each round runs each variant in turn: untimed steps
    for warm_s seconds (at least two when warm_s > 0), then `stretch` timed steps back to
    back, then an untimed pause of settle_s seconds."""
    import time

    for _ in range(warmup):
        for name, step in steps.items():
            step()
            syncs[name]()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            syncs[name]()
            if warm_s:
                end, done = time.perf_counter() + warm_s, 0
                while done < 2 or time.perf_counter() < end:
                    step()
                    syncs[name]()
                    done += 1
            for _ in range(stretch):
                start = time.perf_counter()
                step()
                syncs[name]()
                times[name].append((time.perf_counter() - start) * 1e3)
            if settle_s:
                time.sleep(settle_s)
    return times


def run(backend, with_torch: bool = True, cases=None, log=print) -> dict:
    reason = torch_unavailable() if with_torch else "--no-torch"
    threads = thread_settings(not reason) if backend.name == "cpu" else None
    if threads:
        log(threads_line(threads))
    rows = []
    for case in cases or CASES:
        steps = {"stacked": stacked_step(case, backend), "sequential": sequential_step(case, backend)}
        if getattr(backend, "graph_capturer", None) is not None:  # the trainer's step, plain and captured
            steps["step_plain"], steps["step_graph"] = sweep_step(case, backend, False), sweep_step(case, backend, True)
            steps["sequential_graph"] = sequential_graph_step(case, backend)  # M single runs' captured steps
        syncs = dict.fromkeys(steps, backend.synchronize)
        torch_row = {"skipped": reason} if reason else None
        if not reason:
            try:
                steps["torch_func"], syncs["torch_func"] = torch_func_step(case, backend.name)
            except Exception as e:  # pragma: no cover - depends on the installation
                torch_row = {"skipped": f"torch.func failed: {type(e).__name__}: {e}".splitlines()[0]}
        times = interleaved_ms(steps, syncs, *_counts(case, backend.name))
        med = {k: float(np.median(v)) for k, v in times.items()}
        low = {k: float(np.min(v)) for k, v in times.items()}
        if torch_row is None:
            torch_row = {"ms_per_step": med["torch_func"], "min_ms": low["torch_func"]}
        theirs = torch_row.get("ms_per_step")
        row = {"case": case.name, "models": case.count, "sizes": case.sizes, "batch": case.batch,
               "timed_steps": len(times["stacked"]), "stacked_ms": med["stacked"], "sequential_ms": med["sequential"],
               "stacked_min_ms": low["stacked"], "sequential_min_ms": low["sequential"], "torch_func": torch_row,
               "x_sequential": med["sequential"] / med["stacked"],
               "x_torch_func": theirs / med["stacked"] if theirs else None}  # fmt: skip
        if "step_graph" in med:  # the sweep trainer's step: uncaptured, and as a replayed graph
            row.update(step_plain_ms=med["step_plain"], step_graph_ms=med["step_graph"],
                       step_graph_min_ms=low["step_graph"], x_sequential_graph=med["sequential"] / med["step_graph"],
                       x_torch_func_graph=theirs / med["step_graph"] if theirs else None)  # fmt: skip
            row.update(sequential_graph_ms=med["sequential_graph"], sequential_graph_min_ms=low["sequential_graph"],
                       x_seq_graph=med["sequential_graph"] / med["step_graph"])  # fmt: skip
        rows.append(row)
        log(format_row(row))
    return {"device": bench_device(backend), "threads": threads, "results": rows}


def threads_line(threads: dict) -> str:
    return (f"threads: stacked {threads['stacked']}, sequential (OpenBLAS) {_f(threads['openblas'], 'd')}, "
            f"torch.func {_f(threads['torch'], 'd')}")  # fmt: skip


HEADER = (f"{'case':<12} {'M':>3} {'stacked ms':>11} {'sequential ms':>14} {'torch.func ms':>14} {'x seq':>6} "
          f"{'x func':>7}   (medians of interleaved rounds; min stacked / sequential)")  # fmt: skip


def _f(value, spec):
    return "-" if value is None else format(value, spec)


def format_row(row: dict) -> str:
    t = row["torch_func"].get("ms_per_step")
    line = (f"{row['case']:<12} {row['models']:>3} {row['stacked_ms']:>11.2f} {row['sequential_ms']:>14.2f} "
            f"{_f(t, '.2f'):>14} {row['x_sequential']:>6.2f} {_f(row['x_torch_func'], '.2f'):>7}   "
            f"min {row['stacked_min_ms']:.2f} / {row['sequential_min_ms']:.2f}")  # fmt: skip
    return line + ("\n" + graph_line(row) if "step_graph_ms" in row else "")


def graph_line(row: dict) -> str:
    return (f"{'':<12} {'':>3} sweep step: plain {row['step_plain_ms']:.3f} ms, CUDA graph "
            f"{row['step_graph_ms']:.3f} ms (min {row['step_graph_min_ms']:.3f}); graph x sequential "
            f"{row['x_sequential_graph']:.2f}, x torch.func {_f(row['x_torch_func_graph'], '.2f')}\n"
            f"{'':<12} {'':>3} sequential graphs (M single runs' captured steps) {row['sequential_graph_ms']:.3f} ms "
            f"(min {row['sequential_graph_min_ms']:.3f}); graph x seq graph {row['x_seq_graph']:.2f}")  # fmt: skip


def markdown(report: dict, command: str) -> str:
    lines = [f"Device: {report['device']}", f"Command: `{command}`",
             *([threads_line(report["threads"])] if report.get("threads") else []), "",
             "| case | models x sizes @ batch | stacked ms/step | sequential ms/step | torch.func ms/step "
             "| x sequential | x torch.func | min stacked / sequential ms |", "|" + "---|" * 8]  # fmt: skip
    for r in report["results"]:
        t = r["torch_func"].get("ms_per_step")
        lines.append(
            f"| {r['case']} | {r['models']} x {r['sizes']} @ {r['batch']} | {r['stacked_ms']:.2f} | "
            f"{r['sequential_ms']:.2f} | {_f(t, '.2f')} | {r['x_sequential']:.2f} | {_f(r['x_torch_func'], '.2f')} | "
            f"{r['stacked_min_ms']:.2f} / {r['sequential_min_ms']:.2f} |"
        )
    graphs = [r for r in report["results"] if "step_graph_ms" in r]
    if graphs:  # the sweep trainer's step (gather, guard included), uncaptured and as a CUDA graph
        lines += ["", "| case | sweep step plain ms | sweep step graph ms (min) | graph x sequential | graph x torch.func "
                  "| sequential graphs ms (min) | x seq graph |", "|" + "---|" * 7]  # fmt: skip
        for r in graphs:
            lines.append(
                f"| {r['case']} | {r['step_plain_ms']:.3f} | {r['step_graph_ms']:.3f} ({r['step_graph_min_ms']:.3f}) | "
                f"{r['x_sequential_graph']:.2f} | {_f(r['x_torch_func_graph'], '.2f')} | "
                f"{r['sequential_graph_ms']:.3f} ({r['sequential_graph_min_ms']:.3f}) | {r['x_seq_graph']:.2f} |"
            )
        lines += ["", "sequential graphs: the M models as M single runs step them (each run's step, gpubp/step.py, "
                  "captured once and replayed), one after another; x seq graph = sequential graphs / sweep step graph."]  # fmt: skip
    return "\n".join(lines) + "\n"
