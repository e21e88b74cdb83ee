"""gpubp bench: the cases load, a run reports every figure, files are never overwritten.
(Speed itself is never asserted here: figures come from `gpubp bench` runs.)"""

import json

import numpy as np
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
    assert {"gemm", "bias_act_forward", "act_backward_bias_grad", "loss_forward_backward", "adam_step"} <= set(ops)
    assert all(v >= 0 for v in ops.values())
    table = B.markdown(report).split("Where a step's time goes")[1]
    assert "| t | float32 | " in table and "adam_step" in table and "uncaptured" in table.split("\n")[0]
    # the NumPy backend runs the step uncaptured: no second row to compare, and the note says why
    assert not g["captured"] and g["ms_per_step_no_graph"] is None and g["graph_speedup"] is None
    assert "uncaptured" in g["graph_note"]
    # the wide target's figures: the sum of the step's GEMM times (the per-op table's) and step / that sum
    assert g["gemm_us"] == ops["gemm"] > 0
    assert g["step_over_gemm"] == pytest.approx(1e3 * g["ms_per_step"] / ops["gemm"], rel=1e-12)
    # the products by shape: z_k = A_k W_k (NN, batch x n_{k+1} over n_k), dW_k = A_k^T D' (TN,
    # n_k x n_{k+1} over the batch), D' W_k^T (NT, batch x n_k over n_{k+1}; none for the first layer)
    products = g["products_us"]
    assert set(products) == {"gemm NN 32x16x8", "gemm NN 32x4x16", "gemm TN 8x16x32", "gemm TN 16x4x32",
                             "gemm NT 32x16x4"}  # fmt: skip
    assert all(v["calls_per_step"] == 1 and v["us_per_call"] == pytest.approx(v["us"]) for v in products.values())
    assert sum(v["us"] for v in products.values()) == pytest.approx(ops["gemm"], rel=1e-9)
    assert list(products) == sorted(products, key=lambda k: -products[k]["us"])  # slowest first
    assert "| t | float32 | gemm TN 8x16x32 |" in table.split("The products")[1]


def test_a_fusing_model_is_also_timed_without_its_fused_products(monkeypatch):
    """Where the model fuses its products (the GPU's default for ReLU layers; forced here
    on the recording backend), the row also times the captured step with
    train.gemm_epilogues = false in the same rounds (fused x), and the fused products
    are GEMMs in the profile: their own rows in the per-op table, in the GEMM sum."""
    from gpubp.backend import NumpyBackend
    from gpubp.backend.recording import RecordingBackend

    monkeypatch.setattr(NumpyBackend, "gemm_epilogues", True)
    monkeypatch.setattr(B, "EPILOGUES", True)  # float32: "auto" (the default) leaves them out
    case = B.Case("t", [8, 16, 16, 4], 32, steps=10, warmup=2, loss="mse", optimizer="adamw")
    report = B.run([case], RecordingBackend(), with_torch=False, log=lambda m: None)
    g = report["results"][0]["gpubp"]
    assert g["fused_products"] and g["ms_per_step_unfused"] > 0
    assert g["fusion_speedup"] == pytest.approx(g["ms_per_step_unfused"] / g["ms_per_step"], rel=1e-12)
    ops = g["ops_us"]
    assert ops["gemm_bias_relu"] > 0 and ops["gemm_drelu_bias_grad"] > 0
    assert "act_backward" not in ops  # the ReLU layers' D' in their products, the identity layer's is D
    assert g["gemm_us"] == pytest.approx(sum(ops.get(name, 0.0) for name in B.OpProfile.GEMMS))
    assert ops["gemm_bias"] > 0 and ops["gemm_bias_grad"] > 0  # the identity output layer's
    # the fused products by shape: two ReLU layers forward, the second's D' W^T gives the first's D'
    products = g["products_us"]
    assert {"gemm_bias_relu NN 32x16x8", "gemm_bias_relu NN 32x16x16", "gemm_bias NN 32x4x16",
            "gemm_drelu_bias_grad NT 32x16x16"} <= set(products)  # fmt: skip
    assert sum(v["us"] for v in products.values()) == pytest.approx(g["gemm_us"], rel=1e-9)
    md = B.markdown(report)
    assert f"| {g['fusion_speedup']:.2f} |" in md and "gemm_drelu_bias_grad" in md.split("Where a step's time goes")[1]
    monkeypatch.setattr(NumpyBackend, "gemm_epilogues", False)  # the CPU's default: nothing fused, no third run
    g = B.run([case], RecordingBackend(), with_torch=False, log=lambda m: None)["results"][0]["gpubp"]
    assert not g["fused_products"] and g["ms_per_step_unfused"] is None and g["fusion_speedup"] is None


