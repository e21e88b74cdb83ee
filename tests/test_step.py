"""The training step as a function of device state (gpubp/step.py), and its capture.

The GPU replays a captured CUDA graph; on the CPU, gpubp/backend/recording.py gives the
NumPy backend a graph's semantics (op calls recorded with arrays by reference and
Python scalars frozen, then replayed). A run whose step is captured once per batch
shape and replayed must equal the plain run bitwise: any per-step number passed as a
Python value (learning rate, bias correction, step count, batch position) would be
replayed frozen and change the result, which the comparison sees (see
test_the_comparison_catches_a_frozen_learning_rate).
"""

from __future__ import annotations

import numpy as np
import pytest

import gpubp.trainer as T
from gpubp import precision as PR
from gpubp import stack
from gpubp.backend.recording import CaptureError, RecordingBackend
from gpubp.config import load_config
from gpubp.data import epoch_permutation
from gpubp.model import MLP
from gpubp.step import Step

# 240 training rows in batches of 64: 4 steps an epoch, the last of 48 rows (two shapes);
# 200 steps = 50 epochs. The separate ops' step (train.fused_mlp = false): on a GPU "auto"
# would take the fused MLP for batches this small; it has a case of its own
BASE = ["data.dataset=spirals", "data.n_samples=300", "data.val_fraction=0.2", "data.test_fraction=0.0",
        "model.hidden=[16, 16]", "train.batch_size=64", "train.steps=200", "train.eval_every=25",
        "train.early_stopping_patience=0", "train.restore_best=false", "train.fused_mlp=false"]  # fmt: skip

CASES = {
    "adam-cosine-warmup-clip": ["optimizer.name=adam", "optimizer.lr=0.01", "schedule.name=cosine",
                                "schedule.warmup_steps=20", "schedule.min_lr=0.001", "optimizer.clip_grad_norm=0.5"],
    "adamw-cosine-warmup": ["optimizer.name=adamw", "optimizer.lr=0.01", "optimizer.weight_decay=0.05",
                            "schedule.name=cosine", "schedule.warmup_steps=25", "schedule.min_lr=0.0005"],
    "adamw-step-clip": ["optimizer.name=adamw", "optimizer.lr=0.02", "optimizer.weight_decay=0.01",
                        "schedule.name=step", "schedule.step_size=30", "schedule.gamma=0.5",
                        "schedule.warmup_steps=5", "optimizer.clip_grad_norm=1.0"],
    "sgd-nesterov-cosine-warmup": ["optimizer.name=sgd", "optimizer.lr=0.1", "optimizer.momentum=0.9",
                                   "optimizer.nesterov=true", "optimizer.weight_decay=0.001",
                                   "schedule.name=cosine", "schedule.warmup_steps=10"],
    "sgd-dampening-step-clip": ["optimizer.name=sgd", "optimizer.lr=0.2", "optimizer.momentum=0.8",
                                "optimizer.dampening=0.3", "schedule.name=step", "schedule.step_size=50",
                                "optimizer.clip_grad_norm=0.3"],
    "adam-residual-gelu-float64": ["optimizer.name=adam", "optimizer.lr=0.005", "schedule.name=cosine",
                                   "schedule.warmup_steps=15", "model.activation=gelu", "model.residual=true",
                                   "model.dtype=float64"],
    # mixed precision: the 16-bit weight copy, the casts and (fp16) the device loss scale in the graph
    "adamw-cosine-bf16": ["optimizer.name=adamw", "optimizer.lr=0.01", "schedule.name=cosine",
                          "schedule.warmup_steps=10", "model.dtype=bf16", "optimizer.clip_grad_norm=1.0"],
    "adam-step-fp16": ["optimizer.name=adam", "optimizer.lr=0.01", "schedule.name=step", "schedule.step_size=40",
                       "model.dtype=fp16"],
    "sgd-momentum-tf32": ["optimizer.name=sgd", "optimizer.lr=0.1", "optimizer.momentum=0.9", "model.dtype=tf32"],
    # the fused MLP: one op for the whole pass, its gradient's shares summed by the guard
    "adam-fused-mlp-clip": ["optimizer.name=adam", "optimizer.lr=0.01", "train.fused_mlp=true",
                            "optimizer.clip_grad_norm=0.5", "model.activation=tanh"],
}  # fmt: skip


