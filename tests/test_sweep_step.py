"""The sweep's step as one function of device state (gpubp/sweep_step.py), and its capture.

A sweep whose step is captured once per batch shape and replayed (RecordingBackend: the
NumPy backend with a CUDA graph's semantics, gpubp/backend/recording.py) must equal the
plain sweep bitwise: every model's checkpoints, every logged number, the table. Any
per-step number passed as a Python value (a learning rate, a bias correction, the batch
position, the frozen models) would be replayed frozen and the comparison would see it
(test_the_comparison_catches_frozen_flags). The stack's CPU blocks of models run on a
thread pool; the recording keeps each block's calls and replays them on the same pool
(RecordingBackend.run_blocks), so the tests run with 1 and with 3 threads.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from gpubp.backend.recording import CaptureError, RecordingBackend
from gpubp.backend.threads import set_num_threads
from gpubp.checkpoint import load_checkpoint
from gpubp.config import load_config
from gpubp.sweep_trainer import SweepTrainer, model_dir

from .test_sweep import ctrl_c_at

# digits, 200 steps of 32 rows, warmup + cosine; 1077 training rows: 34 steps an epoch,
# the last of 21 rows (two batch shapes)
BASE = """
[data]
dataset = "digits"
val_fraction = 0.2
test_fraction = 0.2
[model]
hidden = [{hidden}]
residual = {residual}
dtype = "{dtype}"
[optimizer]
name = "{opt}"
momentum = {momentum}
clip_grad_norm = {clip}
[schedule]
name = "cosine"
warmup_steps = 10
[train]
steps = 200
batch_size = 32
eval_every = 50
device = "cpu"
"""

CASES = {
    # grid lr x seed x weight decay, per-model batches (4 seeds: index_window_batched)
    "sgd-momentum-grid-clip": (
        dict(opt="sgd", momentum=0.9, clip=0.5, hidden="16", residual="false", dtype="float64"),
        '"optimizer.lr" = [0.01, 0.05]\n"train.seed" = [0, 3]\n"optimizer.weight_decay" = [0, 1e-3]\n',
    ),
    "adamw-residual-float32-grid-clip": (
        dict(opt="adamw", momentum=0.0, clip=1.0, hidden="16, 16", residual="true", dtype="float32"),
        '"optimizer.lr" = [1e-3, 1e-2]\n"train.seed" = [1, 2]\n"optimizer.weight_decay" = [0, 0.1]\n',
    ),
    # one seed: one batch shared by every model (index_window)
    "adamw-one-seed": (
        dict(opt="adamw", momentum=0.0, clip=0.0, hidden="12", residual="false", dtype="float32"),
        '"optimizer.lr" = [1e-3, 3e-3, 1e-2]\n"optimizer.weight_decay" = [0, 0.05]\n',
    ),
    # with eval_every = 5 and early_stopping_patience = 1 the large rates stop early (frozen flags)
    "adamw-early-stop": (
        dict(opt="adamw", momentum=0.0, clip=0.0, hidden="12", residual="false", dtype="float32"),
        '"optimizer.lr" = [0.5, 0.2, 1e-3]\n',
    ),
    # model 1 diverges (lr 1e6): frozen by the captured guard, the others go on
    "sgd-diverging-member": (
        dict(opt="sgd", momentum=0.9, clip=0.0, hidden="16", residual="false", dtype="float64"),
        'mode = "zip"\n"optimizer.lr" = [0.05, 1e6, 0.02]\n"train.seed" = [0, 0, 1]\n'
        '"optimizer.clip_grad_norm" = [0.5, 0, 0]\n',
    ),
}


@pytest.fixture(params=[1, 3], ids=["1-thread", "3-threads"])
def threads(request):
    set_num_threads(request.param)
    yield request.param
    set_num_threads(None)


def _sweep(tmp_path, case: str, device, name: str, extra: str = ""):
    settings, sweep = CASES[case]
    path = tmp_path / f"{name}.toml"
    text = BASE.format(**settings)
    if "eval_every" in extra:
        text = text.replace("eval_every = 50\n", "")
    path.write_text(text.replace("[train]\n", "[train]\n" + extra) + "[sweep]\n" + sweep)
    cfg = load_config(str(path))
    out = str(tmp_path / name)
    trainer = SweepTrainer(cfg, out, device=device, quiet=True)
    trainer.summary = trainer.train()
    return trainer, out


def assert_same_sweep(a: str, b: str, models: int) -> None:
    """Bitwise: every model's checkpoints (arrays and records), its logged rows, sweep.csv."""
    for i in range(models):
        for name in ("last.npz", "best.npz"):
            pa, pb = os.path.join(model_dir(a, i), name), os.path.join(model_dir(b, i), name)
            assert os.path.exists(pa) == os.path.exists(pb), (i, name)
            if not os.path.exists(pa):
                continue
            (ma, xa), (mb, xb) = load_checkpoint(pa), load_checkpoint(pb)
            assert xa.keys() == xb.keys()
            for key in xa:
                np.testing.assert_array_equal(xa[key], xb[key], err_msg=f"model {i} {name} {key}")
            for key in ("step", "best_step", "best_value", "optimizer_steps", "bad_evals"):
                assert ma[key] == mb[key], (i, name, key)

    def rows(run):
        return [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"}
                for line in open(os.path.join(run, "metrics.jsonl"))]  # fmt: skip

    assert rows(a) == rows(b)
    assert list(csv.DictReader(open(os.path.join(a, "sweep.csv")))) == list(
        csv.DictReader(open(os.path.join(b, "sweep.csv")))
    )


