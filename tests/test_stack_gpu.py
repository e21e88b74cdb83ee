"""The stacked GPU ops (cuBLAS strided-batched GEMM, row kernels over M*N rows, the
elementwise stacked updates) against the NumPy stack, and model i of a GPU stack
against a single GPU MLP with its settings. Marked gpu: skipped without a CUDA device.

Tolerance: float64, |gpu - ref| <= 1e-12 (|ref| + 1) after 200 steps: cuBLAS and the
CPU's BLAS add products in different orders, and the GPU kernels may fuse a*b+c, so
bits differ while the rounding error stays a few hundred ulps of the values.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpubp.model import MLP
from gpubp.optim import make_optimizer
from gpubp.stack import MLPStack, clip_scale_batched, make_stack_optimizer

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu():
    from gpubp.backend import gpu_unavailable_reason

    reason = gpu_unavailable_reason()
    if reason:
        pytest.skip(reason)
    from gpubp.backend.cupy_backend import CupyBackend

    return CupyBackend()


def _close(a, b, what):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.max(np.abs(a - b) / (np.abs(b) + 1.0))
    assert err <= 1e-12, f"{what}: relative error {err:.3g}"


@pytest.mark.parametrize("opt_name, residual", [("sgd", False), ("adamw", True)])
def test_gpu_stack_equals_cpu_stack_and_single_gpu_models(gpu, opt_name, residual):
    from gpubp.backend import get_backend

    cpu = get_backend("cpu")
    sizes = [12, 16, 16, 5]
    m = 6
    settings = dict(lr=[0.01 * (i + 1) for i in range(m)], weight_decay=[0.0, 1e-3] * (m // 2))
    if opt_name == "sgd":
        settings["momentum"] = 0.9
    kw = dict(activation="gelu", loss="softmax_cross_entropy", dtype="float64", residual=residual)
    stacks = [MLPStack(sizes, m, seed=list(range(m)), backend=be, **kw) for be in (gpu, cpu)]
    opts = [make_stack_optimizer(s, opt_name, **settings) for s in stacks]
    singles = [MLP(sizes, seed=i, backend=gpu, **kw) for i in range(m)]
    sopts = [make_optimizer(s, opt_name, **{k: (v[i] if isinstance(v, list) else v) for k, v in settings.items()})
             for i, s in enumerate(singles)]  # fmt: skip
    rng = np.random.default_rng(0)
    clip = np.array([0.0, 1.0] * (m // 2))
    for _ in range(200):
        x = rng.standard_normal((m, 32, sizes[0]))
        y = rng.integers(0, sizes[-1], (m, 32)).astype(np.int32)
        losses = []
        for s, o in zip(stacks, opts):
            loss = s.forward_backward(s.as_input(x), s.as_target(y, 32))
            _, scale = clip_scale_batched(s.backend, s.flat_grads, s.backend.asarray(clip))
            o.step(grad_scale=scale, skip=s.backend.asarray(np.array([False] * m)))
            losses.append(s.backend.to_numpy(loss))
        _close(losses[0], losses[1], "losses")
        for i, (s, o) in enumerate(zip(singles, sopts)):
            s.forward_backward(s.as_input(x[i]), s.as_target(y[i], 32))
            from gpubp.optim import clip_scale

            scale = clip_scale(gpu, s.flat_grads, clip[i])[1] if clip[i] > 0 else 1.0
            o.step(grad_scale=scale)
    p_gpu, p_cpu = gpu.to_numpy(stacks[0].flat_params), stacks[1].flat_params
    _close(p_gpu, p_cpu, "GPU stack vs CPU stack")
    for i, s in enumerate(singles):
        _close(p_gpu[i], gpu.to_numpy(s.flat_params), f"model {i} vs single GPU model")


def test_gpu_batched_ops_match_numpy(gpu):
    from gpubp.backend import numpy_stacked as S
    from gpubp.losses import make_loss

    rng = np.random.default_rng(1)
    for dtype in (np.float64, np.float32):
        tol = 1e-12 if dtype == np.float64 else 1e-5
        flat = rng.standard_normal((5, 7 * 9 + 40)).astype(dtype)
        w = flat[:, :63].reshape(5, 7, 9)  # a strided view, as the stack's W_k
        a = rng.standard_normal((5, 11, 7)).astype(dtype)
        out = np.empty((5, 11, 9), dtype)
        S.gemm_batched(a, w, out)
        gflat = gpu.asarray(flat)
        gout = gpu.empty((5, 11, 9), dtype)
        gpu.gemm_batched(gpu.asarray(a), gflat[:, :63].reshape(5, 7, 9), gout)
        np.testing.assert_allclose(gpu.to_numpy(gout), out, rtol=tol, atol=tol * 10)
        db, gdb = np.empty((5, 9), dtype), gpu.empty((5, 9), dtype)
        S.bias_grad_batched(out, db)
        gpu.bias_grad_batched(gout, gdb)
        np.testing.assert_allclose(gpu.to_numpy(gdb), db, rtol=tol, atol=tol * 10)
        labels = rng.integers(0, 9, 11).astype(np.int32)  # shared by the models
        spec = make_loss("softmax_cross_entropy", 0.1)
        g, gg = np.empty_like(out), gpu.empty(out.shape, dtype)
        v = S.loss_forward_backward_batched(out, labels, spec, g)
        gv = gpu.loss_forward_backward_batched(gout, gpu.asarray(labels), spec, gg)
        np.testing.assert_allclose(gpu.to_numpy(gv), v, rtol=tol)
        np.testing.assert_allclose(gpu.to_numpy(gg), g, rtol=tol, atol=tol)
        acc = gpu.to_numpy(gpu.accuracy_count_batched(gout, gpu.asarray(labels)))
        np.testing.assert_array_equal(acc, S.accuracy_count_batched(out, labels))
        np.testing.assert_allclose(gpu.to_numpy(gpu.sum_squares_batched(gflat)), S.sum_squares_batched(flat), rtol=tol)


def test_gpu_step_guard_norm_batched_matches_numpy(gpu):
    """The squared norms and the verdicts of M models in one launch (a block per model):
    model 1 has a NaN gradient, model 3 is frozen, model 2 clips, P spans several strides
    of the block. grad_sq within the sum's rounding bound; the verdicts exact; norm and
    scale a sqrt and a division of it."""
    from gpubp.backend import numpy_stacked as S

    rng = np.random.default_rng(12)
    for dtype in (np.float32, np.float64):
        m, p = 4, 1000
        g = rng.normal(size=(m, p)).astype(dtype)
        g[1, 17] = np.nan
        loss = np.array([0.5, 1.0, 2.0, 1.0], dtype)
        max_norm, frozen = np.array([1e3, 0.0, 1.0, 0.5], dtype), np.array([False, False, False, True])
        outs = [np.zeros(m, dtype), np.full(m, -1, np.int64), np.empty(m, bool), np.empty(m, dtype),
                np.empty(m, dtype)]  # fmt: skip
        S.step_guard_norm_batched(loss, g, outs[0], 3, max_norm, frozen, *outs[1:])
        douts = [gpu.zeros(m, dtype), gpu.asarray(np.full(m, -1, np.int64)), gpu.zeros(m, np.bool_),
                 gpu.zeros(m, dtype), gpu.zeros(m, dtype)]  # fmt: skip
        gpu.step_guard_norm_batched(gpu.asarray(loss), gpu.asarray(g), douts[0], 3, gpu.asarray(max_norm),
                                    gpu.asarray(frozen), *douts[1:])  # fmt: skip
        got = [gpu.to_numpy(a) for a in douts]
        np.testing.assert_array_equal(got[1], outs[1])
        np.testing.assert_array_equal(got[2], outs[2])
        eps = float(np.finfo(dtype).eps)
        ok = ~np.isnan(outs[0])
        bound = 2 * p * eps * (g[ok].astype(np.float64) ** 2).sum(1)  # any order's rounding of p squares
        assert np.isnan(got[0][1]) and (np.abs(got[0][ok] - outs[0][ok]) <= bound).all()
        np.testing.assert_allclose(got[3][ok], outs[3][ok], rtol=2 * p * eps)
        np.testing.assert_allclose(got[4], outs[4], rtol=2 * p * eps)
