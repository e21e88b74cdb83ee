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
     "sgd-momentum-tf32", "adam-fused-mlp-clip"],
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

    # 2400 training rows: the 22 steps stay in one epoch (a graph replayed on its own does
    # not start the next one: past the epoch's end it would read beyond the order's buffer)
    cfg = load_config(None, BASE + CASES["adamw-step-clip"] + ["data.n_samples=3000"])
    trainer = T.Trainer(cfg, None, device="gpu", quiet=True)
    assert 2 + 20 <= trainer.n_train // 64
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


@pytest.mark.parametrize("shape", [(), (5,), (300,)])
def test_step_advance_adds_the_loss_counts_once_and_selects_the_next_rows(shape, be=None):
    """One launch of one block: running += loss (float64 += float32, the reference's add)
    and pos += 1 once, whatever the number of models (300: past the block's threads); with
    ahead tables (a sweep's step: vectors (K, 3, M, 1), SGD's first-step flags, the (step,
    offset) rows), their rows at the new pos, and none past the tables' last row. Against
    numpy_ops.step_advance and the tables themselves. (be: the GPU's by default;
    tests/test_kernels_emulated.py passes its host-run one.)"""
    from gpubp.backend import numpy_ops
    from gpubp.backend.cupy_backend import CupyBackend

    be = be if be is not None else CupyBackend()
    rng = np.random.default_rng(0)
    m, k = (shape or (1,))[0], 4
    tables = [rng.normal(size=(k, 3, m, 1)).astype(np.float32), np.arange(k) == 1,
              rng.integers(0, 10**12, (k, 2)).astype(np.int64)]  # fmt: skip
    for ahead in (False, True):
        running, loss = rng.normal(size=shape), rng.normal(size=shape).astype(np.float32)
        r_dev, p_dev = be.asarray(running.copy()).reshape(shape), be.zeros((), np.int64)
        p_dev[...] = 1
        pos = np.array(1, np.int64)
        outs = [be.zeros(t.shape[1:], t.dtype) for t in tables]
        pairs = list(zip([be.asarray(t) for t in tables], outs)) if ahead else []
        for step in range(1, k + 1):
            before = [be.to_numpy(o).copy() for o in outs]
            be.step_advance(r_dev, be.asarray(loss).reshape(shape), p_dev, ahead=pairs)
            numpy_ops.step_advance(running, loss, pos)
            assert be.to_numpy(r_dev).shape == shape and be.to_numpy(r_dev).tobytes() == running.tobytes()
            assert int(be.to_numpy(p_dev)) == step + 1 == int(pos)
            for t, o, b in zip(tables, outs, before):
                want = t[step + 1] if ahead and step + 1 < k else b  # past the last row: as it was
                assert be.to_numpy(o).tobytes() == np.asarray(want).tobytes(), (step, t.dtype)


def test_gather_windows_is_index_window_then_gather_rows():
    """One launch for a batch's rows, features and targets together: (N, F) float32 with
    (N, C) float64 targets or int32 labels (N,), bf16 and fp16 features, one pair alone, a
    pair with no columns: the bits of the reference (a gather moves values, it computes nothing).
    Its words (kernels/gather.cu): 16 bytes for 64 float32 features and targets (narrow's),
    8 for float64 rows of 3, 4 and 2 for the others. And float32 features into bf16 or
    fp16 (rounded as they move: the gather then the cast, byte for byte)."""
    from gpubp import precision as PR
    from gpubp.backend import numpy_ops
    from gpubp.backend.cupy_backend import CupyBackend

    be = CupyBackend()
    rng = np.random.default_rng(1)
    perm = rng.permutation(1000).astype(np.int64)
    x32, x16 = rng.normal(size=(1000, 13)).astype(np.float32), rng.integers(0, 65535, (1000, 5)).astype(PR.BF16)
    y64, labels = rng.normal(size=(1000, 3)), rng.integers(0, 9, 1000).astype(np.int32)
    h16 = rng.normal(size=(1000, 6)).astype(np.float16)
    x64w, y64w = rng.normal(size=(2, 1000, 64)).astype(np.float32)
    for srcs in [(x32, y64), (x32, labels), (x16, labels), (h16, y64), (labels,), (x32,), (x32, np.zeros((1000, 0))),
                 (x64w, y64w), (y64,)]:  # fmt: skip
        # poisoned: an unwritten element shows (bf16 bit patterns are < 65535 here)
        outs = tuple(be.xp.full((37, *s.shape[1:]), 65535 if s.dtype == PR.BF16 else -1, s.dtype) for s in srcs)
        got = be.gather_windows(tuple(be.asarray(s) for s in srcs), be.asarray(perm), be.xp.array(np.int64(501)), outs)
        assert got is outs
        want = numpy_ops.gather_windows(srcs, perm, np.array(501), tuple(np.empty_like(s[:37]) for s in srcs))
        for s, o, w in zip(srcs, outs, want):
            assert np.array_equal(be.to_numpy(o), w) and np.array_equal(w, s[perm[501:538]]), (s.dtype, s.shape)
    # float32 x rounded to a 16-bit storage as it moves (a bf16 or fp16 model's step): the
    # gather, then the cast, byte for byte
    for low, other in ((PR.BF16, labels), (PR.F16, y64), (PR.BF16, None)):
        srcs = (x32,) if other is None else (x32, other)
        dts = (low,) + tuple(o.dtype for o in srcs[1:])
        outs = tuple(be.xp.full((37, *s.shape[1:]), -1, d) for s, d in zip(srcs, dts))
        be.gather_windows(tuple(be.asarray(s) for s in srcs), be.asarray(perm), be.xp.array(np.int64(501)), outs)
        want = numpy_ops.gather_windows(srcs, perm, np.array(501), tuple(np.empty((37, *s.shape[1:]), d)
                                                                          for s, d in zip(srcs, dts)))  # fmt: skip
        for o, w in zip(outs, want):
            assert be.to_numpy(o).tobytes() == w.tobytes(), (low, len(srcs))


