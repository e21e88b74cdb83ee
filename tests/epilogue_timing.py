"""Which backward product pays, per shape and precision (a GPU-visit aid, no speed claim).

On an H100 (2026-11-26) the fused backward product of a ReLU layer (cuBLASLt DRELU_BGRAD:
D'_{k-1} = (D' W^T) * mask and its bias gradient in the GEMM's epilogue) took 564 us a
layer of wide's bf16 step (8192 x 4096 x 4096) where the forward products, RELU_AUX_BIAS,
took 392 (about a plain GEMM's time), while on narrow it paid (fused x 1.18). This times,
for the bench cases' layer shapes, each way of that layer's backward work:
- plain:     gemm D' W^T alone (the floor);
- fused:     gemm_drelu_bias_grad (DRELU_BGRAD);
- unfused:   gemm, then act_backward_bias_grad (relu' and the bias gradient in one pass:
             the model's unfused backward since 2026-11-27);
- 2 kernels: gemm, act_backward (relu), bias_grad: the unfused backward before;
- drelu:     cuBLASLt DRELU alone (the mask applied in the epilogue, no bias gradient),
             then bias_grad: the epilogue without its reduction;
and the forward layer: gemm + bias_act_forward against gemm_bias_relu (RELU_AUX_BIAS) and
against cuBLASLt's RELU_BIAS (the same output, no mask: a backward that reads relu' from
the output would not need one; float32's fused forward took 2.4x its plain GEMMs on
narrow, and whether the mask or the epilogue costs it decides what float32 can fuse).
Each: the median of 5 timings of `reps` launches between CUDA events, after a warm-up.
It decides a static rule (which product where), measured once, as BIAS_GRAD_MAX_CHUNKS
was: results differ in their bits, so the choice cannot be a per-run autotune.

    PYTHONPATH=. python3 tests/epilogue_timing.py
"""

from __future__ import annotations

import numpy as np

SHAPES = {"narrow": (262144, 64, 64), "mnist-1024": (1024, 512, 512), "wide": (8192, 4096, 4096)}
EPILOGUE_DRELU = 136  # cublasLtEpilogue_t CUBLASLT_EPILOGUE_DRELU: DRELU (8) | AUX (128)
EPILOGUE_RELU_BIAS = 6  # CUBLASLT_EPILOGUE_RELU_BIAS: RELU (2) | BIAS (4), no mask


def median_ms(timer, fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(5):
        timer.start()
        for _ in range(reps):
            fn()
        times.append(timer.stop() / reps)
    return float(np.median(times))


def time_shape(be, precision: str, store, m: int, k: int, n: int) -> list[str]:
    """The ways' times of one layer shape (see the module docstring), as printed cells."""
    from gpubp import precision as PR
    from gpubp.activations import make_activation
    from gpubp.backend import cublaslt
    from gpubp.backend.cupy_backend import _CUDA_TYPE
    from gpubp.backend.numpy_ops import relu_mask_bytes

    cp, timer, relu = be._cupy, be.timer(), make_activation("relu")
    reps = max(1, int(2e9 / (2 * m * k * n)))  # about 2 GFLOP between the events
    rng = np.random.default_rng(0)

    def dev(shape, dtype=store):
        host = rng.normal(size=shape).astype(np.float32)
        if dtype == PR.BF16:
            out = np.empty(shape, PR.BF16)
            PR.store(host, out)
            return cp.asarray(out)
        return cp.asarray(host.astype(dtype))

    # backward: D' (m, n) W^T, W (k, n) -> (m, k), with the layer below's mask (m, k bits)
    d, w, out, saved = dev((m, n)), dev((k, n)), dev((m, k)), dev((m, k))
    mask = cp.asarray(rng.integers(0, 256, (m, relu_mask_bytes(k)), dtype=np.uint8))
    db = cp.zeros(k, store if precision == "bf16" else np.float32)
    db32 = cp.zeros(k, np.float32)
    lt, stream = be._lt(), cp.cuda.get_current_stream().ptr
    align = lambda x: cublaslt.alignment(x.data.ptr)  # noqa: E731
    # DRELU alone: cublaslt.row_major_plan's mapping (cuBLASLt's A is w, its B is d), no bias
    drelu = lt.plan(m=k, n=m, k=n, lda=n, trans_a=True, ldb=n, trans_b=False, ldd=k, epilogue=EPILOGUE_DRELU,
                    aligns=(align(w), align(d), align(out)), mask_ptr=mask.data.ptr, mask_ld=mask.shape[1] * 8,
                    data_type=_CUDA_TYPE[store], d_type=_CUDA_TYPE[store])  # fmt: skip

    def drelu_only():
        if drelu is None or not drelu.run(w.data.ptr, d.data.ptr, out.data.ptr, stream):
            raise RuntimeError("no DRELU algorithm")
        be.bias_grad(out, out=db32)

    # forward: x (m, k) W (k, n) + b -> (m, n)
    x, wf, z = dev((m, k)), dev((k, n)), dev((m, n))
    bias = cp.zeros(n, store if precision == "bf16" else np.float32)
    bias32, fmask = cp.zeros(n, np.float32), cp.zeros((m, relu_mask_bytes(n)), np.uint8)

    def fwd_relu_bias():  # row_major_plan's mapping as drelu's: cuBLASLt's A is wf, its B is x
        plan = cublaslt.row_major_plan(lt, x, wf, z, bias, None, EPILOGUE_RELU_BIAS, False, False, False,
                                       lambda a: a.data.ptr, _CUDA_TYPE[store], None, _CUDA_TYPE[bias.dtype])  # fmt: skip
        if plan is None or not plan.run(wf.data.ptr, x.data.ptr, z.data.ptr, stream):
            raise RuntimeError("no RELU_BIAS algorithm")

    ways = {
        "plain": lambda: be.gemm(d, w, out, trans_b=True),
        "fused": lambda: be.gemm_drelu_bias_grad(d, w, mask, out, db, trans_b=True),
        "unfused": lambda: (
            be.gemm(d, w, out, trans_b=True),
            be.act_backward_bias_grad(out, saved, relu, out, db32),
        ),  # fmt: skip
        "2 kernels": lambda: (
            be.gemm(d, w, out, trans_b=True),
            be.act_backward(out, saved, relu, out),
            be.bias_grad(out, out=db32),
        ),  # fmt: skip
        "drelu": drelu_only,
        "fwd unfused": lambda: (be.gemm(x, wf, z), be.bias_act_forward(z, bias32, relu, z)),
        "fwd fused": lambda: be.gemm_bias_relu(x, wf, bias, z, fmask),
        "fwd relu-bias": fwd_relu_bias,
    }
    cells = []
    for name, fn in ways.items():
        try:
            cells.append(f"{name} {1e3 * median_ms(timer, fn, reps):8.1f}")
        except Exception as e:  # noqa: BLE001 (a probe: say what failed, go on)
            cells.append(f"{name} failed ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:60]})")
    return cells


def main() -> None:
    from gpubp import precision as PR
    from gpubp.backend.cupy_backend import CupyBackend

    be = CupyBackend()
    for precision, store in (("float32", np.dtype(np.float32)), ("bf16", PR.BF16)):
        for case, (m, k, n) in SHAPES.items():
            cells = time_shape(be, precision, store, m, k, n)
            print(f"{precision:7s} {case:10s} {m}x{k}x{n} us: " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
