"""Data parallel training (gpubp/distributed.py).

Without MPI: the row split and the weighted gradient sum it relies on, against the
whole batch in one process. With mpi4py and an `mpirun` (pip install '.[mpi]'):
real runs of 2 and 3 ranks against one process, resume on another number of ranks,
errors on one rank or all, mismatched configs, and a rank killed by SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gpubp.distributed import LOCAL, _first_difference, launched_as, row_range
from gpubp.model import MLP
from tests.conftest import ROOT, assert_close

# ----------------------------------------------------------------- without MPI


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 32, 33, 311])
@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_row_range_partitions_the_batch(n, size):
    ranges = [row_range(n, r, size) for r in range(size)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n  # covers the batch...
    for (_, b), (c, _) in zip(ranges, ranges[1:]):
        assert b == c  # ...contiguously, in rank order
    counts = [b - a for a, b in ranges]
    assert max(counts) - min(counts) <= 1 and min(counts) >= 0  # balanced (a rank may get none when n < size)


@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "mse"])
@pytest.mark.parametrize("n", [7, 2])  # 7 rows over 3 ranks: 3, 2, 2; 2 rows: one rank has none
def test_weighted_slices_give_the_global_mean_gradient(loss, n):
    """sum_r (n_r / n) g_r, g_r the mean gradient over rank r's rows, is the mean
    gradient over all n rows (the identity the all-reduce computes)."""
    rng = np.random.default_rng(3)
    width = 4
    model = MLP([5, 8, width], "tanh", "identity", loss, dtype="float64", seed=1)
    x = rng.normal(size=(n, 5))
    y = rng.integers(0, width, n) if loss == "softmax_cross_entropy" else rng.normal(size=(n, width))
    full_loss, grads = model.loss_and_grads(x, y)
    full = model.flat_grads.copy()
    total, total_loss = np.zeros_like(full), 0.0
    for r in range(3):
        a, b = row_range(n, r, 3)
        if b > a:
            part_loss, _ = model.loss_and_grads(x[a:b], y[a:b])
            total += (b - a) / n * model.flat_grads
            total_loss += (b - a) / n * part_loss
    # float64, a sum in another order: a few ulps of the largest terms
    assert_close(total, full, np.float64, what="weighted gradient")
    assert_close(total_loss, full_loss, np.float64, what="weighted loss")


def test_one_process_needs_no_launcher(monkeypatch):
    for size_var, _ in [("OMPI_COMM_WORLD_SIZE", 0), ("PMI_SIZE", 0), ("MV2_COMM_WORLD_SIZE", 0),
                        ("SLURM_STEP_NUM_TASKS", 0)]:  # fmt: skip
        monkeypatch.delenv(size_var, raising=False)
    assert launched_as() == (1, 0)
    monkeypatch.setenv("PMI_SIZE", "4")
    monkeypatch.setenv("PMI_RANK", "2")
    assert launched_as() == (4, 2)
    idx = np.arange(10)
    assert LOCAL.rows(idx) is idx and LOCAL.is_root and LOCAL.size == 1


def test_first_difference_names_the_key():
    a = {"config": {"optimizer": {"lr": 0.001, "name": "adam"}}, "--out": "/x"}
    b = {"config": {"optimizer": {"lr": 0.01, "name": "adam"}}, "--out": "/x"}
    assert _first_difference(a, b) == ("config.optimizer.lr", 0.001, 0.01)


class _FakeMPIError(Exception):
    def Get_error_class(self) -> int:
        return 15


def _world_with_a_dead_peer(supervised: bool):
    """An MPIWorld of 3 ranks on this host without MPI: rank 0 here, rank 1 a process
    that has ended, rank 2 alive (this one)."""
    from types import SimpleNamespace

    from gpubp.distributed import MPIWorld, Watchdog

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    world = object.__new__(MPIWorld)
    world.MPI = SimpleNamespace(Exception=_FakeMPIError, Get_error_string=lambda code: f"MPI error class {code}")
    world.rank, world.size, world.host, world.trainer = 0, 3, "here", None
    world.peers = [("here", os.getpid()), ("here", child.pid), ("here", os.getpid())]
    world.supervised = [supervised] * 3
    world.watch = Watchdog(world)
    world.watch.stop()  # only the failing collective's own path is under test
    return world, child.pid


@pytest.mark.parametrize("supervised", [True, False])
def test_a_collective_that_mpi_fails_ends_the_rank_with_one_line(monkeypatch, capsys, supervised):
    """MPI raises inside the all-reduce when a peer vanishes mid-copy: no traceback,
    no 'internal error', but the watchdog's line naming the dead rank and exit 1; a
    supervised peer's parent names it first, so this rank waits (the grace) for the
    launcher to end it before it speaks."""
    from gpubp.distributed import Watchdog

    monkeypatch.setattr(Watchdog, "SUPERVISED_GRACE_S", 0.5)
    monkeypatch.setattr(os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))
    world, pid = _world_with_a_dead_peer(supervised)
    start = time.monotonic()
    with pytest.raises(SystemExit) as exited, world.watch("the gradient all-reduce"):
        raise _FakeMPIError("Other MPI error, error stack: ...")
    waited = time.monotonic() - start
    assert exited.value.code == 1
    assert (waited >= 0.5) == supervised  # only a supervised peer's death is left to its parent to report first
    err = capsys.readouterr().err
    assert err == f"gpubp: error: rank 1 (pid {pid} on here) died during the gradient all-reduce; every rank stopped\n"


def test_a_collective_that_mpi_fails_with_no_dead_peer_here_says_so(monkeypatch, capsys):
    from gpubp.distributed import Watchdog

    monkeypatch.setattr(Watchdog, "SUPERVISED_GRACE_S", 0.3)
    monkeypatch.setattr(os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))
    world, _ = _world_with_a_dead_peer(True)
    world.peers[1] = ("elsewhere", world.peers[1][1])  # the dead peer is on another host: not seen from here
    with pytest.raises(SystemExit), world.watch("the gradient all-reduce"):
        raise _FakeMPIError("Other MPI error")
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "gpubp: error: rank 0: the gradient all-reduce failed (MPI error class 15): a rank on another host "
        "died or lost its connection; every rank stopped"
    ]


def test_other_errors_pass_through_the_watch(monkeypatch):
    world, _ = _world_with_a_dead_peer(True)
    with pytest.raises(KeyError), world.watch("the gradient all-reduce"):
        raise KeyError("not MPI's")
    assert world.watch.since is None


# ----------------------------------------------------------------- with MPI

DIGITS = ["--config", "configs/digits.toml", "--set", "model.dtype=float64", "--quiet"]
# regression: 2800 training rows in batches of 311 = 9 * 311 + 1: every epoch ends with
# a batch of 1 row (on 2 or 3 ranks some have none), and 311 is not divisible by 2 or 3
REGRESSION = ["--config", "configs/regression.toml", "--set", "model.dtype=float64", "--set",
              "train.batch_size=311", "--set", "train.early_stopping_patience=0", "--quiet"]  # fmt: skip
STEPS = ["--set", "train.steps=100"]


def _mpirun() -> str:
    try:
        import mpi4py  # noqa: F401  (not mpi4py.MPI: that would start MPI in pytest itself)
    except ImportError as e:  # absent, or broken (no MPI library it can load)
        pytest.skip(f"mpi4py does not import ({e}); pip install '.[mpi]'")
    here = os.path.dirname(sys.executable)
    found = shutil.which("mpirun", path=here + os.pathsep + os.environ.get("PATH", ""))
    if found is None:
        pytest.skip("no mpirun (pip install '.[mpi]' brings MPICH's)")
    return found


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for size_var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"):
        env.pop(size_var, None)  # pytest itself may run under a launcher
    return env | extra


def mpi_train(n: int, *args, timeout=240, launcher=()) -> subprocess.CompletedProcess:
    """`mpirun -n N python -m gpubp train ARGS` (N = 1: plain python, no launcher)."""
    cmd = [sys.executable, "-m", "gpubp", "train", *args]
    if n > 1:
        cmd = [_mpirun(), *launcher, "-n", str(n), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=_env())


def params(run_dir) -> dict:
    from gpubp.checkpoint import load_checkpoint

    meta, arrays = load_checkpoint(os.path.join(run_dir, "last.npz"))
    return {"step": meta["step"], **{k: v for k, v in arrays.items() if k == "params" or k.startswith("opt.")}}


def assert_same_run(a: dict, b: dict, what: str) -> None:
    assert a["step"] == b["step"]
    for key in a:
        if key != "step":
            # float64, 100 steps whose gradients differ from one process's in the order of
            # their sums (~1e-16): the bound of 1e-12, absolute
            err = np.max(np.abs(a[key] - b[key]))
            assert err <= 1e-12, f"{what}: {key} differs by {err:.3g}"


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process runs every multi-rank run must repeat."""
    _mpirun()
    root = tmp_path_factory.mktemp("single")
    out = {}
    for name, args in (("digits", DIGITS), ("regression", REGRESSION)):
        result = mpi_train(1, *args, *STEPS, "--out", str(root / name))
        assert result.returncode == 0, result.stderr
        out[name] = params(root / name)
        out[name + " summary"] = json.loads((root / name / "summary.json").read_text())
    return out


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("case", ["digits", "regression"])
def test_ranks_repeat_the_single_process_run(single, tmp_path, case, n):
    args = DIGITS if case == "digits" else REGRESSION
    result = mpi_train(n, *args, *STEPS, "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count('"steps": 100') == 1  # one summary, from rank 0
    assert_same_run(params(tmp_path / "run"), single[case], f"{case} on {n} ranks")
    # evaluation split over the ranks: the same metrics, up to the order of the sums
    summary, want = json.loads((tmp_path / "run" / "summary.json").read_text()), single[case + " summary"]
    ends = ("loss", "accuracy", "r2", "rmse", "mae")
    metrics = [k for k, v in want.items() if isinstance(v, float) and k.rsplit("_", 1)[-1] in ends]
    assert len(metrics) >= 3
    for key in metrics:
        assert summary[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
    assert not [f for f in os.listdir(tmp_path / "run") if f.startswith(".tmp")]


@pytest.mark.parametrize("n", [1, 3])
def test_resume_a_two_rank_checkpoint_on_other_rank_counts(single, tmp_path, n):
    """Stop a 2-rank digits run at step 60 (mid-epoch: 42 steps an epoch), resume to
    100 on n ranks: the same parameters as one process's 100 uninterrupted steps."""
    first = mpi_train(2, *DIGITS, "--set", "train.steps=60", "--out", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    assert params(tmp_path / "a")["step"] == 60
    args = ["--resume", str(tmp_path / "a" / "last.npz"), *STEPS, "--quiet", "--out", str(tmp_path / "b")]
    second = mpi_train(n, *args)
    assert second.returncode == 0, second.stderr
    assert_same_run(params(tmp_path / "b"), single["digits"], f"resumed on {n} ranks")


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("gpubp: error:")]


def test_an_error_on_every_rank_is_reported_once(tmp_path):
    result = mpi_train(3, *DIGITS, "--set", "optimizer.lr=-1", "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    lines = _error_lines(result.stderr)
    assert len(lines) == 1 and "optimizer.lr" in lines[0] and "rank" not in lines[0], result.stderr


def test_an_error_on_one_rank_stops_all_and_names_it(tmp_path):
    """MPMD launch: rank 1 is given a config file that does not exist."""
    common = [sys.executable, "-m", "gpubp", "train", "--quiet", "--out", str(tmp_path / "run")]
    cmd = [_mpirun(), "-n", "1", *common, "--config", "configs/digits.toml",
           ":", "-n", "1", *common, "--config", str(tmp_path / "missing.toml")]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120, env=_env())
    assert result.returncode == 2
    lines = _error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("gpubp: error: rank 1: ") and "missing.toml" in lines[0]
    assert not os.path.exists(tmp_path / "run" / "last.npz")


def test_ranks_with_different_configs_are_refused(tmp_path):
    common = [sys.executable, "-m", "gpubp", "train", *DIGITS, "--out", str(tmp_path / "run")]
    cmd = [_mpirun(), "-n", "2", *common, ":", "-n", "1", *common, "--set", "optimizer.lr=0.01"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120, env=_env())
    assert result.returncode == 2
    lines = _error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "config.optimizer.lr is 0.001 on rank 0 but 0.01 on rank 2" in lines[0]
    assert not os.path.exists(tmp_path / "run" / "config.toml")  # refused before anything was written


def _is_hydra(mpirun: str) -> bool:
    try:
        text = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "HYDRA" in text


def _start_long_run(tmp_path, **env):
    """3 ranks on digits, evaluating (and checkpointing) every 10 steps; returns
    (process, stderr file, pid of rank 1) once a checkpoint exists."""
    out = tmp_path / "run"
    cmd = [_mpirun(), "-n", "3", sys.executable, "-m", "gpubp", "train", "--config", "configs/digits.toml",
           "--set", "train.steps=1000000", "--set", "train.eval_every=10", "--out", str(out)]  # fmt: skip
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, env=_env(**env))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        found = re.search(r"1 = pid (\d+) on ", err_path.read_text())  # rank 0's start-up line
        if found and (out / "last.npz").exists():
            time.sleep(0.5)
            return proc, err_path, int(found.group(1))
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"the run did not start: {err_path.read_text()}")