def run(case: str, device, extra=()) -> T.Trainer:
    cfg = load_config(None, BASE + CASES[case] + list(extra))
    trainer = T.Trainer(cfg, None, device=device, quiet=True)
    trainer.summary = trainer.train()
    return trainer


def assert_same_run(a: T.Trainer, b: T.Trainer) -> None:
    """Bitwise: parameters, optimizer state, the guard's record, every logged number."""
    assert np.array_equal(a.model.flat_params, b.model.flat_params)
    sa, sb = a.opt.state_dict(), b.opt.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert np.array_equal(sa[k], sb[k]), k
    assert a.guard.first_bad_step() == b.guard.first_bad_step()
    strip = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in a.history]
    assert strip == [{k: v for k, v in r.items() if k != "elapsed_s"} for r in b.history]


@pytest.mark.parametrize("case", list(CASES))
def test_captured_run_equals_the_plain_run_bitwise(case):
    plain = run(case, "cpu")
    rec = RecordingBackend()
    captured = run(case, rec)
    assert captured.graph_note is None
    assert len(rec.graphs) == 2  # one capture per batch shape (64 and 48 rows)
    assert rec.replays == 200 - 2  # each shape: one plain run (warm-up), then captured once, replayed
    assert_same_run(plain, captured)


@pytest.mark.parametrize("extra", [[], ["data.dataset=regression", "loss.name=mse"]])
def test_a_captured_step_records_the_narrow_layer_ops(extra, monkeypatch):
    """Where the backend runs a layer in its own kernels (layer_fits: the GPU's
    kernels/layer.cu), a captured step records gemm_bias_act and layer_backward like any
    op (layer_backward's output is the gradient it is given) and replays the plain run
    bitwise; their NumPy references are the separate ops, so it is also the run without.
    The first layer's pair and the loss read the batch's rows where they lie (a window of
    the split, read when they run): the step gathers nothing."""
    from gpubp.backend import NumpyBackend

    case = "adam-cosine-warmup-clip"
    without = run(case, "cpu", extra)
    monkeypatch.setattr(NumpyBackend, "layer_fits", lambda self, n_in, n_out, dtype, tf32=False: True, raising=False)
    plain, rec = run(case, "cpu", extra), RecordingBackend()
    captured = run(case, rec, extra)
    calls = [(fn.__name__, kwargs) for fn, _, kwargs in rec.graphs[0]]
    names = [name for name, _ in calls]
    assert {"gemm_bias_act", "layer_backward"} <= set(names) and "gather_windows" not in names
    windows = {name: [kw.get("window") is not None for n, kw in calls if n == name]
               for name in ("gemm_bias_act", "layer_backward", "loss_forward_backward")}  # fmt: skip
    # the first layer (its forward first, its backward last), and the loss
    assert windows == {"gemm_bias_act": [True, False, False], "layer_backward": [False, False, True],
                       "loss_forward_backward": [True]}  # fmt: skip
    # each layer's backward above a ReLU layer writes that layer's D' (e_act), and the ReLU
    # layer's own takes it as it is (identity)
    backward = [(kw.get("e_act"), args[4]) for fn, args, kw in rec.graphs[0] if fn.__name__ == "layer_backward"]
    assert [(e and e.name, act.name) for e, act in backward] == [("relu", "identity"), ("relu", "identity"),
                                                                  (None, "identity")]  # fmt: skip
    assert_same_run(plain, captured)
    assert_same_run(without, plain)


