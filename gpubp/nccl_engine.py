"""The GPU gradient all-reduce of data parallel training: NCCL through CuPy's binding
(`cupy.cuda.nccl`, the library from the nvidia-nccl-cu12/13 wheel), one rank per
GPU, NCCL's unique id broadcast over MPI.

The gradients live in one device buffer [g (P), loss] (the model's flat gradient
buffer is its first P elements). Layer k's bucket is its [W_k, b_k], contiguous.

- overlap (default): as soon as the backward pass has issued layer k's dW_k, db_k,
  an event on the compute stream lets a second stream scale that bucket by this
  rank's share n_r / n and all-reduce it, while the compute stream goes on with
  layer k-1 (PyTorch DDP's scheme; the buckets are the layers). Layer 0's bucket
  and the loss go last, as one NCCL group. The compute stream waits for the second
  stream before the update.
- GPUBP_NCCL_OVERLAP=0: after the backward pass, one scale and one all-reduce of
  the whole buffer on the compute stream (to measure what the overlap saves).

The stop flag (Ctrl-C on any rank) is one host MPI all-reduce per step, which also
keeps the watchdog of gpubp.distributed in charge: a dead rank stops the others there.
Nothing here runs without CuPy and a GPU; this module imports cupy only when built.
"""

from __future__ import annotations

import os
import time

import numpy as np

from .errors import DeviceError

OVERLAP_VAR = "GPUBP_NCCL_OVERLAP"
NCCL_HINT = "pip install 'gpubp[mpi,nccl-cuda12]' (or nccl-cuda13, to match your CuPy)"


def load_nccl():
    """cupy.cuda.nccl, or DeviceError saying how to install NCCL."""
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from cupy.cuda import nccl
    except ImportError as e:
        raise DeviceError(f"data parallel on GPUs needs CuPy's NCCL binding ({e}); {NCCL_HINT}") from None
    if not getattr(nccl, "available", True):
        raise DeviceError(f"data parallel on GPUs needs NCCL, which CuPy cannot load; {NCCL_HINT}")
    return nccl


def nccl_dtype(nccl, dtype) -> int:
    return {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64}[np.dtype(dtype)]


class NcclEngine:
    def __init__(self, world, model, overlap: bool | None = None):
        import cupy

        self.world, self.cupy, self.nccl = world, cupy, load_nccl()
        self.P = model.n_params
        self.buf = cupy.zeros(self.P + 1, dtype=model.dtype)  # [g (P), loss]
        model.use_grad_buffer(self.buf)
        self.dtype = nccl_dtype(self.nccl, model.dtype)
        # layer k's bucket [lo, hi): W_k then b_k
        self.buckets = [(w_off, b_off + fan_out) for w_off, b_off, _, fan_out in model.layout]
        if overlap is None:
            overlap = os.environ.get(OVERLAP_VAR, "1") not in ("0", "")
        self.overlap = overlap
        self.stream = cupy.cuda.Stream(non_blocking=True)  # the communication stream
        self.ready = [cupy.cuda.Event(disable_timing=True) for _ in self.buckets]  # layer k's grads issued
        self.done = cupy.cuda.Event(disable_timing=True)  # every bucket reduced
        self.flag = np.zeros(1, dtype=np.int32)
        self.comm = None

    def start(self) -> None:
        """Collective: rank 0 makes NCCL's unique id, MPI broadcasts it, every rank joins."""
        world = self.world
        uid = self.nccl.get_unique_id() if world.is_root else None
        with world.watch("the NCCL set-up"):
            uid = world.comm.bcast(uid, root=0)
            self.comm = self.nccl.NcclCommunicator(world.size, uid, world.rank)

    # ---- one step

    def _reduce(self, lo: int, hi: int, stream) -> None:
        """All-reduce (sum) buf[lo:hi] in place on `stream`."""
        seg = self.buf[lo:hi]
        self.comm.allReduce(seg.data.ptr, seg.data.ptr, hi - lo, self.dtype, self.nccl.NCCL_SUM, stream.ptr)

    def _bucket(self, k: int, w: float) -> None:
        """Layer k's gradients were issued on the compute stream: scale and reduce them
        on the communication stream once the compute stream gets there."""
        lo, hi = self.buckets[k]
        self.ready[k].record()  # on the current (compute) stream
        self.stream.wait_event(self.ready[k])
        with self.stream:
            self.buf[lo:hi] *= w  # this rank's share of the global mean
            if k > 0:
                self._reduce(lo, hi, self.stream)

    def forward_backward(self, model, xb, yb, n_batch: int, interrupted):
        cupy, n, P = self.cupy, xb.shape[0], self.P
        w = n / n_batch
        compute = cupy.cuda.get_current_stream()
        if n == 0:  # more ranks than rows in this (last) batch: add zeros, in the same collectives
            self.buf.fill(0)
            loss, w = self.buf[P], 1.0
            if self.overlap:
                for k in reversed(range(1, len(self.buckets))):
                    self._bucket(k, w)
        elif self.overlap:
            loss = model.forward_backward(xb, yb, on_layer=lambda k: self._bucket(k, w) if k > 0 else None)
        else:
            loss = model.forward_backward(xb, yb)
        if self.overlap:
            self.ready[0].record()
            self.stream.wait_event(self.ready[0])
            lo, hi = self.buckets[0]
            with self.stream:
                self.buf[lo:hi] *= w
                self.buf[P] = loss * w
                self.nccl.groupStart()
                self._reduce(lo, hi, self.stream)
                self._reduce(P, P + 1, self.stream)
                self.nccl.groupEnd()
            self.done.record(self.stream)
            compute.wait_event(self.done)
        else:
            self.buf[:P] *= w
            self.buf[P] = loss * w
            self._reduce(0, P + 1, compute)
        # Ctrl-C on any rank: a host all-reduce (no device sync); it also notices a dead rank
        MPI = self.world.MPI
        self.flag[0] = 1 if interrupted() else 0
        with self.world.watch("the step's all-reduce of the stop flag"):
            self.world.comm.Allreduce(MPI.IN_PLACE, self.flag, op=MPI.MAX)
        return self.buf[P], bool(self.flag[0])

    def close(self) -> None:
        if self.comm is not None:
            self.comm.destroy()
            self.comm = None


def time_allreduce(engine: NcclEngine, n: int, dtype, repeats: int = 20) -> dict:
    """Milliseconds per in-place NCCL all-reduce of n elements (median of `repeats`,
    after two warm-ups), and the bus bandwidth NCCL's tests report: 2 (N-1)/N bytes / time."""
    cupy = engine.cupy
    buf = cupy.ones(n, dtype=dtype)
    stream = cupy.cuda.get_current_stream()
    code = nccl_dtype(engine.nccl, dtype)
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        engine.comm.allReduce(buf.data.ptr, buf.data.ptr, n, code, engine.nccl.NCCL_SUM, stream.ptr)
        stream.synchronize()
        if i >= 2:
            times.append((time.perf_counter() - start) * 1e3)
    ms = float(np.median(times))
    size = engine.world.size
    nbytes = n * np.dtype(dtype).itemsize
    return {"elements": n, "bytes": nbytes, "ranks": size, "ms": ms,
            "bus_GBps": 2 * (size - 1) / size * nbytes / (ms * 1e-3) / 1e9}  # fmt: skip
