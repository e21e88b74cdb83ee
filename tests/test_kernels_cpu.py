"""The CUDA sources checked without a GPU: every kernel compiles with NVRTC for sm_80
and sm_90 without a warning, with the options CuPy really uses (its -ftz=true
included), and the activation math of kernels/activations.cuh, built for the host with
g++, matches the NumPy reference on ordinary and edge values, also with the CPU
flushing float32 subnormals as the GPU does. The 16-bit conversions of
kernels/precision.cuh match gpubp/precision.py bit for bit, and the activations on
16-bit storage (widen, float math, round once) match the NumPy emulation."""

import ctypes
import os
import shutil
import subprocess

import numpy as np
import pytest

from gpubp import kernels
from gpubp import precision as PR
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
    from gpubp.backend.cupy_backend import LAYER_KERNELS_USED

    assert not {f"{k}_{s}" for k in LAYER_KERNELS_USED for s in ("f32", "bf16")} - defined


def test_every_mixed_precision_kernel_the_backend_launches_exists():
    defined = {n for f in kernels.KERNEL_FILES for n in kernels.kernel_names(f)}
    from gpubp.backend.cupy_backend import LOW_KERNELS_USED

    wanted = {f"{k}_{s}" for k in LOW_KERNELS_USED for s in ("bf16", "f16")}
    wanted |= {"cast_bf16_f32", "cast_f16_f32", "step_guard_scaled_f32", "step_guard_scaled_norm_f32"}
    assert not wanted - defined, wanted - defined


# --------------------------------------------------------------------------- host build


