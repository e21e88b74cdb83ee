"""CPU threads for the stacked ops: a small pool that runs blocks of models side by side.

NumPy releases the GIL inside BLAS calls and inside ufunc loops, so two Python threads
each running the ops of their own models keep two cores busy. At the sizes a stack
of small models has (a 128 x 64 x 128 GEMM per model), that scales better than
OpenBLAS's own threads: a GEMM that small is split by OpenBLAS into pieces whose
hand-offs cost as much as the pieces, and the elementwise ops (bias, activation,
loss, the optimizer) get no second core at all. While the pool runs, OpenBLAS is
set to one thread (its threaded GEMM serializes concurrent callers), and set back
afterwards. The arithmetic of each model is the same on any thread: a model's
slice is computed by the same calls, so the bits do not depend on the thread count.

    num_threads()          the threads a stacked op may use (GPUBP_THREADS, else the
                           BLAS thread count: OMP_NUM_THREADS=1 means one thread)
    set_num_threads(n)     override it for this process
    run_blocks(fn, items)  fn(item) for every item, on the pool; results in order
    blas_one_thread()      a context in which OpenBLAS runs on the calling thread only
"""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

_STATE: dict = {"threads": None, "pool": None, "pid": None, "blas": None}
_PREFIX = "gpubp-stack"


def _blas_functions():
    """(get, set) of the OpenBLAS that NumPy loaded, as ctypes functions, or None.

    Found by its path in /proc/self/maps (Linux) and its exported names, as
    threadpoolctl finds it; anywhere else None, and the pool runs without it."""
    if _STATE["blas"] is not None:
        return _STATE["blas"] or None
    found = ()
    try:
        import numpy  # noqa: F401  (loads the BLAS library)

        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line})
        for path in paths:
            lib = ctypes.CDLL(path)
            for prefix in ("scipy_openblas", "openblas"):
                for suffix in ("64_", "", "_64"):
                    get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                    put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                    if get is not None and put is not None:
                        get.restype, put.argtypes = ctypes.c_int, [ctypes.c_int]
                        found = (get, put)
                        break
                if found:
                    break
            if found:
                break
    except (OSError, ValueError, AttributeError):
        found = ()
    _STATE["blas"] = found
    return found or None


def blas_threads() -> int | None:
    """OpenBLAS's current thread count, or None where it cannot be read."""
    fns = _blas_functions()
    return int(fns[0]()) if fns else None


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def num_threads() -> int:
    """Threads for the stacked CPU ops: set_num_threads(n), else GPUBP_THREADS, else the
    BLAS's own thread count (which follows OMP_NUM_THREADS / OPENBLAS_NUM_THREADS),
    else the usable CPUs."""
    if _STATE["threads"] is None:
        env = os.environ.get("GPUBP_THREADS", "").strip()
        n = int(env) if env.isdigit() and int(env) > 0 else (blas_threads() or _usable_cpus())
        _STATE["threads"] = max(1, min(n, _usable_cpus()))
    return _STATE["threads"]


def set_num_threads(n: int | None) -> None:
    """Use n threads from now on (None: back to the default of num_threads)."""
    if n is not None and int(n) < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    _STATE["threads"] = None if n is None else int(n)


def run_blocks(fn, items: list) -> list:
    """[fn(item) for item in items], spread over num_threads() threads (in order)."""
    threads = min(num_threads(), len(items))
    if threads <= 1 or threading.current_thread().name.startswith(_PREFIX):  # one thread, or nested: in order
        return [fn(item) for item in items]
    pool = _STATE["pool"]
    if pool is None or pool._max_workers != threads or _STATE["pid"] != os.getpid():  # a forked child: a new pool
        if pool is not None and _STATE["pid"] == os.getpid():
            pool.shutdown(wait=False)
        pool = _STATE["pool"] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=_PREFIX)
        _STATE["pid"] = os.getpid()
    err = np.geterr()  # the caller's floating-point error handling: a thread does not inherit it

    def block(item):
        with np.errstate(**err):
            return fn(item)

    with blas_one_thread():
        return list(pool.map(block, items))


@contextmanager
def blas_one_thread():
    """OpenBLAS on one thread inside the block, as it was afterwards. The stacked ops
    call it per model with small GEMMs, whose split over OpenBLAS's threads costs more
    than it saves (and, on a loaded machine, its spinning threads cost far more)."""
    fns = _blas_functions()
    before = int(fns[0]()) if fns else 1
    if before != 1:
        fns[1](1)
    try:
        yield
    finally:
        if before != 1:
            fns[1](before)
