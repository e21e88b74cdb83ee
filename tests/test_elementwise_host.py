"""The GPU backend's data-moving CuPy elementwise kernels (cupy_backend.ELEMENTWISE: the
step's table selects, the index windows, the step advance), built
and run on the host, through the backend's own launchers, against the NumPy reference.

What CuPy makes of an ElementwiseKernel is a loop over i in [0, size) around the body,
with a `raw` parameter a pointer the body indexes itself (linear indices on C-contiguous
arrays), a non-raw array parameter element i of its array, and a scalar a value. This
test writes that loop as C++ (HostKernel; a raw array's indices are bounds-checked),
compiles it with g++ once per kernel and dtype combination, and hands it the NumPy
arrays the launcher passed. So the index arithmetic of each body and the order in which the
launcher passes its arguments are checked without a GPU; what CuPy's own code
generation adds (the grid-stride loop, reduce_dims) is checked on the GPU visit
(tests/test_step_gpu.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
from numpy.testing import assert_allclose

from gpubp import kernels
from gpubp import precision as PR
from gpubp.backend import cupy_backend, numpy_ops

from .test_kernels_cpu import host_compiler

C_TYPE = {
    np.dtype(np.float32): "float",
    np.dtype(np.float64): "double",
    np.dtype(np.int32): "int",
    np.dtype(np.int64): "long long",
    np.dtype(np.bool_): "bool",
    np.dtype(np.uint16): "unsigned short",
    np.dtype(np.uint32): "unsigned int",
    np.dtype(np.float16): "unsigned short",  # fp16: the data-moving kernels only copy its bits
}
NAMED = {"int64": np.int64, "int32": np.int32, "float32": np.float32, "float64": np.float64, "bool": np.bool_,
         "uint16": np.uint16}  # fmt: skip


def parse(params: str) -> list[tuple[bool, str, str]]:
    """(raw, type, name) of each parameter of an ElementwiseKernel list."""
    out = []
    for p in params.split(","):
        words = p.split()
        raw = words[0] == "raw"
        out.append((raw, words[-2], words[-1]))
    return out


class HostKernel:
    """An ELEMENTWISE entry as a host function: called like CuPy's ElementwiseKernel
    (inputs, then outputs, by position; size= when every array is raw) on NumPy arrays."""

    def __init__(self, name: str, build_dir: str):
        ins, outs, self.body, _ = cupy_backend.ELEMENTWISE[name]
        self.name, self.build_dir = name, build_dir
        self.params = [(*p, False) for p in parse(ins)] + [(*p, True) for p in parse(outs)]
        # a preamble (precision.cuh), its CUDA qualifiers defined away as in tests/test_kernels_cpu.py
        self.preamble = HOST_QUALIFIERS + cupy_backend.elementwise_preamble(name)

    def __call__(self, *args, size=None):
        assert len(args) == len(self.params), f"{self.name}: {len(args)} arguments for {len(self.params)}"
        types, c_args, decls, per_i = {}, [], [], []
        # the loop runs over the largest non-raw array; an (M, 1) one (a per-model value of
        # the stacked updates) or a single value broadcasts over its rows, as in CuPy
        loop = max((a for (raw, *_), a in zip(self.params, args) if not raw and isinstance(a, np.ndarray)),
                   key=np.size, default=None)  # fmt: skip
        size = loop.size if loop is not None and size is None else size
        for (raw, t, pname, is_out), a in zip(self.params, args):
            if t in NAMED:
                dtype = np.dtype(NAMED[t])
            else:  # a type placeholder: every use must agree
                dtype = np.asarray(a).dtype
                assert types.setdefault(t, dtype) == dtype, f"{self.name}: {t} is {types[t]} and {dtype}"
            ct = C_TYPE[dtype]
            if isinstance(a, np.ndarray):
                assert a.flags.c_contiguous and a.dtype == dtype, f"{self.name}({pname}): {a.dtype} {a.flags}"
                c_args.append(ctypes.c_void_p(a.ctypes.data))
                # inputs are read-only, as in CuPy's code (const CArray, const T&): a body
                # that writes one fails to compile here as it would under NVRTC
                if raw:  # a bounds-checked pointer: an index outside the array fails the call
                    decls.append(f"{ct}* {pname}_, long long {pname}_n")
                    c_args.append(ctypes.c_longlong(a.size))
                    kind = "RawOut" if is_out else "RawIn"
                    per_i.insert(0, f"{kind}<{ct}> {pname}{{{pname}_, {pname}_n}};")
                else:  # element i of its array, or of its row (broadcast)
                    decls.append(f"{ct}* {pname}_")
                    if a.size == size:
                        at = "i"
                    else:
                        assert a.size == 1 or a.shape == (loop.shape[0], 1), f"{self.name}({pname}): {a.shape}"
                        at = f"i / {size // a.size}"
                    per_i.append(f"{'' if is_out else 'const '}{ct}& {pname} = {pname}_[{at}];")
            else:
                assert not raw and not is_out, f"{self.name}({pname}): a scalar for an array parameter"
                decls.append(f"{ct} {pname}")
                c_args.append(np.ctypeslib.as_ctypes_type(dtype)(np.asarray(a, dtype).item()))
        assert size is not None, f"{self.name}: every array is raw, size= is needed (as CuPy needs it)"
        typedefs = " ".join(f"typedef {C_TYPE[d]} {t};" for t, d in types.items())  # as CuPy declares them
        source = (
            f"{PRELUDE}{self.preamble}\n"
            f'extern "C" int run({", ".join(decls)}, long long size_) {{\n  {typedefs}\n  bad_index = 0;\n'
            f"  for (long long i = 0; i < size_; ++i) {{\n    {' '.join(per_i)}\n{self.body};\n  }}\n"  # CuPy adds the ;
            "  return bad_index;\n}\n"
        )
        lib = build(source, self.build_dir)
        assert lib.run(*c_args, ctypes.c_longlong(size)) == 0, f"{self.name}: an index outside a raw array"
        return args[-1]


HOST_QUALIFIERS = "#define __host__\n#define __device__\n#define __forceinline__ inline\n"
PRELUDE = """#include <cmath>
using std::isfinite; using std::sqrt;
static int bad_index = 0;
template <class T> T& checked(T* p, long long n, long long k) {  // p[k], k checked against the size
  static T dummy;
  if (k < 0 || k >= n) { bad_index = 1; return dummy; }
  return p[k];
}
template <class T> struct RawIn {  // a raw input: read-only
  T* p; long long n;
  const T& operator[](long long k) const { return checked(p, n, k); }
};
template <class T> struct RawOut {  // a raw output
  T* p; long long n;
  T& operator[](long long k) const { return checked(p, n, k); }
};
"""


_BUILT: dict[str, ctypes.CDLL] = {}


def build(source: str, build_dir: str) -> ctypes.CDLL:
    key = hashlib.sha1(source.encode()).hexdigest()[:16]
    if key not in _BUILT:
        src, lib = os.path.join(build_dir, f"k{key}.cpp"), os.path.join(build_dir, f"k{key}.so")
        with open(src, "w") as f:
            f.write(source)
        cmd = [shutil.which("g++") or "c++", "-O1", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Werror", "-Wno-unused-local-typedefs", src,
               "-o", lib]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, f"{r.stderr}\n{source}"
        _BUILT[key] = ctypes.CDLL(lib)
    return _BUILT[key]


@pytest.fixture(scope="module")
def host_backend(tmp_path_factory):
    """A CupyBackend whose arrays are NumPy's and whose elementwise kernels run on the host."""
    host_compiler("the elementwise kernels")
    build_dir = str(tmp_path_factory.mktemp("elementwise"))
    be = cupy_backend.CupyBackend.__new__(cupy_backend.CupyBackend)
    made = {}
    be._stacked_kernel = lambda name: made.setdefault(name, HostKernel(name, build_dir))
    be._cupy = SimpleNamespace(ndarray=np.ndarray)  # the launchers' argument checks take NumPy's arrays
    return be


