"""Host -> device copies that overlap the step: what a streamed training split needs
of a backend (gpubp/stream.py).

    staging(shape, dtype)       a host buffer copies start from (pinned on the GPU)
    wait_staging(slot)          the host may write staging buffer `slot` again (its copy is done)
    copy(dst, src, slot)        dst (device) <- src (host staging `slot`), on the copy stream,
                                after the compute stream's work so far (dst's old rows are read)
    ready(slot)                 the compute stream's next work waits for slot's last copy

NumPy: copies are plain copies, done when `copy` returns; the waits have nothing to wait
for. CuPy: a non-blocking copy stream and CUDA events order the copies with the compute
stream (the current stream, where the step and its CUDA graph run), so a chunk copies
while the previous one is trained on, and no host synchronisation happens but
`wait_staging`, which waits for a copy issued two chunks ago.
"""

from __future__ import annotations

import numpy as np


class HostTransfer:
    """The NumPy backend's transfer: synchronous (the same code path as the GPU's)."""

    def staging(self, shape, dtype) -> np.ndarray:
        return np.empty(shape, dtype=dtype)

    def wait_staging(self, slot: int) -> None:
        pass

    def copy(self, dst, src, slot: int) -> None:
        dst[...] = src

    def ready(self, slot: int) -> None:
        pass


class CupyTransfer:
    """The CuPy backend's transfer: pinned staging, a second stream, events (see the module
    docstring). `cupy`: the module."""

    def __init__(self, cupy):
        self.cupy = cupy
        self.stream = cupy.cuda.Stream(non_blocking=True)  # the copy stream
        self.copied = {}  # slot -> Event recorded on the copy stream after its last copy

    def staging(self, shape, dtype) -> np.ndarray:
        import cupyx

        return cupyx.empty_pinned(shape, dtype=dtype)  # page-locked: the copy is asynchronous (DMA)

    def wait_staging(self, slot: int) -> None:
        event = self.copied.get(slot)
        if event is not None:
            event.synchronize()  # its last copy has read the staging buffer

    def copy(self, dst, src: np.ndarray, slot: int) -> None:
        compute = self.cupy.cuda.get_current_stream()
        self.stream.wait_event(compute.record())  # the steps enqueued so far read dst's old rows first
        assert dst.flags.c_contiguous and src.flags.c_contiguous and dst.nbytes == src.nbytes
        dst.data.copy_from_host_async(src.ctypes.data, src.nbytes, self.stream)
        self.copied[slot] = self.stream.record()

    def ready(self, slot: int) -> None:
        event = self.copied.get(slot)
        if event is not None:
            self.cupy.cuda.get_current_stream().wait_event(event)


def make_transfer(backend):
    """The transfer of `backend` (by its name: "gpu" is CuPy's)."""
    if backend.name == "gpu":
        return CupyTransfer(backend._cupy)
    return HostTransfer()


def free_memory(backend) -> int | None:
    """Bytes the device can still give: the driver's free memory plus what CuPy's pool
    holds unused; None on the CPU (no device budget)."""
    if backend.name != "gpu":
        return None
    cupy = backend._cupy
    free, _total = cupy.cuda.runtime.memGetInfo()
    return int(free) + int(cupy.get_default_memory_pool().free_bytes())
