"""What the CPU tests know of our CUDA kernels' C signatures, read from kernels/*.cu:
each extern "C" kernel's parameters (type, pointer or value, name), a check that a
launch's arguments have those types, and the GPU backend over NumPy arrays whose kernel
launches a test supplies (tests/test_gpu_contract.py, tests/test_kernels_emulated.py)."""

from __future__ import annotations

import os
import re

import numpy as np

C_TYPES = {"float": np.float32, "double": np.float64, "int": np.int32, "long long": np.int64,
           "unsigned int": np.uint32, "unsigned char": np.uint8, "bool": np.bool_, "bf16_t": np.uint16, "f16_t": np.float16}  # fmt: skip
SUFFIX_TYPE = {"f32": "float", "f64": "double", "bf16": "bf16_t", "f16": "f16_t"}


def kernel_params(file: str, name: str) -> list[tuple[str, bool, str]]:
    """(C type, is a pointer, name) of each parameter of extern "C" kernel `name` in
    kernels/`file`, read from the source: a kernel written out, or one an instantiation
    macro `#define M(T, S)` makes (base_##S, cast_##S##_f32, ...; T replaced by the C type
    of the suffix the type list applies)."""
    from gpubp import kernels

    text = kernels.read_source(file)
    found = [(m, None) for m in re.findall(kernels.KERNEL_DECLARATION + rf"{name}\(([^)]*)\)", text)]
    for macro, body in re.findall(r"#define (\w+)\(T, S\)((?:[^\n]*\\\n)*[^\n]*)", text):
        for type_list, suffixes in kernels._TYPE_LISTS.items():
            if not re.search(rf"^{type_list}\({macro}\)", text, re.MULTILINE):
                continue
            for pattern, params in re.findall(kernels.KERNEL_DECLARATION + r"([\w#]+)\(([^)]*)\)", body):
                found += [
                    (params, sfx) for sfx in suffixes if pattern.replace("##S##", sfx).replace("##S", sfx) == name
                ]
    assert len(found) == 1, f"{name}: {len(found)} kernels of that name in {file}"
    params, suffix = found[0]
    out = []
    for p in re.sub(r"\\\n", " ", params).split(","):
        c_type, pname = re.match(r"\s*(?:const\s+)?(.*?)\s*(\w+)$", p).groups()
        pointer = c_type.endswith("*")
        c_type = c_type.rstrip("* ").strip()
        if c_type == "T":
            c_type = SUFFIX_TYPE[suffix]
        elif c_type == "Math<T>::type":  # the type 16-bit storage computes in (precision.cuh)
            c_type = "float" if suffix in ("bf16", "f16") else SUFFIX_TYPE[suffix]
        out.append((c_type, pointer, pname))
    return out


def assert_launch_fits(file: str, name: str, args) -> None:
    """Each argument of a recorded launch has its C parameter's type: an array of that
    dtype for a pointer, a NumPy scalar of that type for a value."""
    params = kernel_params(file, name)
    assert len(args) == len(params), f"{name}: {len(args)} arguments for {len(params)} parameters"
    for (c_type, pointer, pname), arg in zip(params, args):
        want = np.dtype(C_TYPES[c_type])
        if pointer:
            assert isinstance(arg, np.ndarray) and arg.dtype == want, f"{name}({pname}): {arg!r} is not {c_type}*"
        else:
            assert isinstance(arg, np.generic) and arg.dtype == want, f"{name}({pname}): {arg!r} is not {c_type}"


def numpy_backend_of_gpu(function, n_sm: int, poison: bool = False):
    """A CupyBackend whose CuPy is NumPy: its launchers run as on a GPU, each kernel launch
    going to function(name, grid, block, args) (name: the extern "C" kernel's). poison: new
    working buffers (empty) come filled with NaN (77 for integers), so unwritten shows.
    CuPy's ascontiguousarray, as NumPy's, makes a 0-d array (1,): a GPU test can take it."""
    from gpubp.backend import cupy_backend

    def empty(shape, dtype):
        if not poison:
            return np.empty(shape, dtype)
        return np.full(shape, np.nan if np.dtype(dtype).kind == "f" else 77, dtype)

    class FakeCupy:
        ndarray = np.ndarray
        zeros = staticmethod(lambda shape, dtype: np.zeros(shape, dtype))
        full = staticmethod(lambda shape, value, dtype: np.full(shape, value, dtype))
        asarray = staticmethod(lambda a, dtype=None: np.array(a, dtype=dtype, copy=True))
        asnumpy = staticmethod(np.asarray)
        ascontiguousarray = staticmethod(np.ascontiguousarray)
        broadcast_to = staticmethod(np.broadcast_to)
        copyto = staticmethod(np.copyto)

    FakeCupy.empty = staticmethod(empty)
    be = cupy_backend.CupyBackend.__new__(cupy_backend.CupyBackend)
    be._cupy, be.n_sm = FakeCupy(), n_sm
    be.shared_optin = HOST_DYNAMIC_SHARED_BYTES  # what tests/cuda_host.h gives a block
    be.compute_capability = 90  # an H100's: the host runs layer_tc.cu's mma too (its emulation)

    def launcher(base, dtype):
        def launch(grid, block, args, shared_mem=0):
            assert 0 <= shared_mem <= HOST_DYNAMIC_SHARED_BYTES, (base, shared_mem)
            return function(cupy_backend.kernel_name(base, dtype), grid, block, args)

        return launch

    be._function = launcher
    return be


def host_dynamic_shared_bytes() -> int:
    """tests/cuda_host.h's dynamic shared memory (the block's extern __shared__), in bytes:
    its HOST_DYNAMIC_SHARED_BYTES, read from there so that the two cannot differ."""
    with open(os.path.join(os.path.dirname(__file__), "cuda_host.h")) as f:
        a, b = re.search(r"#define HOST_DYNAMIC_SHARED_BYTES \((\d+) \* (\d+)\)", f.read()).groups()
    return int(a) * int(b)


HOST_DYNAMIC_SHARED_BYTES = host_dynamic_shared_bytes()
