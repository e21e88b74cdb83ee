"""The project's exceptions: one type per category, each with its exit code.

The CLI catches `GpubpError` once and prints `gpubp: error: <message>` as one line.
Exit code 2 is for usage and configuration mistakes and bad input files (the user
must change something before trying again); exit code 1 is for failures at run
time (divergence, device faults, an unwritable disk). An interrupted run (Ctrl-C)
exits with 130, as a shell reports a process stopped by SIGINT.
"""

from __future__ import annotations


class GpubpError(Exception):
    """Base class: every error gpubp raises on purpose."""

    exit_code = 1


class ConfigError(GpubpError):
    """A config file, key or value is wrong."""

    exit_code = 2


class UsageError(GpubpError):
    """A command-line argument is wrong (a missing path, an existing output directory)."""

    exit_code = 2


class DataError(GpubpError):
    """A dataset cannot be used as given (bad shape, NaN, labels out of range)."""

    exit_code = 2


class CheckpointError(GpubpError):
    """A checkpoint file is missing, truncated, corrupt, or from another model."""

    exit_code = 2


class DeviceError(GpubpError):
    """The requested device cannot be used (no GPU, CuPy missing)."""

    exit_code = 2


class DeviceRuntimeError(GpubpError):
    """The device failed while working (out of memory, a kernel that does not compile)."""

    exit_code = 1


class TrainingError(GpubpError):
    """Training cannot go on (a non-finite loss or gradient)."""

    exit_code = 1


class Interrupted(GpubpError):
    """Training was stopped by Ctrl-C (SIGINT) after saving a checkpoint at `step`."""

    exit_code = 130

    def __init__(self, message: str, step: int, checkpoint: str):
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint
