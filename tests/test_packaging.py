"""The wheel carries every kernel source: build it, install it into a fresh virtual
environment (no checkout on the path), and find each .cu/.cuh file there."""

import os
import subprocess
import sys
import venv

import pytest

from gpubp import kernels

from .conftest import ROOT


@pytest.mark.slow
def test_wheel_ships_every_kernel_source(tmp_path):
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(wheels), ROOT], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    (wheel,) = wheels.glob("gpubp-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = str(env_dir / "bin" / "python")
    r = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    # gpubp.kernels needs only the standard library, so no dependency is installed
    probe = ("from gpubp import kernels\n"
             "d = kernels.kernel_dir()\n"
             "print(d)\n"
             "for f in kernels.KERNEL_FILES: print(f, len(kernels.read_source(f)))\n")  # fmt: skip
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([py, "-c", probe], capture_output=True, text=True, cwd=str(tmp_path), env=clean)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(str(env_dir)) and lines[0].endswith(os.path.join("gpubp", "cuda_kernels"))
    for f in kernels.KERNEL_FILES:
        expected = len(kernels.read_source(f))  # the checkout's text, headers expanded
        assert f"{f} {expected}" in lines
    for f in kernels.HEADER_FILES:
        assert os.path.isfile(os.path.join(lines[0], f))
