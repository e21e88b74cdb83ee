"""The fused MLP (kernels/mlp.cu, MLP(fused_mlp=True), train.fused_mlp): the whole forward
pass, loss and backward pass of a narrow network in one kernel, its gradient left in one
share per block and summed by sum_shares or by the guard's norm kernel.

The kernel runs on the host (tests/cuda_host.h, as in test_kernels_emulated.py) through
the GPU backend's own launcher, against numpy_ops.mlp_forward_backward, the reference, in
float64. Tolerance, per gradient element and for the loss: the kernel and the reference
sum the same terms in other orders, so they differ by the rounding of those sums. Each
of the L layers' sums has at most n + W terms (rows, or the widest layer), and an error
made in layer k travels through the layers below it, so the bound taken is
    |got - ref| <= 4 L (n + W) eps (|ref| + max|ref|)
with eps the kernel dtype's: a rounding bound of a sum of n + W terms per layer,
relative to the largest gradient element (an element near 0 inherits its neighbours'
absolute error). A wrong index or a missing tile moves an element by O(|ref|) and fails
it in float32 (4 L (n + W) eps <= 0.03 in every case here) and by far in float64.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from gpubp import kernels
from gpubp.activations import ACTIVATIONS, make_activation
from gpubp.backend import NumpyBackend, cupy_backend, numpy_ops
from gpubp.backend.recording import RecordingBackend
from gpubp.losses import make_loss
from gpubp.model import MLP, param_layout

from .test_kernels_emulated import EmulatedGpu, host_kernels  # noqa: F401  (the fixture)


def problem(rng, sizes, hidden: str, loss_name: str, n: int, dtype, output: str = "identity"):
    """Random parameters, batch and targets of a network; its activations and loss (a
    leaky_relu's slope 0.3, not the default: the kernel must take the one it is given)."""
    acts = [make_activation(hidden, 0.3)] * (len(sizes) - 2) + [make_activation(output, 0.3)]
    loss = make_loss(loss_name, label_smoothing=0.1 if loss_name == "softmax_cross_entropy" else 0.0)
    _, p = param_layout(sizes)
    params = (rng.normal(size=p) / np.sqrt(max(sizes))).astype(dtype)
    x = rng.normal(size=(n, sizes[0])).astype(dtype)
    if loss_name == "softmax_cross_entropy":
        y = rng.integers(0, sizes[-1], n).astype(np.int32)
    else:
        y = rng.uniform(size=(n, sizes[-1])).astype(dtype)
    return acts, loss, params, x, y


def reference(sizes, acts, loss, params, x, y):
    """(loss, gradient) of numpy_ops.mlp_forward_backward in float64."""
    f64 = lambda a: a if a.dtype == np.int32 else a.astype(np.float64)  # noqa: E731
    g, out = np.zeros(params.size), np.zeros(())
    numpy_ops.mlp_forward_backward(f64(x), f64(y), f64(params), g, sizes, acts, loss, out)
    return float(out), g


def fused(gpu, sizes, acts, loss, params, x, y):
    """(loss, gradient, shares) of the kernel through the GPU backend's launcher."""
    g, out = np.full(params.size, np.nan, x.dtype), np.full((), np.nan, x.dtype)
    shares = gpu.be.mlp_forward_backward(x, y, params, g, sizes, acts, loss, out)
    assert shares is not None
    gpu.be.sum_shares(shares, g)
    return out, g, shares


def assert_close(got, ref, sizes, n, dtype, what, atol: float = 0.0):
    """The module docstring's bound (plus atol)."""
    eps, layers = float(np.finfo(dtype).eps), len(sizes) - 1
    rel = 4 * layers * (n + max(sizes)) * eps
    err = np.abs(np.asarray(got, np.float64) - ref)
    bound = rel * (np.abs(ref) + np.abs(ref).max()) + atol
    assert np.all(err <= bound), (what, float((err / bound).max()))


CASES = [  # (widths, hidden activation, loss, rows, output activation)
    *[([5, 7, 3], act, "softmax_cross_entropy", 37, "identity") for act in ACTIVATIONS],
    ([4, 6, 6, 2], "gelu", "mse", 9, "identity"),
    ([3, 8, 1], "relu", "binary_cross_entropy", 300, "identity"),
    ([6, 5, 5, 5, 2], "silu", "huber", 70, "identity"),
    ([4, 9, 3], "tanh", "mse", 50, "sigmoid"),  # an output activation, saved (y) and taken back
    ([3, 4, 2], "relu", "mse", 1, "identity"),  # one row: one block, its share the gradient itself
    ([64, 128, 10], "relu", "softmax_cross_entropy", 128, "identity"),  # the tiny bench case
    ([2, *[8] * 7, 3], "elu", "softmax_cross_entropy", 40, "identity"),  # MLP_MAX_LAYERS layers
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_kernel_matches_the_reference(host_kernels, dtype):  # noqa: F811
    """Every hidden activation, every loss, an output activation, one row to 300, the tiny
    bench network and the deepest network taken; one launch, and one more to sum the
    shares when there is more than one block."""
    gpu = EmulatedGpu(host_kernels)
    rng = np.random.default_rng(0)
    sfx = "f32" if dtype == np.float32 else "f64"
    for sizes, act, loss_name, n, output in CASES:
        acts, loss, params, x, y = problem(rng, sizes, act, loss_name, n, dtype, output)
        v_ref, g_ref = reference(sizes, acts, loss, params, x, y)
        gpu.launches.clear()
        out, g, shares = fused(gpu, sizes, acts, loss, params, x, y)
        one = shares.shape[0] == 1
        assert gpu.launches == [f"mlp_fused_{sfx}"] + ([] if one else [f"sum_shares_{sfx}"]), (sizes, n)
        assert one == (n == 1)
        assert_close(out, np.asarray(v_ref), sizes, n, dtype, (sizes, act, loss_name, "loss"))
        assert_close(g, g_ref, sizes, n, dtype, (sizes, act, loss_name, "gradient"))


def test_blocks_that_take_several_tiles_and_the_same_bits_every_launch(host_kernels, monkeypatch):  # noqa: F811
    """With at most 3 blocks, each block adds several tiles into its share (the first tile
    writes it); two launches (other block orders, another block finishing the loss's mean)
    give the same bits, and the shares sum to the reference's gradient."""
    monkeypatch.setattr(cupy_backend, "MLP_MAX_BLOCKS", 3)
    gpu = EmulatedGpu(host_kernels)
    rng = np.random.default_rng(1)
    sizes = [5, 12, 4]
    acts, loss, params, x, y = problem(rng, sizes, "softplus", "softmax_cross_entropy", 203, np.float32)
    out, g, shares = fused(gpu, sizes, acts, loss, params, x, y)
    assert shares.shape == (3, params.size)  # 203 rows: tiles of 8, 26 tiles over 3 blocks
    v_ref, g_ref = reference(sizes, acts, loss, params, x, y)
    assert_close(out, np.asarray(v_ref), sizes, 203, np.float32, "loss")
    assert_close(g, g_ref, sizes, 203, np.float32, "gradient")
    out2, g2, _ = fused(gpu, sizes, acts, loss, params, x, y)
    assert out2.tobytes() == out.tobytes() and g2.tobytes() == g.tobytes()


def tile_cols(groups: int, n: int, ct_max: int) -> int:
    """kernels/mlp.cu's tile_cols (MLP_THREADS threads): the columns a thread takes."""
    c = ct_max
    while c > 1 and not (n % c == 0 and groups * (n // c) >= cupy_backend.MLP_THREADS):
        c //= 2
    return c


def tile_instances(sizes, saves_z, n: int, rt_most: int, ct_max: int) -> set:
    """Which of kernels/mlp.cu's product instances (MLP_TILE_CALL) a float32 launch with
    its weights staged per tile (MLP_RESIDENT_WEIGHTS = False: a W too large for the stage
    goes in chunks) runs, from the kernel's own rules: (product, rows or i a thread,
    columns a thread)."""
    rows = cupy_backend.mlp_tile_rows(sizes, saves_z, 4, n)
    rt, stage = min(rt_most, rows), cupy_backend.mlp_shared(sizes, saves_z, 4, rows)[1]
    groups, taken = rows // rt, set()
    for k, (ni, no) in enumerate(zip(sizes[:-1], sizes[1:])):
        taken.add(("forward", rt, tile_cols(groups, no, ct_max)))
        jt = tile_cols(ni, no, ct_max)
        taken.add(("weight", tile_cols(no // jt, ni, ct_max), jt))
        chunk = stage // (no + 1)
        for i0 in range(0, ni, chunk) if k > 0 else ():
            taken.add(("input", rt, tile_cols(groups, min(ni, i0 + chunk) - i0, ct_max)))
    return taken


def test_rows_and_columns_per_thread_change_nothing_but_the_speed(host_kernels, monkeypatch):  # noqa: F811
    """MLP_ROWS_PER_THREAD and MLP_COLS_PER_THREAD each 1, 2, 4 (kernels/mlp.cu's rt and
    ct_max: the register tiles of the products, each pair a compiled instance of its own):
    each element is summed in the same order, so the same bits. A network with a
    pre-activation kept (gelu) and one of 8-row tiles (rt 4 on a 2-row tile); then, in two
    tiles of 32 rows (MLP_TILES = 1: the most rows that fit), 64- and 128-wide layers whose
    products take tiles of 4 rows by 2 or 4 columns (and W's 128 x 128 staged in two
    chunks), for which the reference checks the tiles' indices; then widths whose weight
    gradients take the remaining shapes (odd, 9 and 42 columns). Between them they run
    every instance of the three products (tile_instances, asserted)."""
    gpu = EmulatedGpu(host_kernels)
    taken = every_tile_instance(lambda sizes, args: fused(gpu, sizes, *args)[:2], monkeypatch)
    assert taken == {(p, a, b) for p in ("forward", "weight", "input") for a, b in TILE_PAIRS}


# (rows, columns) a thread: every pair the launcher takes; the networks (widths, hidden
# activation, rows, MLP_TILES) whose launches at every pair run every product instance
TILE_PAIRS = [(rt, ct) for rt in cupy_backend.MLP_TILE_SIZES for ct in cupy_backend.MLP_TILE_SIZES]
TILE_NETWORKS = [([5, 12, 7, 3], "gelu", 100, 32), ([4, 9, 2], "relu", 50, 32), ([16, 64, 128, 128, 8], "relu", 64, 1),
                 ([5, 128, 64, 42, 3], "relu", 40, 32), ([18, 128, 9], "relu", 40, 32)]  # fmt: skip


def every_tile_instance(run, monkeypatch) -> set:
    """run(sizes, args) -> (loss, gradient) of one float32 launch, for each of TILE_NETWORKS
    at each of TILE_PAIRS, the weights staged per tile (so in chunks where W is larger
    than the stage, whatever the GPU's shared memory): the same bits at every pair, and
    within the module docstring's bound of the reference. Returns the product instances
    run (tile_instances)."""
    monkeypatch.setattr(cupy_backend, "MLP_RESIDENT_WEIGHTS", False)
    rng = np.random.default_rng(7)
    taken = set()
    for sizes, act, n, tiles in TILE_NETWORKS:
        monkeypatch.setattr(cupy_backend, "MLP_TILES", tiles)
        args = problem(rng, sizes, act, "mse", n, np.float32)
        saves_z = tuple(int(a.saves == "input") for a in args[0])
        got = []
        for rt, ct in TILE_PAIRS:
            monkeypatch.setattr(cupy_backend, "MLP_ROWS_PER_THREAD", rt)
            monkeypatch.setattr(cupy_backend, "MLP_COLS_PER_THREAD", ct)
            out, g = run(sizes, args)
            got.append(np.asarray(out).tobytes() + np.asarray(g).tobytes())
            taken |= tile_instances(sizes, saves_z, n, rt, ct)
        assert all(b == got[0] for b in got), sizes
        v_ref, g_ref = reference(sizes, *args)
        tiny = float(np.finfo(np.float32).tiny)  # (the GPU's -ftz=true flushes float32 subnormals to 0)
        assert_close(out, np.asarray(v_ref), sizes, n, np.float32, (sizes, "loss"), tiny)
        assert_close(g, g_ref, sizes, n, np.float32, (sizes, "gradient"), tiny)
    return taken


def test_the_launcher_refuses_a_tile_the_kernel_has_no_instance_for(host_kernels, monkeypatch):  # noqa: F811
    """MLP_ROWS_PER_THREAD = 3 (or MLP_COLS_PER_THREAD = 8) would reach no product instance
    in the kernel (nothing computed, no error from the GPU), and tiles of more rows than the
    kernel's row table holds would write past it: the launcher says so instead."""
    gpu = EmulatedGpu(host_kernels)
    args = problem(np.random.default_rng(3), [4, 8, 2], "relu", "mse", 16, np.float32)
    for name, value in (("MLP_ROWS_PER_THREAD", 3), ("MLP_COLS_PER_THREAD", 8)):
        with monkeypatch.context() as m:
            m.setattr(cupy_backend, name, value)
            with pytest.raises(ValueError, match=f"{name} {value}"):
                fused(gpu, [4, 8, 2], *args)
    many = cupy_backend.MLP_ROW_TABLE * 2
    args = problem(np.random.default_rng(3), [4, 8, 2], "relu", "mse", many * cupy_backend.MLP_TILES, np.float32)
    with monkeypatch.context() as m:
        m.setattr(cupy_backend, "MLP_MAX_ROWS", many)
        with pytest.raises(ValueError, match=f"{many} rows a tile .* row table holds {many // 2}"):
            fused(gpu, [4, 8, 2], *args)
    assert gpu.launches == []


def test_sum_shares_adds_the_shares_in_block_order(host_kernels):  # noqa: F811
    """sum_shares (common.cuh's sum_of_shares, SHARES_UNROLL loads at a time) is the
    in-order sum shares[0] + shares[1] + ... of each element, bit for bit (NumPy's float32
    adds, row by row), for share counts around the batch of loads (1 to 40), a column of
    -0.0 staying -0.0 (an add of 0 for a share past the end would make it +0.0)."""
    gpu = EmulatedGpu(host_kernels)
    rng = np.random.default_rng(9)
    for n_shares in (1, 2, 16, 17, 18, 32, 33, 40):
        scale = 10.0 ** rng.integers(-6, 7, 300)  # columns of other magnitudes: the order shows in the roundings
        shares = (rng.normal(size=(n_shares, 300)) * scale).astype(np.float32)
        shares[:, 7] = -0.0
        want = shares[0].copy()
        for b in range(1, n_shares):
            want += shares[b]
        g = np.full(300, np.nan, np.float32)
        gpu.be.sum_shares(shares, g)
        assert g.tobytes() == want.tobytes(), n_shares
        assert np.signbit(g[7]), n_shares


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_guard_sums_the_shares_to_the_bits_of_sum_shares(host_kernels, dtype):  # noqa: F811
    """step_guard_norm(..., shares): the gradient summed from its shares in the norm's own
    launch, bit for bit what sum_shares writes, and its squared norm and verdict."""
    gpu = EmulatedGpu(host_kernels)
    rng = np.random.default_rng(2)
    sizes = [6, 16, 3]
    acts, loss, params, x, y = problem(rng, sizes, "relu", "mse", 90, dtype)
    out, g_summed, shares = fused(gpu, sizes, acts, loss, params, x, y)
    assert shares.shape[0] > 1
    g = np.full_like(g_summed, np.nan)
    state = [np.array(-1, np.int64), np.array(False), np.zeros((), dtype), np.zeros((), dtype)]
    grad_sq = np.zeros((), dtype)
    gpu.launches.clear()
    gpu.be.step_guard_norm(out, g, grad_sq, np.asarray(3, np.int64), 0.5, *state, shares=shares)
    assert len(gpu.launches) == 1 and g.tobytes() == g_summed.tobytes()
    g[...] = np.nan  # one share that is not g itself: copied into g, as sum_shares does
    gpu.be.step_guard_norm(out, g, grad_sq, np.asarray(3, np.int64), 0.5, *state, shares=g_summed[None].copy())
    assert g.tobytes() == g_summed.tobytes()
    g64 = g_summed.astype(np.float64)
    assert abs(float(grad_sq) - g64 @ g64) <= 2 * g.size * float(np.finfo(dtype).eps) * (g64 @ g64)
    assert int(state[0]) == -1 and not state[1]
    assert float(state[3]) == pytest.approx(
        min(1.0, 0.5 / (np.sqrt(g64 @ g64) + 1e-6)), rel=8 * float(np.finfo(dtype).eps)
    )


def test_a_nan_in_the_batch_reaches_the_loss_and_the_gradient(host_kernels):  # noqa: F811
    """A NaN in one row of x (the last, partial tile's) makes the loss NaN and the
    gradient NaN exactly where the reference's is, so the step's guard sees it."""
    gpu = EmulatedGpu(host_kernels)
    rng = np.random.default_rng(8)
    sizes = [4, 8, 3]
    acts, loss, params, x, y = problem(rng, sizes, "tanh", "softmax_cross_entropy", 45, np.float32)
    x[44, 2] = np.nan  # 45 rows in tiles of 2: the last tile holds row 44 and a padded row
    out, g, _ = fused(gpu, sizes, acts, loss, params, x, y)
    v_ref, g_ref = reference(sizes, acts, loss, params, x, y)
    assert np.isnan(out) and np.isnan(v_ref)
    np.testing.assert_array_equal(np.isnan(g), np.isnan(g_ref))
    assert np.isnan(g).any()


def test_networks_the_kernel_does_not_take_are_left_to_the_ops(host_kernels):  # noqa: F811
    """None and no launch: a layer wider than MLP_MAX_WIDTH, more than MLP_MAX_LAYERS
    layers, two leaky_relu slopes, an empty batch."""
    gpu = EmulatedGpu(host_kernels)
    rng = np.random.default_rng(3)
    for sizes, n in [([4, cupy_backend.MLP_MAX_WIDTH + 1, 2], 8), ([2] * (cupy_backend.MLP_MAX_LAYERS + 2), 8),
                     ([3, 4, 2], 0)]:  # fmt: skip
        acts, loss, params, x, y = problem(rng, sizes, "relu", "mse", n, np.float32)
        g, out = np.zeros(params.size, np.float32), np.zeros((), np.float32)
        assert gpu.be.mlp_forward_backward(x, y, params, g, sizes, acts, loss, out) is None
    acts, loss, params, x, y = problem(rng, [3, 4, 2], "relu", "mse", 8, np.float32)
    acts = [make_activation("leaky_relu", 0.1), make_activation("leaky_relu", 0.2)]
    assert gpu.be.mlp_forward_backward(x, y, params, np.zeros(params.size, np.float32), [3, 4, 2], acts, loss,
                                       np.zeros((), np.float32)) is None  # fmt: skip
    assert gpu.launches == []
    acts = [make_activation("relu")] * 2
    with pytest.raises(ValueError, match="do not fit the widths"):  # parameters of another network
        gpu.be.mlp_forward_backward(x, y, params[:-1], np.zeros(params.size - 1, np.float32), [3, 4, 2], acts, loss,
                                    np.zeros((), np.float32))  # fmt: skip


def test_the_tile_rule_fits_the_kernel():
    """mlp_tile_rows: about MLP_TILES tiles, powers of two up to MLP_MAX_ROWS, within the
    tile's budget; mlp_shared: the launch's shared memory within the two budgets, its
    weights' stage holding at least a row of each layer; the launcher's constants are the
    kernel's."""
    rows, shared = cupy_backend.mlp_tile_rows, cupy_backend.mlp_shared
    assert rows([64, 128, 10], (0, 0), 4, 128) == 4  # tiny: 32 tiles of 4 rows
    assert shared([64, 128, 10], (0, 0), 4, 4) == ((4 * 458 + 64 * 129) * 4, 64 * 129)  # its W_0 staged whole
    assert rows([64, 128, 10], (0, 0), 4, 1) == 1
    assert rows([64, 128, 10], (0, 0), 4, 129) == 8
    assert rows([64] * 6, (0,) * 5, 4, 262144) == 64  # narrow: 64 rows of 2048 bytes, 128 KiB
    assert shared([64] * 6, (0,) * 5, 4, 64) == (131072 + 64 * 65 * 4, 64 * 65)
    assert rows([64] * 6 + [1], (0,) * 6, 4, 262144) == 32  # 63 rows of 2052 bytes fit
    assert rows([128] * 9, (1,) * 8, 8, 4096) == 4  # 7 rows of 9 + 8 + 2 float64 rows of 128 fit
    assert shared([128] * 9, (1,) * 8, 8, 4)[1] == 33024 // 8  # 32 of W's 128 rows a chunk
    assert rows([128] * 10, (0,) * 9, 4, 64) == 0 and rows([4, 129, 2], (0, 0), 4, 64) == 0
    budget = cupy_backend.MLP_SHARED_BYTES + cupy_backend.MLP_WEIGHT_BYTES
    for sizes in ([64, 128, 10], [128] * 9, [3, 128, 128, 1], [100, 100, 100]):
        for itemsize in (4, 8):
            for n in (1, 100, 5000):
                saves_z = (1,) * (len(sizes) - 1)
                r = rows(sizes, saves_z, itemsize, n)
                assert r * (2 * sum(sizes) - sizes[0] + 2 * max(sizes)) * itemsize <= cupy_backend.MLP_SHARED_BYTES
                assert r >= 1 and r & (r - 1) == 0, (sizes, itemsize, n, r)  # a power of two: rt divides it
                size, stage = shared(sizes, saves_z, itemsize, r)
                assert size <= budget and stage >= max(sizes) + 1, (sizes, itemsize, n)
    source = kernels.read_source("mlp.cu")
    for name in ("MLP_THREADS", "MLP_MAX_LAYERS"):
        assert int(re.search(rf"#define {name} (\d+)", source).group(1)) == getattr(cupy_backend, name), name
    assert int(re.search(r"#define MLP_MAX_ROWS (\d+)", source).group(1)) == cupy_backend.MLP_ROW_TABLE
    assert cupy_backend.MLP_MAX_ROWS <= cupy_backend.MLP_ROW_TABLE
    # the products' instances (MLP_TILE_CALL): every pair of the sizes the launcher lets through
    instances = {(int(r), int(c)) for r, c in re.findall(r"case (\d) \* 8 \+ (\d): FN<T, \1, \2>", source)}
    assert instances == {(r, c) for r in cupy_backend.MLP_TILE_SIZES for c in cupy_backend.MLP_TILE_SIZES}
    for name in ("MLP_ROWS_PER_THREAD", "MLP_COLS_PER_THREAD"):
        assert getattr(cupy_backend, name) in cupy_backend.MLP_TILE_SIZES, name


# an A100's shared memory for a block (cudaDevAttrMaxSharedMemoryPerBlockOptin: 163 KiB; an
# H100's is 227 KiB): the GPUs the fused MLP's budget is for
A100_SHARED_OPTIN = 166912


def test_the_kernel_fits_an_a100s_shared_memory():
    """The kernel's static __shared__ arrays (the loss's warp sums, last_block's flag: the
    sizes NVRTC gives the compiled kernel's .shared variables) and the launcher's largest
    dynamic shared memory stay within what an A100 gives a block; the tile is dynamic
    (extern), so it is not among the static arrays."""
    from .test_kernels_cpu import need_nvrtc

    need_nvrtc()
    ptx = kernels.nvrtc_ptx("mlp.cu")
    shared = re.findall(r"\.shared \.align \d+ \.\w+ (\S+?)(?:\[(\d+)\])?;", ptx)
    assert re.search(r"\.extern \.shared \.align 16 \.b8 mlp_dynamic_shared\[\];", ptx), "the tile is not dynamic"
    budget = cupy_backend.MLP_SHARED_BYTES + cupy_backend.MLP_WEIGHT_BYTES
    for t in "fd":  # the float and double kernels
        static = sum(
            int(size or 1)
            for name, size in shared
            if name != "mlp_dynamic_shared[]" and ("mlp_fused" not in name or f"mlp_fusedI{t}E" in name)
        )
        assert 0 < static <= cupy_backend.MLP_STATIC_BYTES, (t, static)
    assert budget + cupy_backend.MLP_STATIC_BYTES <= A100_SHARED_OPTIN


def test_a_gpu_with_less_shared_memory_leaves_the_network_to_the_ops(host_kernels):  # noqa: F811
    """A GPU that gives a block less than the tile's shared memory (mlp_shared): the
    launcher takes the network only where its tile fits (mlp_fits), and the tile's rows
    (so the bits) are the same as on a larger GPU."""
    gpu = EmulatedGpu(host_kernels)
    relu = [make_activation("relu")] * 5
    size, _ = cupy_backend.mlp_shared([64] * 6, (0,) * 5, 4, 64)
    gpu.be.shared_optin = size + cupy_backend.MLP_STATIC_BYTES
    assert gpu.be.mlp_fits([64] * 6, relu, np.float32, 262144)
    gpu.be.shared_optin -= 1
    assert not gpu.be.mlp_fits([64] * 6, relu, np.float32, 262144)
    assert gpu.be.mlp_fits([64] * 6, relu, np.float32, 128)  # 4 rows a tile: small enough


def test_the_launch_raises_the_kernels_shared_memory_once(host_kernels, monkeypatch):  # noqa: F811
    """A launch that needs more dynamic shared memory than the kernel was allowed sets its
    max_dynamic_shared_size_bytes first (CuPy's attribute; past 48 KiB the GPU needs it),
    once per size it grows to: a smaller tile later leaves it, so no launch inside a
    capture sets it again."""
    monkeypatch.setattr(cupy_backend, "MLP_TILES", 1)  # one tile of all the rows
    gpu = EmulatedGpu(host_kernels)
    rng = np.random.default_rng(9)
    sizes = [64] * 6
    for n in (64, 8):
        acts, loss, params, x, y = problem(rng, sizes, "relu", "mse", n, np.float32)
        fused(gpu, sizes, acts, loss, params, x, y)
        size, stage = cupy_backend.mlp_shared(sizes, (0,) * 5, 4, 64)
        resident = size + (cupy_backend.mlp_weight_values(sizes) - stage) * 4  # every W staged (fits 256 KiB)
        assert gpu.be._dynamic_shared == {"mlp_fused_f32": resident}, n


def test_weights_staged_once_per_block_or_per_tile_give_the_same_bits(host_kernels, monkeypatch):  # noqa: F811
    """Where a block's shared memory holds every layer's W beside the tile, the launcher
    has the kernel stage them once per block (resident); where it holds one stage only,
    once per tile and product (W's 128 x 128 there in two chunks). The same sums in the
    same order: the same bits; each launch asks for its own mode's shared memory
    (MLP_RESIDENT_WEIGHTS = False: per tile, whatever fits). Networks of one tile a block,
    of many (3 blocks at most), and with a pre-activation kept."""
    rng = np.random.default_rng(11)
    for sizes, act, n, tiles, blocks in [([16, 64, 128, 128, 8], "relu", 64, 1, 512), ([64] * 6, "relu", 700, 32, 3),
                                         ([5, 12, 7, 3], "gelu", 100, 32, 512)]:  # fmt: skip
        monkeypatch.setattr(cupy_backend, "MLP_TILES", tiles)
        monkeypatch.setattr(cupy_backend, "MLP_MAX_BLOCKS", blocks)
        args = problem(rng, sizes, act, "mse", n, np.float32)
        saves_z = tuple(int(a.saves == "input") for a in args[0])
        size, stage = cupy_backend.mlp_shared(sizes, saves_z, 4, cupy_backend.mlp_tile_rows(sizes, saves_z, 4, n))
        whole = cupy_backend.mlp_weight_values(sizes)
        assert whole > stage
        got = []
        for optin, allowed, shared in ((size + cupy_backend.MLP_STATIC_BYTES, True, size), (None, False, size),
                                       (None, True, size + (whole - stage) * 4)):  # fmt: skip
            monkeypatch.setattr(cupy_backend, "MLP_RESIDENT_WEIGHTS", allowed)
            gpu = EmulatedGpu(host_kernels)
            gpu.be.shared_optin = optin or gpu.be.shared_optin  # None: the host's 256 KiB
            out, g, shares = fused(gpu, sizes, *args)
            assert gpu.be._dynamic_shared == {"mlp_fused_f32": shared}, (sizes, optin, allowed)
            assert shares.shape[0] == min(blocks, -(-n // cupy_backend.mlp_tile_rows(sizes, saves_z, 4, n)))
            got.append(out.tobytes() + g.tobytes())
        assert got[0] == got[1] == got[2], sizes
        v_ref, g_ref = reference(sizes, *args)
        assert_close(g, g_ref, sizes, n, np.float32, (sizes, "gradient"))


# ---------------------------------------------------------------------------------------
# the model and the training step


def gpu_model(host_kernels, sizes, **kw):  # noqa: F811
    """An MLP on the emulated GPU backend (its kernels on the host)."""
    gpu = EmulatedGpu(host_kernels)
    gpu.be.xp = np
    return gpu, MLP(sizes, backend=gpu.be, **kw)


def test_the_model_runs_the_fused_pass_and_matches_its_unfused_self(host_kernels):  # noqa: F811
    """MLP(fused_mlp=True) on the GPU backend: one kernel and the shares' sum, the same
    loss and gradients as the unfused model on the NumPy backend (module tolerance). On
    rows of a split (forward_backward_rows: a window perm[start : start + n], read by the
    kernel where the rows lie) one launch, the gradient left in shares (grad_shares),
    grads not written, the shares' sum the same bits as the gathered batch's."""
    sizes, kw = [6, 20, 20, 4], {"activation": "tanh", "loss": "softmax_cross_entropy", "seed": 4}
    gpu, model = gpu_model(host_kernels, sizes, fused_mlp=True, **kw)
    plain = MLP(sizes, **kw)
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(100, 6)).astype(np.float32), rng.integers(0, 4, 100)
    loss, grads = model.loss_and_grads(x, y)
    assert gpu.launches == ["mlp_fused_f32", "sum_shares_f32"] and model.grad_shares is None
    ref_loss, ref_grads = plain.loss_and_grads(x, y)
    g, g_ref = np.concatenate([a.ravel() for a in grads]), np.concatenate([a.ravel() for a in ref_grads])
    assert_close(g, g_ref.astype(np.float64), sizes, 100, np.float32, "gradient")
    assert_close(np.asarray(loss), np.asarray(ref_loss, np.float64), sizes, 100, np.float32, "loss")
    model.flat_grads[...] = np.nan
    gpu.launches.clear()
    # the batch as rows 7..106 of a split of 150 rows, in a shuffled order
    order = rng.permutation(150)
    split_x, split_y = rng.normal(size=(150, 6)).astype(np.float32), rng.integers(0, 4, 150).astype(np.int32)
    split_x[order[7:107]], split_y[order[7:107]] = x, y
    out = np.full((), np.nan, np.float32)
    got = model.forward_backward_rows(split_x, split_y, order.astype(np.int64), np.asarray(7, np.int64), 100, out)
    assert got is out and gpu.launches == ["mlp_fused_f32"] and model.grad_shares.shape[0] > 1
    assert np.isnan(model.flat_grads).all() and out.tobytes() == np.float32(loss).tobytes()
    summed = np.empty_like(g)  # the shares, summed in order: the bits the kernel's sum gave
    assert numpy_ops.sum_shares(model.grad_shares, summed).tobytes() == g.tobytes()
    assert plain.forward_backward_rows(split_x, split_y, order, np.asarray(7), 100) is None  # not asked for


def test_the_model_keeps_its_ops_where_the_kernel_does_not_apply(host_kernels):  # noqa: F811
    """A residual network, tf32, an input gradient: the unfused ops (GEMMs and kernels)."""
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(16, 8)).astype(np.float32), rng.normal(size=(16, 2)).astype(np.float32)
    for kw in ({"residual": True}, {"dtype": "tf32"}):
        gpu, model = gpu_model(host_kernels, [8, 8, 8, 2], fused_mlp=True, **kw)
        model.backend.gemm = lambda *a, **k: numpy_ops.gemm(*a, **{n: v for n, v in k.items() if n != "tf32"})
        model.loss_and_grads(x, y)
        assert "mlp_fused_f32" not in gpu.launches and gpu.launches, kw
    gpu, model = gpu_model(host_kernels, [8, 8, 2], fused_mlp=True)
    model.backend.gemm = lambda *a, **k: numpy_ops.gemm(*a, **{n: v for n, v in k.items() if n != "tf32"})
    model.input_grad(x, y)
    assert "mlp_fused_f32" not in gpu.launches


def test_auto_takes_the_fused_mlp_for_one_wave_of_small_tiles(host_kernels):  # noqa: F811
    """MLP(fused_mlp="auto") (train.fused_mlp's default): the GPU backend's mlp_pays takes
    a float32 batch where every tile of rows has its own block, at most one a
    multiprocessor, and a tile's products (forward, weight gradient, D' W^T but the
    first layer's) are at most MLP_AUTO_TILE_FMAS multiply-adds; the model then runs the
    fused pass (one mlp_fused launch) exactly there, and the separate ops elsewhere. The
    tile rows here from the kernel's rule itself: the power of two >= n / 32, at most 64.
    The NumPy backend has no mlp_pays: "auto" keeps its ops."""
    sizes, n_sm = [64, 128, 10], 132  # tiny's network on an H100's multiprocessors

    def expected(n, sizes=sizes, sm=n_sm, dtype=np.float32):
        rows = min(64, 1 << max(0, math.ceil(math.log2(n / 32))))
        work = rows * (3 * sum(a * b for a, b in zip(sizes[:-1], sizes[1:])) - sizes[0] * sizes[1])
        return dtype == np.float32 and -(-n // rows) <= sm and work <= cupy_backend.MLP_AUTO_TILE_FMAS

    rng = np.random.default_rng(12)
    cases = [(128, sizes, n_sm, "float32"), (512, sizes, n_sm, "float32"), (1024, sizes, n_sm, "float32"),
             (128, sizes, 16, "float32"), (128, sizes, n_sm, "float64"), (262144, [64] * 6, n_sm, "float32"),
             (8448, [8, 16, 4], n_sm, "float32"), (8512, [8, 16, 4], n_sm, "float32"),
             (200, [8, 16, 4], n_sm, "float32")]  # fmt: skip
    seen = set()
    for n, net, sm, dtype in cases:
        gpu, model = gpu_model(host_kernels, net, fused_mlp="auto", loss="softmax_cross_entropy", dtype=dtype)
        gpu.be.n_sm = sm
        want = expected(n, net, sm, np.dtype(dtype))
        seen.add(want)
        assert model.runs_fused_mlp(n) == want and model.fused_mlp_fits(n), (n, net, sm, dtype)
        if n <= 512:  # the pass itself: fused where "auto" said so (run on the host: small batches)
            model.backend.gemm = lambda *a, **k: numpy_ops.gemm(*a, **{n: v for n, v in k.items() if n != "tf32"})
            x, y = rng.normal(size=(n, net[0])).astype(dtype), rng.integers(0, net[-1], n)
            model.loss_and_grads(x, y)
            assert ("mlp_fused_" + ("f32" if dtype == "float32" else "f64") in gpu.launches) == want, (n, net, sm)
    assert seen == {True, False}
    assert not MLP(sizes, fused_mlp="auto").runs_fused_mlp(128)  # the NumPy backend: no mlp_pays
    with pytest.raises(ValueError, match='fused_mlp must be True, False or "auto"'):
        MLP(sizes, fused_mlp="yes")


def test_the_captured_step_is_three_ops():
    """train.fused_mlp: the tiny bench network's captured step records three ops (the fused
    pass reading the batch's rows where they lie, the guard with the shares' sum and the
    step's advance and select, the update) where the unfused one records 13 (9 with the
    GPU's fused products); on the GPU each of the three is one kernel."""
    from gpubp import bench as B

    (case,) = B.find_cases(["tiny"])
    names = {}
    for fused_on in (True, False):
        rec = RecordingBackend()
        step = B.TrainerStep(case, rec, "float32", True, 4, B._dataset(case), fused_mlp=fused_on)
        for _ in range(3):  # plain, captured, replayed
            step()
        names[fused_on] = [fn.__name__ for fn, _, _ in rec.graphs[0]]
    # unfused: the layers' ops; the ReLU layer's D' and db in one (act_backward_bias_grad),
    # the identity output layer's db alone (its D' is D)
    assert len(names[False]) == 13 and names[False].count("act_backward_bias_grad") == 1
    assert "select_rows" not in names[False]  # the guard's launch selects
    assert names[False].count("bias_grad") == 1 and "act_backward" not in names[False]
    names = names[True]
    assert names == ["mlp_forward_backward", "step_guard_norm", "adam_step_batched"]


def test_a_cpu_run_with_fused_mlp_is_the_reference_op(monkeypatch):
    """On the NumPy backend train.fused_mlp runs numpy_ops.mlp_forward_backward (the
    reference: its one share is the gradient), and trains as the unfused run does, to
    float64 rounding."""
    import gpubp.trainer as T
    from gpubp.config import load_config

    base = ["data.dataset=spirals", "data.n_samples=200", "model.hidden=[12, 12]", "model.dtype=float64",
            "train.batch_size=32", "train.steps=40", "train.eval_every=20", "optimizer.name=adam"]  # fmt: skip
    calls = []
    original = NumpyBackend.mlp_forward_backward
    monkeypatch.setattr(NumpyBackend, "mlp_forward_backward",
                        staticmethod(lambda *a, **k: calls.append(1) or original(*a, **k)))  # fmt: skip
    runs = []
    for fused_on in ("true", "false"):
        t = T.Trainer(load_config(None, base + [f"train.fused_mlp={fused_on}"]), None, device="cpu", quiet=True)
        t.train()
        runs.append(t)
    assert len(calls) == 40
    np.testing.assert_allclose(runs[0].model.flat_params, runs[1].model.flat_params, rtol=1e-9, atol=1e-12)


def test_the_issue_timing_script_runs(capsys):
    """tests/step_issue_timing.py (a GPU visit's aid: host or device, which sets a small
    step's pace) on the recording backend: a line per step kind, each loop's figures."""
    from . import step_issue_timing

    step_issue_timing.main(["tiny"], RecordingBackend(), n=3)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["tiny       separate ops", "tiny       fused MLP   "]
    assert all("replay only" in line and "host only" in line and "graph note: None" in line for line in lines)


def test_the_tile_sweep_script_runs(capsys):
    """tests/mlp_tile_sweep.py (a GPU visit's tuning aid) on the recording backend: a line
    per distinct launch, the separate ops' step beside them; then a line per batch, the
    separate ops' step against the fused MLP's, and what "auto" takes (the separate ops on
    the NumPy backend, which has no mlp_pays)."""
    from . import mlp_tile_sweep

    mlp_tile_sweep.sweep("tiny", RecordingBackend(), steps=5)
    out = capsys.readouterr().out
    # 128 rows: tiles of 2, 4 and 8 rows (64, 32, 16 tiles), each with 2 and 4 rows a thread
    # (2 only on the 2-row tiles), with 1 and 4 columns a thread, weights resident or not
    assert "separate ops' step" in out and out.count("rows a tile") == (1 + 2 + 2) * 2 * 2
    assert out.count("weights per tile") == out.count("weights resident if they fit") == (1 + 2 + 2) * 2
    mlp_tile_sweep.batches("tiny", RecordingBackend(), steps=2, sizes=(16, 64))
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["tiny at     16 rows", "tiny at     64 rows"]
    assert all("separate / fused" in line and line.endswith("auto takes the separate ops") for line in lines)