def _stop_within(proc, seconds: float) -> None:
    start = time.monotonic()
    try:
        proc.wait(timeout=seconds)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert time.monotonic() - start < seconds


def _checkpoint_intact(out) -> None:
    from gpubp.checkpoint import load_checkpoint

    meta, arrays = load_checkpoint(str(out / "last.npz"))  # complete: the checksum verifies
    assert meta["step"] % 10 == 0 and np.all(np.isfinite(arrays["params"]))


def test_a_killed_rank_stops_every_rank(tmp_path):
    """SIGKILL rank 1 of 3 mid-run: its supervising parent says which rank died and
    how, in one line; every rank stops within a bounded time (the launcher ends the
    others at once; otherwise gpubp's watchdog would); no process is left behind; the
    exit status says it failed, and last.npz is complete."""
    proc, err_path, pid = _start_long_run(tmp_path)
    os.kill(pid, signal.SIGKILL)
    _stop_within(proc, 30)
    assert proc.returncode != 0
    text = err_path.read_text()
    lines = _error_lines(text)
    assert len(lines) == 1, text
    assert re.match(rf"gpubp: error: rank 1 \(pid {pid} on \S+\) was killed by SIGKILL; every rank stops", lines[0])
    _checkpoint_intact(tmp_path / "run")
    if shutil.which("pgrep"):
        time.sleep(1)
        survivors = subprocess.run(["pgrep", "-f", str(tmp_path / "run")], capture_output=True, text=True).stdout
        assert survivors.strip() == "", "ranks left running: " + survivors


