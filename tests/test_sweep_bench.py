"""gpubp bench --case sweep: every variant runs and is reported (speed is never asserted)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from gpubp import sweep_bench as S
from gpubp.backend import get_backend
from gpubp.cli import main

SMALL = [S.SweepCase("t", 3, [5, 8, 4], 16, cpu_warmup=1, cpu_steps=3, cpu_settle_s=0.0)]


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