def test_the_narrow_layer_kernels_are_timed_as_products(monkeypatch):
    """Where the backend runs narrow layers in its own kernels (layer_fits: the GPU's
    layer.cu, stood in for here), the row times the step without them too (fused x), and
    gemm_bias_act and layer_backward are the step's products: in the GEMM sum, by shape
    (a forward by its NN product, a backward by the layer's rows x inputs x outputs)."""
    from gpubp.backend import NumpyBackend
    from gpubp.backend.recording import RecordingBackend

    monkeypatch.setattr(NumpyBackend, "layer_fits", lambda self, n_in, n_out, dtype, tf32=False: True, raising=False)
    case = B.Case("t", [8, 16, 16, 4], 32, steps=10, warmup=2, loss="mse", optimizer="adamw")
    g = B.run([case], RecordingBackend(), with_torch=False, log=lambda m: None)["results"][0]["gpubp"]
    assert g["fused_products"] and g["ms_per_step_unfused"] > 0
    assert set(g["products_us"]) == {"gemm_bias_act NN 32x16x8", "gemm_bias_act NN 32x16x16",
                                     "gemm_bias_act NN 32x4x16", "layer_backward layer 32x8x16",
                                     "layer_backward layer 32x16x16", "layer_backward layer 32x16x4"}  # fmt: skip
    assert g["gemm_us"] == pytest.approx(g["ops_us"]["gemm_bias_act"] + g["ops_us"]["layer_backward"])


def test_a_captured_step_is_profiled_op_by_op_as_graphs_of_their_own(monkeypatch):
    """On the GPU (GRAPH_PROFILE_DEVICES; the recording backend stands in) each op of one
    uncaptured step is captured REPEAT times into a graph of its own and timed by one
    replay: the row's graph_ops_us, for the separate ops' step and the fused MLP's, and their
    table in the report. Every op of the step is there, each capture holds REPEAT calls."""
    from gpubp.backend.recording import RecordingBackend

    monkeypatch.setattr(B, "GRAPH_PROFILE_DEVICES", ("cpu",))
    monkeypatch.setattr(B, "FUSED_MLP_DEVICES", ("cpu",))
    monkeypatch.setattr(B.GraphOpProfile, "REPEAT", 3)
    monkeypatch.setattr(B.GraphOpProfile, "BUDGET_MS", 1e9)  # every op repeated REPEAT times
    rec = RecordingBackend()
    case = B.Case("t", [8, 16, 4], 32, steps=4, warmup=2, loss="softmax_cross_entropy", optimizer="adam")
    report = B.run([case], rec, with_torch=False, log=lambda m: None)
    g = report["results"][0]["gpubp"]
    default, fused = g["graph_ops_us"]["separate ops"], g["graph_ops_us"]["fused MLP"]
    assert {"gemm", "bias_act_forward", "loss_forward_backward", "adam_step", "step_guard_norm"} <= set(default)
    assert "mlp_forward_backward" in fused and "gemm" not in fused
    assert all(t > 0 for t in [*default.values(), *fused.values()])
    op_graphs = [calls for calls in rec.graphs if len(calls) == 3]  # the profile's captures: REPEAT calls each
    assert len({calls[0][0].__name__ for calls in op_graphs}) >= len(default)
    md = B.markdown(report)
    assert "as a CUDA graph of its own" in md and "| t | float32 | fused MLP |" in md


def test_a_long_op_is_captured_fewer_times():
    """GraphOpProfile repeats an op about BUDGET_MS worth of its plain run, at least once
    and at most REPEAT times (a capture's length is its repeats)."""
    from gpubp.backend.recording import RecordingBackend

    rec = RecordingBackend()
    a, b, out = (np.ones((4, 4), np.float32) for _ in range(3))
    for budget, repeats in ((1e-12, 1), (1e12, B.GraphOpProfile.REPEAT)):
        prof = B.GraphOpProfile(rec)
        prof.BUDGET_MS = budget
        with prof:
            rec.gemm(a, b, out)
        assert len(rec.graphs[-1]) == repeats and prof.per_op["gemm"] > 0


