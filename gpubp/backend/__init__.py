"""Backends: one object carries the array module (`xp`), memory helpers and the op set.

`NumpyBackend` is the reference and runs anywhere. `CupyBackend`
(gpubp/backend/cupy_backend.py) implements the same names with our CUDA kernels and
cuBLAS. Nothing above this package imports cupy.
"""

from __future__ import annotations

import numpy as np

from ..errors import DeviceError
from . import cpu_kernels, numpy_ops, numpy_stacked

DEVICES = ("auto", "cpu", "gpu")


class NumpyBackend:
    """The CPU backend: NumPy arrays, the reference ops of numpy_ops."""

    name = "cpu"
    xp = np
    optimizer_scratch_rows = 2  # the NumPy updates work in two preallocated rows
    # the fused products (gemm_bias, gemm_bias_relu, gemm_drelu_bias_grad, gemm_bias_grad)
    # are a model's default only on the GPU, where they save passes over memory; here they
    # are the same NumPy ops (plus a mask), so a model uses them only when asked
    # (MLP(gemm_epilogues=True): the tests)
    gemm_epilogues = False
    epilogue_note = "the NumPy backend runs the unfused ops (the same arithmetic)"

    # ops: the same names on every backend (see numpy_ops for shapes and formulas)
    gemm = staticmethod(numpy_ops.gemm)
    bias_act_forward = staticmethod(numpy_ops.bias_act_forward)
    act_backward = staticmethod(numpy_ops.act_backward)
    bias_grad = staticmethod(numpy_ops.bias_grad)
    act_backward_bias_grad = staticmethod(numpy_ops.act_backward_bias_grad)
    gemm_bias = staticmethod(numpy_ops.gemm_bias)
    gemm_bias_relu = staticmethod(numpy_ops.gemm_bias_relu)
    gemm_drelu_bias_grad = staticmethod(numpy_ops.gemm_drelu_bias_grad)
    gemm_bias_grad = staticmethod(numpy_ops.gemm_bias_grad)
    # a narrow layer's forward and backward, one op each: the GPU's own kernels
    # (kernels/layer.cu), which a model calls where the backend's layer_fits takes the layer
    # (this backend has no layer_fits: the same arithmetic as the separate ops)
    gemm_bias_act = staticmethod(numpy_ops.gemm_bias_act)
    layer_backward = staticmethod(numpy_ops.layer_backward)
    loss_forward_backward = staticmethod(numpy_ops.loss_forward_backward)
    accuracy_count = staticmethod(numpy_ops.accuracy_count)
    sgd_step = staticmethod(numpy_ops.sgd_step)
    adam_step = staticmethod(numpy_ops.adam_step)
    sum_squares = staticmethod(numpy_ops.sum_squares)
    step_guard = staticmethod(numpy_ops.step_guard)
    step_guard_norm = staticmethod(numpy_ops.step_guard_norm)
    # mixed precision (gpubp/precision.py): storage conversions, the residual sum, fp16's guard
    cast = staticmethod(numpy_ops.cast)
    add = staticmethod(numpy_ops.add)
    step_guard_scaled = staticmethod(numpy_ops.step_guard_scaled)
    step_guard_scaled_norm = staticmethod(numpy_ops.step_guard_scaled_norm)
    # the whole forward and backward pass as one op (MLP(fused_mlp=True); one kernel on the GPU)
    mlp_forward_backward = staticmethod(numpy_ops.mlp_forward_backward)
    sum_shares = staticmethod(numpy_ops.sum_shares)
    gather_rows = staticmethod(numpy_ops.gather_rows)
    gather_windows = staticmethod(numpy_ops.gather_windows)
    select_rows = staticmethod(numpy_ops.select_rows)
    index_window = staticmethod(numpy_ops.index_window)
    update_vectors = staticmethod(numpy_ops.update_vectors)
    step_advance = staticmethod(numpy_ops.step_advance)
    # the same ops over a leading model axis (gpubp.stack; see numpy_stacked)
    gemm_batched = staticmethod(numpy_stacked.gemm_batched)
    bias_act_forward_batched = staticmethod(numpy_stacked.bias_act_forward_batched)
    bias_grad_batched = staticmethod(numpy_stacked.bias_grad_batched)
    loss_forward_backward_batched = staticmethod(numpy_stacked.loss_forward_backward_batched)
    accuracy_count_batched = staticmethod(numpy_stacked.accuracy_count_batched)
    sum_squares_batched = staticmethod(numpy_stacked.sum_squares_batched)
    step_guard_norm_batched = staticmethod(numpy_stacked.step_guard_norm_batched)
    index_window_batched = staticmethod(numpy_stacked.index_window_batched)
    sgd_step_batched = staticmethod(numpy_stacked.rounded(numpy_stacked.sgd_step_batched))
    adam_step_batched = staticmethod(numpy_stacked.rounded(numpy_stacked.adam_step_batched))

    # what this backend raises when its memory runs out; the trainer turns these into
    # DeviceRuntimeError with the batch size and the memory needed
    out_of_memory_errors = (MemoryError,)

    def describe(self) -> str:
        return f"cpu (NumPy {np.__version__})"

    @staticmethod
    def mlp_fits(sizes, activations, dtype, n: int) -> bool:
        """Whether mlp_forward_backward runs: always here (the reference takes any network)."""
        return True

    def asarray(self, a, dtype=None):
        """A contiguous backend array holding a copy of (or a view on) host data."""
        return np.ascontiguousarray(a, dtype=dtype)

    def to_numpy(self, a) -> np.ndarray:
        return np.asarray(a)

    def to_float(self, a) -> float:
        return float(a)

    def empty(self, shape, dtype):
        return np.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype):
        return np.zeros(shape, dtype=dtype)

    def synchronize(self) -> None:
        pass

    def timer(self) -> HostTimer:
        """A stopwatch for device work (here: the host clock, as NumPy runs synchronously)."""
        return HostTimer()

    def memory_reset(self) -> None:
        """Start tracking the peak of memory allocated for arrays (tracemalloc on the CPU)."""
        import tracemalloc

        if tracemalloc.is_tracing():
            tracemalloc.stop()
        tracemalloc.start()

    def memory_peak(self) -> int:
        """Peak bytes allocated since memory_reset()."""
        import tracemalloc

        peak = tracemalloc.get_traced_memory()[1] if tracemalloc.is_tracing() else 0
        tracemalloc.stop()
        return peak