def poisoned(like, rows=None):
    shape = like.shape if rows is None else (rows, *like.shape[1:])
    fill = np.iinfo(like.dtype).max if like.dtype.kind == "u" else (True if like.dtype == np.bool_ else -1)
    return np.full(shape, fill, like.dtype)


def test_select_rows_runs_as_the_reference(host_backend):
    """Two tables a launch (Adam: vectors and where), three (SGD: first too, a 0-d bool
    out: two launches), one alone, at several positions."""
    rng = np.random.default_rng(1)
    k = 6
    vectors = rng.normal(size=(k, 3, 2, 1)).astype(np.float32)
    first, where = rng.integers(0, 2, k).astype(np.bool_), rng.integers(0, 10**12, (k, 2)).astype(np.int64)
    for tables in [(vectors, where), (vectors, first, where), (where,), (first, vectors.astype(np.float64))]:
        for p in (0, 3, k - 1):
            outs = tuple(poisoned(t[0]) if t.ndim > 1 else np.array(not t[p], t.dtype) for t in tables)
            assert host_backend.select_rows(tables, np.array(p, np.int64), outs) is outs
            want = numpy_ops.select_rows(tables, np.array(p), tuple(np.empty_like(o) for o in outs))
            for o, w in zip(outs, want):
                assert np.array_equal(o, w), (p, w.dtype)


