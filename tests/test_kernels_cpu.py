"""The CUDA sources checked without a GPU: every kernel compiles with NVRTC for sm_80
and sm_90 without a warning, with the options CuPy really uses (its -ftz=true
included), and the activation math of kernels/activations.cuh, built for the host with
g++, matches the NumPy reference on ordinary and edge values, also with the CPU
flushing float32 subnormals as the GPU does."""

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

# Step 2 of .ci/run installs NVRTC and sets this: there a missing compiler or NVRTC is a
# failure, not a skip. Step 1 (the README's test command in a bare venv) has neither
# NVRTC nor this variable, so those tests skip there, as they do for a new user.
REQUIRE_KERNEL_TOOLS = os.environ.get("GPUBP_REQUIRE_KERNEL_TOOLS") == "1"


def need_nvrtc():
    if kernels.load_nvrtc() is None:
        message = "no NVRTC library (pip install nvidia-cuda-nvrtc)"
        if REQUIRE_KERNEL_TOOLS:
            pytest.fail(message + ": CI must compile the kernels")
        pytest.skip(message)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("name", kernels.KERNEL_FILES)
def test_kernel_compiles_with_nvrtc_without_warnings(name, arch):
    need_nvrtc()
    log = kernels.nvrtc_compile(name, arch)
    assert log == "", f"kernels/{name} ({arch}) compiled with messages:\n{log}"


def test_compile_options_are_the_ones_cupy_uses():
    """CuPy appends CUPY_APPENDED_OPTIONS to every NVRTC compile; if a CuPy release
    changes that, this fails and kernels.CUPY_APPENDED_OPTIONS must follow."""
    compiler = pytest.importorskip("cupy.cuda.compiler")
    import inspect

    source = inspect.getsource(compiler)
    for option in kernels.CUPY_APPENDED_OPTIONS:
        assert f"options += ('{option}',)" in source, f"CuPy no longer appends {option}"
    assert kernels.effective_options()[: len(kernels.NVRTC_OPTIONS)] == kernels.NVRTC_OPTIONS


@pytest.mark.parametrize("name", ["bias_act.cu", "loss.cu", "optim.cu"])
def test_ci_compile_flushes_subnormals_as_the_gpu_does(name):
    """The PTX compiled here carries .ftz on float32 arithmetic, as on the GPU; without
    CuPy's options it would not (so a compile that drops them fails this test)."""
    need_nvrtc()
    import re

    arith = re.compile(r"\b(?:add|sub|mul|fma\.rn)\.(ftz\.)?f32\b")  # ex2.approx is .ftz always
    ftz = [m.group(1) is not None for m in arith.finditer(kernels.nvrtc_ptx(name))]
    assert ftz and all(ftz), f"kernels/{name}: float32 arithmetic without .ftz in the PTX"
    plain = [m.group(1) is not None for m in arith.finditer(kernels.nvrtc_ptx(name, options=kernels.NVRTC_OPTIONS))]
    assert plain and not any(plain)


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
        if REQUIRE_KERNEL_TOOLS:
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
    if lib.has_ftz():
        lib.act_forward_f32_ftz.argtypes = lib.act_forward_f32.argtypes
        lib.act_backward_f32_ftz.argtypes = lib.act_backward_f32.argtypes
    return lib


EDGES = [0.0, -0.0, 1e-30, -1e-30, 1.0, -1.0, 30.0, -30.0, 1e4, -1e4, np.inf, -np.inf, np.nan]


def inputs(dtype):
    rng = np.random.default_rng(0)
    z = np.concatenate([EDGES, rng.normal(scale=3.0, size=2000), np.linspace(-12, 12, 481)])
    return z.astype(dtype)


def assert_math_close(actual, ref, z, dtype, what, atol_extra=0.0):
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
    with np.errstate(invalid="ignore"):  # inf - inf where both are the same inf: `same` covers it
        ok = same | (np.abs(actual - ref) <= 10 * (atol * zmag + rtol * np.abs(ref)) + atol_extra)
    if not ok.all():
        i = int(np.argmin(ok))
        raise AssertionError(f"{what}: {int((~ok).sum())} entries off; z={z[i]!r}: {actual[i]!r} vs {ref[i]!r}")


def host_call(lib, fn, dtype, *arrays, kind, alpha, ftz=False):
    suffix = ("f32" if dtype == np.float32 else "f64") + ("_ftz" if ftz else "")
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


SUBNORMAL = np.array([1e-40, -1e-40, 1e-39, -3e-39, 5e-45], dtype=np.float32)  # below 2^-126 = 1.18e-38


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_host_math_with_flushed_subnormals(host_math, name):
    """float32 math as the GPU runs it under -ftz=true (MXCSR FTZ|DAZ on the host).
    The model of the flush: every subnormal input reads as (signed) zero, every
    subnormal result becomes zero. So the reference is NumPy's on the flushed inputs,
    and the bound TOL plus the smallest normal float32 (the bound tests/test_gpu.py
    uses). The consequence that matters: at a subnormal z, relu'(z) is relu'(0) = 0
    on the GPU, where NumPy gives 1."""
    if not host_math.has_ftz():
        pytest.skip("this CPU has no flush-to-zero mode to emulate the GPU with")
    dtype, tiny = np.float32, float(np.finfo(np.float32).tiny)
    act = make_activation(name, 0.05)
    # inputs whose results are subnormal in exact arithmetic: GELU/SiLU/sigmoid far left
    z = np.concatenate([inputs(dtype), SUBNORMAL, np.float32([-13.5, -14.0, -88.0, -95.0, -104.0])])

    def flushed(a):
        return np.where(np.abs(a) < tiny, np.copysign(np.float32(0), a), a).astype(dtype)

    with np.errstate(all="ignore"):
        y_ref = numpy_ops.act_forward(flushed(z), act, np.empty_like(z))
    y = host_call(host_math, "act_forward", dtype, z, kind=act.info.kernel_id, alpha=act.alpha, ftz=True)
    assert_math_close(y, y_ref, z, dtype, f"{name} forward, flushed", atol_extra=tiny)
    saved = z if act.info.saves == SAVES_INPUT else y_ref
    d = np.random.default_rng(1).normal(size=z.shape).astype(dtype)
    with np.errstate(all="ignore"):
        g_ref = numpy_ops.act_backward(d, flushed(saved), act, np.empty_like(z))
    g = host_call(host_math, "act_backward", dtype, d, saved, kind=act.info.kernel_id, alpha=act.alpha, ftz=True)
    assert_math_close(g, g_ref, z, dtype, f"{name} backward, flushed", atol_extra=tiny)
    # the flush is the caller's only: NumPy in this thread still keeps subnormals
    assert np.float32(1e-40) * np.float32(1.0) != 0


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