class HostTimer:
    """start() ... stop() -> milliseconds, by the host's monotonic clock."""

    def start(self) -> None:
        import time

        self._t0 = time.perf_counter()

    def stop(self) -> float:
        import time

        return (time.perf_counter() - self._t0) * 1e3


_CPU = NumpyBackend()
_GPU: dict = {}  # device id -> its one CupyBackend (kernels compiled once, one cuBLAS handle, shared scratch)


def gpu_unavailable_reason() -> str | None:
    """None when a GPU backend can be made here, else a one-line reason."""
    try:
        from . import cupy_backend
    except ImportError:
        return "the GPU backend is not part of this build"
    return cupy_backend.unavailable_reason()


def get_backend(device: str = "cpu"):
    """The backend for `device` ("cpu", "gpu" or "auto"); raises DeviceError when
    "gpu" cannot be had. For "auto" see `resolve_device`, which also says why."""
    return resolve_device(device)[0]


def resolve_device(device: str):
    """(backend, note): note is None, or one line saying why "auto" fell back to the CPU."""
    if not isinstance(device, str):  # a backend object itself (tests: the recording backend)
        return device, None
    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r}: use one of {', '.join(DEVICES)}")
    if device == "cpu":
        cpu_kernels.choice()  # a bad GPUBP_CPU_KERNELS fails here, in one line, before a run starts
        return _CPU, None
    reason = gpu_unavailable_reason() if not _GPU else None
    if reason is None:
        from .cupy_backend import CupyBackend, current_device

        dev = current_device()  # 0, or the GPU a data-parallel rank chose (its local rank)
        if dev not in _GPU:
            _GPU[dev] = CupyBackend(dev)
        return _GPU[dev], None
    if device == "gpu":
        raise DeviceError(f"--device gpu: no usable GPU ({reason}); use --device cpu or auto")
    cpu_kernels.choice()
    return _CPU, f"device auto: using the CPU ({reason})"