def test_a_captured_bf16_step_records_the_tensor_core_layer_ops(monkeypatch):
    """bf16 layers in the backend's own kernels (the GPU's layer_tc.cu): the captured step
    records gemm_bias_act and layer_backward, whose first layer's pair reads the split's
    float32 rows where they lie and rounds them (no gather, no cast), leaves the float32
    gradient in its layers' shares for the guard, and replays the plain run bitwise. And
    that run is the one that gathers and casts x first (the bits of rows rounded once)."""
    from gpubp.backend import NumpyBackend

    case = "adamw-cosine-bf16"
    monkeypatch.setattr(NumpyBackend, "layer_fits", lambda self, n_in, n_out, dtype, tf32=False: True, raising=False)
    plain, rec = run(case, "cpu"), RecordingBackend()
    captured = run(case, rec)
    calls = [(fn.__name__, args, kwargs) for fn, args, kwargs in rec.graphs[0]]
    names = [name for name, _, _ in calls]
    assert names.count("gemm_bias_act") == names.count("layer_backward") == 3
    assert "gather_windows" not in names and "cast" not in names
    windows = {name: [kw.get("window") is not None for n, _, kw in calls if n == name]
               for name in ("gemm_bias_act", "layer_backward")}  # fmt: skip
    assert windows == {"gemm_bias_act": [True, False, False], "layer_backward": [False, False, True]}
    first = next(args for n, args, kw in calls if n == "gemm_bias_act")
    assert first[0].dtype == np.float32 and first[4].dtype == PR.BF16  # the split's x, a bf16 a_0
    assert all(kw["shares"][0].dtype == np.float32 for n, _, kw in calls if n == "layer_backward")
    assert_same_run(plain, captured)
    monkeypatch.setattr(MLP, "takes_input_window", lambda self: False)
    assert_same_run(run(case, "cpu"), plain)  # gathered and cast first


@pytest.mark.parametrize("extra", [[], ["model.dtype=bf16"], ["train.fused_mlp=true"]])
def test_a_regression_step_reads_its_targets_where_they_lie(extra, monkeypatch):
    """Targets (n, c) are not gathered: the step gathers x alone and the loss reads rows
    perm[offset : offset + n] of the split's targets (a window read when it runs). The
    same values in the same order: the run of the step that gathers them, bitwise, and
    the captured run replays it (a frozen window would read one batch's targets forever).
    The fused MLP reads its own window (forward_backward_rows) and is unchanged."""
    import gpubp.step as S

    cfg = BASE + ["data.dataset=regression", "loss.name=mse", "optimizer.name=adam", "optimizer.lr=0.01",
                  "train.steps=60", "train.eval_every=20"] + extra  # fmt: skip

    def train(device):
        trainer = T.Trainer(load_config(None, cfg), None, device=device, quiet=True)
        trainer.summary = trainer.train()
        return trainer

    rec = RecordingBackend()
    captured, plain = train(rec), train("cpu")
    calls = [(fn.__name__, args, kwargs) for fn, args, kwargs in rec.graphs[0]]
    gathers = [args for name, args, _ in calls if name == "gather_windows"]
    losses = [kwargs for name, _, kwargs in calls if name == "loss_forward_backward"]
    if "train.fused_mlp=true" in extra:
        assert not gathers and not losses and "mlp_forward_backward" in [name for name, _, _ in calls]
    else:
        assert [len(srcs) for srcs, *_ in gathers] == [1]  # x alone
        assert len(losses) == 1 and losses[0]["window"] is not None
    monkeypatch.setattr(S, "reads_targets_in_place", lambda loss: False)
    gathered = train("cpu")
    assert_same_run(plain, captured)
    assert_same_run(gathered, plain)


@pytest.mark.parametrize("case", ["adamw-cosine-bf16", "adam-step-fp16"])
def test_a_16bit_steps_gather_rounds_x_as_it_moves(case, monkeypatch):
    """bf16 and fp16 (separate ops): the step gathers the batch's float32 rows straight into
    the model's 16-bit storage (gather_windows with a 16-bit out: gather.cu's _w4_bf16 and
    _w4_f16 on the GPU), and the model casts nothing. The bits of the gather and then the
    cast: the run whose gather moves float32 rows (the model's cast after), bitwise."""
    from gpubp.data import DeviceSplit

    plain, rec = run(case, "cpu"), RecordingBackend()
    captured = run(case, rec)
    calls = [(fn.__name__, args) for fn, args, _ in rec.graphs[0]]
    gathers = [args for name, args in calls if name == "gather_windows"]
    low = captured.model.store_dtype
    assert len(gathers) == 1 and gathers[0][0][0].dtype == np.float32 and gathers[0][3][0].dtype == low
    assert "cast" not in [name for name, _ in calls]
    assert_same_run(plain, captured)
    window = DeviceSplit.batch_window
    monkeypatch.setattr(DeviceSplit, "batch_window", lambda self, *a, x_dtype=None, **kw: window(self, *a, **kw))
    cast_after = RecordingBackend()
    gathered = run(case, cast_after)
    assert "cast" in [fn.__name__ for fn, _, _ in cast_after.graphs[0]]  # (the patch took)
    assert_same_run(gathered, plain)


