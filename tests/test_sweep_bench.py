"""gpubp bench --case sweep: every variant runs and is reported (speed is never asserted)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from click.testing import CliRunner

from gpubp import sweep_bench as S
from gpubp.backend import get_backend
from gpubp.cli import main

SMALL = [S.SweepCase("t", 3, [5, 8, 4], 16, cpu_warmup=1, cpu_steps=3, cpu_settle_s=0.0, cpu_stretch=1, cpu_warm_s=0.0)]


def test_run_reports_stacked_sequential_and_ratios():
    report = S.run(get_backend("cpu"), with_torch=False, cases=SMALL, log=lambda m: None)
    (row,) = report["results"]
    assert row["timed_steps"] == 3 and row["stacked_ms"] > 0 and row["sequential_ms"] > 0
    assert row["x_sequential"] == pytest.approx(row["sequential_ms"] / row["stacked_ms"])
    assert row["torch_func"] == {"skipped": "--no-torch"} and row["x_torch_func"] is None
    assert "| t | 3 x [5, 8, 4] @ 16 |" in S.markdown(report, "gpubp bench --case sweep")
    assert report["threads"]["stacked"] >= 1 and "threads: stacked" in S.markdown(report, "gpubp bench")
    from gpubp.backend import cpu_kernels

    assert report["device"].endswith(f", optimizer updates: {cpu_kernels.describe()}")  # numba's or NumPy's


def test_interleaved_rounds_pause_untimed_after_each_step():
    import time

    calls = []
    steps = {
        "a": lambda: calls.append(("a", time.perf_counter())),
        "b": lambda: calls.append(("b", time.perf_counter())),
    }
    times = S.interleaved_ms(steps, {"a": lambda: None, "b": lambda: None}, 0, 2, settle_s=0.05)
    assert [c[0] for c in calls] == ["a", "b", "a", "b"]  # one step of each per round
    assert all(t2 - t1 >= 0.05 for (_, t1), (_, t2) in zip(calls, calls[1:]))  # the pause lies between steps
    assert sorted(times) == ["a", "b"] and all(len(v) == 2 for v in times.values())


def test_cpu_rounds_time_back_to_back_stretches_after_untimed_warm_steps():
    """Each round: per variant untimed steps for warm_s (two at least), then `stretch`
    timed steps back to back, then the pause; only the stretch's steps are timed."""
    import time

    calls = []
    steps = {name: (lambda name=name: calls.append((name, time.perf_counter()))) for name in "ab"}
    times = S.interleaved_ms(steps, dict.fromkeys("ab", lambda: None), 0, 2, settle_s=0.03, stretch=3, warm_s=0.01)
    assert all(len(v) == 6 for v in times.values())  # 2 rounds x 3 timed steps
    names = [c[0] for c in calls]
    runs = [names[0]]
    for n in names[1:]:
        if n != runs[-1]:
            runs.append(n)
    assert runs == ["a", "b", "a", "b"]  # one stretch of each variant per round, not mixed
    per_run = [len(list(g)) for _, g in itertools.groupby(names)]
    assert all(k >= 2 + 3 for k in per_run)  # at least two warm steps before the three timed ones
    assert S._counts(S.CASES[0], "cpu")[3] > 1 and S._counts(S.CASES[0], "gpu")[3:] == (1, 0.0)


def test_torch_func_variant_runs_where_torch_is_installed():
    pytest.importorskip("torch")
    report = S.run(get_backend("cpu"), with_torch=True, cases=SMALL, log=lambda m: None)
    row = report["results"][0]
    assert row["torch_func"]["ms_per_step"] > 0 and row["x_torch_func"] > 0


def test_cli_refuses_other_cases_beside_sweep(tmp_path):
    r = CliRunner().invoke(main, ["bench", "--case", "sweep", "--case", "tiny", "--device", "cpu"])
    assert r.exit_code == 2 and "--case sweep runs on its own" in r.output


