"""The fused MLP kernel (kernels/mlp.cu) on a GPU, against the NumPy reference (marked
gpu: skipped without a CUDA device). tests/test_mlp_fused.py runs the same kernel on the
host; here it is the GPU's own memory model (the last block's fences), its FMA
contraction and -ftz=true. The tolerance is test_mlp_fused's formula (an FMA rounds once
where a product and a sum round twice: inside the bound), plus the smallest normal float
for a flushed subnormal."""

from __future__ import annotations

import numpy as np
import pytest

import gpubp.trainer as T
from gpubp.config import load_config

from .test_mlp_fused import CASES, assert_close, every_tile_instance, problem, reference

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def be():
    from gpubp.backend.cupy_backend import CupyBackend

    return CupyBackend()


def run_kernel(be, sizes, acts, loss, params, x, y):
    """(loss, gradient) of the kernel on the GPU, on the host."""
    cp = be.xp
    g = cp.full(params.size, cp.nan, x.dtype)
    out = cp.full((), cp.nan, x.dtype)
    shares = be.mlp_forward_backward(cp.asarray(x), cp.asarray(y), cp.asarray(params), g, sizes, acts, loss, out)
    assert shares is not None
    be.sum_shares(shares, g)
    return float(out.get()), g.get()


LARGE = [([64, 64, 64, 64, 64, 64, 1], "relu", "mse", 20000, "identity"),  # many tiles a block (32 rows)
         ([64] * 6, "relu", "mse", 8192, "identity"),  # narrow's network: 64-row tiles, 4 x 4 register tiles, 147 KiB
         ([64, 128, 10], "relu", "softmax_cross_entropy", 4096, "identity")]  # fmt: skip


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_kernel_matches_the_reference_on_the_gpu(be, dtype):
    rng = np.random.default_rng(0)
    for sizes, act, loss_name, n, output in CASES + LARGE:
        acts, loss, params, x, y = problem(rng, sizes, act, loss_name, n, dtype, output)
        v_ref, g_ref = reference(sizes, acts, loss, params, x, y)
        v, g = run_kernel(be, sizes, acts, loss, params, x, y)
        tiny = float(np.finfo(np.float32).tiny)  # -ftz=true flushes float32 subnormals to 0
        assert_close(np.asarray(v), np.asarray(v_ref), sizes, n, dtype, (sizes, act, loss_name, "loss"), tiny)
        assert_close(g, g_ref, sizes, n, dtype, (sizes, act, loss_name, "gradient"), tiny)


def test_the_kernel_repeats_bitwise_on_the_gpu(be):
    """Whichever block finishes last, the loss's mean and the shares' sum are the same bits."""
    rng = np.random.default_rng(1)
    sizes, act, loss_name, n, output = LARGE[0]
    args = problem(rng, sizes, act, loss_name, n, np.float32, output)
    first = run_kernel(be, sizes, *args)
    for _ in range(5):
        again = run_kernel(be, sizes, *args)
        assert again[0] == first[0] and again[1].tobytes() == first[1].tobytes()


def test_every_tile_instance_gives_the_same_bits_on_the_gpu(be, monkeypatch):
    """The products' instances (rows and columns a thread 1, 2, 4: MLP_TILE_CALL) as the GPU
    compiles them: each element summed in the same order, contracted to the same FMAs,
    so the same bits at every pair, as on the host."""
    every_tile_instance(lambda sizes, args: run_kernel(be, sizes, *args), monkeypatch)


def test_resident_weights_give_the_per_tile_bits_on_the_gpu(be, monkeypatch):
    """The weights staged once per block (MLP_RESIDENT_WEIGHTS, where this GPU's shared
    memory holds them beside the tile: an H100's does for both networks) and once per tile
    and product: the same sums in the same order, the same bits."""
    from gpubp.backend import cupy_backend

    rng = np.random.default_rng(2)
    for sizes, act, loss_name, n, output in LARGE[:2]:
        args = problem(rng, sizes, act, loss_name, n, np.float32, output)
        got = []
        for resident in (True, False):
            monkeypatch.setattr(cupy_backend, "MLP_RESIDENT_WEIGHTS", resident)
            v, g = run_kernel(be, sizes, *args)
            got.append((v, g.tobytes()))
        assert got[0] == got[1], sizes


def test_a_fused_run_trains_as_the_unfused_one(gpu):
    """digits, 300 steps: train.fused_mlp = true (captured) against the default products;
    the same accuracy within 2 points (different summation orders, the same training)."""
    acc = {}
    for fused in ("true", "false"):
        cfg = load_config(None, ["data.dataset=digits", "model.hidden=[64, 64]", "train.steps=300", "train.seed=0",
                                 "train.eval_every=100", f"train.fused_mlp={fused}"])  # fmt: skip
        trainer = T.Trainer(cfg, None, device="gpu", quiet=True)
        summary = trainer.train()
        acc[fused] = summary["test_accuracy"]  # 450 rows: a point is 4.5 of them
    assert abs(acc["true"] - acc["false"]) <= 0.02, acc
