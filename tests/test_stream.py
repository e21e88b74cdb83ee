"""A training split streamed from host memory (gpubp/stream.py) trains exactly as a
resident one: the same rows in the same batches in the same order, so every number of
the run is bitwise equal (the NumPy backend runs the streaming code path with plain
copies). Chunks of C rows are chosen so that batches straddle chunk boundaries, the last
batch of an epoch is partial, and an epoch has several chunks."""

from __future__ import annotations

import numpy as np
import pytest

import gpubp.trainer as T
from gpubp import stream
from gpubp.backend.recording import RecordingBackend
from gpubp.config import load_config, parse_size
from gpubp.errors import ConfigError, DeviceRuntimeError

# 240 training rows in batches of 64: 4 steps an epoch, the last of 48 rows; 60 steps = 15 epochs.
# The separate ops' step (on a GPU "auto" would take the fused MLP for batches this small)
BASE = ["data.dataset=spirals", "data.n_samples=300", "data.val_fraction=0.2", "data.test_fraction=0.0",
        "model.hidden=[16, 16]", "train.batch_size=64", "train.steps=60", "train.eval_every=7",
        "train.early_stopping_patience=0", "train.restore_best=false", "optimizer.name=adam", "optimizer.lr=0.01",
        "schedule.name=cosine", "schedule.warmup_steps=5", "optimizer.clip_grad_norm=1.0",
        "train.fused_mlp=false"]  # fmt: skip
N_TRAIN, BATCH = 240, 64


def run(extra=(), device="cpu", chunk=None, monkeypatch=None, out=None, resume=None) -> T.Trainer:
    """A run; with `chunk`, its training split streams in chunks of that many rows."""
    if chunk is not None:
        monkeypatch.setattr(T, "stream_chunk", lambda *a, **k: chunk)
    cfg = load_config(None, BASE + list(extra))
    trainer = T.Trainer(cfg, out, device=device, quiet=True, resume=resume)
    trainer.summary = trainer.train()
    if chunk is not None:
        monkeypatch.undo()
    return trainer


def assert_same_run(a: T.Trainer, b: T.Trainer) -> None:
    """Bitwise: parameters, optimizer state, every logged number, the final summary."""
    assert np.array_equal(a.model.flat_params, b.model.flat_params)
    sa, sb = a.opt.state_dict(), b.opt.state_dict()
    for k in sa:
        assert np.array_equal(sa[k], sb[k]), k
    strip = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in a.history]
    assert strip == [{k: v for k, v in r.items() if k != "elapsed_s"} for r in b.history]
    skip = ("seconds", "eval_seconds")
    assert {k: v for k, v in a.summary.items() if k not in skip} == {
        k: v for k, v in b.summary.items() if k not in skip
    }


@pytest.fixture(scope="module")
def resident():
    return run()


