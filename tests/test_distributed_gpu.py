"""Data parallel on the GPU: the NCCL engine with one rank (GPU machines only).

One rank's all-reduce adds nothing (its share n/n = 1 scales by exactly 1), so the
NCCL path, overlapped or not, must give the plain GPU run's parameters bit for bit.
The all-reduce of the largest bench model's gradient (wide: 84M parameters) is timed
and printed (run with -s); nothing asserts on time.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from gpubp.config import load_config
from gpubp.trainer import Trainer

pytestmark = pytest.mark.gpu


def _world():
    try:
        from mpi4py import MPI
    except ImportError as e:
        pytest.skip(f"mpi4py does not import ({e}); pip install '.[mpi]'")

    from gpubp.distributed import MPIWorld
    from gpubp.nccl_engine import load_nccl

    try:
        load_nccl()
    except Exception as e:
        pytest.skip(str(e))
    return MPIWorld(MPI.COMM_WORLD)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_nccl_one_rank_repeats_the_plain_gpu_run(tmp_path, monkeypatch, dtype):
    cfg = load_config("configs/digits.toml", [f"model.dtype={dtype}", "train.steps=100", "train.eval_every=30"])
    plain = Trainer(cfg, str(tmp_path / "plain"), device="gpu", quiet=True)
    plain.train()
    want = plain.run.backend.to_numpy(plain.model.flat_params)
    for overlap in ("1", "0"):
        monkeypatch.setenv("GPUBP_NCCL_OVERLAP", overlap)
        world = _world()
        try:
            t = Trainer(cfg, str(tmp_path / f"nccl-{overlap}"), device="gpu", quiet=True, dist=world)
            assert world.engine.overlap == (overlap == "1")
            world.start(t)
            t.train()
            got = t.run.backend.to_numpy(t.model.flat_params)
        finally:
            world.close()
        assert np.array_equal(got, want), f"overlap={overlap}: max diff {np.max(np.abs(got - want)):.3g}"


def test_time_the_allreduce_of_the_largest_bench_gradient(tmp_path):
    """wide: sizes [4096] * 6, 5 layers of 4096 x 4096 + 4096: 83,906,560 parameters."""
    from gpubp.nccl_engine import time_allreduce

    sizes = [4096] * 6
    n_params = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    cfg = load_config("configs/digits.toml", ["model.hidden=[16]", "train.steps=1"])
    world = _world()
    try:
        t = Trainer(cfg, str(tmp_path / "run"), device="gpu", quiet=True, dist=world)
        world.start(t)
        results = [time_allreduce(world.engine, n_params, dtype) for dtype in (np.float32, np.float64)]
    finally:
        world.close()
    print("\nNCCL all-reduce of the wide bench gradient:", json.dumps(results))
    if os.environ.get("GPUBP_TIMING_OUT"):
        with open(os.environ["GPUBP_TIMING_OUT"], "w") as f:
            json.dump(results, f, indent=1)
    assert all(r["ms"] > 0 for r in results)
