"""A narrow layer's own kernels against the separate ops (a GPU-visit aid, no speed claim).

kernels/layer.cu runs a float32 layer of at most 64 inputs and outputs as one kernel
forward (gemm_bias_act) and one backward (layer_backward: D', dW, db, D' W^T and the sum
of its blocks' shares); kernels/layer_tc.cu the same for bf16 on the tensor cores. This
times, for narrow's layer (262144 x 64 x 64, ReLU):
- copy:      a device copy of the (262144, 64) matrix (the HBM's rate: a forward layer moves
             two such, a backward four);
- forward:   float32: gemm + bias_act_forward (the separate ops); bf16: gemm_bias_relu
             (cuBLASLt's RELU_AUX_BIAS, the default before layer_tc.cu); against gemm_bias_act;
- backward:  float32: act_backward_bias_grad + gemm x^T D' + gemm D' W^T; bf16:
             gemm_bias_grad (BGRADA: x^T D' and db) + gemm_drelu_bias_grad (D' W^T with the
             layer below's ReLU' and db); against layer_backward at several grids
             (LAYER_MAX_BLOCKS: the shares to sum, and the blocks an SM).
Each: the median of 5 timings of `reps` launches between CUDA events, after a warm-up; a
part that fails prints its error and the rest go on. What it decides: whether the kernels
stay on (CupyBackend.layer_fits, per dtype) and LAYER_MAX_BLOCKS (a static rule: the grid
sets the bits, so it cannot be a per-run autotune).

    PYTHONPATH=. python3 tests/layer_timing.py
"""

from __future__ import annotations

import numpy as np

from tests.epilogue_timing import median_ms  # (PYTHONPATH=.: the repository root)

SHAPE = (262144, 64, 64)  # narrow's layer: rows, inputs, outputs
GRIDS = (132, 256, 264, 512, 1024)


def main(be=None, shape=SHAPE, grids=GRIDS, reps: int = 20, dtypes=("float32", "bf16")) -> None:
    """The tables on `be` (a CupyBackend; the CPU test passes the host-run kernels')."""
    from gpubp.backend import cupy_backend as C

    be = C.CupyBackend() if be is None else be
    rng = np.random.default_rng(0)
    for name in dtypes:
        table(be, name, shape, grids, reps, rng)


def table(be, name: str, shape, grids, reps: int, rng) -> None:
    """One precision's table (float32 or bf16 storage)."""
    from gpubp import precision as PR
    from gpubp.activations import make_activation
    from gpubp.backend import cupy_backend as C
    from gpubp.backend.numpy_ops import relu_mask_bytes

    cp, timer, relu = be._cupy, be.timer(), make_activation("relu")
    n, k, m = shape
    dt = PR.get_precision(name).store_dtype

    def dev(*shape, dt=dt):
        host = np.empty(shape, dt)
        PR.store(rng.normal(size=shape).astype(np.float32), host)
        return be.asarray(host)

    x, w, d, a, z, dz, e = dev(n, k), dev(k, m), dev(n, m), dev(n, m), dev(n, m), dev(n, m), dev(n, k)
    b = dev(m, dt=np.float32)
    grad = be.zeros(k * m + m, np.float32)
    dw, db = grad[: k * m].reshape(k, m), grad[k * m :]
    mask, mask_below = be.zeros((n, relu_mask_bytes(m)), np.uint8), be.zeros((n, relu_mask_bytes(k)), np.uint8)
    db_below = be.zeros(k, dt)  # (cuBLASLt: a bf16 out's bias gradient is bf16)
    print(f"{be.describe()}: narrow's layer {n} x {k} x {m}, {name}, relu; us per call")

    def forward_separate():
        be.gemm(x, w, out=z)
        be.bias_act_forward(z, b, relu, out=a)

    def backward_separate():
        be.act_backward_bias_grad(d, a, relu, dz, db)
        be.gemm(x, dz, out=dw, trans_a=True)
        be.gemm(dz, w, out=e, trans_b=True)

    def backward_lt():  # dW, db of this layer; D' W^T masked by the layer below's ReLU, and its db
        be.gemm_bias_grad(x, d, dw, db, trans_a=True)
        be.gemm_drelu_bias_grad(d, w, mask_below, e, db_below, trans_b=True)

    low = dt != np.float32
    parts = [
        (f"copy {n * m * np.dtype(dt).itemsize >> 20} MiB", lambda: cp.copyto(z, a)),
        ("forward: gemm_bias_relu (cuBLASLt)", lambda: be.gemm_bias_relu(x, w, b, a, mask))
        if low else ("forward: gemm + bias_act_forward", forward_separate),
        ("forward: gemm_bias_act", lambda: be.gemm_bias_act(x, w, b, relu, a)),
        ("backward: gemm_bias_grad + gemm_drelu_bias_grad", backward_lt)
        if low else ("backward: act_backward_bias_grad + 2 gemm", backward_separate),
    ]  # fmt: skip
    for grid in grids:

        def backward(grid=grid):
            C.LAYER_MAX_BLOCKS = grid  # (this process only: a timing aid)
            be.layer_backward(d, a, x, w, relu, grad, e)

        parts.append((f"backward: layer_backward, {grid} blocks", backward))
    blocks = C.LAYER_MAX_BLOCKS
    try:
        for part, fn in parts:
            try:
                print(f"  {part:50s} {1e3 * median_ms(timer, fn, reps):9.1f}", flush=True)
            except Exception as err:  # a GPU-visit aid: one part's failure must not hide the others
                print(f"  {part:50s} failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}", flush=True)
    finally:
        C.LAYER_MAX_BLOCKS = blocks


if __name__ == "__main__":
    main()