# C = 240: one chunk an epoch; 64: batches aligned with chunks; 100, 70: batches straddle chunk
# boundaries (100: chunk 1 ends inside batch 2, the last chunk holds 40 rows); 64 = one batch
@pytest.mark.parametrize("chunk", [240, 64, 100, 70])
def test_streamed_run_equals_the_resident_run_bitwise(resident, monkeypatch, chunk):
    streamed = run(chunk=chunk, monkeypatch=monkeypatch)
    train = streamed.run.splits["train"]
    assert isinstance(train, stream.StreamSplit) and train.chunk == chunk
    assert not isinstance(resident.run.splits["train"], stream.StreamSplit)
    assert_same_run(resident, streamed)
    # double buffering: each chunk of the run copied once (the last prefetch may be one past the end)
    chunks = 15 * -(-N_TRAIN // chunk)
    assert chunks <= train.loads <= chunks + 1


@pytest.mark.parametrize("chunk,waits", [(64, 1), (128, 1), (240, 1), (100, 15)])
def test_the_next_chunk_copies_while_one_is_trained_on(monkeypatch, chunk, waits):
    """Only the run's first chunk is copied when a step needs it; every other chunk was
    sent ahead, while the steps of the chunk before it ran. Not so when chunks are not a
    multiple of the batch (100 rows): the epoch's last batch straddles two chunks,
    holding both slots, and the next epoch's first chunk waits (once per epoch; plan
    therefore picks multiples of the batch)."""
    streamed = run(chunk=chunk, monkeypatch=monkeypatch)
    assert streamed.run.splits["train"].waits == waits


def test_plan_picks_a_multiple_of_the_batch():
    est = {"params": 100, "batch": 10, "eval": 10, "data": 10000}
    chunk, _ = stream.plan(est, 100, 80, 10, 8, 8, 2200 + 44 * 30 + 43, "w")  # room for 30 rows: 3 batches of 8
    assert chunk == 24


def test_ring_offsets_point_at_each_batchs_rows(monkeypatch):
    """Independent of the training: for every step of three epochs, the ring rows the
    step's index window reads (ring_index[r : r + n]) hold x[perm[o : o + n]]."""
    monkeypatch.setattr(T, "stream_chunk", lambda *a, **k: 100)
    trainer = T.Trainer(load_config(None, BASE), None, device="cpu", quiet=True)
    split = trainer.run.splits["train"]
    x_host = split.x_host
    for step in range(12):
        epoch, b = divmod(step, 4)
        perm = np.random.default_rng([trainer.cfg.train.seed, epoch]).permutation(N_TRAIN)
        split.new_epoch(epoch, perm)
        split.ready(step)
        n = min(BATCH, N_TRAIN - b * BATCH)
        r = split.ring_offset(step)
        rows = split.ring_index[r : r + n]
        assert np.array_equal(split.x[rows], x_host[perm[b * BATCH : b * BATCH + n]]), step


def test_captured_streamed_run_equals_the_resident_run(resident, monkeypatch):
    """The recording backend captures the step once per batch shape and replays it: the
    streamed step reads only fixed buffers (ring, ring index, tables), so its replays
    follow the chunks copied in between."""
    rec = RecordingBackend()
    captured = run(chunk=100, monkeypatch=monkeypatch, device=rec)
    assert captured.graph_note is None
    assert len(rec.graphs) == 2  # 64 and 48 rows
    assert_same_run(resident, captured)


def test_regression_targets_stream_too(monkeypatch):
    extra = ["data.dataset=regression", "data.n_features=3", "loss.name=mse", "train.batch_size=32"]
    a = run(extra)
    b = run(extra, chunk=45, monkeypatch=monkeypatch)
    assert isinstance(b.run.splits["train"], stream.StreamSplit)
    assert_same_run(a, b)


def test_resume_mid_epoch_streamed_equals_an_uninterrupted_resident_run(tmp_path, monkeypatch):
    sched = ["schedule.name=step", "schedule.step_size=20"]  # unlike cosine, not a function of train.steps
    resident = run(sched)
    # 30 steps: mid-epoch (4 steps an epoch), inside chunk 1 of 100-row chunks
    run(sched + ["train.steps=30"], chunk=100, monkeypatch=monkeypatch, out=str(tmp_path / "part"))
    resumed = run(sched, chunk=100, monkeypatch=monkeypatch, out=str(tmp_path / "part"),
                  resume=str(tmp_path / "part" / "last.npz"))  # fmt: skip
    assert resumed.step == 60
    assert np.array_equal(resumed.model.flat_params, resident.model.flat_params)
    for k, v in resident.opt.state_dict().items():
        assert np.array_equal(resumed.opt.state_dict()[k], v), k
    skip = ("seconds", "eval_seconds", "run_dir")
    assert {k: v for k, v in resumed.summary.items() if k not in skip} == {
        k: v for k, v in resident.summary.items() if k not in skip
    }


# ---- the budget: data.device_memory


# wide rows, small evaluation batches: streaming in chunks takes less memory than the split
WIDE = ["data.dataset=regression", "data.n_features=50", "loss.name=mse", "train.eval_batch_size=32"]


def chunk_budget(chunk: int) -> int:
    """Bytes of data.device_memory that leave room for exactly `chunk` rows per chunk, by
    plan's accounting: everything but the training split, plus two chunks (rows of 50
    float32 features and a float32 target), their ring index (3 int64 per chunk row) and
    an evaluation buffer of 32 rows."""
    cfg = load_config(None, BASE + WIDE)
    est = T.memory_estimate(cfg, [50, 16, 16, 1], BATCH, 300, T.resolve_device("cpu")[0])
    row = 50 * 4 + 4
    fixed = est["params"] + est["batch"] + est["eval"] + est["data"] * 60 / 300 + 32 * row
    return int(fixed + (2 * row + 24) * chunk) + 1


def test_a_budget_below_the_run_streams_and_says_so_once():
    lines = []
    cfg = load_config(None, BASE + WIDE + [f"data.device_memory={chunk_budget(70)}"])
    trainer = T.Trainer(cfg, None, device="cpu", log=lines.append)
    assert trainer.run.splits["train"].chunk == 64  # room for 70 rows: one batch of 64
    notes = [line for line in lines if "streams from host memory" in line]
    assert len(notes) == 1 and "chunks of 64 rows" in notes[0] and "data.device_memory" in notes[0]
    resident = run(WIDE)
    trainer.summary = trainer.train()
    assert_same_run(resident, trainer)


def test_a_budget_that_fits_keeps_the_split_resident():
    cfg = load_config(None, BASE + ["data.device_memory=1GiB"])
    trainer = T.Trainer(cfg, None, device="cpu", quiet=True)
    assert not isinstance(trainer.run.splits["train"], stream.StreamSplit)
    free = T.Trainer(load_config(None, BASE), None, device="cpu", quiet=True)  # "free": no limit on the CPU
    assert not isinstance(free.run.splits["train"], stream.StreamSplit)


def test_a_budget_too_small_for_two_batches_is_refused_in_one_line():
    cfg = load_config(None, BASE + WIDE + [f"data.device_memory={chunk_budget(BATCH) - 500}"])
    with pytest.raises(ConfigError) as e:
        T.Trainer(cfg, None, device="cpu", quiet=True)
    assert "data.device_memory" in str(e.value) and "\n" not in str(e.value)
    assert "train.batch_size" in str(e.value)


def test_a_device_too_small_for_two_batches_is_out_of_memory(monkeypatch):
    """data.device_memory = "free" (the default) measures the device: when not even two
    chunks of one batch fit there, the run is out of memory (DeviceRuntimeError: exit 1),
    with the smaller batch to try, not a config error about a setting the user never made."""
    monkeypatch.setattr(T, "stream_budget", lambda value, backend: chunk_budget(BATCH) - 500)
    with pytest.raises(DeviceRuntimeError) as e:
        T.Trainer(load_config(None, BASE + WIDE), None, device="cpu", quiet=True)
    msg = str(e.value)
    assert msg.startswith("out of memory on ") and "\n" not in msg
    assert msg.endswith(f"use a smaller train.batch_size (e.g. {BATCH // 4})")


def test_plan_caps_the_chunk_at_the_split():
    # 100 rows of 100 bytes in the estimate, 80 of them training rows of 10 bytes streamed
    est = {"params": 100, "batch": 10, "eval": 10, "data": 10000}
    assert stream.plan(est, 100, 80, 10, 8, 8, 10**6, "w") == (None, "")  # fits
    # 1 byte short: fixed = 120 + 20 rows * 100 + 8 eval rows * 10 = 2200; (10119 - 2200) // 44 = 179 > 80
    chunk, note = stream.plan(est, 100, 80, 10, 8, 8, 10119, "w")
    assert chunk == 80 and "w (9.9 KiB)" in note
    chunk, _ = stream.plan(est, 100, 80, 10, 8, 8, 2200 + 44 * 32 + 43, "w")
    assert chunk == 32


@pytest.mark.parametrize("text,n", [("4GiB", 4 * 2**30), ("512 MiB", 512 * 2**20), ("1.5GB", 1_500_000_000),
                                    ("100", 100), (12345, 12345), ("2kib", 2048)])  # fmt: skip
def test_sizes_parse(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("value", ['"lots"', "0", "-5", "true", '"4 GiBs"', '"0GiB"', "1.5"])
def test_bad_device_memory_is_one_clear_line(value):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"data.device_memory={value}"])
    msg = str(e.value)
    assert "data.device_memory" in msg and "4GiB" in msg and "\n" not in msg


def test_device_memory_may_change_on_resume(tmp_path):
    T.Trainer(load_config(None, BASE + ["train.steps=8"]), str(tmp_path / "r"), device="cpu", quiet=True).train()
    cfg = load_config(None, BASE + ["train.steps=12", "data.device_memory=1GiB"])
    t = T.Trainer(cfg, str(tmp_path / "r"), device="cpu", quiet=True, resume=str(tmp_path / "r" / "last.npz"))
    assert t.step == 8


# ---- the host gather, the bench case


def test_threaded_gather_equals_take():
    """stream.gather splits a large gather over threads (48 MiB: several slices)."""
    rng = np.random.default_rng(0)
    src = rng.standard_normal((30000, 500)).astype(np.float32)
    rows = rng.permutation(30000)[:25000]
    out = np.empty((25000, 500), np.float32)
    stream.gather(src, rows, out)
    assert np.array_equal(out, src[rows])


def test_bench_stream_case_runs_scaled_down_on_the_cpu():
    from gpubp import bench

    (case,) = bench.find_cases(["stream"])
    assert case.stream_gib == 16.0 and case.budget_gib == 4.0  # the issue's case, on the GPU
    report = bench.run([case], T.resolve_device("cpu")[0], with_torch=False, log=lambda line: None)
    (row,) = report["results"]
    g = row["gpubp"]
    assert "not a speed figure" in g["note"]
    assert g["chunk_rows"] % 64 == 0 and g["dataset_bytes"] > 2 * g["chunk_rows"] * (784 * 4 + 4)
    assert g["chunks_copied"] >= 2 and g["chunk_waits"] == 1  # each later chunk was sent ahead
    assert g["samples_per_s"] > 0 and g["resident_samples_per_s"] > 0 and g["vs_resident"] > 0
    assert "x the resident" in bench.format_row(row) and "x resident" in bench.markdown(report)