def host_compiler(what: str) -> str:
    """The host's C++ compiler; without one the test skips (fails in CI, which must check
    `what` on the host)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        if REQUIRE_KERNEL_TOOLS:
            pytest.fail(f"no C++ compiler: CI must check {what} on the host")
        pytest.skip(f"no C++ compiler (g++) on this machine: {what} is not checked on the host")
    return cxx


@pytest.fixture(scope="module")
def host_math(tmp_path_factory):
    cxx = host_compiler("the kernel math")
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
    ptr, n = ctypes.c_void_p, ctypes.c_long
    for name in ("round_bf16", "round_f16", "widen_bf16", "widen_f16"):
        getattr(lib, name).argtypes = [ptr, ptr, n]
    for low in ("bf16", "f16"):
        getattr(lib, f"act_forward_{low}").argtypes = [ctypes.c_int, ctypes.c_float, ptr, ptr, n]
        getattr(lib, f"act_backward_{low}").argtypes = [ctypes.c_int, ctypes.c_float, ptr, ptr, ptr, n]
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


# --------------------------------------------------------------------------- 16-bit storage


def float32_patterns() -> np.ndarray:
    """float32 inputs that exercise every rounding path: random bit patterns (every
    exponent, NaN and inf included), exact ties and their neighbours at the bf16 (bit 15)
    and fp16 (bit 12) positions for every high half, fp16's subnormal range in steps of
    its ties, and the overflow borders."""
    rng = np.random.default_rng(0)
    high = np.arange(2**16, dtype=np.uint32) << 16
    sub = np.arange(0x33000000 >> 12, 0x38800000 >> 12, dtype=np.uint32) << 12  # 2^-25 .. 2^-14
    edges = np.array([0x477FEFFF, 0x477FF000, 0x477FF001, 0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x00000001,
                      0x007FFFFF, 0x33000000, 0x33000001, 0x38800000, 0x387FFFFF], dtype=np.uint32)  # fmt: skip
    u = np.concatenate([rng.integers(0, 2**32, 1_000_000, dtype=np.uint64).astype(np.uint32), high | 0x8000,
                        high | 0x7FFF, high | 0x8001, high | 0x1000, high | 0x3000, sub, sub | 0x800, edges])  # fmt: skip
    u = np.concatenate([u, u[-len(edges) :] | 0x80000000])
    return u.view(np.float32)


@pytest.mark.parametrize("low", ["bf16", "f16"])
def test_host_built_rounding_matches_numpy_bit_for_bit(host_math, low):
    """precision.cuh's float -> 16-bit rounding == gpubp.precision's (numpy float16 for
    fp16, the bit-level emulation for bf16) on every pattern; NaN stays NaN."""
    x = float32_patterns()
    out = np.empty(x.size, np.uint16)
    getattr(host_math, f"round_{low}")(x.ctypes.data, out.ctypes.data, x.size)
    with np.errstate(all="ignore"):
        ref = PR.bf16_bits(x) if low == "bf16" else PR.f16_bits(x)
    nan = np.isnan(x)
    bad = (out != ref) & ~nan
    assert not bad.any(), f"{int(bad.sum())} differ, e.g. {x[bad][:3]!r}: {out[bad][:3]} vs {ref[bad][:3]}"
    widen = PR.bf16_to_float32 if low == "bf16" else (lambda b: b.view(np.float16).astype(np.float32))
    assert np.isnan(widen(out[nan])).all()


@pytest.mark.parametrize("low", ["bf16", "f16"])
def test_host_built_widening_is_exact_for_every_pattern(host_math, low):
    bits = np.arange(2**16, dtype=np.uint16)
    out = np.empty(bits.size, np.float32)
    getattr(host_math, f"widen_{low}")(bits.ctypes.data, out.ctypes.data, bits.size)
    ref = PR.bf16_to_float32(bits) if low == "bf16" else bits.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    assert (out.view(np.uint32)[~nan] == ref.view(np.uint32)[~nan]).all()
    assert np.isnan(out[nan]).all()


def low_close(out_bits, ref_bits, low, z):
    """Equal bits, or neighbours (one 16-bit ulp), or within the float32 bound of
    assert_math_close: the float math under the rounding is the C library's float32 on
    the host and NumPy's (partly float64) in the reference; where those differ by an ulp
    of float32 the rounded results may straddle a 16-bit rounding boundary, and where the
    float32 formula cancels (gelu's 1 + erf far left) they differ by its absolute error."""
    a = out_bits.astype(np.int32)
    b = ref_bits.astype(np.int32)
    widen = PR.bf16_to_float32 if low == "bf16" else (lambda h: h.view(np.float16).astype(np.float32))
    fa, fb = widen(out_bits).astype(np.float64), widen(ref_bits).astype(np.float64)
    atol, rtol = TOL[np.dtype(np.float32)]
    zmag = np.maximum(1.0, np.abs(np.nan_to_num(z.astype(np.float64), posinf=0.0, neginf=0.0)))
    with np.errstate(invalid="ignore"):
        near = np.abs(fa - fb) <= 10 * (atol * zmag + rtol * np.abs(fb))
    both_nan = np.isnan(fa) & np.isnan(fb)
    return (a == b) | both_nan | near | ((np.abs(a - b) == 1) & ((a ^ b) & 0x8000 == 0))


@pytest.mark.parametrize("low", ["bf16", "f16"])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_host_built_activations_on_16_bit_storage_match_the_emulation(host_math, name, low):
    """bias_act.cu's 16-bit path (widen, f in float, round once) against numpy_ops on the
    same 16-bit arrays: equal bits or one 16-bit ulp apart, and equal bits for nearly all."""
    act = make_activation(name, 0.05)
    dtype = PR.BF16 if low == "bf16" else PR.F16
    z16 = np.empty(inputs(np.float32).size, dtype)
    with np.errstate(all="ignore"):
        PR.store(inputs(np.float32), z16)
        y16 = np.empty_like(z16)
        numpy_ops.bias_act_forward(z16.copy(), np.zeros(1, np.float32), act, y16)
    zb = z16.view(np.uint16)
    out = np.empty_like(zb)
    getattr(host_math, f"act_forward_{low}")(act.info.kernel_id, act.alpha, zb.ctypes.data, out.ctypes.data, zb.size)
    ok = low_close(out, y16.view(np.uint16), low, PR.to_float32(z16))
    assert ok.all(), f"{name} forward ({low}): {int((~ok).sum())} off, e.g. z={PR.to_float32(z16)[~ok][:3]}"
    # most results agree to the bit; gelu and gelu_tanh less (about 93%: 1 + erf(z) and
    # 1 + tanh(u) cancel in float32 on the left, where NumPy's Phi runs in float64)
    assert (out == y16.view(np.uint16)).mean() > (0.9 if name.startswith("gelu") else 0.99)
    saved = z16 if act.info.saves == SAVES_INPUT else y16
    d16 = np.empty_like(z16)
    PR.store(np.random.default_rng(1).normal(size=z16.shape).astype(np.float32), d16)
    with np.errstate(all="ignore"):
        g16 = numpy_ops.act_backward(d16, saved, act, np.empty_like(z16))
    db, sb = d16.view(np.uint16), saved.view(np.uint16)
    getattr(host_math, f"act_backward_{low}")(act.info.kernel_id, act.alpha, db.ctypes.data, sb.ctypes.data,
                                              out.ctypes.data, zb.size)  # fmt: skip
    ok = low_close(out, g16.view(np.uint16), low, PR.to_float32(z16))
    assert ok.all(), f"{name} backward ({low}): {int((~ok).sum())} off"
    assert (out == g16.view(np.uint16)).mean() > (0.9 if name.startswith("gelu") else 0.99)