def test_on_the_gpu_a_network_the_fused_mlp_takes_is_timed_with_it_too(monkeypatch):
    """On the GPU (FUSED_MLP_DEVICES; the recording backend stands in) the row also times
    the captured step the other way in the same rounds where the network fits the kernel:
    with the fused MLP where the default ("auto") leaves it out, without where "auto" takes
    it. "mlp x", the separate ops' step over the fused MLP's, in the row and both tables,
    starred where the default step is the fused MLP's; a network it does not take (wider
    than the kernel's 128 here) has none."""
    from gpubp.backend.recording import RecordingBackend

    monkeypatch.setattr(B, "FUSED_MLP_DEVICES", ("cpu",))
    rec = RecordingBackend()  # (its op set is the NumPy reference's: the fused MLP runs as numpy_ops' op)
    case = B.Case("t", [8, 16, 4], 32, steps=10, warmup=2, loss="softmax_cross_entropy", optimizer="adam")
    report = B.run([case], rec, with_torch=False, log=lambda m: None, precisions=["float32"])
    g = report["results"][0]["gpubp"]
    assert g["ms_per_step_fused_mlp"] > 0
    assert g["fused_mlp_speedup"] == pytest.approx(g["ms_per_step"] / g["ms_per_step_fused_mlp"], rel=1e-12)
    assert f"| {g['fused_mlp_speedup']:.2f}  |" in B.markdown(report) and not g["fused_mlp_default"]
    assert f" {g['fused_mlp_speedup']:>5.2f}  " in B.format_row(report["results"][0])
    assert any(fn.__name__ == "mlp_forward_backward" for graph in rec.graphs for fn, _, _ in graph)
    # "auto" takes the fused MLP (the GPU's mlp_pays for a small batch): the default step is
    # the fused MLP's, the other run the separate ops', and "mlp x" the one over the other
    rec.inner.mlp_pays = lambda sizes, activations, dtype, n: True
    rec.graphs.clear()
    report = B.run([case], rec, with_torch=False, log=lambda m: None, precisions=["float32"])
    g = report["results"][0]["gpubp"]
    assert g["fused_mlp_default"] and g["ms_per_step_fused_mlp"] == g["ms_per_step"]
    separate = g["fused_mlp_speedup"] * g["ms_per_step"]  # the other run's time
    assert separate > 0 and f"| {g['fused_mlp_speedup']:.2f}* |" in B.markdown(report)
    assert f" {g['fused_mlp_speedup']:>5.2f}* " in B.format_row(report["results"][0])
    names = [[fn.__name__ for fn, _, _ in graph] for graph in rec.graphs]
    assert ["mlp_forward_backward", "step_guard_norm", "adam_step_batched"] in names  # captured: fused
    assert any("gemm" in graph and "mlp_forward_backward" not in graph for graph in names)  # and the separate ops
    del rec.inner.mlp_pays
    off = B.run([case], rec, with_torch=False, log=lambda m: None, precisions=["float32"], with_fused_mlp=False)
    assert off["results"][0]["gpubp"]["fused_mlp_speedup"] is None  # gpubp bench --no-fused-mlp
    wide = B.Case("w", [8, 200, 4], 32, steps=10, warmup=2, loss="mse", optimizer="adam")
    rec.inner.mlp_fits = lambda sizes, *a: max(sizes) <= 128  # the GPU's width limit
    g = B.run([wide], rec, with_torch=False, log=lambda m: None, precisions=["float32"])["results"][0]["gpubp"]
    assert g["ms_per_step_fused_mlp"] is None and g["fused_mlp_speedup"] is None


