"""The GPU work that compute-sanitizer watches (tests/test_gpu.py::test_compute_sanitizer).

CuPy's memory pool is switched off first: the pool rounds every allocation up to 512
bytes and reuses freed blocks, so a kernel that overruns its array inside a pooled block
writes memory the sanitizer counts as valid. With set_allocator(None) every array is
its own cudaMalloc and the first byte past it is caught.

Covered: every kernel of the backend (KERNELS_USED), a multi-chunk bias gradient
(n >= 2048 rows: partial sums over chunks, then the finishing pass), the batch loss's
mean finished by the loss kernel's last block (1 to 2100 rows), a one-output model
(GEMV products), a batch of one row (GEMV in the other orientation), a residual model,
both optimizers, gradient clipping and the divergence guard of the trainer; the fused MLP
kernel (one block, many tiles a block, its shares summed both ways); the narrow layer's
forward and backward kernels (layer.cu: the float32 models' layers, and ragged shapes: a
partial k stage, a partial row tile, blocks that take several tiles), also on a window of
a split (the training step's first layer); the trainer's steps, which read their batch's
rows where they lie (the regression run: x by the layer kernels, the targets by the loss).
"""

from __future__ import annotations

import os
import sys
import tempfile

import cupy
import numpy as np

cupy.cuda.set_allocator(None)
cupy.cuda.set_pinned_memory_allocator(None)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gpubp  # noqa: E402
from gpubp.activations import make_activation  # noqa: E402
from gpubp.backend import cupy_backend  # noqa: E402
from gpubp.backend.cupy_backend import CupyBackend  # noqa: E402
from gpubp.cli import main  # noqa: E402

be = CupyBackend()
rng = np.random.default_rng(0)
for dtype in (np.float32, np.float64):
    for n, m in [(1, 1), (2049, 3), (5000, 40), (3, 1000)]:  # 2049 rows: 8 chunks of the bias gradient, 5000: 19
        d = be.asarray(rng.normal(size=(n, m)).astype(dtype))
        out = be.empty(m, dtype)
        be.bias_grad(d, out)
        assert np.allclose(be.to_numpy(out), be.to_numpy(d).sum(0), rtol=1e-4, atol=1e-3)

for n, k, m in [(1, 1, 1), (130, 60, 64), (20, 64, 33), (37, 3, 10), (9000, 64, 64)]:
    x, w, b = (be.asarray(rng.normal(size=s).astype(np.float32)) for s in ((n, k), (k, m), m))
    a, z = be.empty((n, m), np.float32), be.empty((n, m), np.float32)
    assert be.gemm_bias_act(x, w, b, make_activation("gelu"), a, z)
    assert np.allclose(be.to_numpy(z), be.to_numpy(x) @ be.to_numpy(w) + be.to_numpy(b), rtol=1e-4, atol=1e-4)
    grad, e = be.empty(k * m + m, np.float32), be.empty((n, k), np.float32)
    gelu = make_activation("gelu")
    assert be.layer_backward(a, z, x, w, gelu, grad, e)  # D = a, f'(z); 9000 rows: blocks of several tiles
    dz = be.to_numpy(be.act_backward(a, z, gelu, be.empty((n, m), np.float32)))
    assert np.allclose(be.to_numpy(grad)[k * m :], dz.sum(0), rtol=1e-3, atol=1e-3)
    assert np.allclose(be.to_numpy(e), dz @ be.to_numpy(w).T, rtol=1e-3, atol=1e-3)
    # the first layer's pair on a window of a split (its rows perm[5 + i]; the split 2 n + 7 rows)
    perm, start = be.asarray(rng.permutation(2 * n + 7).astype(np.int64)), be.asarray(np.array(5, np.int64))
    split = be.asarray(rng.normal(size=(2 * n + 7, k)).astype(np.float32))
    assert be.gemm_bias_act(split, w, b, gelu, a, z, window=(perm, start))
    assert be.layer_backward(a, z, split, w, gelu, grad, None, window=(perm, start))
    assert be.layer_backward(a, z, x, w, gelu, grad, e, e_act=make_activation("relu"))  # E: the D' of a ReLU below
    held = be.empty((be.layer_share_rows(n), k * m + m + 5), np.float32)  # a model's shares: this layer's at 5
    assert be.layer_backward(a, z, x, w, gelu, grad, e, shares=(held, 5))