def _shapes(trainer) -> int:
    n, bs = trainer.step_fn.g.n_train, trainer.step_fn.batch_size
    return 1 if n % bs == 0 else 2


@pytest.mark.parametrize("case", list(CASES))
def test_captured_sweep_equals_the_plain_sweep_bitwise(tmp_path, case, threads):
    plain, plain_dir = _sweep(tmp_path, case, "cpu", "plain")
    assert plain.graph_note == "the cpu backend runs the step uncaptured" and plain.step_fn.captures == 0
    rec = RecordingBackend()
    captured, captured_dir = _sweep(tmp_path, case, rec, "captured")
    assert captured.graph_note is None
    shapes = _shapes(captured)
    assert shapes == 2  # the config gives a short last batch: two graphs
    assert captured.step_fn.captures == len(rec.graphs) == shapes
    assert rec.replays == 200 - shapes  # each shape: one plain (warm-up) step, then captured once, replayed
    # the stack's forward and backward are in the graph, as its blocks of models (one entry)
    blocks = [args[1] for graph in rec.graphs for op, args, _ in graph if op.__name__ == "run_cpu_blocks"]
    assert len(blocks) == shapes
    members = len(captured.step_fn.g.members)
    assert len(blocks[0]) == len(captured.step_fn.g.stack.blocks(32)) == min(threads, members)
    assert_same_sweep(plain_dir, captured_dir, members)
    if case == "sgd-diverging-member":
        assert plain.summary["diverged"] == captured.summary["diverged"] == [1]


def test_cuda_graph_off_runs_the_sweep_plainly(tmp_path):
    rec = RecordingBackend()
    trainer, out = _sweep(tmp_path, "adamw-one-seed", rec, "off", extra="cuda_graph = false\n")
    assert trainer.graph_note == "train.cuda_graph = false" and rec.graphs == [] and rec.replays == 0
    _, plain = _sweep(tmp_path, "adamw-one-seed", "cpu", "plain")
    assert_same_sweep(plain, out, 6)


def test_the_comparison_catches_frozen_flags(tmp_path, monkeypatch):
    """The old way (a new frozen-flags array after each evaluation): right when every step
    runs, wrong when the step is captured once and replayed (the graph keeps reading the
    old array, so a model frozen later, here one that stops early, keeps training)."""
    import gpubp.sweep_trainer as ST
    from gpubp.sweep_step import SweepStep

    original, init = ST.SweepTrainer._log_eval, SweepStep.__init__

    def own_flags(self, g, state, frozen, capturer=None):  # the step's flags are not the trainer's buffer
        init(self, g, state, frozen.copy(), capturer)

    def replacing_log_eval(self, g, step):
        original(self, g, step)
        self.step_fn.frozen = g.backend.asarray(g.stopped | np.array([d is not None for d in g.diverged]))

    monkeypatch.setattr(SweepStep, "__init__", own_flags)
    monkeypatch.setattr(ST.SweepTrainer, "_log_eval", replacing_log_eval)
    case, extra = "adamw-early-stop", "early_stopping_patience = 1\nrestore_best = false\neval_every = 5\n"
    plain, plain_dir = _sweep(tmp_path, case, "cpu", "plain", extra)
    captured, captured_dir = _sweep(tmp_path, case, RecordingBackend(), "captured", extra)
    stopped = [i for i, s in enumerate(plain.step_fn.g.stopped) if s]
    assert stopped  # some model stopped early before the end
    i = stopped[0]
    a = load_checkpoint(os.path.join(model_dir(plain_dir, i), "last.npz"))[1]["params"]
    b = captured.step_fn.g.backend.to_numpy(captured.step_fn.g.stack.flat_params)[i]
    p = plain.step_fn.g.backend.to_numpy(plain.step_fn.g.stack.flat_params)[i]
    assert np.array_equal(a, p)  # plain: frozen from its stop on
    assert not np.array_equal(p, b)  # captured with the replaced array: it went on training
    monkeypatch.undo()
    fixed, fixed_dir = _sweep(tmp_path, case, RecordingBackend(), "fixed", extra)
    assert np.array_equal(fixed.step_fn.g.backend.to_numpy(fixed.step_fn.g.stack.flat_params)[i], p)
    assert_same_sweep(plain_dir, fixed_dir, 3)