def test_a_hung_rank_stops_every_rank_with_one_line(tmp_path):
    """SIGSTOP rank 1: no launcher notices, so the others wait in the all-reduce until
    the watchdog's limit (GPUBP_RANK_TIMEOUT) and stop with one line from rank 0."""
    proc, err_path, pid = _start_long_run(tmp_path, GPUBP_RANK_TIMEOUT="3")
    os.kill(pid, signal.SIGSTOP)
    try:
        _stop_within(proc, 60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode != 0
    text = err_path.read_text()
    lines = _error_lines(text)
    assert len(lines) == 1, text
    assert re.match(r"gpubp: error: rank 0: no answer from the other ranks for \d+ s during .+ at step \d+", lines[0])
    assert "GPUBP_RANK_TIMEOUT" in lines[0] and "is intact" in lines[0]
    _checkpoint_intact(tmp_path / "run")


def test_ctrl_c_stops_every_rank_at_the_same_step(tmp_path):
    """SIGINT to mpirun (MPICH's forwards it to every rank): the ranks agree in the
    next all-reduce, stop after the same step, rank 0 saves last.npz there and says
    so once; exit status 130."""
    from gpubp.checkpoint import load_checkpoint

    if not _is_hydra(_mpirun()):
        pytest.skip("relies on MPICH's mpirun forwarding SIGINT")
    proc, err_path, _ = _start_long_run(tmp_path)
    proc.send_signal(signal.SIGINT)
    _stop_within(proc, 60)
    assert proc.returncode == 130
    text = err_path.read_text()
    lines = [line for line in text.splitlines() if line.startswith("gpubp: interrupted at step")]
    assert len(lines) == 1, text
    step = int(re.match(r"gpubp: interrupted at step (\d+);", lines[0]).group(1))
    assert "--resume" in lines[0] and "any number of ranks" in lines[0]
    meta, _ = load_checkpoint(str(tmp_path / "run" / "last.npz"))
    assert meta["step"] == step


def test_watchdog_sees_a_dead_process(tmp_path):
    from gpubp.distributed import _alive

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not _alive(child.pid) and _alive(os.getpid())


def test_ranks_say_they_read_the_whole_file(tmp_path):
    from gpubp.config import load_config
    from gpubp.distributed import whole_file_note

    path = tmp_path / "d.csv"
    path.write_text("a,label\n" + "".join(f"{i},{i % 2}\n" for i in range(10)))
    csv = load_config("configs/digits.toml", ["data.dataset=csv", f"data.path={path}"])
    note = whole_file_note(csv, 3)
    assert note.startswith(f"data: each of the 3 ranks parses the whole CSV file {path} ")
    assert whole_file_note(load_config("configs/digits.toml", []), 3) is None  # vendored: no file named


def test_a_launcher_of_another_mpi_is_refused(tmp_path):
    """The environment says 2 ranks (Open MPI's variables) but MPICH's mpi4py starts
    as a singleton: N copies of a one-process run would write the same run directory."""
    if not _is_hydra(_mpirun()):
        pytest.skip("written for an MPICH build of mpi4py")
    cmd = [sys.executable, "-m", "gpubp", "train", *DIGITS, "--out", str(tmp_path / "run")]
    env = _env(OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_RANK="0")
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
    assert result.returncode == 2
    lines = _error_lines(result.stderr)
    assert len(lines) == 1 and "the launcher started 2 ranks, but MPI sees only this one" in lines[0]
    assert not os.path.exists(tmp_path / "run")


def test_rank_timeout_from_the_environment(monkeypatch):
    from gpubp.distributed import Silent, rank_timeout
    from gpubp.errors import UsageError

    monkeypatch.delenv("GPUBP_RANK_TIMEOUT", raising=False)
    assert rank_timeout(0) == 600.0
    monkeypatch.setenv("GPUBP_RANK_TIMEOUT", "2.5")
    assert rank_timeout(1) == 2.5
    for bad in ("soon", "0", "-3", "nan"):
        monkeypatch.setenv("GPUBP_RANK_TIMEOUT", bad)
        with pytest.raises(UsageError, match="GPUBP_RANK_TIMEOUT"):
            rank_timeout(0)
        with pytest.raises(Silent):  # said once, by rank 0
            rank_timeout(2)


def test_a_sweep_is_refused_under_a_launcher(tmp_path):
    result = mpi_train(2, "--config", "configs/digits-sweep.toml", "--quiet", "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    lines = _error_lines(result.stderr)
    assert len(lines) == 1 and "a [sweep] trains its models in one process" in lines[0], result.stderr
