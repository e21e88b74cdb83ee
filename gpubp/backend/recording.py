"""The NumPy backend with a CUDA graph's semantics: the CPU stand-in for graph capture.

A CUDA graph records kernel launches with their arguments: device pointers (whose
contents are read when the graph runs) and scalars (frozen at capture). Replaying it
runs the same launches on the same memory; nothing on the host runs. `RecordingBackend`
does the same with NumPy: while capturing it records every op call (arrays by
reference, like pointers; Python scalars as they were, frozen) without running it, and
the replay calls the recorded ops again. So a step that passes a changing number as a
Python value (a learning rate, a step count) replays the captured number, and a CPU
test that compares a captured run with a plain one sees it.

What a CUDA graph cannot hold fails here too, at capture:
- memory: `empty`, `zeros`, `asarray`, and an op that returns a new array (one with an
  `out` parameter called without it, or an `xp` function called without `out=`):
  a captured step must write only into buffers it was given (`CaptureError`);
- host reads: `to_numpy`, `to_float`, `synchronize` (a sync inside a capture).
Outside a capture it is the NumPy backend, op for op.
"""

from __future__ import annotations

import inspect

import numpy as np

from . import NumpyBackend

# the backend's ops: recorded while capturing (everything else passes through)
OPS = (
    "gemm", "bias_act_forward", "act_backward", "bias_grad", "loss_forward_backward", "accuracy_count",
    "sgd_step", "adam_step", "sum_squares", "step_guard", "step_guard_norm", "gather_rows", "select_rows", "index_window",
    "gemm_batched", "bias_act_forward_batched", "bias_grad_batched", "loss_forward_backward_batched",
    "accuracy_count_batched", "sum_squares_batched", "step_guard_norm_batched", "sgd_step_batched", "adam_step_batched",
    "cast", "add", "step_guard_scaled", "step_guard_scaled_norm", "index_window_batched", "update_vectors", "gemm_bias", "gemm_bias_relu",
    "gemm_drelu_bias_grad", "gemm_bias_grad", "step_advance", "gather_windows", "mlp_forward_backward", "sum_shares",
    "act_backward_bias_grad", "gemm_bias_act", "layer_backward",
)  # fmt: skip
# the ops that return whether they ran (a fused product: False where the GPU has no
# algorithm for it); the NumPy reference always runs, so a recorded call says True
RETURN_DONE = (
    "gemm_bias",
    "gemm_bias_relu",
    "gemm_drelu_bias_grad",
    "gemm_bias_grad",
    "gemm_bias_act",
    "layer_backward",
)
# the backend's callables that touch no device memory: anything else not listed above is
# refused inside a capture, so a new op must be added to OPS (or it would run once, at capture)
HOST_ONLY = ("describe", "memory_peak", "memory_reset", "timer", "mlp_fits", "mlp_pays", "layer_fits")
MEMORY = ("empty", "zeros", "asarray")
HOST_READS = ("to_numpy", "to_float", "synchronize")


class CaptureError(RuntimeError):
    """Something a CUDA graph cannot capture happened inside a captured step."""


class RecordingBackend:
    """NumpyBackend, plus `graph_capturer()` with capture-and-replay semantics (see above)."""

    def __init__(self):
        self.inner = NumpyBackend()
        self.recording: list | None = None  # the calls of the capture in progress
        self.xp = _RecordingXp(self)
        self.graphs: list[list] = []  # every capture's calls (tests look at them)
        self.replays = 0

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name in OPS:
            return self._op(name, attr)
        if name in MEMORY or name in HOST_READS:
            return self._guarded(name, attr)
        if callable(attr) and not name.startswith("_") and name not in HOST_ONLY:
            return self._guarded(name, attr)
        return attr

    def _op(self, name, fn):
        signature = inspect.signature(fn)

        def call(*args, **kwargs):
            if self.recording is None:
                return fn(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            outs = [p for p in ("out", "outs", "grad") if p in signature.parameters]  # (grad: layer_backward's)
            if outs:
                out = bound.arguments.get(outs[0])
                if out is None:
                    raise CaptureError(f"{name} returns a new array inside a captured step: pass out=")
                self.recording.append((fn, args, kwargs))
                if name == "mlp_forward_backward":  # the reference's shares: the gradient itself, one share
                    return bound.arguments["grads"].reshape(1, -1)
                return True if name in RETURN_DONE else out
            if name.startswith(("sgd_step", "adam_step", "step_guard", "update_vectors", "step_advance", "sum_shares")):
                self.recording.append((fn, args, kwargs))
                return None
            raise CaptureError(f"{name} returns a new array inside a captured step")

        call.__signature__ = signature  # the op's own parameters (the bench's profile binds them)
        return call

    def _guarded(self, name, fn):
        def call(*args, **kwargs):
            if self.recording is not None:
                what = (
                    "allocates memory"
                    if name in MEMORY
                    else "reads the device from the host"
                    if name in HOST_READS
                    else "is not a recorded op (add it to recording.OPS)"
                )
                raise CaptureError(f"{name} {what} inside a captured step")
            return fn(*args, **kwargs)

        return call

    def run_blocks(self, fn, items, runner):
        """runner(fn, items): the stack's CPU blocks of models (gpubp.stack.run_cpu_blocks:
        one block inline, several on the thread pool, OpenBLAS on one thread either way).
        Outside a capture it just runs. Inside one, each block's op calls are recorded in a
        list of their own (fn runs once per block, nothing executes), and the recording gets
        one entry: the same runner over those lists. A replay therefore runs each block's
        ops in order, on the pool's threads, with OpenBLAS set as in the plain step."""
        if self.recording is None:
            return runner(fn, items)
        outer, results, blocks = self.recording, [], []
        try:
            for item in items:
                self.recording = []
                results.append(fn(item))
                blocks.append(self.recording)
        finally:
            self.recording = outer
        outer.append((runner, (_run_calls, blocks), {}))
        return results

    # ---- the capturer (CupyBackend.graph_capturer's interface)

    def graph_capturer(self):
        return self

    def warmup(self, key, fn) -> None:
        """The first run of a batch shape: plain (it allocates that shape's buffers)."""
        fn()

    def capture(self, key, fn):
        """Record fn's op calls without running them; returns replay()."""
        if self.recording is not None:
            raise CaptureError("a capture is already in progress")
        self.recording = []
        try:
            fn()
            calls = self.recording
        finally:
            self.recording = None
        self.graphs.append(calls)

        def replay():
            self.replays += 1
            _run_calls(calls)

        return replay


def _run_calls(calls: list) -> None:
    """Run recorded op calls in order (a replay, or one block of one)."""
    for op, args, kwargs in calls:
        op(*args, **kwargs)


class _RecordingXp:
    """numpy, with its functions recorded while capturing (only as `out=` calls)."""

    def __init__(self, backend: RecordingBackend):
        self._backend = backend

    def __getattr__(self, name):
        attr = getattr(np, name)
        if not callable(attr) or isinstance(attr, type):
            return attr
        backend = self._backend

        def call(*args, **kwargs):
            if backend.recording is None:
                return attr(*args, **kwargs)
            if kwargs.get("out") is None:
                raise CaptureError(f"numpy.{name} returns a new array inside a captured step: pass out=")
            backend.recording.append((attr, args, kwargs))
            return kwargs["out"]

        return call