def test_index_windows_run_as_the_reference(host_backend):
    from gpubp.backend import numpy_stacked

    rng = np.random.default_rng(2)
    perm = rng.permutation(50).astype(np.int64)
    out = poisoned(perm, 9)
    host_backend.index_window(perm, np.array(20, np.int64), out)
    assert np.array_equal(out, numpy_ops.index_window(perm, np.array(20), np.empty_like(out)))
    perms = np.stack([rng.permutation(50) for _ in range(3)]).astype(np.int64)
    rows = poisoned(perms[:, :9].copy())
    host_backend.index_window_batched(perms, np.array(11, np.int64), rows)
    assert np.array_equal(rows, numpy_stacked.index_window_batched(perms, np.array(11), np.empty_like(rows)))


def cupy_like_source(name: str) -> str:
    """ELEMENTWISE[name] as CuPy assembles an elementwise kernel, closely enough for the
    compiler: CuPy's carray.cuh, the preamble, a grid-stride loop around the body with a
    raw parameter a pointer, a non-raw one a reference to its element i, a scalar a value
    (placeholders: T float, U double, I long long)."""
    ins, outs, body, kname = cupy_backend.ELEMENTWISE[name]
    ctype = {**{k: C_TYPE[np.dtype(v)] for k, v in NAMED.items()}, "T": "T", "U": "U", "I": "I"}
    decls, per_i = [], []
    for raw, t, pname, is_out in [(*p, False) for p in parse(ins)] + [(*p, True) for p in parse(outs)]:
        const = "" if is_out else "const "
        if raw:
            decls.append(f"{const}{ctype[t]}* {pname}")
        else:  # an array's element (a scalar argument reads the same in the body)
            decls.append(f"{const}{ctype[t]}* {pname}_")
            per_i.append(f"{const}{ctype[t]}& {pname} = {pname}_[i];")
    return (
        f"#include <cupy/carray.cuh>\n{cupy_backend.elementwise_preamble(name)}\n"
        "typedef float T; typedef double U; typedef long long I;\n"
        f'extern "C" __global__ void {kname}({", ".join(decls)}, long long size_) {{\n'
        "  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < size_;\n"
        "       i += (long long)blockDim.x * gridDim.x) {\n"
        f"    {' '.join(per_i)}\n{body};\n  }}\n}}\n"
    )


@pytest.mark.parametrize("name", sorted(cupy_backend.ELEMENTWISE))
def test_elementwise_kernels_compile_with_nvrtc_and_cupys_headers(name):
    """Every ELEMENTWISE body (and preamble) compiles under NVRTC with the options CuPy
    uses, beside CuPy's own headers (a name of ours that clashed with one of CuPy's, or a
    body that writes an input, fails here, not on the GPU)."""
    import importlib.util

    from .test_kernels_cpu import need_nvrtc

    need_nvrtc()
    spec = importlib.util.find_spec("cupy")
    include = spec and os.path.join(os.path.dirname(spec.origin), "_core", "include")
    if not include or not os.path.isfile(os.path.join(include, "cupy", "carray.cuh")):
        pytest.skip("no CuPy headers (pip install cupy-cuda13x): CuPy's elementwise code is not compiled here")
    log = kernels.nvrtc_compile_source(
        cupy_like_source(name), name, options=(*kernels.effective_options(), f"-I{include}")
    )
    assert "warning" not in log, log


def _update_args(rule: str, rng, m: int, p: int):
    """(state arrays, keywords) of a stacked update of m models of p float32 parameters,
    as gpubp.stack passes them: per-model values (m, 1), model 1 skipped."""
    f32 = np.float32
    col = lambda lo, hi: rng.uniform(lo, hi, (m, 1)).astype(f32)  # noqa: E731
    state = {"p": rng.normal(size=(m, p)).astype(f32), "g": rng.normal(size=(m, p)).astype(f32)}
    kw = dict(grad_scale=col(0.5, 1), weight_decay=col(0, 0.01), skip=np.array([False, True, False][:m]))
    if rule == "sgd":
        state["buf"] = rng.normal(size=(m, p)).astype(f32)
        kw |= dict(lr=col(0.01, 0.1), momentum=col(0.5, 0.9), one_minus_dampening=col(0.9, 1), nesterov=False,
                   first_step=np.bool_(False))  # fmt: skip
    else:
        state |= {"m": rng.normal(size=(m, p)).astype(f32), "v": rng.uniform(0, 1, (m, p)).astype(f32)}
        kw |= dict(lr_decay=col(0.99, 1), one_minus_beta1=col(0.1, 0.1), beta2=col(0.999, 0.999),
                   one_minus_beta2=col(0.001, 0.001), eps=col(1e-8, 1e-8), step_size=col(1e-3, 1e-2),
                   bias2_sqrt=col(0.1, 1), decoupled=True)  # fmt: skip
    return state, kw


