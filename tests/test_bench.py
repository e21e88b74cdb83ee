"""gpubp bench: the cases load, a run reports every figure, files are never overwritten.
(Speed itself is never asserted here: figures come from `gpubp bench` runs.)"""

import json

import pytest

from gpubp import bench as B
from gpubp.backend import get_backend
from gpubp.errors import ConfigError

from .conftest import run_cli


def test_every_case_loads_and_counts_flops():
    cases = {c.name: c for c in B.find_cases()}
    assert set(cases) == {"tiny", "mnist-100", "mnist-1024", "narrow", "wide", "stream"}
    tiny = cases["tiny"]
    assert tiny.sizes == [64, 128, 10] and tiny.batch == 128
    # 6 x weights x batch: 2 (forward) + 2 (dW) + 2 (dX) flops per weight and sample
    assert tiny.flops_per_step == 6 * (64 * 128 + 128 * 10) * 128
    assert cases["wide"].weights == 5 * 4096 * 4096
    with pytest.raises(ConfigError, match="no such case"):
        B.find_cases(["huge"])


def test_a_bad_case_file_is_refused(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('name = "x"\nsizes = [3, 0]\nbatch = 4\n')
    with pytest.raises(ConfigError, match="sizes must be"):
        B.load_case(str(p))
    p.write_text('name = "x"\nsizes = [3, 2]\nbatch = 4\nspeed = 1\n')
    with pytest.raises(ConfigError, match="unknown key 'speed'"):
        B.load_case(str(p))


def test_run_reports_every_figure():
    case = B.Case("t", [8, 16, 4], 32, steps=5, warmup=2, dtypes=["float32", "tf32"])
    report = B.run([case], get_backend("cpu"), with_torch=False, log=lambda m: None)
    row, skipped = report["results"]
    g = row["gpubp"]
    assert g["ms_per_step"] > 0 and g["samples_per_s"] == pytest.approx(32 / (g["ms_per_step"] / 1e3))
    assert g["tflops"] == pytest.approx(case.flops_per_step / (g["ms_per_step"] / 1e3) / 1e12)
    assert sum(g["share"].values()) == pytest.approx(1.0, abs=1e-9) and g["share"]["gemm"] > 0
    assert g["peak_mem_mib"] > 0
    assert report["device_peak"]["float32"]["gemm_tflops"] > 0
    assert "skipped" in skipped["gpubp"]  # tf32 on a CPU
    assert "| t | float32 |" in B.markdown(report)
    # per op: every op of an Adam step was seen, and ops + rest add up to the profiled pass
    ops = g["ops_us"]
    assert {"gemm", "bias_act_forward", "act_backward", "bias_grad", "loss_forward_backward", "adam_step"} <= set(ops)
    assert all(v >= 0 for v in ops.values())
    table = B.markdown(report).split("Where a step's time goes")[1]
    assert "| t | float32 | " in table and "adam_step" in table


def test_profile_restores_the_backend():
    be = get_backend("cpu")
    before = be.gemm
    with B.OpProfile(be):
        assert be.gemm is not before
    assert be.gemm is before and "gemm" not in be.__dict__


def test_bench_cli_writes_json_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "b.json"
    r = run_cli("bench", "--device", "cpu", "--case", "tiny", "--no-torch", "--json", str(out))
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert report["results"][0]["case"] == "tiny" and "numpy" in report["versions"]
    r = run_cli("bench", "--device", "cpu", "--case", "tiny", "--no-torch", "--json", str(out))
    assert r.returncode == 2 and "exists; pass --overwrite" in r.stderr