def test_the_comparison_catches_a_frozen_learning_rate(monkeypatch):
    """The old way (the host sets opt.lr each step, the update takes it as a Python float):
    right when every step runs, wrong when the step is captured once and replayed."""

    def update(self, p, g, scale, skip, rows, low):
        self.backend.sgd_step_batched(
            p, g, self.momentum_buffer[rows], self._scratch_rows(rows), lr=float(self.lr[0]),
            momentum=self._momentum_v[rows], one_minus_dampening=self._one_minus_damp[rows], nesterov=self.nesterov,
            weight_decay=self._wd[rows],
            first_step=self.first_step, grad_scale=scale, skip=skip, momentum_on=True, decay_on=True, low=low,
        )  # fmt: skip

    original = Step.run

    def host_lr_run(self, step):
        self.opt.lr = float(self.state.lr_rows(step, 1)[0][0])
        return original(self, step)

    monkeypatch.setattr(stack.StackSGD, "_update", update)
    monkeypatch.setattr(Step, "run", host_lr_run)
    case = "sgd-nesterov-cosine-warmup"
    plain, captured = run(case, "cpu"), run(case, RecordingBackend())
    assert not np.array_equal(plain.model.flat_params, captured.model.flat_params)
    monkeypatch.undo()
    assert np.array_equal(plain.model.flat_params, run(case, "cpu").model.flat_params)  # the patch was exact


def signature(calls):
    """A recording with arrays as (address, shape, strides, dtype), like device pointers."""

    def norm(v):
        if isinstance(v, np.ndarray):
            return ("array", v.__array_interface__["data"][0], v.shape, v.strides, v.dtype.str)
        if isinstance(v, (list, tuple)):
            return tuple(norm(x) for x in v)
        if isinstance(v, dict):
            return tuple((k, norm(x)) for k, x in sorted(v.items()))
        return v if isinstance(v, (int, float, bool, str, type(None), np.generic)) else repr(v)

    return [(op.__name__, norm(args), norm(kwargs)) for op, args, kwargs in calls]


@pytest.mark.parametrize("case", ["adamw-cosine-bf16", "adam-step-fp16"])
def test_the_update_writes_the_16bit_copy_the_next_step_reads(case, monkeypatch):
    """bf16/fp16: the captured step holds no cast of the parameters (the update writes
    params_low as it goes, numpy_stacked.rounded), and the run equals, bitwise, one whose
    every forward pass casts them itself (the fold off). A copy left stale (an update
    that did not write it) would train on the first step's weights: a different run."""
    rec = RecordingBackend()
    folded = run(case, rec)
    flat, low = folded.model.flat_params, folded.model.flat_params_low
    calls = [(op.__name__, args, kwargs) for graph in rec.graphs for op, args, kwargs in graph]
    assert not [c for c in calls if c[0] == "cast" and c[1][0] is flat]
    updates = [kw["low"] for name, _, kw in calls if name == "adam_step_batched"]
    assert len(updates) == 2 and all(np.shares_memory(u, low) for u in updates)

    init = Step.__init__

    def unfolded_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.fold_cast = False

    monkeypatch.setattr(Step, "__init__", unfolded_init)
    assert_same_run(folded, run(case, "cpu"))