@pytest.mark.parametrize("dtype", ["float32", "float64", "bf16"])
@pytest.mark.parametrize("name", ["mse", "huber", "softmax_cross_entropy"])
def test_the_loss_reads_a_windows_targets_where_they_lie(name, dtype, be=None):
    """The step's loss on rows perm[start + i] of a split's targets (window) against the
    same loss on those rows gathered first: the same values in the same order, the same
    bits, at two starts. (be: a backend; the GPU's by default, tests/test_kernels_emulated.py
    passes its host-run one.)"""
    from gpubp import precision as PR
    from gpubp.backend.cupy_backend import CupyBackend, _math
    from gpubp.losses import make_loss

    be = be if be is not None else CupyBackend()
    rng = np.random.default_rng(7)
    storage = PR.BF16 if dtype == "bf16" else np.dtype(dtype)
    mt = _math(storage)
    loss, (n, c, rows) = make_loss(name), (300, 64, 1000)
    x = np.empty((n, c), storage)
    PR.store(rng.normal(size=(n, c)).astype(np.float32), x)
    x = be.asarray(x)
    if name != "softmax_cross_entropy":
        split = rng.normal(size=(rows, c)).astype(mt)
    else:
        split = rng.integers(0, c, rows).astype(np.int32)
    perm = rng.permutation(rows).astype(np.int64)
    dev_split, dev_perm = be.asarray(split), be.asarray(perm)
    for s in (101, 650):
        grad, out = be.empty((n, c), storage), be.empty((), mt)
        be.loss_forward_backward(x, dev_split, loss, grad, out=out, window=(dev_perm, be.asarray(np.array(s))))
        want_grad, want = be.empty((n, c), storage), be.empty((), mt)
        be.loss_forward_backward(x, be.asarray(split[perm[s : s + n]]), loss, want_grad, out=want)
        assert be.to_numpy(out).tobytes() == be.to_numpy(want).tobytes(), s
        assert be.to_numpy(grad).tobytes() == be.to_numpy(want_grad).tobytes(), s


