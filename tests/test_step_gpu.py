"""The captured training step on the GPU (marked gpu: skipped without a CUDA device).

A CUDA-graph run must equal the same run with train.cuda_graph = false bitwise: the
graph replays the same kernels on the same buffers, and every per-step number comes
from device memory (gpubp/step.py). tests/test_step.py checks the same on the CPU with
the recording backend."""

from __future__ import annotations

import numpy as np
import pytest

import gpubp.trainer as T
from gpubp.config import load_config

from .test_step import BASE, CASES, assert_same_run

pytestmark = pytest.mark.gpu


def run(case, graph: bool) -> T.Trainer:
    cfg = load_config(None, BASE + CASES[case] + [f"train.cuda_graph={str(graph).lower()}"])
    trainer = T.Trainer(cfg, None, device="gpu", quiet=True)
    trainer.summary = trainer.train()
    return trainer


def host(trainer):
    """The run's state copied to the host, for assert_same_run."""
    be = trainer.run.backend

    class Copy:
        pass

    c = Copy()
    c.model = type("M", (), {"flat_params": be.to_numpy(trainer.model.flat_params)})()
    c.opt = type("O", (), {"state_dict": lambda self: trainer.opt.state_dict()})()
    c.guard, c.history = trainer.guard, trainer.history
    return c


@pytest.mark.parametrize(
    "case",
    ["adamw-cosine-warmup", "adamw-step-clip", "sgd-nesterov-cosine-warmup", "adamw-cosine-bf16", "adam-step-fp16",
     "sgd-momentum-tf32"],
)  # fmt: skip
def test_graph_run_equals_the_plain_run_bitwise(gpu, case):
    """200 steps, two batch shapes, warmup + cosine/step schedules, AdamW/SGD, clipping."""
    captured = run(case, True)
    assert captured.graph_note is None and len(captured.step_fn.capturer.graphs) == 2  # 64 and 48 rows
    assert_same_run(host(captured), host(run(case, False)))


def test_replays_allocate_nothing(gpu):
    """After the capture, steps take no memory from CuPy's default pool (the graph's
    temporaries live in its own pool)."""
    import cupy

    cfg = load_config(None, BASE + CASES["adamw-step-clip"])
    trainer = T.Trainer(cfg, None, device="gpu", quiet=True)
    step_fn = trainer.make_step()
    from gpubp.data import epoch_permutation

    step_fn.new_epoch(epoch_permutation(cfg.train.seed, 0, trainer.n_train))
    step_fn.run(0)
    step_fn.run(1)  # warm-up, capture (64 rows)
    cupy.cuda.get_current_stream().synchronize()
    pool = cupy.get_default_memory_pool()
    used = pool.used_bytes()
    for _ in range(20):
        step_fn.graphs[64]()
    cupy.cuda.get_current_stream().synchronize()
    assert pool.used_bytes() == used and np.isfinite(trainer.run.backend.to_float(trainer.running_loss))


def test_graph_run_with_skipped_fp16_steps_equals_the_plain_run_bitwise(gpu, monkeypatch):
    """fp16 with overflows forced (tests/test_skipped_steps.py): the device counts the
    updates taken (update_vectors, in the graph) and the tables are reloaded from that
    count; the graph run equals the uncaptured one, and the count is steps - skipped."""
    from gpubp import precision as PR

    from .test_skipped_steps import CASES as SKIP_CASES
    from .test_skipped_steps import INIT_SCALE, INTERVAL

    monkeypatch.setattr("gpubp.model.LOSS_SCALE_INIT", INIT_SCALE)
    monkeypatch.setattr(PR, "LOSS_SCALE_INTERVAL", INTERVAL)
    runs = []
    for graph in (True, False):
        cfg = load_config(
            None, BASE + SKIP_CASES["adam"] + ["model.dtype=fp16", f"train.cuda_graph={str(graph).lower()}"]
        )
        trainer = T.Trainer(cfg, None, device="gpu", quiet=True)
        trainer.summary = trainer.train()
        runs.append(trainer)
    captured, plain = runs
    assert captured.summary["skipped_steps"] >= 12
    assert captured.opt.steps == plain.opt.steps == 200 - captured.summary["skipped_steps"]
    assert_same_run(host(captured), host(plain))


@pytest.mark.parametrize("shape", [(), (5,)])
def test_step_advance_adds_the_loss_and_counts_once(shape):
    """One launch: running += loss (float64 += float32, as CuPy's add casts) and pos += 1
    once, whatever the number of models; the NumPy reference's bits."""
    from gpubp.backend import numpy_ops
    from gpubp.backend.cupy_backend import CupyBackend

    be = CupyBackend()
    rng = np.random.default_rng(0)
    running = rng.normal(size=shape)
    loss = rng.normal(size=shape).astype(np.float32)
    pos = np.array(41, np.int64)
    r_gpu, p_gpu = be.xp.array(running), be.xp.array(pos)  # (asarray would make a 0-d array 1-d)
    be.step_advance(r_gpu, be.xp.array(loss), p_gpu)
    numpy_ops.step_advance(running, loss, pos)
    assert r_gpu.shape == shape and np.array_equal(be.to_numpy(r_gpu), running)
    assert int(be.to_numpy(p_gpu)) == 42 == int(pos)


def test_gather_window_is_index_window_then_gather_rows():
    """One launch for a batch's rows: features (N, F) float32, targets (N, C), int32
    labels (N,): the bits of the reference (a gather moves values, it computes nothing)."""
    from gpubp.backend import numpy_ops
    from gpubp.backend.cupy_backend import CupyBackend

    be = CupyBackend()
    rng = np.random.default_rng(1)
    perm = rng.permutation(1000).astype(np.int64)
    for src in (rng.normal(size=(1000, 13)).astype(np.float32), rng.normal(size=(1000, 3)),
                rng.integers(0, 9, 1000).astype(np.int32)):  # fmt: skip
        out = be.xp.full((37, *src.shape[1:]), -1, src.dtype)
        be.gather_window(be.asarray(src), be.asarray(perm), be.xp.array(np.int64(501)), out)
        want = numpy_ops.gather_window(src, perm, np.array(501), np.empty((37, *src.shape[1:]), src.dtype))
        assert np.array_equal(be.to_numpy(out), want) and np.array_equal(want, src[perm[501:538]])
