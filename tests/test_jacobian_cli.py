"""`gpubp jacobian` through a real subprocess: the table shows the crossover (wrt input)
and the gap (wrt params); --json, --plot and their errors."""

import json

import pytest

from gpubp import MLP

from .conftest import run_cli

# spirals: n_in = 2; one hidden layer of 16 keeps every case well under a second
SMALL = ["--config", "configs/spirals.toml", "--device", "cpu", "--repeats", "1", "--set", "model.hidden=[16]"]


def table_rows(stdout: str, wrt: str):
    """{sizes tuple: [numbers (None for 'skipped')...]} of one sweep's table."""
    block = stdout.split(f"wrt={wrt},")[1].split("\n\n")[0]
    rows = {}
    for line in block.splitlines()[2:]:
        sizes, rest = line.strip()[1:].split("]")
        rows[tuple(int(s) for s in sizes.split(","))] = [None if v == "skipped" else float(v) for v in rest.split()]
    return rows


def test_table_shows_crossover_and_gap(tmp_path):
    r = run_cli("jacobian", *SMALL, "--json", str(tmp_path / "j.json"))
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    # columns: params, fwd MFLOP, fwd ms, rev MFLOP, rev ms, fwd/rev FLOP, fwd/rev time
    inputs = table_rows(r.stdout, "input")
    assert sorted(s[-1] for s in inputs) == [1, 2, 4, 8, 16]
    for sizes, (params, fwd, fwd_ms, rev, rev_ms, ratio, _) in inputs.items():
        assert params == MLP(list(sizes)).n_params and fwd_ms > 0 and rev_ms > 0
        # forward carries n_in tangents, reverse n_out adjoints through the same GEMMs
        assert ratio == pytest.approx(sizes[0] / sizes[-1], rel=1e-3)
        assert (fwd < rev) == (sizes[-1] > sizes[0])
    params_rows = table_rows(r.stdout, "params")
    assert sorted(s[1] for s in params_rows) == [2, 4, 8, 16]
    gaps = [row[5] for _, row in sorted(params_rows.items(), key=lambda kv: kv[1][0])]
    assert 1 < gaps[0] < gaps[1] < gaps[2] < gaps[3]  # forward mode falls behind as P grows

    data = json.loads((tmp_path / "j.json").read_text())
    assert data["n_in"] == 2 and data["n_out"] == 3 and len(data["rows"]) == 9
    assert all(row["seconds"]["forward"] > 0 and row["seconds"]["reverse"] > 0 for row in data["rows"])

    # an existing output is not overwritten
    r = run_cli("jacobian", *SMALL, "--json", str(tmp_path / "j.json"))
    assert r.returncode == 2 and r.stderr.strip().endswith("exists; pass --overwrite to replace it")


def test_one_mode_and_the_plot(tmp_path):
    pytest.importorskip("matplotlib")
    r = run_cli("jacobian", *SMALL, "--mode", "reverse", "--plot", str(tmp_path / "j.png"))
    assert r.returncode == 0, r.stderr
    assert "rev MFLOP" in r.stdout and "fwd" not in r.stdout
    png = (tmp_path / "j.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_plot_without_matplotlib_is_one_line(tmp_path, monkeypatch):
    # a matplotlib package that fails to import, ahead of the real one on the path
    fake = tmp_path / "site" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    r = run_cli("jacobian", *SMALL, "--plot", str(tmp_path / "j.png"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "gpubp: error: gpubp jacobian --plot needs matplotlib: pip install 'gpubp[plot]'"
    ]
    assert not (tmp_path / "j.png").exists() and r.stdout == ""


def test_missing_config():
    r = run_cli("jacobian", "--config", "missing.toml")
    assert r.returncode == 2 and r.stderr.startswith("gpubp: error: config file 'missing.toml' not found")


def test_cases_over_the_memory_cap_are_counted_not_run():
    # hidden 512: forward mode's tangent block after layer 1 is (2*512 + 512, 512) float32 = 3 MiB
    r = run_cli("jacobian", "--config", "configs/spirals.toml", "--device", "cpu", "--repeats", "1",
                "--set", "model.hidden=[512]", "--mode", "forward", "--max-mb", "1")  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = table_rows(r.stdout, "params")
    # columns: params, fwd MFLOP, fwd ms
    assert rows[(2, 512, 3)][1] > 0 and rows[(2, 512, 3)][2] is None  # counted, not timed
    assert all(row[2] > 0 for sizes, row in rows.items() if sizes != (2, 512, 3))
    assert r.stdout.count("skipped") == 1