def test_nothing_is_allocated_inside_a_captured_sweep_step(tmp_path, monkeypatch):
    """A step whose batched squared norms return a new array is refused at capture."""
    from gpubp.sweep_step import SweepStep

    original = SweepStep._body

    def allocating_body(self, n):
        self.backend.sum_squares_batched(self.g.stack.flat_grads)  # a new (M,) array each step
        original(self, n)

    monkeypatch.setattr(SweepStep, "_body", allocating_body)
    with pytest.raises(CaptureError, match="sum_squares_batched returns a new array inside a captured step"):
        _sweep(tmp_path, "adamw-one-seed", RecordingBackend(), "alloc")


def test_index_window_batched_matches_slicing():
    """Each model's window of its own order: perm[i, s : s + N] (numpy_stacked's reference)."""
    from gpubp.backend import numpy_stacked as S

    perm = np.arange(5 * 40, dtype=np.int64).reshape(5, 40)[:, ::-1].copy()
    out = np.zeros((5, 7), np.int64)
    S.index_window_batched(perm, np.array(31, dtype=np.int64), out)
    np.testing.assert_array_equal(out, perm[:, 31:38])


def test_batched_loss_and_norms_into_buffers_equal_the_returned_ones():
    from gpubp.backend import numpy_stacked as S
    from gpubp.losses import make_loss

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 300, 4)).astype(np.float32)  # 300 rows: several loss row blocks
    y = rng.integers(0, 4, 300).astype(np.int32)
    loss = make_loss("softmax_cross_entropy", 0.1, 1.0)
    out, g1, g2 = np.zeros(3, np.float32), np.zeros_like(x), np.zeros_like(x)
    ref = S.loss_forward_backward_batched(x, y, loss, grad=g1)
    assert S.loss_forward_backward_batched(x, y, loss, grad=g2, out=out) is out
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(g1, g2)
    flat = rng.standard_normal((3, 50))
    sq = np.zeros(3)
    S.sum_squares_batched(flat, out=sq)
    np.testing.assert_array_equal(sq, [np.dot(r, r) for r in flat])


def test_a_captured_sweep_resumed_mid_epoch_ends_as_the_plain_uninterrupted_one(tmp_path, monkeypatch):
    """Two shape groups (each its own captured step), a diverging member in each, Ctrl-C
    at step 120 of the second group (mid-epoch), --resume with a fresh capture: the same
    bits as the plain sweep that ran through."""

    import gpubp.sweep_trainer as ST
    from gpubp.errors import Interrupted

    settings = dict(opt="sgd", momentum=0.9, clip=0.0, hidden="16", residual="false", dtype="float64")
    path = tmp_path / "s.toml"
    path.write_text(BASE.format(**settings) + '[sweep]\n"optimizer.lr" = [0.05, 1e6, 0.01]\n"train.seed" = [0, 1]\n'
                    '"model.hidden" = [[8], [12]]\n')  # fmt: skip
    whole = str(tmp_path / "whole")
    SweepTrainer(load_config(str(path)), whole, device="cpu", quiet=True).train()
    monkeypatch.setattr(ST, "catch_sigint", ctrl_c_at(2, 120))
    run = str(tmp_path / "run")
    rec = RecordingBackend()
    with pytest.raises(Interrupted):
        SweepTrainer(load_config(str(path)), run, device=rec, quiet=True).train()
    assert len(rec.graphs) == 4  # two groups, two batch shapes each
    monkeypatch.undo()
    rec = RecordingBackend()
    resumed = SweepTrainer(load_config(str(path)), run, device=rec, quiet=True, resume=True)
    resumed.train()
    assert resumed.graph_note is None and len(rec.graphs) == 2  # the second group's shapes, captured anew
    assert_same_sweep(whole, run, 12)


def test_every_recorded_op_has_the_same_parameters_on_the_gpu_backend():
    """What the CPU captures (recording.OPS) the GPU backend offers with the same
    parameters (out= included), so the GPU graph runs the calls the CPU tests replay."""
    import inspect

    from gpubp.backend import NumpyBackend
    from gpubp.backend.cupy_backend import CupyBackend
    from gpubp.backend.recording import OPS

    for name in OPS:
        cpu = [p for p in inspect.signature(getattr(NumpyBackend, name)).parameters if p != "blocked"]
        gpu = [p for p in inspect.signature(getattr(CupyBackend, name)).parameters if p != "self"]
        assert cpu == gpu, name
    assert {"index_window_batched", "loss_forward_backward_batched", "sum_squares_batched"} <= set(OPS)


def test_capture_note_states_the_one_reason_a_sweep_runs_plainly():
    from types import SimpleNamespace

    from gpubp.backend import NumpyBackend
    from gpubp.data import DeviceSplit
    from gpubp.sweep_step import capture_note

    def cfg(on):
        return SimpleNamespace(train=SimpleNamespace(cuda_graph=on))

    rec, split = RecordingBackend(), DeviceSplit.__new__(DeviceSplit)
    assert capture_note(cfg(True), rec, split) is None
    assert capture_note(cfg(False), rec, split) == "train.cuda_graph = false"
    assert capture_note(cfg(True), NumpyBackend(), split) == "the cpu backend runs the step uncaptured"
    assert capture_note(cfg(True), rec, object()) == "a mapped split"