@pytest.mark.parametrize("store", [PR.BF16, PR.F16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_updates_write_the_16bit_copy(host_backend, rule, store):
    """The stacked updates with `low` (mixed precision: the parameters' 16-bit copy the next
    forward pass reads, written by the update's own kernel): p and the state as the NumPy
    reference's, and low exactly the kernel's own p rounded to 16 bits (numpy_ops.cast,
    the bit-level reference of precision.cuh), the skipped model's too (its p unchanged)."""
    from gpubp.backend import NumpyBackend

    rng = np.random.default_rng(3)
    state, kw = _update_args(rule, rng, 3, 257)
    got = {k: a.copy() for k, a in state.items()}
    want = {k: a.copy() for k, a in state.items()}
    low = poisoned(np.zeros((3, 257), store))
    names = [k for k in state if k not in ("p", "g")]
    update = f"{rule}_step_batched"
    getattr(host_backend, update)(got["p"], got["g"], *(got[k] for k in names), None, low=low, **kw)
    ref_low = np.zeros_like(low)
    scratch = np.empty((2, 3, 257), np.float32)
    getattr(NumpyBackend, update)(want["p"], want["g"], *(want[k] for k in names), scratch, low=ref_low, **kw)
    # float32, a handful of operations each rounded once, the same order as the reference:
    # within atol + rtol |ref| with rtol a few float32 ulps (2^-23 each)
    for k in state:
        assert_allclose(got[k], want[k], rtol=8 * 2.0**-23, atol=1e-30, err_msg=k)
    assert np.array_equal(got["p"][1], state["p"][1])  # skipped
    assert np.array_equal(low, numpy_ops.cast(got["p"], np.zeros_like(low)))  # the kernel's own p, rounded
    assert np.array_equal(ref_low, numpy_ops.cast(want["p"], np.zeros_like(low)))


def test_the_16bit_copy_check_can_fail(host_backend, monkeypatch, tmp_path):
    """A kernel that writes the copy before the update (the old parameters) is caught."""
    name = "adam_bf16"
    ins, outs, body, kname = cupy_backend.ELEMENTWISE[name]
    write = "low[i] = bf16_from_float(p).bits;"
    monkeypatch.setitem(cupy_backend.ELEMENTWISE, name, (ins, outs, write + body.replace(write, ""), kname))
    be = cupy_backend.CupyBackend.__new__(cupy_backend.CupyBackend)
    be._stacked_kernel = lambda n: HostKernel(n, str(tmp_path))
    be._cupy = SimpleNamespace(ndarray=np.ndarray)
    state, kw = _update_args("adam", np.random.default_rng(4), 3, 64)
    low = np.zeros((3, 64), PR.BF16)
    be.adam_step_batched(state["p"], state["g"], state["m"], state["v"], None, low=low, **kw)
    assert not np.array_equal(low, numpy_ops.cast(state["p"], np.zeros_like(low)))


def test_the_host_loop_catches_a_wrong_index(host_backend, monkeypatch, tmp_path):
    """The check can fail: a body that reads the row after the selected one is caught."""
    entry = cupy_backend.ELEMENTWISE["select2"]
    wrong = (entry[0], entry[1], entry[2].replace("pos[0] * wa", "(pos[0] + 1) * wa"), entry[3])
    monkeypatch.setitem(cupy_backend.ELEMENTWISE, "select2", wrong)
    be = cupy_backend.CupyBackend.__new__(cupy_backend.CupyBackend)
    be._stacked_kernel = lambda name: HostKernel(name, str(tmp_path))
    a, b = np.arange(12.0).reshape(4, 3), np.arange(8, dtype=np.int64).reshape(4, 2)
    outs = (np.empty(3), np.empty(2, np.int64))
    be.select_rows((a, b), np.array(1, np.int64), outs)
    assert not np.array_equal(outs[0], a[1]) and np.array_equal(outs[1], b[1])


def call_arguments(source: str, name: str) -> list[str]:
    """The argument text of every `_stacked_kernel("name")(...)` call in source (balanced
    parentheses)."""
    calls = []
    for match in re.finditer(rf'_stacked_kernel\("{name}"\)\(', source):
        depth, i = 1, match.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            i += 1
        calls.append(source[match.end() : i - 1])
    return calls


def test_every_raw_only_kernel_is_called_with_a_size():
    """CuPy needs size= when every array parameter is raw; the launchers pass it."""
    import inspect

    source = inspect.getsource(cupy_backend)
    assert call_arguments('f(g(1), 2)) x; _stacked_kernel("a")(b, size=(c + d))\n', "a") == ["b, size=(c + d)"]
    for name, (ins, outs, _, _) in cupy_backend.ELEMENTWISE.items():
        arrays = [p for p in parse(ins) + parse(outs) if p[0] or p[1] not in NAMED]
        calls = call_arguments(source, name)
        if arrays and all(raw for raw, _, _ in arrays):
            assert calls and all("size=" in c for c in calls), name
