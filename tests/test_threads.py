"""gpubp.backend.threads: the thread count it picks, the pool's results and order, and
OpenBLAS set to one thread inside blas_one_thread and back afterwards."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest

from gpubp.backend import threads as th


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setitem(th._STATE, "threads", None)
    return monkeypatch


def test_thread_count_from_the_environment_and_the_override(fresh):
    fresh.setenv("GPUBP_THREADS", "1")
    assert th.num_threads() == 1
    th.set_num_threads(2)
    assert th.num_threads() == min(2, len(__import__("os").sched_getaffinity(0)))
    with pytest.raises(ValueError, match="threads must be >= 1"):
        th.set_num_threads(0)


def test_run_blocks_returns_results_in_order_and_uses_the_pool(fresh):
    th.set_num_threads(2)
    names = set()

    def work(i):
        names.add(threading.current_thread().name)
        return np.arange(i, i + 3) @ np.ones(3)  # a BLAS call on the worker

    assert th.run_blocks(work, list(range(20))) == [float(3 * i + 3) for i in range(20)]
    if th.num_threads() > 1:
        assert all(n.startswith("gpubp-stack") for n in names)
    th.set_num_threads(1)
    names.clear()
    assert th.run_blocks(work, [0, 1]) == [3.0, 6.0] and names == {threading.current_thread().name}


def test_the_workers_keep_the_callers_floating_point_error_handling(fresh):
    """A diverging sweep member overflows inside the workers: the trainer's
    np.errstate(all="ignore") must hold there too (a thread does not inherit it),
    and np.errstate(over="raise") too."""
    th.set_num_threads(2)
    if th.num_threads() < 2:
        pytest.skip("one CPU: the blocks run on the caller's thread")
    big = np.full(4, 1e300)

    def work(i):
        return float((big * big)[0])  # overflows

    with np.errstate(all="ignore"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert th.run_blocks(work, [0, 1, 2, 3]) == [np.inf] * 4
    with np.errstate(over="raise"), pytest.raises(FloatingPointError):
        th.run_blocks(work, [0, 1])


def test_blas_runs_on_one_thread_inside_the_context_and_as_before_after():
    before = th.blas_threads()
    if before is None:
        pytest.skip("the BLAS thread count cannot be read here")
    with th.blas_one_thread():
        assert th.blas_threads() == 1
    assert th.blas_threads() == before


def test_a_forked_child_gets_its_own_pool(fresh):
    import os

    if not hasattr(os, "fork"):
        pytest.skip("no fork here")
    th.set_num_threads(2)
    assert th.run_blocks(lambda i: i * 2, [1, 2, 3]) == [2, 4, 6]  # the parent's pool exists
    pid = os.fork()
    if pid == 0:  # the child: the parent's worker threads are not here; a new pool must run the blocks
        import signal

        signal.alarm(20)  # a child stuck on the parent's dead pool ends here, not never
        ok = th.run_blocks(lambda i: i + 1, [1, 2, 3, 4]) == [2, 3, 4, 5]
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0  # not 1 (wrong results), not -SIGALRM (stuck)
