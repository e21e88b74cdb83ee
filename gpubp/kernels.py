"""Our CUDA sources: where they are, their text, and an NVRTC compile that needs no GPU.

The sources live in kernels/ at the repository root and ship inside the wheel as the
package `gpubp.cuda_kernels` (pyproject.toml maps the folder). A source's local
`#include "x.cuh"` lines are expanded here, so the text handed to NVRTC (and CuPy's
compile cache, which keys on that text) covers the headers too.

`nvrtc_compile` talks to the NVRTC library directly through ctypes: it compiles for
any architecture on a machine without a GPU, which is how CI checks every kernel.
The GPU backend compiles the same text through CuPy's RawModule.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import re
from functools import lru_cache
from importlib import resources

KERNEL_FILES = ("bias_act.cu", "reduce.cu", "loss.cu", "optim.cu", "cast.cu", "mlp.cu", "gather.cu", "layer.cu",
                "layer_tc.cu")  # fmt: skip
HEADER_FILES = ("common.cuh", "activations.cuh", "precision.cuh", "loss.cuh")
NVRTC_OPTIONS = ("-std=c++17",)  # what the backend asks for
# what CuPy's compiler module appends to every NVRTC compile, after the caller's options
# (cupy/cuda/compiler.py: _compile_with_cache_cuda and _compile_using_nvrtc). -ftz=true
# flushes float32 subnormals (|x| < 2^-126) to zero, inputs and results: the GPU computes
# relu'(1e-40) = relu'(0) = 0 where NumPy gives 1. tests/test_kernels_cpu.py checks that
# CuPy still adds exactly these and compiles the kernels with them.
CUPY_APPENDED_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")


def effective_options(options=NVRTC_OPTIONS) -> tuple[str, ...]:
    """The NVRTC options a kernel is really compiled with on the GPU: ours, then CuPy's."""
    return (*options, *CUPY_APPENDED_OPTIONS)


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)


def kernel_dir() -> str:
    """The folder holding the .cu/.cuh files: the installed package's copy, else the
    checkout's kernels/ beside gpubp/."""
    try:
        installed = resources.files("gpubp.cuda_kernels")
        if installed.joinpath("bias_act.cu").is_file():
            return str(installed)
    except ModuleNotFoundError:
        pass
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    if os.path.isfile(os.path.join(here, "bias_act.cu")):
        return here
    raise FileNotFoundError("gpubp's CUDA sources (kernels/*.cu) are missing from this installation")


def read_source(name: str) -> str:
    """The text of kernels/<name>, local includes expanded (each header once)."""
    seen: set[str] = set()

    def expand(file: str) -> str:
        path = os.path.join(kernel_dir(), file)
        with open(path) as f:
            text = f.read()

        def include(match):
            header = match.group(1)
            if header in seen:
                return f"// {header} already included"
            seen.add(header)
            return f"// ---- begin {header}\n{expand(header)}\n// ---- end {header}"

        return _INCLUDE.sub(include, text)

    seen.add(name)
    return expand(name)


# the instantiation lists of common.cuh / precision.cuh / gather.cu and the suffixes they give
_TYPE_LISTS = {"FOR_FLOAT_TYPES": ("f32", "f64"), "FOR_LOW_TYPES": ("bf16", "f16"),
               "FOR_WORD_TYPES": ("w1", "w2", "w4", "w8", "w16")}  # fmt: skip


# how a kernel's entry point starts, before its name: extern "C" __global__ void, with or
# without __launch_bounds__(...) (layer.cu's)
KERNEL_DECLARATION = r'extern "C" __global__ void\s+(?:__launch_bounds__\([^)]*\)\s+)?'


def kernel_names(name: str) -> list[str]:
    """The extern "C" entry points a source defines: written directly, or by an
    instantiation macro `#define M(T, S)` (names with ##S) applied by FOR_FLOAT_TYPES(M)
    (suffixes f32, f64) and/or FOR_LOW_TYPES(M) (bf16, f16), or FOR_WORD_TYPES(M) (w1 .. w16)."""
    text = read_source(name)
    names = set(re.findall(KERNEL_DECLARATION + r"(\w+)\(", text))
    for macro, body in re.findall(r"#define (\w+)\(T, S\)((?:[^\n]*\\\n)*[^\n]*)", text):
        bases = re.findall(KERNEL_DECLARATION + r"([\w#]+)\(", body)
        for type_list, suffixes in _TYPE_LISTS.items():
            if re.search(rf"^{type_list}\({macro}\)", text, re.MULTILINE):
                for suffix in suffixes:
                    names.update(b.replace("##S##", suffix).replace("##S", suffix) for b in bases)
    return sorted(names)