def test_the_gpubp_row_times_the_trainers_step_captured_and_plain(monkeypatch):
    """With a backend that captures (the recording backend: a CUDA graph's semantics on the
    CPU), the gpubp row runs the trainer's Step twice over: captured (one capture, then
    replays: no op runs outside the replays) and uncaptured (train.cuda_graph = false),
    timed in the same rounds; the per-op profile runs the uncaptured one."""
    from gpubp.backend.recording import RecordingBackend
    from gpubp.step import Step

    calls = {}  # Step -> [runs, runs while an op profile was on]
    run = Step.run

    def counting(self, step):
        c = calls.setdefault(self, [0, 0])
        c[0] += 1
        c[1] += "gemm" in self.backend.__dict__  # OpProfile wraps the backend's gemm
        assert step == c[0] - 1  # steps 0, 1, 2, ... as a training loop runs them
        return run(self, step)

    monkeypatch.setattr(Step, "run", counting)
    rec = RecordingBackend()
    case = B.Case("t", [8, 16, 4], 32, steps=10, warmup=2, loss="mse", optimizer="adamw")
    report = B.run([case], rec, with_torch=False, log=lambda m: None)
    g = report["results"][0]["gpubp"]
    assert g["captured"] and g["graph_note"] is None and g["finite_loss"]
    assert g["ms_per_step"] > 0 and g["ms_per_step_no_graph"] > 0
    assert g["graph_speedup"] == pytest.approx(g["ms_per_step_no_graph"] / g["ms_per_step"], rel=1e-12)
    (captured, plain) = sorted(calls, key=lambda s: s.capturer is None)
    assert captured.capturer is not None and plain.capturer is None
    warmup = 3  # max(case.warmup, 3): plain, capture, one replay
    timed = B.ROUNDS * (case.steps // B.ROUNDS)
    n_prof = 10  # min(steps, 20)
    assert calls[captured] == [2 * warmup + timed, 0]  # warmed alone (peak memory), then in steps_ms
    assert calls[plain] == [warmup + timed + n_prof, n_prof]  # the profiled pass: the uncaptured step
    # one capture (one batch shape); every captured step after the first two was a replay
    assert len(rec.graphs) == 1 and captured.captures == 1
    assert rec.replays == calls[captured][0] - 1  # the capturing call replays once too
    ops = {fn.__name__ for fn, _, _ in rec.graphs[0]}
    assert {"gather_windows", "gemm", "step_guard_norm", "adam_step_batched"} <= ops
    assert "select_rows" not in ops  # the guard's launch selects the next step's rows


def test_steps_ms_times_blocks_ending_with_a_synchronize():
    """Each block of steps ends with a device synchronize before the clock stops; every
    callable is warmed up and then timed in the same rounds."""
    events = []
    steps = {"a": lambda: events.append("a"), "b": lambda: events.append("b")}
    out = B.steps_ms(steps, lambda: events.append("sync"), warmup=2, n_steps=6, rounds=3)
    assert set(out) == {"a", "b"} and all(v >= 0 for v in out.values())
    assert events[:4] == ["a", "a", "b", "b"]  # warm-up
    rounds = events[4:]
    block = ["sync", "a", "a", "sync", "sync", "b", "b", "sync"]  # a round: each in turn, 6 // 3 steps
    assert rounds == block * 3


def test_profile_restores_the_backend():
    be = get_backend("cpu")
    before = be.gemm
    with B.OpProfile(be):
        assert be.gemm is not before
    assert be.gemm is before and "gemm" not in be.__dict__


def test_bench_cli_writes_json_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "b.json"
    r = run_cli("bench", "--device", "cpu", "--case", "tiny", "--no-torch", "--no-fused-mlp", "--json", str(out))
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert report["results"][0]["case"] == "tiny" and "numpy" in report["versions"]
    assert "partial" not in report  # the finished run's files replace the partial ones
    r = run_cli("bench", "--device", "cpu", "--case", "tiny", "--no-torch", "--json", str(out))
    assert r.returncode == 2 and "exists; pass --overwrite" in r.stderr


def test_precision_filters_choose_the_rows_and_the_compiled_ones():
    pytest.importorskip("torch")
    from gpubp.cli import B_PRECISIONS
    from gpubp.errors import UsageError

    assert B_PRECISIONS == B.PRECISIONS  # the CLI's copy (cli.py does not import bench at startup)
    case = B.Case("t", [8, 16, 4], 32, steps=2, warmup=1, dtypes=["float32", "float64"])
    report = B.run([case], get_backend("cpu"), log=lambda m: None, precisions=("float64",),
                   compile_precisions=("float32",))  # fmt: skip
    (row,) = report["results"]
    assert row["precision"] == "float64" and row["torch_eager"]["ms_per_step"] > 0
    assert row["torch_compile"] == {"skipped": "--compile-precision float32"}
    with pytest.raises(UsageError, match="--precision bf16: none of the chosen cases"):
        B.run([case], get_backend("cpu"), with_torch=False, log=lambda m: None, precisions=("bf16",))


def test_a_run_leaves_its_rows_behind_as_it_goes():
    case = B.Case("t", [8, 16, 4], 32, steps=2, warmup=1, dtypes=["float32", "float64"])
    seen = []
    report = B.run([case], get_backend("cpu"), with_torch=False, log=lambda m: None,
                   partial=lambda r: seen.append((r["partial"], [row["precision"] for row in r["results"]],
                                                  B.markdown(r))))  # fmt: skip
    assert [(p, rows) for p, rows, _ in seen] == [("1 of 2 rows", ["float32"])]  # not after the last row
    assert "Partial report: 1 of 2 rows" in seen[0][2] and "| t | float32 |" in seen[0][2]
    assert "partial" not in report and "Partial" not in B.markdown(report)
