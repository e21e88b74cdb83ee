"""Data parallel training: N ranks (processes) train one model, started by an MPI
launcher (`mpirun -n N gpubp train ...`, `srun`, `mpirun -H a,b ...`).

Every step all ranks take the same global batch of `train.batch_size` rows (the
epoch's order is a function of (seed, epoch)); rank r keeps its contiguous slice
of n_r rows (`row_range`), computes the mean gradient g_r over them, and one
all-reduce of the flat gradient buffer gives every rank

    g = sum_r (n_r / n) g_r          n = sum_r n_r, the global batch's rows

which is the mean gradient over the global batch, as one process computes it (up
to the order of the floating-point sums). The weighted loss and a stop flag
(Ctrl-C on any rank) ride in two extra slots of the same buffer on the CPU, so
all ranks take the same update, log the same loss and stop at the same step.

- One process (no launcher, or a launcher with 1 rank) uses `LOCAL`: every hook is
  the identity and nothing imports mpi4py.
- On the CPU the collectives are MPI's (mpi4py). On the GPU the gradient all-reduce
  is NCCL's (`gpubp.nccl_engine`, CuPy's NCCL binding, its unique id broadcast over
  MPI), one rank per GPU (local rank -> device).
- Rank 0 alone writes logs, checkpoints and the summary. A checkpoint holds the
  global state only, so it resumes on any number of ranks.
- Start-up runs under `agree`: an error on any rank (config, data, output folder)
  stops every rank and is printed once; configs that differ between ranks are
  refused. While a rank waits in a collective, a watchdog thread checks that the
  ranks on its host are alive and that the wait stays under GPUBP_RANK_TIMEOUT
  seconds (default 600); otherwise it prints one line (which rank, what happened,
  the last checkpoint) and ends the process.
- A rank killed outright (SIGKILL, a crash) cannot speak, and MPICH's mpirun kills
  the others at once: so each rank runs under a supervising parent (`supervise`, a
  fork before MPI starts) that prints the line naming the rank and the signal.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time

import numpy as np

from .errors import ConfigError, GpubpError, Interrupted, TrainingError, UsageError

# what launchers put in the environment of each rank: (size, rank) variables
LAUNCHER_VARS = (
    ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),  # Open MPI
    ("PMI_SIZE", "PMI_RANK"),  # MPICH (hydra), Intel MPI, srun --mpi=pmi2
    ("MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK"),  # MVAPICH
    ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID"),  # srun (set only inside a job step)
)
TIMEOUT_VAR = "GPUBP_RANK_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
INSTALL_HINT = "pip install 'gpubp[mpi]'"


def launched_as() -> tuple[int, int]:
    """(size, rank) that a launcher announced in the environment; (1, 0) without one."""
    for size_var, rank_var in LAUNCHER_VARS:
        size = os.environ.get(size_var, "")
        if size.isdigit() and int(size) > 1:
            rank = os.environ.get(rank_var, "0")
            return int(size), int(rank) if rank.isdigit() else 0
    return 1, 0


SUPERVISOR_VAR = "GPUBP_RANK_SUPERVISOR"  # "0": no supervising parent process
SUPERVISED_VAR = "GPUBP_SUPERVISED_BY"  # set in a supervised rank: its parent's pid
FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2")


def supervise() -> None:
    """Under a launcher with N > 1 ranks (Linux): fork before MPI starts. The child
    returns and trains; the parent forwards the launcher's signals to it and, when it
    dies by a signal (SIGKILL, a crash), prints the one line that names the rank,
    before the launcher stops the other ranks. MPICH's mpirun kills the survivors at
    once, so no surviving rank could say which one died."""
    size, rank = launched_as()
    if size == 1 or os.environ.get(SUPERVISOR_VAR, "1") == "0" or not sys.platform.startswith("linux"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.environ[SUPERVISED_VAR] = str(parent)
        os.setpgid(0, 0)  # signals reach it only through the parent, once
        _die_with(parent)
        return
    for name in FORWARDED:
        signal.signal(getattr(signal, name), lambda signum, frame: _forward(pid, signum))
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status))
        sys.stderr.write(
            f"gpubp: error: rank {rank} (pid {pid} on {socket.gethostname()}) was killed by {sig.name}; "
            "every rank stops (the launcher ends the others); checkpoints are written atomically, "
            "so the run's last.npz is intact\n"
        )
        sys.stderr.flush()
        os._exit(128 + sig.value)
    os._exit(os.WEXITSTATUS(status))


def _forward(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _die_with(parent: int) -> None:
    """This process gets SIGKILL when `parent` ends (Linux's PR_SET_PDEATHSIG): a rank
    whose supervisor the launcher killed must not train on alone."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != parent:  # it ended before prctl took effect
        os._exit(1)


def row_range(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous share [start, stop) of n rows split over `size` ranks:
    the first n % size ranks take one row more, so shares differ by at most one
    (a rank may get none when n < size)."""
    q, extra = divmod(n, size)
    start = rank * q + min(rank, extra)
    return start, start + q + (1 if rank < extra else 0)


class Silent(GpubpError):
    """An error another rank reports: this rank exits with its code and says nothing."""

    def __init__(self, exit_code: int):
        super().__init__("")
        self.exit_code = exit_code
        self.silent = True


# --------------------------------------------------------------------------- one process


class Local:
    """One process: every hook is the identity; the trainer behaves as it always did."""

    rank, size, local_rank, is_root = 0, 1, 0, True

    def describe(self) -> str:
        return "1 process"

    def agree(self, fn, what: str = "start-up", undo=None):
        return fn()

    def check_same(self, record: dict, what: str) -> None:
        pass

    def use_device(self, device: str) -> None:
        pass

    def attach(self, trainer) -> None:
        pass

    def start(self, trainer) -> None:
        pass

    def rows(self, idx):
        """This rank's rows of a global batch (all of them)."""
        return idx

    def forward_backward(self, model, xb, yb, n_batch: int, interrupted):
        """(loss, stop): the loss and gradients of the global batch of n_batch rows (xb,
        yb: this rank's share); with N ranks the all-reduce too. `interrupted()` says
        whether Ctrl-C came to this process; stop: whether it came to any rank."""
        return model.forward_backward(xb, yb), interrupted()

    def evaluate(self, model, part, name: str, batch_size: int, host=None, scaler=None, report=False) -> dict:
        """trainer.evaluate_split's metrics of a split (with N ranks: each its share)."""
        from .trainer import evaluate_split

        return evaluate_split(model, part, name, batch_size, host, scaler, report)

    def report(self, error: GpubpError) -> GpubpError:
        """The error this rank raises for `error` (one line from one rank)."""
        return error

    def close(self) -> None:
        pass


LOCAL = Local()


def from_environment() -> Local:
    """LOCAL, or an `MPIWorld` when a launcher started more than one rank."""
    size, rank = launched_as()
    if size == 1:
        return LOCAL
    try:
        from mpi4py import MPI
    except ImportError as e:
        if rank != 0:
            raise Silent(UsageError.exit_code) from None
        raise UsageError(
            f"started as one of {size} ranks by an MPI launcher, but mpi4py does not import ({e}); {INSTALL_HINT}"
        ) from None
    if MPI.COMM_WORLD.Get_size() == 1:  # N copies of one process each: they would all write the same run
        if rank != 0:
            raise Silent(UsageError.exit_code)
        library = " ".join(MPI.Get_library_version().splitlines()[0].split())
        raise UsageError(
            f"the launcher started {size} ranks, but MPI sees only this one: mpi4py uses {library}, not the "
            "launcher's MPI; start with the mpirun (mpiexec) of the MPI that mpi4py was built for"
        )
    return MPIWorld(MPI.COMM_WORLD)


# --------------------------------------------------------------------------- MPI


def rank_timeout(rank: int) -> float:
    """Seconds a rank may wait in a collective: GPUBP_RANK_TIMEOUT, or 600."""
    text = os.environ.get(TIMEOUT_VAR, "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        value = -1.0
    if not value > 0 or value != value:
        if rank != 0:
            raise Silent(UsageError.exit_code)
        raise UsageError(f"{TIMEOUT_VAR}={text!r}: give the seconds a rank may wait for the others, e.g. 600")
    return value


def _alive(pid: int) -> bool:
    """Whether process `pid` on this host is running (a zombie is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class MPIWorld(Local):
    """N ranks over MPI: CPU collectives through mpi4py, the GPU's through NCCL."""

    def __init__(self, comm, timeout: float | None = None):
        from mpi4py import MPI

        self.MPI, self.comm = MPI, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.is_root = self.rank == 0
        self.host = socket.gethostname()
        local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        local.Free()
        self.timeout = rank_timeout(self.rank) if timeout is None else timeout
        self.trainer = None
        self.engine = None
        self.watch = Watchdog(self)
        self.peers = comm.allgather((self.host, os.getpid()))  # rank -> (host, pid)
        # ranks under a supervising parent, which reports their death itself
        self.supervised = comm.allgather(os.environ.get(SUPERVISED_VAR) == str(os.getppid()))

    def describe(self) -> str:
        hosts = sorted({h for h, _ in self.peers})
        return f"{self.size} ranks on {len(hosts)} host{'s' if len(hosts) > 1 else ''}"

    def rank_table(self) -> str:
        """'rank 0 = pid 123 on a, ...': maps a launcher's PID to a rank."""
        return ", ".join(f"{r} = pid {pid} on {host}" for r, (host, pid) in enumerate(self.peers))

    # ---- start-up: the same outcome on every rank

    def agree(self, fn, what: str = "start-up", undo=None):
        """Run fn() (no collectives inside) on every rank; if it raised on any rank,
        every rank raises: rank 0 the first rank's error, once, naming that rank
        unless all failed alike; the others `Silent`. `undo(result)`: on a rank where fn
        succeeded but another failed, takes back what fn left (a new run directory)."""
        try:
            result, failure = fn(), None
        except GpubpError as e:
            result, failure = None, (str(e), e.exit_code)
        except Exception as e:  # an unexpected failure on one rank must not leave the others waiting
            result, failure = None, (f"internal error during {what}: {type(e).__name__}: {e}", 1)
        with self.watch(what):
            failures = self.comm.allgather(failure)
        bad = [(r, f) for r, f in enumerate(failures) if f is not None]
        if not bad:
            return result
        first_rank, (message, code) = bad[0]
        if failure is None and undo is not None:
            undo(result)
        if not self.is_root:
            raise Silent(code)
        if not (len(bad) == self.size and all(f == bad[0][1] for _, f in bad)):
            others = f" (and {len(bad) - 1} more rank{'s' if len(bad) > 2 else ''})" if len(bad) > 1 else ""
            message = f"rank {first_rank}{others}: {message}"
        error = _error_type(code)(message)
        error.reported = True  # already names its rank
        raise error

    def check_same(self, record: dict, what: str) -> None:
        """Refuse to start when ranks were given different `record`s (config, paths,
        data shape): ConfigError naming the first key that differs."""
        mine = json.dumps(record, sort_keys=True, default=str)
        with self.watch(f"the check that all ranks run the same {what}"):
            everyone = self.comm.allgather(mine)
        for r, theirs in enumerate(everyone):
            if theirs != everyone[0]:
                key, a, b = _first_difference(json.loads(everyone[0]), json.loads(theirs))
                error = ConfigError(
                    f"the ranks were not given the same {what}: {key} is {a!r} on rank 0 but {b!r} on rank {r}; "
                    "start every rank with the same command, config and files"
                )
                error.reported = True
                raise error if self.is_root else Silent(error.exit_code)

    def use_device(self, device: str) -> None:
        """One rank per GPU: the local rank picks the device, before any backend exists."""
        if device == "cpu":
            return
        from .backend import gpu_unavailable_reason

        if gpu_unavailable_reason() is not None:
            return  # "auto" falls back to the CPU; "gpu" fails in resolve_device with the reason
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
        if self.local_size > count:
            raise UsageError(
                f"{self.local_size} ranks on host {self.host} but {count} GPU{'s' if count > 1 else ''}: "
                "start one rank per GPU (e.g. mpirun -n <GPUs per host> per host), or use --device cpu"
            )
        cupy.cuda.runtime.setDevice(self.local_rank)

    # ---- the trainer's hooks

    def attach(self, trainer) -> None:
        """Inside Trainer.__init__ (no collectives): the reduction buffers."""
        self.trainer = trainer
        if trainer.run.backend.name == "gpu":
            from .nccl_engine import NcclEngine

            self.engine = NcclEngine(self, trainer.model)
        else:
            self.engine = MPIEngine(self, trainer.model)

    def start(self, trainer) -> None:
        """After every rank has built its trainer: the collective part of the set-up."""
        from . import shard

        t = trainer
        shard.finish(t, self)  # a memory-mapped dataset: statistics from every rank's rows, shares to the device
        part = t.run.splits["train"]
        fingerprint = {
            "train rows": part.n,
            "features": t.run.n_features,
            "classes": t.run.n_classes,
            "standardisation (mean, std) checksum": _checksum(t.run.standardizer.mean, t.run.standardizer.std),
            "device": t.run.backend.name,
            "start step": t.step,
        }
        self.check_same(fingerprint, "data")
        self.engine.start()
        if self.is_root and not t.quiet:
            t.log(f"data parallel on {self.describe()}: {self.rank_table()}")
            note = whole_file_note(t.cfg, self.size, mapped=isinstance(part, shard.MappedSplit))
            if note:
                t.log(note)

    def rows(self, idx):
        start, stop = row_range(idx.shape[0], self.rank, self.size)
        return idx[start:stop]

    def all_sum(self, values: np.ndarray, what: str) -> None:
        """values (float64, host) <- their sum over the ranks, in place."""
        with self.watch(what):
            self.comm.Allreduce(self.MPI.IN_PLACE, values, op=self.MPI.SUM)

    def forward_backward(self, model, xb, yb, n_batch: int, interrupted):
        return self.engine.forward_backward(model, xb, yb, n_batch, interrupted)

    def evaluate(self, model, part, name: str, batch_size: int, host=None, scaler=None, report=False) -> dict:
        """Each rank evaluates its share of the split's rows; the sums are all-reduced.
        The metrics of whole outputs (regression's R^2, RMSE, MAE; the classification
        report) come from every rank's outputs, gathered in rank order."""
        from .trainer import output_metrics, wants_outputs

        start, stop = row_range(part.n, self.rank, self.size)
        sums = np.zeros(2)  # [sum of per-row losses, correct predictions]
        x, target, labels = part.share(start, stop)  # this rank's rows (all it holds of a memory-mapped file)
        # one forward pass: the loss, and this rank's outputs when a metric needs them
        mine = np.zeros((stop - start, model.sizes[-1])) if wants_outputs(host, report) else None
        if stop > start:
            loss, correct = model.evaluate(x, target, labels, batch_size, mine)
            sums[:] = loss * (stop - start), correct or 0
        with self.watch(f"the evaluation of the {name} split"):
            self.comm.Allreduce(self.MPI.IN_PLACE, sums, op=self.MPI.SUM)
        out = {f"{name}_loss": float(sums[0]) / part.n}
        if labels is not None:
            out[f"{name}_accuracy"] = float(sums[1]) / part.n
        if mine is not None:
            with self.watch(f"the gathering of the {name} split's outputs"):
                outputs = np.concatenate(self.comm.allgather(mine))  # (n, width), the split's row order
            out.update(output_metrics(model, outputs, name, host, scaler))
        return out

    def report(self, error: GpubpError) -> GpubpError:
        # divergence and Ctrl-C happen on every rank at the same step: rank 0 says so
        if isinstance(error, (TrainingError, Interrupted)):
            return error if self.is_root else Silent(error.exit_code)
        if isinstance(error, Silent) or getattr(error, "reported", False):
            return error
        attributed = GpubpError(f"rank {self.rank}: {error}")
        attributed.exit_code = error.exit_code
        return attributed

    def close(self) -> None:
        self.watch.stop()
        if self.engine is not None:
            self.engine.close()

    # ---- faults

    def dead_ranks(self) -> list[int]:
        """Ranks on this host whose process is gone."""
        return [
            r for r, (host, pid) in enumerate(self.peers) if host == self.host and r != self.rank and not _alive(pid)
        ]

    def fault_message(self, dead: list[int], what: str, waited: float, failed: str | None = None) -> str:
        """The fault's line: the ranks seen dead, or (none on this host) the collective
        that failed with MPI's reason `failed`, or that waited too long."""
        t = self.trainer
        at = f" at step {t.step}" if t is not None else ""
        if dead:
            names = ", ".join(f"rank {r} (pid {self.peers[r][1]} on {self.peers[r][0]})" for r in dead)
            head = f"{names} died during {what}{at}; every rank stopped"
        elif failed is not None:
            head = (
                f"rank {self.rank}: {what}{at} failed ({failed}): a rank on another host died or lost its "
                "connection; every rank stopped"
            )
        else:
            head = (
                f"rank {self.rank}: no answer from the other ranks for {waited:.0f} s during {what}{at} "
                f"(a rank on another host died or hangs; {TIMEOUT_VAR} sets the limit); every rank stopped"
            )
        if t is not None:
            last = os.path.join(t.out_dir, "last.npz")
            if t.saved_step is not None:
                head += f"; the last checkpoint {last} (step {t.saved_step}) is intact"
            elif os.path.exists(last):
                head += f"; the last checkpoint {last} is intact"
            else:
                head += "; no checkpoint had been written yet"
        return head

    def reporter(self, dead: list[int]) -> bool:
        """Whether this rank prints the fault: the lowest live rank of its host."""
        live = [r for r, (host, _) in enumerate(self.peers) if host == self.host and r not in dead]
        return not live or self.rank == min(live)


def whole_file_note(cfg, size: int, mapped: bool = False) -> str | None:
    """The line that says how the ranks read the data file: each only its rows
    (`mapped`, gpubp/shard.py), or each the whole file (None for generated data)."""
    path = cfg.data_path()
    if not path or not os.path.exists(path):
        return None
    if mapped:
        drop = (cfg.data.dataset, cfg.data.missing) == ("npz", "drop")
        scan = ', after one pass over it for the rows with a missing value (data.missing = "drop")' if drop else ""
        return (
            f"data: each of the {size} ranks memory-maps {path} and reads only its rows (its share of each split "
            f"at start-up, its slice of each batch){scan}"
        )
    nbytes = (
        os.path.getsize(path)
        if os.path.isfile(path)
        else sum(
            os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if os.path.isfile(os.path.join(path, f))
        )
    )
    what = "parses the whole CSV file" if cfg.data.dataset == "csv" else "reads the whole dataset"
    return (
        f"data: each of the {size} ranks {what} {path} ({nbytes / 2**20:.1f} MiB) and keeps the training split "
        f"on its device; each step uses only its share of the rows{_why_whole(cfg, path)}"
    )


def _why_whole(cfg, path: str) -> str:
    """Why a file that could be memory-mapped is read whole, and what would let each rank
    read only its rows ("" where there is nothing to say)."""
    import zipfile

    if cfg.data.dataset == "mnist":
        gz = os.path.isdir(path) and any(f.endswith(".gz") for f in os.listdir(path))
        return " (its IDX files are gzipped; unzipped, each rank would read only its rows)" if gz else ""
    if cfg.data.dataset != "npz":
        return ""
    try:
        with zipfile.ZipFile(path) as z:
            compressed = any(i.compress_type != zipfile.ZIP_STORED for i in z.infolist())
    except (OSError, zipfile.BadZipFile):
        return ""
    if compressed:
        return (
            " (its arrays are compressed, np.savez_compressed; saved with np.savez, each rank would read only its rows)"
        )
    return " (its arrays cannot be memory-mapped: C-order numeric arrays x and y, or x_train, y_train, x_test, y_test, can)"


def _error_type(code: int) -> type:
    return {2: ConfigError}.get(code, GpubpError)


def _checksum(*arrays) -> str:
    import hashlib

    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
    return h.hexdigest()[:16]


def _first_difference(a, b, prefix: str = ""):
    """(key, a's value, b's value) of the first place two JSON records differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
    return prefix.rstrip("."), a, b


class Watchdog:
    """A daemon thread that watches the collective this rank is waiting in: when a
    rank on this host has died (checked every 0.2 s, after a 2 s grace), or the wait
    passes the time limit, it prints one line (from the lowest live rank of the
    host) and ends the process: a rank blocked in MPI cannot be interrupted otherwise.
    A collective that MPI itself fails (a peer's memory gone mid-copy) ends the same way."""

    GRACE_S = 2.0  # a peer that finished the collective first may exit before we return from it
    SUPERVISED_GRACE_S = 10.0  # a supervised peer's death is reported by its parent: speak only if still here

    def __init__(self, world: MPIWorld):
        self.world = world
        self.what, self.since = "", None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpubp-watchdog", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def __call__(self, what: str):
        self.what, self.since = what, time.monotonic()
        try:
            yield
        except self.world.MPI.Exception as e:  # MPI saw a peer vanish (e.g. its shared memory) before we did
            since, self.since = self.since, None  # this thread reports it, not the watchdog's
            self._collective_failed(what, since, e)
        finally:
            self.since = None

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(0.2):
            since, what = self.since, self.what
            if since is None:
                continue
            waited = time.monotonic() - since
            if waited < self.GRACE_S:
                continue
            dead = self.world.dead_ranks()
            if dead and all(self.world.supervised[r] for r in dead) and waited < self.SUPERVISED_GRACE_S:
                continue  # their supervisors say it, and the launcher is about to stop this rank
            if dead or waited > self.world.timeout:
                if self.since is not since:  # the collective returned meanwhile
                    continue
                self._stop(dead, self.world.fault_message(dead, what, waited))

    def _collective_failed(self, what: str, since: float, error) -> None:
        """The collective raised: a rank died mid-way. A supervised rank's parent names
        it and the launcher then ends this rank, so wait for that (SUPERVISED_GRACE_S);
        still here, say what is known and end."""
        end = time.monotonic() + self.SUPERVISED_GRACE_S
        dead = self.world.dead_ranks()
        # an unsupervised dead rank has no parent to name it: say it at once
        while not any(not self.world.supervised[r] for r in dead) and time.monotonic() < end:
            time.sleep(0.2)
            dead = self.world.dead_ranks()
        reason = self.world.MPI.Get_error_string(error.Get_error_class())
        self._stop(dead, self.world.fault_message(dead, what, time.monotonic() - since, failed=reason))

    def _stop(self, dead: list[int], message: str) -> None:
        """One line from the host's reporting rank, then the end of this process: a
        rank blocked in (or broken out of) MPI cannot unwind normally."""
        if self.world.reporter(dead):
            sys.stderr.write(f"gpubp: error: {message}\n")
            sys.stderr.flush()
        else:  # let the reporter's line out first: a launcher may kill it once one rank exits
            time.sleep(self.GRACE_S)
        os._exit(1)


class MPIEngine:
    """The CPU all-reduce: gradients, the weighted loss and the stop flag in one
    buffer [g (P), loss, stop], one MPI_Allreduce (sum) per step."""

    def __init__(self, world: MPIWorld, model):
        self.world = world
        self.P = model.n_params
        self.buf = np.zeros(self.P + 2, dtype=model.dtype)
        model.use_grad_buffer(self.buf)

    def start(self) -> None:
        pass

    def forward_backward(self, model, xb, yb, n_batch: int, interrupted):
        buf, P, n = self.buf, self.P, xb.shape[0]
        if n > 0:
            loss = model.forward_backward(xb, yb)
            w = n / n_batch  # this rank's share of the global mean
            np.multiply(buf[:P], w, out=buf[:P])
            buf[P] = loss * w
        else:  # more ranks than rows in this (last) batch: nothing to add
            buf[: P + 1] = 0.0
        buf[P + 1] = 1.0 if interrupted() else 0.0
        MPI = self.world.MPI
        with self.world.watch("the gradient all-reduce"):
            self.world.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        return buf[P].copy(), bool(buf[P + 1] > 0)

    def close(self) -> None:
        pass
