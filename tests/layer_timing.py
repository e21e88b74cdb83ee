"""A narrow layer's own kernels against the separate ops (a GPU-visit aid, no speed claim).

kernels/layer.cu runs a float32 layer of at most 64 inputs and outputs as one kernel
forward (gemm_bias_act) and one backward (layer_backward: D', dW, db, D' W^T and the sum
of its blocks' shares). This times, for narrow's layer (262144 x 64 x 64, ReLU):
- copy:      a 64 MiB device copy (the HBM's rate: a forward layer moves two such, a
             backward four);
- forward:   gemm + bias_act_forward (the separate ops) against gemm_bias_act;
- backward:  act_backward_bias_grad + gemm x^T D' + gemm D' W^T against layer_backward at
             several grids (LAYER_MAX_BLOCKS: the shares to sum, and the blocks an SM).
Each: the median of 5 timings of `reps` launches between CUDA events, after a warm-up; a
part that fails prints its error and the rest go on. What it decides: whether the kernels
stay on (CupyBackend.layer_fits) and LAYER_MAX_BLOCKS (a static rule: the grid sets the
bits, so it cannot be a per-run autotune).

    PYTHONPATH=. python3 tests/layer_timing.py
"""

from __future__ import annotations

import numpy as np

from tests.epilogue_timing import median_ms  # (PYTHONPATH=.: the repository root)

SHAPE = (262144, 64, 64)  # narrow's layer: rows, inputs, outputs
GRIDS = (132, 256, 264, 512, 1024)


def main(be=None, shape=SHAPE, grids=GRIDS, reps: int = 20) -> None:
    """The table on `be` (a CupyBackend; the CPU test passes the host-run kernels')."""
    from gpubp.activations import make_activation
    from gpubp.backend import cupy_backend as C

    be = C.CupyBackend() if be is None else be
    cp, timer, relu = be._cupy, be.timer(), make_activation("relu")
    n, k, m = shape
    rng = np.random.default_rng(0)

    def dev(*shape):
        return be.asarray(rng.normal(size=shape).astype(np.float32))

    x, w, b, d = dev(n, k), dev(k, m), dev(m), dev(n, m)
    a, z, dz, e = dev(n, m), dev(n, m), dev(n, m), dev(n, k)
    grad = be.zeros(k * m + m, np.float32)
    dw, db = grad[: k * m].reshape(k, m), grad[k * m :]
    print(f"{be.describe()}: narrow's layer {n} x {k} x {m}, float32, relu; us per call")

    def forward_separate():
        be.gemm(x, w, out=z)
        be.bias_act_forward(z, b, relu, out=a)

    def backward_separate():
        be.act_backward_bias_grad(d, a, relu, dz, db)
        be.gemm(x, dz, out=dw, trans_a=True)
        be.gemm(dz, w, out=e, trans_b=True)

    parts = [
        ("copy 64 MiB", lambda: cp.copyto(z, a)),
        ("forward: gemm + bias_act_forward", forward_separate),
        ("forward: gemm_bias_act", lambda: be.gemm_bias_act(x, w, b, relu, a)),
        ("backward: act_backward_bias_grad + 2 gemm", backward_separate),
    ]
    for grid in grids:

        def backward(grid=grid):
            C.LAYER_MAX_BLOCKS = grid  # (this process only: a timing aid)
            be.layer_backward(d, a, x, w, relu, grad, e)

        parts.append((f"backward: layer_backward, {grid} blocks", backward))
    blocks = C.LAYER_MAX_BLOCKS
    try:
        for name, fn in parts:
            try:
                print(f"  {name:45s} {1e3 * median_ms(timer, fn, reps):9.1f}", flush=True)
            except Exception as err:  # a GPU-visit aid: one part's failure must not hide the others
                print(f"  {name:45s} failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}", flush=True)
    finally:
        C.LAYER_MAX_BLOCKS = blocks


if __name__ == "__main__":
    main()
