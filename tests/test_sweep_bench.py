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
    assert row["rounds"] == 3 and row["stacked_ms"] > 0 and row["sequential_ms"] > 0
    assert row["x_sequential"] == pytest.approx(row["sequential_ms"] / row["stacked_ms"])
    assert row["torch_func"] == {"skipped": "--no-torch"} and row["x_torch_func"] is None
    assert "| t | 3 x [5, 8, 4] @ 16 |" in S.markdown(report, "gpubp bench --case sweep")
    assert report["threads"]["stacked"] >= 1 and "threads: stacked" in S.markdown(report, "gpubp bench")


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
    a_first = [t for n, t in calls if n == "a"][: per_run[0]]
    assert a_first[-1] - a_first[0] >= 0.01  # the warm steps lasted warm_s
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
    plain, graph = (f.sweep_step for f in made)
    assert plain.captures == 0 and graph.captures == 1 and rec.replays == 1 + 1 + 3 - 2  # warm-up, capture, replays
    assert "sweep step plain ms" in S.markdown(report, "gpubp bench --case sweep")


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
