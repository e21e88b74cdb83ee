"""Shared test helpers: tolerances by dtype, small random problems, GPU skipping."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tolerance |actual - ref| <= atol + rtol |ref|, by dtype. Two computations of the same
# formula in a different order differ by a few ulps times the condition of the
# formula; the rtol values leave a margin of ~100 ulps (float64 eps 2.2e-16,
# float32 eps 1.2e-7) and atol covers results that cancel to near zero.
TOL = {
    np.dtype(np.float64): (1e-13, 1e-12),  # (atol, rtol)
    np.dtype(np.float32): (1e-6, 1e-5),
}


def assert_close(actual, ref, dtype=np.float64, scale=1.0, what=""):
    """assert |actual - ref| <= scale (atol + rtol |ref|) elementwise, TOL by dtype."""
    atol, rtol = TOL[np.dtype(dtype)]
    actual = np.asarray(actual, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert actual.shape == ref.shape, f"{what}: shape {actual.shape} != {ref.shape}"
    both_nan = np.isnan(actual) & np.isnan(ref)
    err = np.where(both_nan, 0.0, np.abs(actual - ref))
    bound = scale * (atol + rtol * np.abs(ref))
    bad = ~(err <= bound) & ~both_nan
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, err / np.maximum(bound, 1e-300), 0)), bad.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} entries off; worst at {i}: {actual[i]!r} vs {ref[i]!r} (bound {bound[i]:.3g})"
        )


def targets_for(loss: str, rng, n: int, width: int):
    """Random targets of the right kind for a loss."""
    if loss == "softmax_cross_entropy":
        return rng.integers(0, width, size=n)
    if loss == "binary_cross_entropy":
        return rng.uniform(0.0, 1.0, size=(n, width))
    return rng.normal(size=(n, width))


def run_cli(*args, cwd=None, timeout=300, module="gpubp.cli"):
    """Run `python -m gpubp.cli ARGS` (or train.py) in a real subprocess."""
    if module == "train.py":
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), *args]
    else:
        cmd = [sys.executable, "-m", module, *args]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd or ROOT, timeout=timeout, env=env)


def has_gpu() -> bool:
    from gpubp.backend import gpu_unavailable_reason

    return gpu_unavailable_reason() is None


def pytest_collection_modifyitems(config, items):
    if any("gpu" in item.keywords for item in items):
        reason = None
        try:
            from gpubp.backend import gpu_unavailable_reason

            reason = gpu_unavailable_reason()
        except Exception as e:  # pragma: no cover - a broken backend is reported by its tests
            reason = str(e)
        if reason is not None:
            skip = pytest.mark.skip(reason=f"no GPU: {reason}")
            for item in items:
                if "gpu" in item.keywords:
                    item.add_marker(skip)


@pytest.fixture(scope="module")
def gpu():
    """Skips the test where no GPU can be used (the reason in the skip line); the GPU test
    modules that need a backend object define their own `gpu`."""
    from gpubp.backend import gpu_unavailable_reason

    reason = gpu_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
