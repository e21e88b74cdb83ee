"""The GPU backend against the NumPy reference (tests marked gpu: they skip without a
CUDA device). Outputs are poisoned with NaN before each call, so an element a kernel
fails to write fails the comparison.

Tolerance: |gpu - ref| <= atol + rtol |ref| with rtol 1e-12 (float64) and 1e-5
(float32), the issue's bounds. atol is rtol times the magnitude of the terms that
produced the value (a sum of K products can cancel to ~0 while its rounding error
stays eps * sum |terms|), as stated at each call, plus, for float32, the smallest
normal float32 (2^-126): CuPy compiles every kernel with -ftz=true, so float32
subnormal inputs and results are flushed to zero on the GPU where NumPy keeps them
(GELU or sigmoid of a large negative input, a product of two tiny values).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest

from gpubp.activations import ACTIVATIONS, SAVES_INPUT, make_activation
from gpubp.backend import numpy_ops
from gpubp.losses import LOSSES, make_loss

from .conftest import ROOT

pytestmark = pytest.mark.gpu

RTOL = {np.float64: 1e-12, np.float32: 1e-5}
FTZ = {np.float64: 0.0, np.float32: float(np.finfo(np.float32).tiny)}  # -ftz=true: |x| < 2^-126 -> 0
DTYPES = [np.float64, np.float32]
SIZES = [1, 7, 31, 1000, 1000003]  # elementwise totals: 1, odd, < a warp, not a block multiple, large prime


@pytest.fixture(scope="module")
def gpu():
    from gpubp.backend.cupy_backend import CupyBackend

    return CupyBackend()


def close(actual, ref, dtype, magnitude=None, what=""):
    """|actual - ref| <= atol + rtol |ref|, atol = rtol * magnitude (default |ref|); NaN == NaN."""
    rtol = RTOL[dtype]
    actual = np.asarray(actual, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert actual.shape == ref.shape, f"{what}: shape {actual.shape} != {ref.shape}"
    mag = np.abs(ref) if magnitude is None else np.asarray(magnitude, dtype=np.float64)
    bound = rtol * (mag + np.abs(ref)) + FTZ[dtype]
    ok = (actual == ref) | (np.isnan(actual) & np.isnan(ref)) | (np.abs(actual - ref) <= bound)
    if not ok.all():
        bad = np.flatnonzero(~ok.ravel())
        i = bad[0]
        raise AssertionError(
            f"{what}: {bad.size} of {ok.size} off (NaN = unwritten); first at {i}: "
            f"{actual.ravel()[i]!r} vs {ref.ravel()[i]!r}"
        )


def poisoned(gpu, shape, dtype):
    out = gpu.empty(shape, dtype)
    out.fill(np.nan)
    return out


def shapes_for(total):
    return [(total, 1), (1, total)] if total < 1000 else [(total, 1)]


# --------------------------------------------------------------------------- activations


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_bias_act_forward_and_backward(gpu, name, dtype):
    rng = np.random.default_rng(0)
    act = make_activation(name, 0.05)
    for total in SIZES:
        for shape in shapes_for(total) + ([(total // 7, 7)] if total >= 1000 else []):
            z = rng.normal(scale=3.0, size=shape).astype(dtype)
            b = rng.normal(size=shape[1]).astype(dtype)
            # reference: z + b, then f
            z_ref = z + b
            a_ref = numpy_ops.act_forward(z_ref.copy(), act, np.empty_like(z))
            zd = gpu.asarray(z)
            out = poisoned(gpu, shape, dtype)
            gpu.bias_act_forward(zd, gpu.asarray(b), act, out)
            close(gpu.to_numpy(zd), z_ref, dtype, what=f"{name} z+b {shape}")
            # f(z) of a few ulps-different inputs: atol scales with |z|
            close(gpu.to_numpy(out), a_ref, dtype, magnitude=np.abs(z_ref) + 1, what=f"{name} forward {shape}")
            # in place (a == z), as the model does when f' reads the output
            zi = gpu.asarray(z)
            gpu.bias_act_forward(zi, gpu.asarray(b), act, zi)
            close(gpu.to_numpy(zi), a_ref, dtype, magnitude=np.abs(z_ref) + 1, what=f"{name} in place {shape}")
            # backward from what the forward pass saves
            saved = z_ref if act.saves == SAVES_INPUT else a_ref
            d = rng.normal(size=shape).astype(dtype)
            g_ref = numpy_ops.act_backward(d, saved, act, np.empty_like(d))
            g = poisoned(gpu, shape, dtype)
            gpu.act_backward(gpu.asarray(d), gpu.asarray(saved), act, g)
            close(gpu.to_numpy(g), g_ref, dtype, magnitude=np.abs(d) * (np.abs(saved) + 1), what=f"{name} backward")


# --------------------------------------------------------------------------- GEMM / GEMV

GEMM_SHAPES = [(1, 1, 1), (1, 7, 31), (7, 1, 31), (31, 7, 1), (64, 33, 17), (128, 10, 1000), (1000, 513, 64)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_gemm(gpu, dtype, trans_a, trans_b):
    rng = np.random.default_rng(1)
    for m, n, k in GEMM_SHAPES:
        a = rng.normal(size=(k, m) if trans_a else (m, k)).astype(dtype)
        b = rng.normal(size=(n, k) if trans_b else (k, n)).astype(dtype)
        opa, opb = (a.T if trans_a else a), (b.T if trans_b else b)
        # atol: rtol * sum_k |a_ik b_kj| (the terms of each dot product)
        mag = np.abs(opa).astype(np.float64) @ np.abs(opb).astype(np.float64)
        out = poisoned(gpu, (m, n), dtype)
        gpu.gemm(gpu.asarray(a), gpu.asarray(b), out, trans_a=trans_a, trans_b=trans_b)
        close(gpu.to_numpy(out), opa.astype(np.float64) @ opb.astype(np.float64), dtype, mag, f"gemm {m, n, k}")
        c0 = rng.normal(size=(m, n)).astype(dtype)
        out = gpu.asarray(c0)
        gpu.gemm(gpu.asarray(a), gpu.asarray(b), out, trans_a=trans_a, trans_b=trans_b, beta=1.0)
        ref = opa.astype(np.float64) @ opb.astype(np.float64) + c0
        close(gpu.to_numpy(out), ref, dtype, mag + np.abs(c0), f"gemm beta=1 {m, n, k}")


# --------------------------------------------------------------------------- reductions


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_grad(gpu, dtype):
    rng = np.random.default_rng(2)
    # one chunk, several, the most (1024), a row count that leaves the last chunk short
    for shape in [(1, 1), (7, 1), (1, 7), (31, 33), (1000, 17), (1000003, 2), (4096, 1000), (262144, 64), (2049, 3)]:
        d = rng.normal(size=shape).astype(dtype)
        out = poisoned(gpu, shape[1], dtype)
        gpu.bias_grad(gpu.asarray(d), out)
        close(gpu.to_numpy(out), d.astype(np.float64).sum(0), dtype, np.abs(d).astype(np.float64).sum(0), f"{shape}")


def check_act_backward_bias_grad(be, shapes, seed: int = 6) -> None:
    """be.act_backward_bias_grad (reduce.cu: one pass over D) against be.act_backward then
    be.bias_grad, byte for byte: D' and db of every activation (f' read from z or from the
    output) in float32 and float64, and of relu in bf16 and fp16 (16-bit D', float32 db),
    over `shapes` (n, m); D' in place (out is d) as well. Shared by the GPU and the
    host-run kernels (tests/test_kernels_emulated.py)."""
    from gpubp import precision as PR

    rng = np.random.default_rng(seed)
    cases = [(name, dt) for name in ACTIVATIONS for dt in (np.float32, np.float64)]
    cases += [("relu", PR.BF16), ("relu", PR.F16)]
    for name, dt in cases:
        act = make_activation(name)
        for n, m in shapes:
            if dt in PR.LOW:
                d, saved = np.empty((n, m), dt), np.empty((n, m), dt)
                PR.store(rng.normal(size=(n, m)).astype(np.float32), d)
                PR.store(rng.normal(size=(n, m)).astype(np.float32), saved)
            else:
                d, saved = rng.normal(size=(n, m)).astype(dt), rng.normal(size=(n, m)).astype(dt)
            sum_dtype = np.float32 if dt in PR.LOW else dt
            dz_ref, db_ref = be.empty((n, m), dt), be.zeros(m, sum_dtype)
            be.bias_grad(be.act_backward(be.asarray(d), be.asarray(saved), act, dz_ref), db_ref)
            for in_place in (False, True):
                dd = be.asarray(d)
                dz = dd if in_place else be.zeros((n, m), dt)
                db = be.zeros(m, sum_dtype)
                be.act_backward_bias_grad(dd, be.asarray(saved), act, dz, db)
                what = f"{name} {np.dtype(dt)} {(n, m)} in place {in_place}"
                assert be.to_numpy(dz).tobytes() == be.to_numpy(dz_ref).tobytes(), what
                assert be.to_numpy(db).tobytes() == be.to_numpy(db_ref).tobytes(), what


def test_act_backward_bias_grad_is_the_two_ops_bitwise(gpu):
    # one chunk, several (last block finishes), more than 256 columns (the finishing kernel)
    check_act_backward_bias_grad(gpu, [(1, 1), (31, 33), (2049, 3), (262144, 64), (4096, 1000)])


def check_gemm_bias_act(be, shapes, names=tuple(ACTIVATIONS), seed: int = 7) -> None:
    """be.gemm_bias_act (kernels/layer.cu: a narrow float32 layer's z = x W + b and
    a = f(z) in one kernel) over `shapes` (n, K, N) and the activations `names`:
    - small integers (every product and sum exact in float32): z is NumPy's float64
      x W + b, exactly (any indexing slip shows);
    - normal values: |z - ref| <= 2 (K + 1) eps (|x| |W| + |b|) + 2^-126, the rounding of
      a sum of K + 1 terms in any order (-ftz: a flushed subnormal), and a = f(z) byte for
      byte as be.bias_act_forward gives it from the kernel's z (the same activation code);
    - with z and without (f' reading a): a alone is written then.
    Then the layers it refuses (nothing written, False): float64, TF32, more than
    LAYER_MAX_WIDTH inputs or outputs. Shared by the GPU and the host-run kernels
    (tests/test_kernels_emulated.py)."""
    from gpubp.backend.cupy_backend import LAYER_MAX_WIDTH

    rng = np.random.default_rng(seed)
    f32, eps = np.float32, float(np.finfo(np.float32).eps)
    for (n, k, m), name in [(s, a) for s in shapes for a in names]:
        act = make_activation(name)
        for values in ("integers", "normal"):
            if values == "integers":
                x, w, b = (rng.integers(-3, 4, size=s).astype(f32) for s in ((n, k), (k, m), m))
            else:
                x, w, b = (
                    rng.normal(size=(n, k)).astype(f32),
                    rng.normal(size=(k, m)).astype(f32),
                    rng.normal(size=m).astype(f32),
                )
            ref = x.astype(np.float64) @ w + b
            for keep_z in (True, False):
                out, z = poisoned(be, (n, m), f32), poisoned(be, (n, m), f32) if keep_z else None
                assert be.gemm_bias_act(be.asarray(x), be.asarray(w), be.asarray(b), act, out, z) is True
                what = f"{name} {(n, k, m)} {values} z {keep_z}"
                if keep_z:
                    got = be.to_numpy(z).astype(np.float64)
                    if values == "integers":
                        assert np.array_equal(got, ref), what
                    else:
                        bound = 2 * (k + 1) * eps * (np.abs(x).astype(np.float64) @ np.abs(w) + np.abs(b)) + FTZ[f32]
                        assert (np.abs(got - ref) <= bound).all(), what
                    a_ref = poisoned(be, (n, m), f32)
                    be.bias_act_forward(be.asarray(be.to_numpy(z)), be.zeros(m, f32), act, a_ref)
                    assert be.to_numpy(out).tobytes() == be.to_numpy(a_ref).tobytes(), what
                elif values == "integers":  # a = f(the exact z), as the elementwise kernel computes it
                    a_ref = poisoned(be, (n, m), f32)
                    be.bias_act_forward(be.asarray(ref.astype(f32)), be.zeros(m, f32), act, a_ref)
                    assert be.to_numpy(out).tobytes() == be.to_numpy(a_ref).tobytes(), what
    act = make_activation("relu")
    for n, k, m, dt, tf32 in [(5, 4, 3, np.float64, False), (5, 4, 3, f32, True), (5, LAYER_MAX_WIDTH + 1, 3, f32, False),
                              (5, 4, LAYER_MAX_WIDTH + 1, f32, False)]:  # fmt: skip
        x, w, b = (be.asarray(rng.normal(size=s).astype(dt)) for s in ((n, k), (k, m), m))
        out = poisoned(be, (n, m), dt)
        assert be.gemm_bias_act(x, w, b, act, out, tf32=tf32) is False, (n, k, m, dt, tf32)
        assert np.isnan(be.to_numpy(out)).all()


def check_layer_backward(be, shapes, names=tuple(ACTIVATIONS), seed: int = 8) -> None:
    """be.layer_backward (kernels/layer.cu: a narrow float32 layer's D' = D f'(saved),
    dW = x^T D', db = 1^T D' and E = D' W^T in one kernel, then its blocks' shares summed)
    over `shapes` (n, K, N) and the activations `names`, against float64 sums of D'_ref =
    be.act_backward's (the elementwise kernel: the same d * f'(saved), so the same bits):
    - ReLU and identity on small integers: every product and sum exact, so dW, db and E are
      the float64 ones exactly (a wrong row, column or share shows);
    - normal values: each of the n-term sums (dW, db) and N-term sums (E) within
      2 (terms + 1) eps sum |terms| + 2^-126 (any order's rounding; -ftz);
    - without E (the first layer): E's buffer untouched.
    Then the layers it refuses (nothing written, False): float64, TF32, more than
    LAYER_MAX_WIDTH inputs or outputs. Shared by the GPU and the host-run kernels."""
    from gpubp.backend.cupy_backend import LAYER_MAX_WIDTH

    rng = np.random.default_rng(seed)
    f32, eps = np.float32, float(np.finfo(np.float32).eps)
    for (n, k, m), name in [(s, a) for s in shapes for a in names]:
        act = make_activation(name)
        for values in ("integers", "normal") if name in ("relu", "identity") else ("normal",):
            if values == "integers":
                d, saved, x, w = (rng.integers(-3, 4, size=s).astype(f32) for s in ((n, m), (n, m), (n, k), (k, m)))
            else:
                d, x, w = (rng.normal(size=s).astype(f32) for s in ((n, m), (n, k), (k, m)))
                saved = rng.normal(size=(n, m)).astype(f32)
                if name in ("relu", "sigmoid", "softplus", "elu", "tanh"):  # f' reads the output: in its range
                    saved = be.to_numpy(be.bias_act_forward(be.asarray(saved), be.zeros(m, f32), act,
                                                            poisoned(be, (n, m), f32)))  # fmt: skip
            dz = be.to_numpy(be.act_backward(be.asarray(d), be.asarray(saved), act, poisoned(be, (n, m), f32)))
            dz = dz.astype(np.float64)
            x64, w64 = x.astype(np.float64), w.astype(np.float64)
            want = {"dW": x64.T @ dz, "db": dz.sum(0), "E": dz @ w64.T}
            bound = {"dW": 2 * (n + 1) * eps * (np.abs(x64).T @ np.abs(dz)),
                     "db": 2 * (n + 1) * eps * np.abs(dz).sum(0), "E": 2 * (m + 1) * eps * (np.abs(dz) @ np.abs(w64).T)}  # fmt: skip
            for with_e in (True, False):
                grad, e = poisoned(be, k * m + m, f32), poisoned(be, (n, k), f32)
                ok = be.layer_backward(be.asarray(d), be.asarray(saved), be.asarray(x), be.asarray(w), act, grad,
                                       e if with_e else None)  # fmt: skip
                assert ok is True
                g = be.to_numpy(grad).astype(np.float64)
                got = {"dW": g[: k * m].reshape(k, m), "db": g[k * m :], "E": be.to_numpy(e).astype(np.float64)}
                for part in ("dW", "db", "E") if with_e else ("dW", "db"):
                    what = f"{name} {(n, k, m)} {values} {part} (E {with_e})"
                    if values == "integers":
                        assert np.array_equal(got[part], want[part]), what
                    else:
                        assert (np.abs(got[part] - want[part]) <= bound[part] + FTZ[f32]).all(), what
                if not with_e:
                    assert np.isnan(got["E"]).all()
    act = make_activation("relu")
    for n, k, m, dt, tf32 in [(5, 4, 3, np.float64, False), (5, 4, 3, f32, True), (5, LAYER_MAX_WIDTH + 1, 3, f32, False),
                              (5, 4, LAYER_MAX_WIDTH + 1, f32, False)]:  # fmt: skip
        d, saved, x, w = (be.asarray(rng.normal(size=s).astype(dt)) for s in ((n, m), (n, m), (n, k), (k, m)))
        grad, e = poisoned(be, k * m + m, dt), poisoned(be, (n, k), dt)
        assert be.layer_backward(d, saved, x, w, act, grad, e, tf32=tf32) is False, (n, k, m, dt, tf32)
        assert np.isnan(be.to_numpy(grad)).all() and np.isnan(be.to_numpy(e)).all()


def check_layer_windows(be, shapes, names=("relu", "gelu", "identity"), seed: int = 9, low: bool = False) -> None:
    """The layer kernels on a window of a split (layer_forward_rows, layer_backward_rows: x's
    row i is row perm[start + i] of the split's; the training step's first layer) against
    the same kernels on those rows gathered first: the same values in the same order, so
    the same bits (a, z, dW and db, E), at two starts; a window past the batch's rows
    reads no row of the split beyond them (the split's other rows are NaN). low: bfloat16
    layers (layer_tc.cu), whose window is of a float32 split, rounded as it is loaded:
    against the rows gathered, then rounded by be.cast (the step's way without a window).
    Shared by the GPU and the host-run kernels (tests/test_kernels_emulated.py)."""
    from gpubp import precision as PR

    rng = np.random.default_rng(seed)
    f32 = np.float32

    def stored(v):  # host float32 values in the layer's storage
        return be.asarray(PR.bf16_bits(v) if low else v)

    def out(shape):  # a poisoned output of the layer's storage
        return be.asarray(np.full(shape, BF16_NAN, np.uint16)) if low else poisoned(be, shape, f32)

    for (n, k, m), name in [(s, a) for s in shapes for a in names]:
        act, rows = make_activation(name), 2 * n + 9
        perm = rng.permutation(rows).astype(np.int64)
        w, b = rng.normal(size=(k, m)).astype(f32), rng.normal(size=m).astype(f32)
        d, saved = rng.normal(size=(n, m)).astype(f32), rng.normal(size=(n, m)).astype(f32)
        (dw, dd, ds), db = (stored(v) for v in (w, d, saved)), be.asarray(b)
        for s in (0, n + 9):
            split = np.full((rows, k), np.nan, f32)
            x = rng.normal(size=(n, k)).astype(f32)
            split[perm[s : s + n]] = x
            window = (be.asarray(perm), be.asarray(np.array(s, np.int64)))
            gathered = be.cast(be.asarray(x), be.empty((n, k), PR.BF16)) if low else be.asarray(x)
            got, want = [], []
            for xs, win, into in ((be.asarray(split), window, got), (gathered, None, want)):
                a, z = out((n, m)), out((n, m))
                assert be.gemm_bias_act(xs, dw, db, act, a, z, window=win) is True
                grad, e = poisoned(be, k * m + m, f32), out((n, k))
                assert be.layer_backward(dd, ds, xs, dw, act, grad, e, window=win) is True
                into += [be.to_numpy(v).tobytes() for v in (a, z, grad, e)]
            assert got == want, (name, (n, k, m), s, low)


def check_layer_backward_primes_below(be, shapes, names=("relu", "leaky_relu", "tanh", "sigmoid"), seed=10) -> None:
    """layer_backward's e_act (the layer below's activation g, whose g' reads x, its
    output): E = (D' W^T) * g'(x), byte for byte the E of a launch without, then
    be.act_backward(E, x, g) (the same product); the rest (dW, db) unchanged. x within g's
    range (g of normal values); a window of a split too. Shared by the GPU and the
    host-run kernels."""
    rng = np.random.default_rng(seed)
    f32, relu = np.float32, make_activation("relu")
    for (n, k, m), name in [(s, a) for s in shapes for a in names]:
        g = make_activation(name)
        d, saved, w = (rng.normal(size=s).astype(f32) for s in ((n, m), (n, m), (k, m)))
        x = be.bias_act_forward(be.asarray(rng.normal(size=(n, k)).astype(f32)), be.zeros(k, f32), g,
                                poisoned(be, (n, k), f32))  # fmt: skip
        dd, ds, dw = be.asarray(d), be.asarray(np.maximum(saved, 0)), be.asarray(w)
        perm = rng.permutation(n).astype(np.int64)
        split = be.asarray(be.to_numpy(x)[np.argsort(perm)])  # row perm[i] of split is x's row i
        for xs, win in ((x, None), (split, (be.asarray(perm), be.asarray(np.array(0, np.int64))))):
            runs = []
            for e_act in (g, None):
                grad, e = poisoned(be, k * m + m, f32), poisoned(be, (n, k), f32)
                assert be.layer_backward(dd, ds, xs, dw, relu, grad, e, window=win, e_act=e_act) is True
                if e_act is None:
                    be.act_backward(e, x, g, e)
                runs.append([be.to_numpy(v).tobytes() for v in (grad, e)])
            assert runs[0] == runs[1], (name, (n, k, m), win is not None)


BF16_NAN = 0x7FC0  # a bf16 quiet NaN's bits: a 16-bit buffer's poison
BF16_HALF_ULP = 2.0**-8  # |bf16(v) - v| <= 2^-8 |v|: 8 significant bits, rounded to nearest


def check_layer_bf16(be, shapes, names=tuple(ACTIVATIONS), seed: int = 11) -> None:
    """be.gemm_bias_act and be.layer_backward on bfloat16 storage (kernels/layer_tc.cu: the
    products on the tensor cores, float32 sums) over `shapes` (n, K, N), against float64
    sums of the kernels' own bf16 inputs (numpy_ops' 16-bit rounding: each result rounded
    once from its float32 value):
    - small integers (x, W, D, saved in -1..1, b in -2..2: every product and sum exact in
      float32, every result exact in bf16): z, dW, db and E are the float64 ones exactly,
      a is numpy_ops.gemm_bias_act's byte for byte (a wrong row, column, fragment lane or
      share shows);
    - normal values: the float32 sums within 2 (terms + 1) eps32 sum |terms| (any order,
      the tensor cores' included), a result rounded to bf16 within 2^-8 of its value more;
      D' (the products' input) byte for byte be.act_backward's (the same d f'(saved),
      rounded once), and E with the layer below's g (e_act) = bf16((D' W^T) g'(x));
    - without z, without E: those buffers untouched.
    Then what they refuse (nothing written, False): fp16, wider than LAYER_MAX_WIDTH, and
    bf16 on a GPU without bf16 tensor cores (compute capability below 8.0)."""
    from gpubp import precision as PR
    from gpubp.backend.cupy_backend import LAYER_MAX_WIDTH

    rng = np.random.default_rng(seed)
    f32, bf, eps = np.float32, PR.BF16, float(np.finfo(np.float32).eps)

    def low(v):  # host float32 values -> bf16 bits, and their float64 values
        bits = PR.bf16_bits(np.asarray(v, f32))
        return bits, PR.to_float32(bits).astype(np.float64)

    def poison(shape):
        return be.asarray(np.full(shape, BF16_NAN, np.uint16))

    def wide(a):
        return PR.to_float32(be.to_numpy(a)).astype(np.float64)

    for (n, k, m), name in [(s, a) for s in shapes for a in names]:
        act = make_activation(name)
        for values in ("integers", "normal") if name in ("relu", "identity") else ("normal",):
            draw = (lambda s: rng.integers(-1, 2, size=s)) if values == "integers" else (lambda s: rng.normal(size=s))
            (x, x64), (w, w64) = low(draw((n, k))), low(draw((k, m)))
            b = (2 * draw(m) if values == "integers" else draw(m)).astype(f32)
            what = f"{name} {(n, k, m)} {values}"
            # forward: v = x W + b (float32 sums), z = bf16(v), a = bf16(f(v))
            v64 = x64 @ w64 + b
            sums = 2 * (k + 1) * eps * (np.abs(x64) @ np.abs(w64) + np.abs(b)) + FTZ[f32]
            a_ref, z_ref = np.empty((n, m), bf), np.empty((n, m), bf)
            numpy_ops.gemm_bias_act(x, w, b, act, a_ref, z_ref)
            for keep_z in (True, False):
                a, z = poison((n, m)), poison((n, m))
                ok = be.gemm_bias_act(be.asarray(x), be.asarray(w), be.asarray(b), act, a, z if keep_z else None)
                assert ok is True, what
                if not keep_z:
                    assert (be.to_numpy(z) == BF16_NAN).all(), what
                if values == "integers":
                    assert be.to_numpy(a).tobytes() == a_ref.tobytes(), what
                    if keep_z:
                        assert np.array_equal(wide(z), v64), what
                    continue
                if keep_z:
                    assert (np.abs(wide(z) - v64) <= sums + BF16_HALF_ULP * (np.abs(v64) + sums)).all(), what
                # a = bf16(f(v)), a_ref = bf16(f(v_ref)): f's slope at most 1.2 (gelu's 1.13)
                fa = PR.to_float32(a_ref).astype(np.float64)
                tol = 1.2 * sums + 2 * BF16_HALF_ULP * (np.abs(fa) + 1.2 * sums) + FTZ[f32]
                assert (np.abs(wide(a) - fa) <= tol).all(), what
            # backward
            (d, _), (saved, _) = low(draw((n, m))), low(draw((n, m)))
            if values == "normal" and name in ("relu", "sigmoid", "softplus", "elu", "tanh"):  # f' reads the output
                saved = be.to_numpy(be.bias_act_forward(be.asarray(saved), be.zeros(m, f32), act, poison((n, m))))
            dz = wide(be.act_backward(be.asarray(d), be.asarray(saved), act, poison((n, m))))  # D', rounded once
            want = {"dW": x64.T @ dz, "db": dz.sum(0), "E": dz @ w64.T}
            bound = {"dW": 2 * (n + 1) * eps * (np.abs(x64).T @ np.abs(dz)), "db": 2 * (n + 1) * eps * np.abs(dz).sum(0),
                     "E": 2 * (m + 1) * eps * (np.abs(dz) @ np.abs(w64).T)}  # fmt: skip
            for with_e in (True, False):
                grad, e = poisoned(be, k * m + m, f32), poison((n, k))
                ok = be.layer_backward(be.asarray(d), be.asarray(saved), be.asarray(x), be.asarray(w), act, grad,
                                       e if with_e else None)  # fmt: skip
                assert ok is True, what
                g = be.to_numpy(grad).astype(np.float64)
                got = {"dW": g[: k * m].reshape(k, m), "db": g[k * m :]}
                if with_e:
                    got["E"] = wide(e)
                else:
                    assert (be.to_numpy(e) == BF16_NAN).all(), what
                for part in got:
                    if values == "integers":
                        assert np.array_equal(got[part], want[part]), f"{what} {part}"
                    else:
                        tol = (
                            bound[part]
                            + FTZ[f32]
                            + (BF16_HALF_ULP * (np.abs(want[part]) + bound[part]) if part == "E" else 0)
                        )
                        assert (np.abs(got[part] - want[part]) <= tol).all(), f"{what} {part}"
            if values == "normal" and k > 0:  # E as the layer below's D': (D' W^T) g'(x), g = tanh
                tanh = make_activation("tanh")
                xt, xt64 = low(np.tanh(rng.normal(size=(n, k))))
                gp = be.to_numpy(be.act_backward(be.asarray(np.ones((n, k), f32)), be.asarray(xt64.astype(f32)), tanh,
                                                 poisoned(be, (n, k), f32))).astype(np.float64)  # fmt: skip
                grad, e = poisoned(be, k * m + m, f32), poison((n, k))
                assert be.layer_backward(be.asarray(d), be.asarray(saved), be.asarray(xt), be.asarray(w), act, grad, e,
                                         e_act=tanh) is True  # fmt: skip
                e_ref = want["E"] * gp  # (and the float32 product's own rounding)
                e_bound = bound["E"] * np.abs(gp) + eps * np.abs(e_ref) + FTZ[f32]
                tol = e_bound + BF16_HALF_ULP * (np.abs(e_ref) + e_bound)
                assert (np.abs(wide(e) - e_ref) <= tol).all(), f"{what} E with e_act"
    relu = make_activation("relu")
    cases = [(5, 4, 3, PR.F16, 90), (5, LAYER_MAX_WIDTH + 1, 3, bf, 90), (5, 4, LAYER_MAX_WIDTH + 1, bf, 90),
             (5, 4, 3, bf, 75)]  # fmt: skip
    cc = be.compute_capability
    try:
        for n, k, m, dt, be.compute_capability in cases:
            x, w, d = (be.asarray(np.zeros(s, dt)) for s in ((n, k), (k, m), (n, m)))
            out, grad = poison((n, m)).view(dt), poisoned(be, k * m + m, f32)
            assert be.gemm_bias_act(x, w, be.zeros(m, f32), relu, out) is False, (n, k, m, dt)
            assert be.layer_backward(d, d, x, w, relu, grad) is False, (n, k, m, dt)
            assert (be.to_numpy(out).view(np.uint16) == BF16_NAN).all() and np.isnan(be.to_numpy(grad)).all()
    finally:
        be.compute_capability = cc


def test_bf16_layer_kernels_are_the_products_on_the_tensor_cores(gpu):
    # one element; odd widths; several row tiles and blocks; narrow's layer (2048 forward
    # row tiles, 256 backward blocks of 32 tiles each)
    check_layer_bf16(gpu, [(1, 1, 1), (37, 3, 10), (300, 64, 64), (20000, 33, 64)])
    check_layer_bf16(gpu, [(262144, 64, 64)], ("relu",))
    # and on a window of a float32 split: the rows gathered and rounded first, bit for bit
    check_layer_windows(gpu, [(37, 3, 10), (300, 64, 64)], low=True)
    check_layer_windows(gpu, [(262144, 64, 64)], ("relu",), low=True)


def test_layer_backward_writes_the_layer_belows_dprime(gpu):
    # odd widths, partial tiles; narrow's layer (256 blocks of 32 tiles each)
    check_layer_backward_primes_below(gpu, [(37, 3, 10), (300, 64, 64)])
    check_layer_backward_primes_below(gpu, [(262144, 64, 64)], ("relu",))


def test_the_layer_kernels_read_a_window_of_a_split_as_its_gathered_rows(gpu):
    # odd widths, partial tiles; narrow's layer (2048 forward row tiles, 256 backward blocks)
    check_layer_windows(gpu, [(37, 3, 10), (300, 64, 64)])
    check_layer_windows(gpu, [(262144, 64, 64)], ("relu",))


def test_layer_backward_is_dprime_its_products_and_sums(gpu):
    # one row; odd widths; partial tiles; narrow's layer: 256 blocks of 32 tiles each
    check_layer_backward(gpu, [(1, 1, 1), (37, 3, 10), (300, 64, 64), (20000, 33, 64)])
    check_layer_backward(gpu, [(262144, 64, 64)], ("relu", "identity"))


def test_gemm_bias_act_is_the_product_bias_and_activation(gpu):
    # one element; odd widths; k in two stages, the second partial; narrow's layer (2048 row tiles)
    check_gemm_bias_act(gpu, [(1, 1, 1), (37, 3, 10), (130, 60, 64), (20, 64, 33)])
    check_gemm_bias_act(gpu, [(262144, 64, 64)], ("relu", "gelu"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sum_squares(gpu, dtype):
    rng = np.random.default_rng(3)
    for total in SIZES:
        g = rng.normal(size=total).astype(dtype)
        ref = (g.astype(np.float64) ** 2).sum()
        close(gpu.to_float(gpu.sum_squares(gpu.asarray(g))), ref, dtype, what=f"sum_squares {total}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_launch_reductions_see_every_block_and_reset_their_counters(gpu, dtype):
    """reduce.cu's sum and the loss kernel finish in their last block (common.cuh's
    last_block). Sums of integers are exact in any order, so a stale or missing block
    partial (a fence or ticket bug) shows as a wrong total: ones and twos alternate over
    1024 blocks, with other grids between. Each launch must leave its counter at 0, and
    the same input must give the same bits (which block finishes last varies)."""
    n = 10_000_000
    ones, twos = gpu.asarray(np.ones(n, dtype)), gpu.asarray(np.full(n, 2, dtype))
    out = gpu.zeros((), dtype)
    for rep in range(10):
        assert gpu.to_float(gpu.sum_squares(ones, out=out)) == n, rep
        assert gpu.to_float(gpu.sum_squares(twos, out=out)) == 4 * n, rep
        assert gpu.to_float(gpu.sum_squares(ones[:5000], out=out)) == 5000, rep
        x = gpu.asarray(np.zeros((3000, 3), dtype))
        assert int(gpu.to_float(gpu.accuracy_count(x, gpu.asarray(np.zeros(3000, np.int32))))) == 3000, rep
    loss = make_loss("mse")
    rng = np.random.default_rng(11)
    for n_rows in (1, 37, 1024, 1025, 70_000):  # 1 block to 1024 (the grid's cap: rows grid-strided)
        x, t = (gpu.asarray(rng.normal(size=(n_rows, 4)).astype(dtype)) for _ in range(2))
        first = gpu.to_numpy(gpu.loss_forward_backward(x, t, loss))
        for _ in range(5):
            assert np.array_equal(gpu.to_numpy(gpu.loss_forward_backward(x, t, loss)), first), n_rows
        # integers: every partial exact, so a stale or missing block partial shows; the
        # mean is the exact total divided once, in the dtype (IEEE division on both)
        xi = rng.integers(-3, 4, size=(n_rows, 4)).astype(dtype)
        want = dtype((xi.astype(np.float64) ** 2).sum()) / dtype(n_rows * 4)
        got = gpu.to_float(gpu.loss_forward_backward(gpu.asarray(xi), gpu.asarray(np.zeros_like(xi)), loss))
        assert got == want, (n_rows, got, want)
    gpu.synchronize()
    counters = {k: int(gpu.to_numpy(a)[0]) for k, a in gpu._kept_arrays.items() if k[0] == "counter"}
    assert counters and not any(counters.values()), counters


@pytest.mark.parametrize("dtype", DTYPES)
def test_step_guard(gpu, dtype):
    """The fused guard/clip kernel against numpy_ops.step_guard, over a run of steps with
    clipping on and off and a non-finite loss and gradient along the way."""
    t = np.dtype(dtype).type
    ref = [np.array(-1, np.int64), np.array(False), np.zeros((), dtype), np.zeros((), dtype)]
    dev = [gpu.asarray(a) for a in ref]
    for step, (loss, sq, max_norm) in enumerate(
        [(0.5, 16.0, 2.0), (0.5, 1.0, 2.0), (0.5, 16.0, 0.0), (0.3, 1e30, 1.0), (np.nan, 4.0, 1.0), (1.0, np.inf, 1.0)]
    ):
        numpy_ops.step_guard(t(loss), t(sq), step, max_norm, *ref)
        gpu.step_guard(gpu.asarray(np.array(loss, dtype)), gpu.asarray(np.array(sq, dtype)), step, max_norm, *dev)
        got = [gpu.to_numpy(a).reshape(()) for a in dev]  # asarray of a 0-d array gives (1,): the kernel takes either
        assert got[0] == ref[0] and got[1] == ref[1], step
        close(got[2], ref[2], dtype, what=f"norm at {step}")
        close(got[3], ref[3], dtype, what=f"scale at {step}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_step_guard_norm(gpu, dtype):
    """The squared norm and the guard in one launch (the block that finishes the sum runs
    the guard) against numpy_ops.step_guard_norm over a run of steps: one block and 293
    blocks, clipping on and off, a NaN gradient, then a finite one (first_bad stays)."""
    t = np.dtype(dtype).type
    rng = np.random.default_rng(6)
    ref = [np.array(-1, np.int64), np.array(False), np.zeros((), dtype), np.zeros((), dtype)]
    dev = [gpu.asarray(a) for a in ref]
    sq_ref, sq_dev = np.zeros((), dtype), gpu.zeros((), dtype)
    steps = [(5, 2.0, False), (300_000, 1.0, False), (300_000, 0.0, False), (900, 1e-3, False),
             (300_000, 1.0, True), (77, 1.0, False)]  # fmt: skip
    for step, (n, max_norm, nan) in enumerate(steps):
        g = rng.normal(size=n).astype(dtype)
        if nan:
            g[n // 3] = np.nan
        loss = t(0.5)
        numpy_ops.step_guard_norm(np.array(loss), g, sq_ref, step, max_norm, *ref)
        gpu.step_guard_norm(gpu.asarray(np.array(loss)), gpu.asarray(g), sq_dev, step, max_norm, *dev)
        got = [gpu.to_numpy(a).reshape(()) for a in dev]
        assert got[0] == ref[0] and got[1] == ref[1], step
        # |g|^2: a sum of n positive terms, so the relative bound applies to it directly
        close(gpu.to_numpy(sq_dev), sq_ref, dtype, what=f"grad_sq at {step}")
        close(got[2], ref[2], dtype, what=f"norm at {step}")
        close(got[3], ref[3], dtype, what=f"scale at {step}")
    assert int(ref[0]) == 4  # the NaN step, kept after it


def loss_data(rng, name, n, c, dtype):
    x = rng.normal(scale=3.0, size=(n, c)).astype(dtype)
    if name == "softmax_cross_entropy":
        return x, rng.integers(0, c, size=n).astype(np.int32)
    if name == "binary_cross_entropy":
        return x, rng.uniform(size=(n, c)).astype(dtype)
    return x, rng.normal(size=(n, c)).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_forward_backward(gpu, name, dtype):
    rng = np.random.default_rng(4)
    loss = make_loss(name, label_smoothing=0.1, huber_delta=0.8)
    for n, c in [(1, 1), (7, 3), (31, 1), (1000, 10), (1000003, 2), (64, 1000)]:
        if name == "softmax_cross_entropy" and c == 1:
            c = 2
        x, t = loss_data(rng, name, n, c, dtype)
        g_ref = np.empty_like(x)
        v_ref = numpy_ops.loss_forward_backward(x, t, loss, g_ref)
        g = poisoned(gpu, (n, c), dtype)
        v = gpu.loss_forward_backward(gpu.asarray(x), gpu.asarray(t), loss, g)
        # the mean of N row losses: atol = rtol * mean |row loss| (all terms are >= 0 here
        # except MSE/huber's, which are >= 0 too), so the relative bound applies directly
        close(gpu.to_float(v), float(v_ref), dtype, what=f"{name} value {n, c}")
        close(gpu.to_numpy(g), g_ref, dtype, magnitude=np.abs(g_ref) + 1.0 / x.size, what=f"{name} grad {n, c}")
        v2 = gpu.loss_forward_backward(gpu.asarray(x), gpu.asarray(t), loss, None)
        assert gpu.to_float(v2) == gpu.to_float(v)


def test_cross_entropy_label_out_of_range_is_nan(gpu):
    x = gpu.asarray(np.zeros((2, 3)))
    v = gpu.loss_forward_backward(x, gpu.asarray(np.array([0, 3], np.int32)), make_loss("softmax_cross_entropy"))
    assert np.isnan(gpu.to_float(v))


@pytest.mark.parametrize("dtype", DTYPES)
def test_accuracy_count(gpu, dtype):
    rng = np.random.default_rng(5)
    for n, c in [(1, 1), (7, 3), (1000, 10), (1000003, 2), (31, 1)]:
        x = rng.normal(size=(n, c)).astype(dtype)
        labels = rng.integers(0, max(c, 2), size=n).astype(np.int32)
        ref = int(numpy_ops.accuracy_count(x, labels, 0.25))
        assert int(gpu.to_float(gpu.accuracy_count(gpu.asarray(x), gpu.asarray(labels), 0.25))) == ref


# --------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "kind,kw",
    [
        ("sgd", dict(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0)),
        ("sgd", dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=False, weight_decay=1e-2)),
        ("sgd", dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.0)),
        ("adam", dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, decoupled=False)),
        ("adam", dict(lr=1e-2, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=1e-1, decoupled=True)),
    ],
)
def test_optimizer_steps(gpu, kind, kw, dtype):
    rng = np.random.default_rng(6)
    for total in SIZES:
        p = rng.normal(size=total).astype(dtype)
        states = [np.zeros(total, dtype) for _ in range(1 if kind == "sgd" else 2)]
        pd, sd = gpu.asarray(p), [gpu.asarray(s) for s in states]
        scale = 0.5
        for step in (1, 2, 3):
            g = rng.normal(size=total).astype(dtype)
            if kind == "sgd":
                numpy_ops.sgd_step(
                    p, g, *states, np.empty((2, total), dtype), first_step=step == 1, grad_scale=scale, **kw
                )
                gpu.sgd_step(pd, gpu.asarray(g), *sd, None, first_step=step == 1,
                             grad_scale=gpu.xp.full((), scale, dtype), **kw)  # fmt: skip
            else:
                numpy_ops.adam_step(p, g, *states, np.empty((2, total), dtype), step=step, grad_scale=scale, **kw)
                gpu.adam_step(pd, gpu.asarray(g), *sd, None, step=step, grad_scale=scale, **kw)
        # three steps of a few ulps each; atol: rtol * (|p| + lr)
        close(gpu.to_numpy(pd), p, dtype, magnitude=10 * (np.abs(p) + kw["lr"]), what=f"{kind} {total}")
        for s, sref in zip(sd, states):
            close(gpu.to_numpy(s), sref, dtype, magnitude=10 * (np.abs(sref) + 1e-3), what=f"{kind} state {total}")


def test_launchers_check_their_arguments(gpu):
    z = gpu.zeros((4, 3), np.float32)
    act = make_activation("relu")
    with pytest.raises(TypeError, match="dtype"):
        gpu.bias_act_forward(z, gpu.zeros(3, np.float64), act, z)
    with pytest.raises(ValueError, match="do not fit"):
        gpu.bias_act_forward(z, gpu.zeros(4, np.float32), act, z)
    with pytest.raises(ValueError, match="C-contiguous"):
        gpu.act_backward(z.T, z.T, act, z.T)
    with pytest.raises(TypeError, match="CuPy array"):
        gpu.gemm(np.zeros((4, 3), np.float32), z.T, gpu.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="does not fit"):
        gpu.gemm(z, z, gpu.zeros((4, 4), np.float32))


# --------------------------------------------------------------------------- whole training

# (config, overrides): digits, spirals, regression (one output) and a residual model
TRAINING_CASES = {
    "digits": ("configs/digits.toml", ["model.hidden=[64, 32]"]),
    "spirals": ("configs/spirals.toml", []),
    "regression": ("configs/regression.toml", []),
    "residual": ("configs/digits.toml", ["model.hidden=[64, 64, 64]", "model.residual=true"]),
}


def train_run(out, case, device, dtype, steps=200, resume=None):
    """Per-step training losses (eval_every = 1) and the final flat parameters."""
    import json

    from gpubp.config import load_config
    from gpubp.trainer import Trainer

    config, extra = TRAINING_CASES[case]
    overrides = extra + [
        f"model.dtype={dtype}",
        f"train.steps={steps}",
        "train.eval_every=1",
        "train.early_stopping_patience=0",
    ]
    trainer = Trainer(load_config(config, overrides), str(out), device=device, quiet=True, resume=resume)
    trainer.train()
    losses = [json.loads(line)["train_loss"] for line in open(os.path.join(out, "metrics.jsonl"))]
    return np.array(losses), trainer.run.backend.to_numpy(trainer.model.flat_params)


@pytest.mark.parametrize("case", list(TRAINING_CASES))
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-4)])
def test_training_curves_agree_with_cpu(tmp_path, case, dtype, tol):
    cpu, _ = train_run(tmp_path / "cpu", case, "cpu", dtype)
    gpu_losses, _ = train_run(tmp_path / "gpu", case, "gpu", dtype)
    assert len(cpu) == len(gpu_losses) == 200
    # relative agreement of the loss at every one of the 200 steps (the bounds)
    np.testing.assert_allclose(gpu_losses, cpu, rtol=tol, atol=0)


def test_gpu_training_is_deterministic_and_resumes_bitwise(tmp_path):
    a, pa = train_run(tmp_path / "a", "residual", "gpu", "float32", steps=100)
    b, pb = train_run(tmp_path / "b", "residual", "gpu", "float32", steps=100)
    assert np.array_equal(a, b) and np.array_equal(pa, pb)
    # stop after 37 steps (mid-epoch), resume to 100: the same losses and parameters, bitwise
    train_run(tmp_path / "c", "residual", "gpu", "float32", steps=37)
    c, pc = train_run(tmp_path / "c", "residual", "gpu", "float32", steps=100, resume=str(tmp_path / "c" / "last.npz"))
    assert np.array_equal(c, a) and np.array_equal(pc, pa)


def test_digits_same_test_accuracy_on_both_devices(tmp_path):
    import json

    from .conftest import run_cli

    acc = {}
    for device in ("cpu", "gpu"):
        r = run_cli("train", "--config", "configs/digits.toml", "--device", device, "--out", str(tmp_path / device),
                    "--quiet", "--set", "model.dtype=float64")  # fmt: skip
        assert r.returncode == 0, r.stderr
        acc[device] = json.loads(r.stdout)["test_accuracy"]
    print(f"digits test accuracy: cpu {acc['cpu']:.4f}, gpu {acc['gpu']:.4f}")
    assert acc["gpu"] == acc["cpu"] and acc["gpu"] >= 0.97


def test_every_device_command_runs_on_the_gpu(tmp_path):
    """train, eval, predict, gradcheck, jacobian and bench (one case) with --device gpu."""
    from .conftest import run_cli

    run = str(tmp_path / "run")
    steps = ["--set", "train.steps=30", "--set", "model.hidden=[32]"]
    commands = {
        "train": ["train", "--config", "configs/spirals.toml", "--out", run, "--quiet", *steps],
        "eval": ["eval", "--checkpoint", f"{run}/last.npz"],
        "predict": ["predict", "--checkpoint", f"{run}/last.npz", "--input", "IN", "--output", str(tmp_path / "p.npy")],
        "gradcheck": ["gradcheck", "--config", "configs/regression.toml", "--set", "model.dtype=float64"],
        "jacobian": ["jacobian", "--config", "configs/spirals.toml", "--repeats", "1", "--set", "model.hidden=[16]"],
        "bench": ["bench", "--case", "tiny", "--no-torch"],
    }
    x = np.random.default_rng(0).normal(size=(9, 2))
    np.save(tmp_path / "x.npy", x)
    for name, args in commands.items():
        args = [str(tmp_path / "x.npy") if a == "IN" else a for a in args]
        r = run_cli(*args, "--device", "gpu", timeout=600)
        assert r.returncode == 0, f"{name}: {r.stderr[-2000:]}"
    assert np.load(tmp_path / "p.npy").shape == (9, 3)


# --------------------------------------------------------------------------- compute-sanitizer


def sanitizer_path():
    return shutil.which("compute-sanitizer") or next(
        (p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if os.path.exists(p)), None
    )


@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_compute_sanitizer(tool):
    """tests/gpu_sanitize_child.py (CuPy's memory pool off, so an overrun inside a pooled
    block is seen) under each tool: ERROR SUMMARY: 0 errors."""
    import sys

    sanitizer = sanitizer_path()
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found")
    child = os.path.join(ROOT, "tests", "gpu_sanitize_child.py")
    cmd = [sanitizer, "--tool", tool, "--error-exitcode", "99", sys.executable, child]
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1200)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    # memcheck and synccheck end "ERROR SUMMARY: 0 errors", racecheck "RACECHECK SUMMARY:
    # 0 hazards displayed (0 errors, 0 warnings)"
    summary = (
        "RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)"
        if tool == "racecheck"
        else "ERROR SUMMARY: 0 errors"
    )
    assert summary in out, out[-4000:]
    assert "sanitize child: ok" in out