# --------------------------------------------------------------------------- NVRTC via ctypes


def _nvrtc_candidates() -> list[str]:
    found = []
    env = os.environ.get("GPUBP_NVRTC_LIB")
    if env:
        found.append(env)
    try:
        import nvidia  # the nvidia-cuda-nvrtc wheel (a namespace package)

        for root in nvidia.__path__:
            found += sorted(glob.glob(os.path.join(root, "cu1*", "lib", "libnvrtc.so*")), reverse=True)
            found += sorted(glob.glob(os.path.join(root, "cuda_nvrtc", "lib", "libnvrtc.so*")), reverse=True)
    except ImportError:
        pass
    lib = ctypes.util.find_library("nvrtc")
    if lib:
        found.append(lib)
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            found += sorted(glob.glob(os.path.join(home, "lib64", "libnvrtc.so*")), reverse=True)
    return [f for f in found if "builtins" not in os.path.basename(f)]


@lru_cache(maxsize=1)
def load_nvrtc():
    """The NVRTC shared library, or None when none can be found."""
    for path in _nvrtc_candidates():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        lib.nvrtcGetErrorString.argtypes = [ctypes.c_int]
        return lib
    return None


def nvrtc_version() -> tuple[int, int] | None:
    lib = load_nvrtc()
    if lib is None:
        return None
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


class NvrtcError(RuntimeError):
    def __init__(self, name: str, log: str):
        super().__init__(f"kernels/{name}: NVRTC compile failed:\n{log}")
        self.name = name
        self.log = log


def nvrtc_compile(name: str, arch: str = "sm_90", options=None) -> str:
    """Compile kernels/<name> to PTX for `arch` with NVRTC, with the options CuPy really
    uses (effective_options()) unless `options` is given; returns the compile log
    (empty when there is nothing to say). Raises NvrtcError with the log on failure."""
    return _nvrtc(name, arch, options)[0]


def nvrtc_ptx(name: str, arch: str = "sm_90", options=None) -> str:
    """The PTX of kernels/<name>, compiled as nvrtc_compile does."""
    return _nvrtc(name, arch, options)[1]


def nvrtc_compile_source(source: str, name: str, arch: str = "sm_90", options=None) -> str:
    """nvrtc_compile of the text `source` (called `name` in messages), e.g. a CuPy
    elementwise kernel as CuPy would assemble it; returns the log."""
    return _nvrtc(name, arch, options, source)[0]


def _nvrtc(name: str, arch: str, options, text: str | None = None) -> tuple[str, str]:
    """(log, PTX) of an NVRTC compile of kernels/<name> (or of `text`)."""
    options = effective_options() if options is None else options
    lib = load_nvrtc()
    if lib is None:
        raise RuntimeError("no NVRTC library found (pip install nvidia-cuda-nvrtc, or set GPUBP_NVRTC_LIB)")
    source = (read_source(name) if text is None else text).encode()
    prog = ctypes.c_void_p()
    status = lib.nvrtcCreateProgram(ctypes.byref(prog), source, name.encode(), 0, None, None)
    if status != 0:
        raise RuntimeError(f"nvrtcCreateProgram: {lib.nvrtcGetErrorString(status).decode()}")
    try:
        opts = [f"--gpu-architecture={arch}".encode(), *(o.encode() for o in options)]
        argv = (ctypes.c_char_p * len(opts))(*opts)
        status = lib.nvrtcCompileProgram(prog, len(opts), argv)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, buf)
        log = buf.value.decode(errors="replace").strip()
        if status != 0:
            raise NvrtcError(name, log or lib.nvrtcGetErrorString(status).decode())
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetPTX(prog, ptx)
        return log, ptx.value.decode(errors="replace")
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
