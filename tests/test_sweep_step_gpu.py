"""The captured sweep step on the GPU (marked gpu: skipped without a CUDA device).

A sweep whose step is a replayed CUDA graph must equal the same sweep with
train.cuda_graph = false bitwise: the graph replays the same kernels on the same
buffers, and every per-step number (learning rates, bias corrections, the batch's
position, the frozen models) is read from device memory (gpubp/sweep_step.py).
tests/test_sweep_step.py checks the same on the CPU with the recording backend."""

from __future__ import annotations

import numpy as np
import pytest

from .test_sweep_step import CASES, _sweep, assert_same_sweep

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("case", list(CASES))
def test_graph_sweep_equals_the_plain_sweep_bitwise(gpu, tmp_path, case):
    """200 steps, two batch shapes; grid lr x seed x wd (SGD-momentum, AdamW), warmup +
    cosine, clipping, one shared seed, early stopping, a diverging member."""
    extra = "early_stopping_patience = 1\neval_every = 5\n" if case == "adamw-early-stop" else ""
    captured, a = _sweep(tmp_path, case, "gpu", "graph", extra)
    assert captured.graph_note is None
    assert captured.step_fn.captures == len(captured.step_fn.capturer.graphs) == 2  # 32 and 21 rows
    plain, b = _sweep(tmp_path, case, "gpu", "plain", extra + "cuda_graph = false\n")
    assert plain.graph_note == "train.cuda_graph = false" and plain.step_fn.captures == 0
    assert_same_sweep(a, b, len(captured.step_fn.g.members))
    if case == "sgd-diverging-member":
        assert captured.summary["diverged"] == plain.summary["diverged"] == [1]


def test_batched_ops_into_buffers_equal_numpy(gpu):
    """index_window_batched, and the batched loss and squared norms written into (M,)
    buffers, against numpy_stacked (the loss to float32 rounding: a different summation
    order; the window and the norms' inputs exactly)."""
    import cupy

    from gpubp.backend import get_backend
    from gpubp.backend import numpy_stacked as S
    from gpubp.losses import make_loss

    be = get_backend("gpu")
    rng = np.random.default_rng(0)
    perm = rng.permutation(4 * 50).reshape(4, 50).astype(np.int64)
    out = cupy.zeros((4, 9), np.int64)
    be.index_window_batched(cupy.asarray(perm), cupy.asarray(np.int64(37)), out)
    np.testing.assert_array_equal(cupy.asnumpy(out), perm[:, 37:46])
    x = rng.standard_normal((4, 300, 5)).astype(np.float32)
    y = rng.integers(0, 5, 300).astype(np.int32)
    loss = make_loss("softmax_cross_entropy", 0.0, 1.0)
    buf, grad = cupy.zeros(4, np.float32), cupy.zeros(x.shape, np.float32)
    assert be.loss_forward_backward_batched(cupy.asarray(x), cupy.asarray(y), loss, grad=grad, out=buf) is buf
    ref = S.loss_forward_backward_batched(x, y, loss, grad=np.zeros_like(x))
    np.testing.assert_allclose(cupy.asnumpy(buf), ref, rtol=1e-5, atol=1e-6)  # float32 sums in another order
    returned = be.loss_forward_backward_batched(cupy.asarray(x), cupy.asarray(y), loss, grad=grad)
    np.testing.assert_array_equal(cupy.asnumpy(returned), cupy.asnumpy(buf))  # the same kernels: the same bits
    g = cupy.asarray(rng.standard_normal((4, 70)).astype(np.float32))
    sq = cupy.zeros(4, np.float32)
    be.sum_squares_batched(g, out=sq)
    np.testing.assert_array_equal(cupy.asnumpy(sq), cupy.asnumpy(be.sum_squares_batched(g)))


def test_the_benchs_sequential_graphs_equal_their_plain_steps(gpu):
    """The bench's sequential_graph variant (M single runs' trainer Steps, each a CUDA graph
    of its own) trains what the same Steps train uncaptured, bitwise, over 20 steps (2.5
    epochs); tests/test_sweep_bench.py checks it on the CPU against eager single runs."""
    from gpubp import sweep_bench as S
    from gpubp.backend import get_backend

    be = get_backend("gpu")
    case = S.SweepCase("t", 3, [5, 8, 4], 16)
    graph, plain = S.sequential_graph_step(case, be, graph=True), S.sequential_graph_step(case, be, graph=False)
    for _ in range(20):
        graph()
        plain()
    for g, p in zip(graph.steps, plain.steps):
        assert g.captures == len(g.capturer.graphs) == 1 and p.captures == 0
        np.testing.assert_array_equal(be.to_numpy(g.model.flat_params), be.to_numpy(p.model.flat_params))