# ---- the GPU's ordering, checked on the CPU


class FakeEvent:
    def __init__(self, log, stream):
        self.log, self.stream = log, stream

    def synchronize(self):
        self.log.append(("host waits", self.stream.name))


class FakeStream:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def record(self):
        self.log.append(("record", self.name))
        return FakeEvent(self.log, self)

    def wait_event(self, event):
        self.log.append(("wait", self.name, event.stream.name))


class FakeCupy:
    """cupy.cuda.Stream / get_current_stream as CupyTransfer uses them, logging each call."""

    def __init__(self):
        self.log = []
        compute = FakeStream(self.log, "compute")
        log = self.log

        class Cuda:
            @staticmethod
            def Stream(non_blocking=False):
                assert non_blocking  # the legacy default stream would serialise it with the step
                return FakeStream(log, "copy")

            @staticmethod
            def get_current_stream():
                return compute

        self.cuda = Cuda


def test_gpu_transfer_orders_copies_with_events():
    """CupyTransfer: a copy waits for the compute stream's work so far, runs on the copy
    stream from pinned memory, and is recorded; the step waits for it; the host waits
    only before writing a staging buffer again."""
    from gpubp.backend.transfer import CupyTransfer

    cp = FakeCupy()
    t = CupyTransfer(cp)
    copies = []

    class Dst:
        nbytes = 32
        flags = type("F", (), {"c_contiguous": True})()
        data = type("D", (), {"copy_from_host_async": lambda self, ptr, n, s: copies.append((ptr, n, s.name))})()

    src = np.zeros(8, np.float32)
    t.wait_staging(0)  # nothing copied yet: no wait
    t.copy(Dst(), src, 0)
    t.ready(0)
    t.wait_staging(0)
    assert cp.log == [("record", "compute"), ("wait", "copy", "compute"), ("record", "copy"),
                      ("wait", "compute", "copy"), ("host waits", "copy")]  # fmt: skip
    assert copies == [(src.ctypes.data, 32, "copy")]


def test_each_step_waits_for_the_copies_of_its_chunks(monkeypatch):
    """The protocol on a streamed run: before each step, the slots holding its batch's
    chunks are waited on (ready) after their last copy; a slot is copied into only when
    no step still to come reads its old chunk."""
    log = []
    monkeypatch.setattr(T, "stream_chunk", lambda *a, **k: 100)
    trainer = T.Trainer(load_config(None, BASE), None, device="cpu", quiet=True)
    split = trainer.run.splits["train"]
    inner = split.transfer

    class Logged:
        def staging(self, shape, dtype):
            return inner.staging(shape, dtype)

        def wait_staging(self, slot):
            pass

        def copy(self, dst, src, slot):
            inner.copy(dst, src, slot)
            log.append(("copy", slot, split_loading[0]))

        def ready(self, slot):
            log.append(("ready", slot))

    split_loading = [None]
    load = split._load
    monkeypatch.setattr(split, "_load", lambda g: (split_loading.__setitem__(0, g), load(g)))
    split.transfer = Logged()
    ready = split.ready

    def ready_and_log(step):
        ready(step)
        epoch, b = divmod(step, 4)
        o, n = b * BATCH, min(BATCH, N_TRAIN - b * BATCH)
        chunks = {epoch * 3 + o // 100, epoch * 3 + (o + n - 1) // 100}
        log.append(("step", step, chunks))

    monkeypatch.setattr(split, "ready", ready_and_log)
    trainer.train()
    held, waited = {}, set()  # slot -> chunk; slots waited on since their last copy
    for i, entry in enumerate(log):
        if entry[0] == "copy":
            slot, g = entry[1], entry[2]
            held[slot] = g
            waited.discard(slot)
            old = g - 2  # the chunk this slot held: no later step may read it
            assert all(old not in e[2] for e in log[i:] if e[0] == "step")
        elif entry[0] == "ready":
            waited.add(entry[1])
        else:
            for g in entry[2]:
                assert held[g % 2] == g and g % 2 in waited, (entry, held, waited)


def test_the_fused_mlp_reads_streamed_rows_as_resident_ones(monkeypatch):
    """train.fused_mlp: the fused pass reads the batch's rows where they lie (a window of
    the split, no gather): streamed, in the ring of chunks, captured and replayed, the run
    equals the resident fused run bitwise (batches straddling chunks included)."""
    fused = ["train.fused_mlp=true"]
    resident_fused = run(fused)
    rec = RecordingBackend()
    captured = run(fused, chunk=100, monkeypatch=monkeypatch, device=rec)
    assert isinstance(captured.run.splits["train"], stream.StreamSplit) and captured.graph_note is None
    assert any(fn.__name__ == "mlp_forward_backward" for fn, _, _ in rec.graphs[0])
    assert_same_run(resident_fused, captured)
