"""Checkpoints: one .npz file (no pickles) holding the flat parameters, the optimizer
state, the standardisation statistics and a JSON `meta` record (config, step, RNG
position, early-stopping state), sealed by a SHA-256 checksum over everything else.

Writes are atomic: a temporary file in the same folder, fsync, rename, fsync of the
folder. A reader sees the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading

import numpy as np

from .data import read_numpy_file
from .errors import CheckpointError

FORMAT = "gpubp-checkpoint"
VERSION = 1


def _digest(arrays: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


TMP_PREFIX = ".tmp-"  # temporaries of atomic_write: .tmp-<name>-<random>
_deferred = threading.local()  # .folders: the folders whose fsync folder_sync_once() holds back


@contextlib.contextmanager
def folder_sync_once():
    """Within it, atomic_write fsyncs each file but defers the fsync of its folder to the
    end, once per folder: two files written in turn (best.npz, then last.npz) cost three
    fsyncs, not four. Each file is still durable before its rename; the renames come in
    order, and the fsync of the second file commits the first rename with it on a
    journaling file system (ext4, XFS), so a crash never shows the second new and the
    first old. The folder is synced on the way out, an error's too."""
    outer = getattr(_deferred, "folders", None)
    if outer is not None:  # nested: the outermost syncs
        yield
        return
    _deferred.folders = folders = []
    try:
        yield
    finally:
        _deferred.folders = None
        for folder in folders:
            _sync_folder(folder)


def _sync_folder(folder: str) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path: str, write) -> None:
    """Replace `path` atomically: `write(f)` fills a temporary file (binary) in the same
    folder, which is flushed, fsynced and renamed over `path`; then the folder is fsynced.
    A reader sees the old file or the new one, never half of one. On any failure (or
    Ctrl-C) the temporary is removed; only a killed process leaves one behind, and
    `remove_temporaries` clears those."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + os.path.basename(path) + "-", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # the mode a plain open() would give, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    deferred = getattr(_deferred, "folders", None)
    if deferred is None:
        _sync_folder(folder)
    elif folder not in deferred:
        deferred.append(folder)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def remove_temporaries(folder: str) -> list[str]:
    """Delete the temporaries that killed writes left in `folder`; returns their names."""
    names = sorted(n for n in os.listdir(folder) if n.startswith(TMP_PREFIX))
    for name in names:
        os.unlink(os.path.join(folder, name))
    return names


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_checkpoint(path: str, meta: dict, arrays: dict) -> None:
    """Write arrays plus meta to `path` atomically."""
    payload = {name: np.asarray(a) for name, a in arrays.items()}
    payload["meta"] = np.array(json.dumps({"format": FORMAT, "version": VERSION, **meta}, sort_keys=True))
    payload["checksum"] = np.array(_digest(payload))
    atomic_write(path, lambda f: np.savez(f, **payload))


def load_checkpoint(path: str) -> tuple[dict, dict]:
    """(meta, arrays) of a checkpoint, verified; CheckpointError otherwise."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} not found; give the path of a last.npz or best.npz")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a directory; give a .npz file inside it (last.npz or best.npz)")
    arrays = read_numpy_file(path, CheckpointError, "gpubp checkpoint")
    if not isinstance(arrays, dict) or "meta" not in arrays or "checksum" not in arrays:
        raise CheckpointError(f"{path}: not a gpubp checkpoint (no meta/checksum records); was it written by gpubp?")
    stored = str(arrays.pop("checksum"))
    if _digest(arrays) != stored:
        raise CheckpointError(
            f"{path}: checksum mismatch: the file is corrupt; use another checkpoint (best.npz or last.npz)"
        )
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: the meta record is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a gpubp checkpoint (format {meta.get('format') if isinstance(meta, dict) else None!r})"
        )
    if meta.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {meta.get('version')} is not supported (this gpubp reads {VERSION})"
        )
    return meta, arrays


def check_params(arrays: dict, path: str, n_params: int, sizes) -> np.ndarray:
    """The flat parameter vector (n_params,) of a checkpoint's arrays, or CheckpointError
    naming `path` (missing, or from another architecture)."""
    params = arrays.get("params")
    if params is None or params.ndim != 1:
        raise CheckpointError(f"{path}: no flat 'params' array in the checkpoint")
    if params.shape[0] != n_params:
        raise CheckpointError(
            f"{path}: holds {params.shape[0]} parameters but the model {list(sizes)} has {n_params}; "
            "it is from another architecture"
        )
    return params


def best_for_resume(last: str, meta: dict, n_params: int, sizes) -> tuple[dict, dict] | None:
    """(meta, arrays) of the best.npz beside checkpoint `last` (its `meta`) that a resumed
    run returns to with train.restore_best, the same rule for a single run and a sweep's
    models:
    - none there, or one of a step past last.npz's (written just before a crash that
      came before last.npz; the resumed run writes it again when it gets there): None;
    - the step last.npz records as its best (meta["best_step"]), with this model's
      number of parameters: that checkpoint;
    - any other (from another run, copied in): CheckpointError naming it."""
    path = os.path.join(os.path.dirname(os.path.abspath(last)), "best.npz")
    if not os.path.exists(path):
        return None
    best_meta, best_arrays = load_checkpoint(path)
    step, best_step = best_meta.get("step"), meta.get("best_step")
    if best_step is not None and step == best_step:
        check_params(best_arrays, path, n_params, sizes)
        return best_meta, best_arrays
    if isinstance(step, int) and step > int(meta["step"]):
        return None
    recorded = f"the best at step {best_step}" if best_step is not None else "no best step"
    raise CheckpointError(
        f"--resume {last}: {path} is a checkpoint of step {step}, but {os.path.basename(last)} records {recorded}; "
        "it is not this run's best.npz (copied from another run?): put the run's own back, or remove it to "
        "go on without the best weights"
    )