for sizes, loss, rows, residual in [
    ([4, 16, 1], "mse", 2048, False),  # one output: D' W^T and x^T D' are GEMVs
    ([4, 16, 16, 3], "softmax_cross_entropy", 1, True),  # a batch of one, residual
    ([5, 8, 2], "binary_cross_entropy", 33, False),
    ([5, 8, 4], "huber", 2100, False),
]:
    for dtype in ("float32", "float64"):
        model = gpubp.MLP(sizes, "gelu", loss=loss, dtype=dtype, device="gpu", seed=1, residual=residual)
        opt = gpubp.Adam(model, lr=1e-3) if rows > 1 else gpubp.SGD(model, lr=1e-2, momentum=0.9)
        x = model.as_input(rng.normal(size=(rows, sizes[0])))
        if loss == "softmax_cross_entropy":
            y = rng.integers(0, sizes[-1], size=rows)
        elif loss == "binary_cross_entropy":
            y = rng.uniform(size=(rows, sizes[-1]))
        else:
            y = rng.normal(size=(rows, sizes[-1]))
        y = model.as_target(y, rows)
        for _ in range(3):
            model.forward_backward(x, y)
            opt.step()
        be.synchronize()

# the fused MLP kernel (train.fused_mlp): one block (one row), several tiles a block (300
# rows in tiles of 16 over at most 4 blocks), a partial last tile, the batch read through
# a window, the shares summed by sum_shares and by the guard
cupy_backend.MLP_MAX_BLOCKS = 4
for sizes, loss, rows in [([3, 8, 2], "softmax_cross_entropy", 1), ([6, 64, 64, 1], "mse", 300),
                          ([5, 32, 4], "huber", 77)]:  # fmt: skip
    for dtype in ("float32", "float64"):
        model = gpubp.MLP(sizes, "silu", loss=loss, dtype=dtype, device="gpu", seed=2, fused_mlp=True)
        x = model.as_input(rng.normal(size=(rows, sizes[0])))
        if loss == "softmax_cross_entropy":
            y = rng.integers(0, sizes[-1], size=rows)
        else:
            y = rng.normal(size=(rows, sizes[-1]))
        y = model.as_target(y, rows)
        assert model.fused_mlp_fits(rows)
        model.forward_backward(x, y)  # the shares summed by sum_shares
        order, start = be.asarray(rng.permutation(rows)), be.zeros((), np.int64)
        loss_value = model.forward_backward_rows(x, y, order, start, rows)  # left in shares: the guard sums them
        scalar = lambda dt: be.zeros((), dt)  # noqa: E731
        be.step_guard_norm(loss_value, model.flat_grads, scalar(model.dtype), 0, 1.0, scalar(np.int64) - 1,
                           scalar(np.bool_), scalar(model.dtype), scalar(model.dtype), shares=model.grad_shares)  # fmt: skip
        be.synchronize()

# the whole trainer: clipping, the guard, evaluation, accuracy, checkpoints
with tempfile.TemporaryDirectory() as tmp:
    for config, extra in [("configs/spirals.toml", ["optimizer.clip_grad_norm=1.0"]),
                          ("configs/regression.toml", ["train.batch_size=2500", "data.n_samples=4000"])]:  # fmt: skip
        args = ["train", "--config", config, "--device", "gpu", "--quiet", "--out", os.path.join(tmp, config[8:12]),
                "--set", "train.steps=6", "--set", "train.eval_every=3"]  # fmt: skip
        for e in extra:
            args += ["--set", e]
        try:
            main(args, standalone_mode=False)
        except SystemExit as e:
            assert e.code in (0, None), e.code
print("sanitize child: ok")