@pytest.mark.parametrize("first", [False, True])
def test_the_guards_advance_selects_this_steps_rows_and_the_next_steps_start(first, be=None):
    """step_guard_norm's advance with the step's select folded in (StepState.guard_advance):
    the update's numbers of the row at pos (float32 (R, M, 1); SGD: and first_step, a
    bool), then pos + 1, then the next step's (step, offset) at the new pos, not past the
    table's last row; the guard reads the step index before the next one is selected (a
    NaN at step 2: first_bad is that step's). Against the tables' rows and
    numpy_ops.step_advance_selecting. (be: the GPU's by default; tests/test_kernels_emulated.py
    passes its host-run one.)"""
    from gpubp.backend import numpy_ops
    from gpubp.backend.cupy_backend import CupyBackend

    be = be if be is not None else CupyBackend()
    rng = np.random.default_rng(5)
    k = 4
    tables = {"vectors": rng.normal(size=(k, 3, 1, 1)).astype(np.float32), "first": np.arange(k) == 0,
              "where": np.stack([np.arange(k) + 10, rng.integers(0, 1000, k)], axis=1).astype(np.int64)}  # fmt: skip

    def state(zeros, asarray):
        tabs = {name: asarray(t) for name, t in tables.items()}
        outs = {name: zeros(t.shape[1:], t.dtype) for name, t in tables.items()}
        outs["where"][...] = tabs["where"][0]  # as StepState.ensure writes it
        now = [(tabs["vectors"], outs["vectors"])] + ([(tabs["first"], outs["first"])] if first else [])
        guard = [zeros((), np.int64), zeros((), np.bool_), zeros((), np.float32), zeros((), np.float32)]
        guard[0][...] = -1
        return outs, guard, (zeros((), np.float64), zeros((), np.int64), now, [(tabs["where"], outs["where"])])

    ref_outs, ref_guard, ref_adv = state(np.zeros, np.asarray)
    outs, guard, adv = state(be.zeros, be.asarray)
    for step in range(k):
        g, loss = rng.normal(size=3000).astype(np.float32), np.array(np.float32(0.25))
        g[7] = np.nan if step == 2 else g[7]
        numpy_ops.step_guard_norm(loss, g, np.zeros((), np.float32), ref_outs["where"][0, ...], 1.0, *ref_guard,
                                  advance=ref_adv)  # fmt: skip
        be.step_guard_norm(be.asarray(loss), be.asarray(g), be.zeros((), np.float32), outs["where"][0, ...], 1.0,
                           *guard, advance=adv)  # fmt: skip
        got = {name: be.to_numpy(o) for name, o in outs.items()}
        assert int(be.to_numpy(adv[1])) == step + 1 and float(be.to_numpy(adv[0])) == 0.25 * (step + 1), step
        assert int(be.to_numpy(guard[0])) == int(ref_guard[0]) == (-1 if step < 2 else 12), step
        assert got["vectors"].tobytes() == tables["vectors"][step].tobytes(), step
        assert bool(got["first"]) == (first and step == 0), step
        # the next step's start; after the last row nothing (the host uploads the next tables)
        assert np.array_equal(got["where"], tables["where"][min(step + 1, k - 1)]), step
        for name in tables:
            assert got[name].tobytes() == ref_outs[name].tobytes(), (name, step)
    with pytest.raises(ValueError, match="at most 2"):
        be.step_guard_norm(be.asarray(loss), be.asarray(g), be.zeros((), np.float32), 0, 1.0, *guard,
                           advance=(*adv[:2], adv[2] * 3, adv[3]))  # fmt: skip
    with pytest.raises(ValueError, match="rows do not fit"):
        be.step_guard_norm(be.asarray(loss), be.asarray(g), be.zeros((), np.float32), 0, 1.0, *guard,
                           advance=(*adv[:3], [(adv[3][0][0], outs["vectors"])]))  # fmt: skip


def test_select_rows_gives_the_references_rows_two_tables_a_launch():
    """The step's tables: Adam's vectors (K, 3, 1, 1) with (K, 2) int64 where-rows, SGD's
    with a (K,) bool first-step table too (a 0-d out), one table alone."""
    from gpubp.backend import numpy_ops
    from gpubp.backend.cupy_backend import CupyBackend

    be = CupyBackend()
    rng = np.random.default_rng(2)
    k = 9
    vectors = rng.normal(size=(k, 3, 1, 1)).astype(np.float32)
    first, where = rng.integers(0, 2, k).astype(np.bool_), rng.integers(0, 10**12, (k, 2)).astype(np.int64)
    for tables in [(vectors, where), (vectors, first, where), (where,), (vectors[:, :1], first)]:
        dev = tuple(be.asarray(t) for t in tables)
        for p in (0, 4, k - 1):
            pos = be.xp.array(np.int64(p))
            outs = tuple(be.xp.zeros(t.shape[1:], t.dtype) for t in tables)
            assert be.select_rows(dev, pos, outs) is outs
            want = numpy_ops.select_rows(tables, np.array(p), tuple(np.empty(t.shape[1:], t.dtype) for t in tables))
            for o, w in zip(outs, want):
                assert np.array_equal(be.to_numpy(o), w), (p, w.dtype)