def test_cli_writes_the_report(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "CASES", SMALL)
    out = tmp_path / "s.json"
    r = CliRunner().invoke(main, ["bench", "--case", "sweep", "--device", "cpu", "--no-torch", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["results"][0]["case"] == "t"


def test_a_capturing_backend_also_times_the_sweep_step_plain_and_as_a_graph(monkeypatch):
    """On the GPU the sweep trainer's step runs beside the others, uncaptured and captured;
    here the recording backend (a CUDA graph's semantics on the CPU) stands in for it."""
    from gpubp.backend.recording import RecordingBackend

    rec = RecordingBackend()
    made = []
    original = S.sweep_step
    monkeypatch.setattr(S, "sweep_step", lambda *a, **k: made.append(original(*a, **k)) or made[-1])
    report = S.run(rec, with_torch=False, cases=SMALL, log=lambda m: None)
    (row,) = report["results"]
    assert row["step_plain_ms"] > 0 and row["step_graph_ms"] > 0
    assert row["x_sequential_graph"] == pytest.approx(row["sequential_ms"] / row["step_graph_ms"])
    assert row["sequential_graph_ms"] > 0 and row["x_seq_graph"] == pytest.approx(
        row["sequential_graph_ms"] / row["step_graph_ms"]
    )
    plain, graph = (f.sweep_step for f in made)
    # 1 warm-up + 3 rounds: the sweep step and each of the 3 single steps run plainly, are captured (and
    # replayed), then replayed twice
    assert plain.captures == 0 and graph.captures == 1 and rec.replays == (1 + 3) * (1 + 1 + 3 - 2)
    md = S.markdown(report, "gpubp bench --case sweep")
    assert "sweep step plain ms" in md and "| x seq graph |" in md and f"{row['x_seq_graph']:.2f} |" in md
    assert "graph x seq graph" in S.format_row(row)


def _plain_runs(case, k: int, batches: int = 8):
    """Model i of sequential_graph_step trained k steps eagerly, as in the README: its batch
    rows[perm[offset:offset + B]] sliced on the host, model.forward_backward, opt.step()."""
    from gpubp.data import epoch_permutation
    from gpubp.model import MLP
    from gpubp.optim import Adam

    m, b = case.count, case.batch
    n = batches * b
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m * n, case.sizes[0])).astype(np.float32)
    y = rng.integers(0, case.sizes[-1], m * n).astype(np.int32)
    params = []
    for i in range(m):
        model = MLP(case.sizes, "relu", "identity", "softmax_cross_entropy", seed=i)
        opt = Adam(model, lr=1e-3)
        for s in range(k):
            epoch, batch = divmod(s, batches)
            idx = i * n + epoch_permutation(i, epoch, n)[batch * b : (batch + 1) * b]
            model.forward_backward(model.as_input(x[idx]), model.as_target(y[idx], b))
            opt.step()
        params.append(model.flat_params.copy())
    return params


@pytest.mark.parametrize("graph", [True, False], ids=["captured", "plain"])
def test_sequential_graph_trains_each_model_as_a_plain_single_run(graph):
    """The sequential_graph variant is M single runs' trainer Steps, captured (recording
    backend: a CUDA graph's semantics) once per model and replayed: after 20 steps (2.5
    epochs: two new orders) every model's parameters equal, bitwise, those of 20 eager
    single-model steps on the same rows in the same order (a step replayed with a frozen
    number, another model's rows or another order would differ)."""
    from gpubp.backend.recording import RecordingBackend

    case, k = SMALL[0], 20
    rec = RecordingBackend()
    step = S.sequential_graph_step(case, rec, graph=graph)
    before = [fn.model.flat_params.copy() for fn in step.steps]
    for _ in range(k):
        step()
    ref = _plain_runs(case, k)
    assert len(step.steps) == case.count
    for i, fn in enumerate(step.steps):
        assert not np.array_equal(before[i], ref[i])  # the comparison below sees training
        assert np.array_equal(fn.model.flat_params, ref[i]), f"model {i}"
        assert fn.opt.steps == k
    # each model: step 0 plain (warm-up), step 1 captured and replayed, then replays; plain: nothing captured
    assert [fn.captures for fn in step.steps] == [int(graph)] * case.count
    assert len(rec.graphs) == int(graph) * case.count and rec.replays == int(graph) * case.count * (k - 1)


def test_sequential_graph_catches_a_wrong_order():
    """The reference comparison above is sharp: models trained on another epoch's order differ."""
    from gpubp.backend.recording import RecordingBackend

    case = SMALL[0]
    step = S.sequential_graph_step(case, RecordingBackend(), batches=8)
    for fn in step.steps:  # each model's order reversed
        fn.new_epoch = lambda perm, epoch, original=fn.new_epoch: original(perm[::-1], epoch)
    for _ in range(3):
        step()
    ref = _plain_runs(case, 3)
    assert not any(np.array_equal(fn.model.flat_params, r) for fn, r in zip(step.steps, ref))


def test_the_benchs_sweep_step_captured_equals_it_plain():
    """The bench's captured sweep step computes what its plain one does (the same bits)."""
    from gpubp.backend.recording import RecordingBackend

    case = SMALL[0]
    plain, graph = S.sweep_step(case, get_backend("cpu"), False), S.sweep_step(case, RecordingBackend(), True)
    for _ in range(20):  # 2.5 epochs of 8 batches
        plain()
        graph()
    a, b = plain.sweep_step.g, graph.sweep_step.g
    assert graph.sweep_step.captures == 1
    assert np.array_equal(a.stack.flat_params, b.stack.flat_params) and np.array_equal(a.running, b.running)
