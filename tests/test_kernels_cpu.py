"""The CUDA sources checked without a GPU: every kernel compiles with NVRTC for sm_80
and sm_90 without a warning, and the activation math of kernels/activations.cuh,
built for the host with g++, matches the NumPy reference on ordinary and edge values."""

import ctypes
import os
import shutil
import subprocess

import numpy as np
import pytest

from gpubp import kernels
from gpubp.activations import ACTIVATIONS, SAVES_INPUT, make_activation
from gpubp.backend import numpy_ops

from .conftest import ROOT, TOL

IN_CI = os.environ.get("CI") == "true"


def need_nvrtc():
    if kernels.load_nvrtc() is None:
        message = "no NVRTC library (pip install nvidia-cuda-nvrtc)"
        if IN_CI:
            pytest.fail(message + ": CI must compile the kernels")
        pytest.skip(message)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("name", kernels.KERNEL_FILES)
def test_kernel_compiles_with_nvrtc_without_warnings(name, arch):
    need_nvrtc()
    log = kernels.nvrtc_compile(name, arch)
    assert log == "", f"kernels/{name} ({arch}) compiled with messages:\n{log}"


def test_a_broken_kernel_reports_file_and_log(tmp_path, monkeypatch):
    need_nvrtc()
    for f in kernels.HEADER_FILES + kernels.KERNEL_FILES:
        shutil.copy(os.path.join(kernels.kernel_dir(), f), tmp_path / f)
    with open(tmp_path / "loss.cu", "a") as f:
        f.write('\nextern "C" __global__ void broken(float* x) { x[0] = undefined_name; }\n')
    monkeypatch.setattr(kernels, "kernel_dir", lambda: str(tmp_path))
    with pytest.raises(kernels.NvrtcError) as e:
        kernels.nvrtc_compile("loss.cu")
    assert str(e.value).startswith("kernels/loss.cu: NVRTC compile failed:")
    assert "undefined_name" in e.value.log


def test_every_kernel_the_backend_launches_exists():
    defined = {n for f in kernels.KERNEL_FILES for n in kernels.kernel_names(f)}
    from gpubp.backend.cupy_backend import KERNELS_USED

    missing = {f"{k}_{s}" for k in KERNELS_USED for s in ("f32", "f64")} - defined
    assert not missing, missing


# --------------------------------------------------------------------------- host build


@pytest.fixture(scope="module")
def host_math(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        if IN_CI:
            pytest.fail("no C++ compiler: CI must check the kernel math on the host")
        pytest.skip("no C++ compiler (g++) on this machine: the kernel math is not checked on the host")
    out = str(tmp_path_factory.mktemp("hostmath") / "libhostmath.so")
    cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror",
           "-D__host__=", "-D__device__=", "-D__forceinline__=inline",  # the CUDA qualifiers, defined away
           "-I", kernels.kernel_dir(), os.path.join(ROOT, "tests", "host_math.cpp"), "-o", out]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lib = ctypes.CDLL(out)
    for name, ct in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
        ptr = ctypes.c_void_p
        getattr(lib, f"act_forward_{name}").argtypes = [ctypes.c_int, ct, ptr, ptr, ctypes.c_long]
        getattr(lib, f"act_backward_{name}").argtypes = [ctypes.c_int, ct, ptr, ptr, ptr, ctypes.c_long]
    return lib


EDGES = [0.0, -0.0, 1e-30, -1e-30, 1.0, -1.0, 30.0, -30.0, 1e4, -1e4, np.inf, -np.inf, np.nan]


def inputs(dtype):
    rng = np.random.default_rng(0)
    z = np.concatenate([EDGES, rng.normal(scale=3.0, size=2000), np.linspace(-12, 12, 481)])
    return z.astype(dtype)


def assert_math_close(actual, ref, z, dtype, what):
    """|actual - ref| <= 10 (atol max(1, |z|) + rtol |ref|), TOL by dtype.

    Both sides evaluate the same formula with the C library's functions (or CUDA's);
    where a formula cancels (1 + tanh(u) for very negative z, 1 - y^2 near saturation)
    the difference is a few ulps of the terms, which scale with z, not with the small
    result: hence atol times max(1, |z|). NaN must meet NaN.
    """
    atol, rtol = TOL[np.dtype(dtype)]
    actual = actual.astype(np.float64)
    ref = ref.astype(np.float64)
    zmag = np.maximum(1.0, np.abs(np.nan_to_num(z.astype(np.float64), posinf=0.0, neginf=0.0)))
    same = (actual == ref) | (np.isnan(actual) & np.isnan(ref))
    ok = same | (np.abs(actual - ref) <= 10 * (atol * zmag + rtol * np.abs(ref)))
    if not ok.all():
        i = int(np.argmin(ok))
        raise AssertionError(f"{what}: {int((~ok).sum())} entries off; z={z[i]!r}: {actual[i]!r} vs {ref[i]!r}")


def host_call(lib, fn, dtype, *arrays, kind, alpha):
    suffix = "f32" if dtype == np.float32 else "f64"
    arrays = [np.ascontiguousarray(a, dtype=dtype) for a in arrays]
    out = np.empty_like(arrays[0])
    getattr(lib, f"{fn}_{suffix}")(kind, alpha, *(a.ctypes.data for a in arrays), out.ctypes.data, out.size)
    return out


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_host_built_activation_math_matches_numpy(host_math, name, dtype):
    act = make_activation(name, 0.05)
    info = act.info
    z = inputs(dtype)
    with np.errstate(all="ignore"):  # inf and NaN inputs are the point here
        y_ref = numpy_ops.act_forward(z.copy(), act, np.empty_like(z))
    y = host_call(host_math, "act_forward", dtype, z, kind=info.kernel_id, alpha=act.alpha)
    assert_math_close(y, y_ref, z, dtype, f"{name} forward")
    saved = z if info.saves == SAVES_INPUT else y_ref
    d = np.random.default_rng(1).normal(size=z.shape).astype(dtype)
    d[:3] = [np.nan, np.inf, 0.0]  # NaN and inf in D propagate as in NumPy
    with np.errstate(all="ignore"):
        g_ref = numpy_ops.act_backward(d, saved, act, np.empty_like(z))
    g = host_call(host_math, "act_backward", dtype, d, saved, kind=info.kernel_id, alpha=act.alpha)
    assert_math_close(g, g_ref, z, dtype, f"{name} backward")


def test_host_check_catches_a_wrong_derivative(host_math):
    # a derivative that is wrong by 1% must fail the comparison above
    act = make_activation("tanh")
    z = inputs(np.float64)
    y = numpy_ops.act_forward(z.copy(), act, np.empty_like(z))
    d = np.ones_like(z)
    g = host_call(host_math, "act_backward", np.float64, d, y, kind=act.info.kernel_id, alpha=0.0)
    ref = numpy_ops.act_backward(d, y, act, np.empty_like(z))
    assert_math_close(g, ref, z, np.float64, "tanh")
    with pytest.raises(AssertionError):
        assert_math_close(g * 1.01, ref, z, np.float64, "tanh off by 1%")
