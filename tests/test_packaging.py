"""The wheel is complete: build it the way a fresh machine can, install it into a fresh
virtual environment (no checkout on the path), and use it from another folder: every
kernel source is there, and `gpubp bench` finds its cases."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import venv
from importlib import metadata

import pytest

from gpubp import kernels

from .conftest import ROOT

# what pip prints when build isolation cannot fetch the build backend (no index reachable)
OFFLINE = re.compile(
    r"No matching distribution found for setuptools|Could not find a version that satisfies the requirement "
    r"setuptools|NewConnectionError|Temporary failure in name resolution|Network is unreachable"
)


def _version(name: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in re.findall(r"\d+", metadata.version(name))[:2])
    except metadata.PackageNotFoundError:
        return ()


def _can_build_here() -> bool:
    """Whether this interpreter can build the wheel without build isolation: setuptools
    >= 70.1 brings bdist_wheel itself; an older one (>= 61, pyproject metadata) needs the
    `wheel` package. A fresh venv (Python 3.10-3.13) has neither: it builds isolated."""
    st = _version("setuptools")
    return st >= (70, 1) or (st >= (61,) and _version("wheel") != ())


def build_wheel(dest) -> str:
    """Path of a freshly built gpubp wheel in `dest`. With a recent enough setuptools here,
    built in place; otherwise with build isolation (pip fetches setuptools from the index);
    skipped only when that fails for want of a reachable index."""
    isolated = not _can_build_here()
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), ROOT]
    if not isolated:
        cmd.insert(5, "--no-build-isolation")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 and isolated and OFFLINE.search(r.stdout + r.stderr):
        pytest.skip("cannot build the wheel: no package index reachable for setuptools (offline), "
                    "and this environment's setuptools is too old to build without isolation")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = dest.glob("gpubp-*.whl")
    return str(wheel)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python, bin folder, venv folder, cwd): the wheel installed alone in a fresh venv.
    Its dependencies (numpy, click, tqdm) are not installed there (no index needed): a
    .pth file appends the folders where this interpreter has them, after the venv's own
    site-packages, so `import gpubp` finds the venv's copy."""
    tmp = tmp_path_factory.mktemp("packaging")
    wheel = build_wheel(tmp / "wheels")
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=True)
    py = str(env_dir / "bin" / "python")
    r = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    deps = ["numpy", "click", "tqdm"] + (["tomli"] if sys.version_info < (3, 11) else [])
    folders = {os.path.dirname(os.path.dirname(os.path.abspath(__import__(d).__file__))) for d in deps}
    with open(os.path.join(site, "zz_gpubp_test_deps.pth"), "w") as f:
        f.write("".join(folder + "\n" for folder in sorted(folders)))
    elsewhere = tmp / "elsewhere"  # no checkout here or above
    elsewhere.mkdir()
    return py, str(env_dir / "bin"), str(env_dir), str(elsewhere)


def _run(cmd, cwd):
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=clean, timeout=300)


@pytest.mark.slow
def test_wheel_ships_every_kernel_source(installed):
    py, _, env_dir, cwd = installed
    probe = ("from gpubp import kernels\n"
             "d = kernels.kernel_dir()\n"
             "print(d)\n"
             "for f in kernels.KERNEL_FILES: print(f, len(kernels.read_source(f)))\n")  # fmt: skip
    r = _run([py, "-c", probe], cwd)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(env_dir) and lines[0].endswith(os.path.join("gpubp", "cuda_kernels"))
    for f in kernels.KERNEL_FILES:
        expected = len(kernels.read_source(f))  # the checkout's text, headers expanded
        assert f"{f} {expected}" in lines
    for f in kernels.HEADER_FILES:
        assert os.path.isfile(os.path.join(lines[0], f))


@pytest.mark.slow
def test_installed_bench_finds_its_cases_from_any_folder(installed):
    py, bin_dir, env_dir, cwd = installed
    from gpubp import bench

    r = _run([py, "-c", "import gpubp, gpubp.bench as b; print(gpubp.__file__); print(b.bench_dir())"], cwd)
    assert r.returncode == 0, r.stderr
    module, cases = r.stdout.splitlines()
    assert module.startswith(env_dir) and cases == os.path.join(os.path.dirname(module), "bench_cases")
    shipped = sorted(f for f in os.listdir(cases) if f.endswith(".toml"))
    assert shipped == sorted(f for f in os.listdir(bench.bench_dir()) if f.endswith(".toml"))

    gpubp_cmd = os.path.join(bin_dir, "gpubp")  # the console script of the wheel
    r = _run([gpubp_cmd, "bench", "--help"], cwd)
    assert r.returncode == 0 and "Usage:" in r.stdout, r.stderr
    r = _run([gpubp_cmd, "bench", "--case", "tiny", "--device", "cpu", "--no-torch"], cwd)
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("tiny") and "float32" in line)
    assert float(row.split()[2]) > 0  # ms/step of the float32 row
    assert os.listdir(cwd) == []  # nothing written where it ran


def quickstart_commands(readme: str) -> tuple[list[str], int | None]:
    """The command lines of the README's Quickstart and the index of the one after the
    test-command marker, read as .ci/run reads them."""
    lines = readme.splitlines()
    start = lines.index("## Quickstart")
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("## "))
    commands, fence, marker_at = [], False, None
    for line in lines[start:end]:
        if line.startswith("<!-- test-command"):
            marker_at = len(commands)
        elif line.startswith("```"):
            fence = not fence
        elif fence and line.strip():
            commands.append(line)
    return commands, marker_at


def test_quickstart_is_two_commands_and_the_test_extra_leaves_nvrtc_out():
    with open(os.path.join(ROOT, "README.md")) as f:
        commands, marker_at = quickstart_commands(f.read())
    assert commands == ["pip install . && python train.py --config configs/digits.toml",
                        "pip install '.[test]' && python -m pytest -q"] and marker_at == 1  # fmt: skip
    # the kernel-compile tests skip without NVRTC (tests/test_kernels_cpu.py), so the test
    # extra must not pull its 58 MB onto a CPU-only machine; the nvrtc extra carries it
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert not any("nvrtc" in req for req in extras["test"])
    assert any(req.startswith("nvidia-cuda-nvrtc") for req in extras["nvrtc"])
