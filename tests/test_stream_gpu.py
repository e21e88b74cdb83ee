"""A streamed training split on the GPU (marked gpu: skipped without a CUDA device).

The chunks are copied from pinned memory on a second stream, ordered with the step by
CUDA events (gpubp/backend/transfer.py): a missing wait would let a step read a slot
before its copy lands, or a copy overwrite rows a queued step still reads, and change
the numbers. So a streamed run must equal the resident run bitwise, with the CUDA graph
and without. tests/test_stream.py checks the same logic on the CPU."""

from __future__ import annotations

import numpy as np
import pytest

import gpubp.trainer as T
from gpubp import stream
from gpubp.backend.transfer import CupyTransfer
from gpubp.config import load_config

from .test_step_gpu import host
from .test_stream import BASE, assert_same_run

pytestmark = pytest.mark.gpu

# many small steps and many chunks: 16000 training rows, batches of 128, 200-row chunks
# (not a multiple: batches straddle chunks) or 1024 rows (8 batches); steps queue up
# far ahead of the device, so the copies race the steps unless the events order them
BIG = ["data.dataset=regression", "data.n_samples=20000", "data.n_features=64", "loss.name=mse",
       "train.batch_size=128", "train.steps=400", "train.eval_every=50", "model.hidden=[64, 64]",
       "train.eval_batch_size=512"]  # fmt: skip


def run(extra, graph: bool, chunk=None, monkeypatch=None) -> T.Trainer:
    if chunk is not None:
        monkeypatch.setattr(T, "stream_chunk", lambda *a, **k: chunk)
    cfg = load_config(None, BASE + list(extra) + [f"train.cuda_graph={str(graph).lower()}"])
    trainer = T.Trainer(cfg, None, device="gpu", quiet=True)
    trainer.summary = trainer.train()
    if chunk is not None:
        monkeypatch.undo()
    return trainer


def same(a: T.Trainer, b: T.Trainer) -> None:
    ha, hb = host(a), host(b)
    ha.summary, hb.summary = a.summary, b.summary
    assert_same_run(ha, hb)


@pytest.mark.parametrize("graph", [True, False])
@pytest.mark.parametrize("chunk", [64, 100])
def test_streamed_equals_resident_on_the_gpu(gpu, monkeypatch, graph, chunk):
    resident = run([], graph)
    streamed = run([], graph, chunk, monkeypatch)
    split = streamed.run.splits["train"]
    assert isinstance(split, stream.StreamSplit) and isinstance(split.transfer, CupyTransfer)
    assert split.stage_x[0].base is not None  # a view on pinned memory (cupyx.empty_pinned)
    if graph:
        assert streamed.graph_note is None and len(streamed.step_fn.capturer.graphs) == 2
    same(resident, streamed)


@pytest.mark.parametrize("chunk", [200, 1024])
def test_many_chunks_race_free(gpu, monkeypatch, chunk):
    resident = run(BIG, True)
    streamed = run(BIG, True, chunk, monkeypatch)
    assert streamed.run.splits["train"].loads >= 400 * 128 // chunk
    same(resident, streamed)


def test_a_budget_streams_on_the_gpu(gpu):
    """data.device_memory below the run's estimate: the split streams (chunks a multiple of
    the batch) and trains as the resident run."""
    lines = []
    cfg = load_config(None, BASE + BIG + ["data.device_memory=4MiB"])
    trainer = T.Trainer(cfg, None, device="gpu", log=lines.append)
    split = trainer.run.splits["train"]
    assert isinstance(split, stream.StreamSplit) and split.chunk % 128 == 0
    assert sum("streams from host memory" in line for line in lines) == 1
    trainer.summary = trainer.train()
    same(run(BIG, True), trainer)
    assert np.isfinite(trainer.summary["train_loss"])