@pytest.mark.parametrize("case", ["adamw-step-clip", "sgd-dampening-step-clip", "adam-step-fp16"])
def test_a_step_captured_later_records_the_same_calls(case):
    """Every per-step number is read from device state: a capture at step 1 and one at
    step 41 (other learning rate, bias corrections, step, batch position, epoch order)
    record the same ops with the same scalars on the same buffers."""
    rec = RecordingBackend()
    cfg = load_config(None, BASE + CASES[case])
    trainer = T.Trainer(cfg, None, device=rec, quiet=True)
    step_fn = trainer.make_step()
    for s in range(42):
        if s % trainer.steps_per_epoch == 0:
            step_fn.new_epoch(epoch_permutation(cfg.train.seed, s // trainer.steps_per_epoch, trainer.n_train))
        if s == 41:
            step_fn.graphs.clear()  # capture the 64-row step again
        step_fn.run(s)
    assert len(rec.graphs) == 3 and len(rec.graphs[0]) > 10  # 64 rows (step 1), 48 rows (step 7), 64 again
    assert signature(rec.graphs[0]) == signature(rec.graphs[2])


def test_nothing_is_allocated_inside_a_captured_step(monkeypatch):
    """The capture succeeded above only if no op allocated; here a step that lets an op
    return a new array (the squared norm without out=) is refused at capture."""
    original = T.Step._finish

    def allocating_finish(self, loss):
        self.backend.sum_squares(self.model.flat_grads)  # a new 0-d array each step
        original(self, loss)

    monkeypatch.setattr(T.Step, "_finish", allocating_finish)
    with pytest.raises(CaptureError, match="sum_squares returns a new array inside a captured step"):
        run("adam-cosine-warmup-clip", RecordingBackend())


def test_the_recording_backend_refuses_what_a_graph_cannot_hold(monkeypatch):
    from gpubp.backend import NumpyBackend

    # an op the recording does not list would run once, at capture, and never in a replay
    monkeypatch.setattr(NumpyBackend, "new_op", lambda self, out: out.fill(1.0), raising=False)
    rec = RecordingBackend()
    buf = rec.zeros((3,), np.float64)  # outside a capture: the NumPy backend
    for fn, message in [
        (lambda: rec.zeros((3,), np.float64), "zeros allocates memory"),
        (lambda: rec.to_float(buf[0]), "to_float reads the device from the host"),
        (lambda: rec.xp.add(buf, 1.0), "numpy.add returns a new array"),
        (lambda: rec.loss_forward_backward(buf.reshape(3, 1), buf.reshape(3, 1), None), "pass out="),
        (lambda: rec.new_op(buf), "new_op is not a recorded op"),
    ]:
        with pytest.raises(CaptureError, match=message):
            rec.capture(0, fn)
    replay = rec.capture(0, lambda: rec.xp.add(buf, 1.0, out=buf))
    assert buf.tolist() == [0.0, 0.0, 0.0]  # capturing runs nothing
    replay()
    replay()
    assert buf.tolist() == [2.0, 2.0, 2.0]


def test_cuda_graph_off_runs_every_step_plainly():
    rec = RecordingBackend()
    trainer = run("adam-cosine-warmup-clip", rec, ["train.cuda_graph=false"])
    assert trainer.graph_note == "train.cuda_graph = false" and rec.graphs == []
    assert_same_run(trainer, run("adam-cosine-warmup-clip", "cpu"))


def test_a_resumed_captured_run_repeats_the_uninterrupted_one(tmp_path):
    """Resume mid-epoch from a checkpoint: the tables are rebuilt from the restored step
    and optimizer count, the epoch's order from (seed, epoch)."""
    case = CASES["adamw-step-clip"]
    whole = T.Trainer(load_config(None, BASE + case), str(tmp_path / "a"), device=RecordingBackend(), quiet=True)
    whole.train()
    half = T.Trainer(load_config(None, BASE + case + ["train.steps=75"]), str(tmp_path / "b"),
                     device=RecordingBackend(), quiet=True)  # fmt: skip
    half.train()
    rest = T.Trainer(load_config(None, BASE + case), str(tmp_path / "c"), device=RecordingBackend(), quiet=True,
                     resume=str(tmp_path / "b" / "last.npz"))  # fmt: skip
    rest.train()
    assert np.array_equal(whole.model.flat_params, rest.model.flat_params)


def test_tables_longer_runs_than_one_chunk(monkeypatch):
    """More steps than one table holds: the tables are reloaded mid-run (and mid-graph)."""
    from gpubp import step as S

    monkeypatch.setattr(S, "CHUNK", 7)
    monkeypatch.setattr(S.StepState.__init__, "__defaults__", (7,))
    captured = run("sgd-dampening-step-clip", RecordingBackend())
    assert captured.opt.steps == 200
    monkeypatch.undo()
    assert_same_run(captured, run("sgd-dampening-step-clip", "cpu"))


def test_gather_windows_reads_its_start_when_it_runs():
    """The reference gathers rows perm[start : start + n] of every src with start read at
    the call (a captured step replays it with the device's new offset)."""
    from gpubp.backend import numpy_ops

    src, perm = np.arange(20.0).reshape(10, 2), np.array([3, 1, 4, 0, 5, 9, 2, 6, 8, 7])
    labels = np.arange(100, 110, dtype=np.int32)
    start, outs = np.array(2), (np.empty((3, 2)), np.empty(3, np.int32))
    assert numpy_ops.gather_windows((src, labels), perm, start, outs) is outs
    assert np.array_equal(outs[0], src[[4, 0, 5]]) and np.array_equal(outs[1], [104, 100, 105])
    start[...] = 6
    numpy_ops.gather_windows((src,), perm, start, outs[:1])
    assert np.array_equal(outs[0], src[[2, 6, 8]])
    with pytest.raises(ValueError):  # a src without its out
        numpy_ops.gather_windows((src, labels), perm, start, outs[:1])


def test_select_rows_reads_pos_when_it_runs():
    from gpubp.backend import numpy_ops

    vectors, where = np.arange(24.0).reshape(4, 3, 2), np.arange(8, dtype=np.int64).reshape(4, 2)
    first = np.array([True, False, False, True])
    pos = np.array(1, np.int64)
    outs = (np.empty((3, 2)), np.empty((), np.bool_), np.empty(2, np.int64))
    numpy_ops.select_rows((vectors, first, where), pos, outs)
    assert np.array_equal(outs[0], vectors[1]) and not outs[1] and np.array_equal(outs[2], [2, 3])
    pos[...] = 3
    numpy_ops.select_rows((vectors, first, where), pos, outs)
    assert np.array_equal(outs[0], vectors[3]) and outs[1] and np.array_equal(outs[2], [6, 7])


def test_the_guards_advance_selects_around_the_count():
    """step_advance_selecting: the now rows at pos as it was, the ahead rows at pos + 1,
    and none past the table's end (the host uploads the next chunk's first row)."""
    from gpubp.backend import numpy_ops

    vectors, where = np.arange(12.0).reshape(3, 2, 2), np.arange(6, dtype=np.int64).reshape(3, 2)
    outs, running, pos = (np.zeros((2, 2)), np.zeros(2, np.int64)), np.zeros(()), np.array(1, np.int64)
    numpy_ops.step_advance_selecting(running, np.array(0.5), pos, [(vectors, outs[0])], [(where, outs[1])])
    assert np.array_equal(outs[0], vectors[1]) and np.array_equal(outs[1], [4, 5]) and pos == 2 and running == 0.5
    numpy_ops.step_advance_selecting(running, np.array(0.5), pos, [(vectors, outs[0])], [(where, outs[1])])
    assert np.array_equal(outs[0], vectors[2]) and np.array_equal(outs[1], [4, 5]) and pos == 3 and running == 1
    with pytest.raises(ValueError, match="at most 2 now and 1 ahead"):
        numpy_ops.step_advance_selecting(running, np.array(0.5), pos, [], [(where, outs[1])] * 2)


def test_the_table_timing_script_runs():
    """tests/step_table_timing.py (the host's cost of a step-table upload, single run and
    sweep) runs on this checkout's API."""
    from . import step_table_timing

    times = step_table_timing.main()
    assert [label.split(" ")[0] for label, _ in times] == ["tiny", "a"] and all(ms > 0 for _, ms in times)
