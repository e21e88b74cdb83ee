"""Jacobians of the network output: forward mode == reverse mode == finite differences,
for every activation, plain and residual, with respect to the parameters and the input."""

import numpy as np
import pytest

import gpubp
from gpubp.activations import ACTIVATIONS
from gpubp.gradcheck import kink_margin, numeric_jacobian
from gpubp.jacobians import jacobian_flops

from .conftest import assert_close

# Two hidden layers of width 4 after a 3 -> 4 layer: with residual=True layers 2 and 3
# are residual, so one skip feeds another and the children-sum runs twice in a row.
SIZES = (3, 4, 4, 4, 2)
DEVICES = ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)]

# Forward vs reverse: the same products summed in another order, a few ulps apart on
# entries of order 1: the float64 default of assert_close (atol 1e-13 + rtol 1e-12).
# Against fourth-order central differences (h = 1e-3, gpubp/gradcheck.py): rounding
# ~1.5 eps |y| / h ~ 3e-13 and truncation h^4 |y^(5)| / 30 ~ 1e-12 for these O(1)
# networks (the worst seen is 7e-12), so scale 1e3 (atol 1e-10 + rtol 1e-9) leaves a
# margin of ten and still fails any wrong derivative, which is off by far more (a 1%
# error in one f' moves entries by ~1e-4 and more).
FD_SCALE = 1e3


def problem(act, residual, device="cpu"):
    """A float64 model with random weights and biases and one input whose
    pre-activations stay at least 0.02 from any kink (> 4 h |x|: no difference
    straddles one). Hidden and output layers both use `act`."""
    for seed in range(100):
        rng = np.random.default_rng(seed)
        model = gpubp.MLP(list(SIZES), act, act, "mse", dtype="float64", seed=seed, residual=residual,
                          leaky_relu_slope=0.1, device=device)  # fmt: skip
        model.set_flat_params(rng.normal(scale=0.6, size=model.n_params))
        x = rng.normal(size=SIZES[0])
        if kink_margin(model, x.reshape(1, -1)) > 0.02:
            return model, x
    raise AssertionError("no kink-free problem found")


def finite_differences(model, x, wrt):
    """d output / d (flat params or x) by central differences on the CPU model."""
    if wrt == "params":
        p = model.backend.to_numpy(model.flat_params).copy()

        def out():
            model.set_flat_params(p)
            return model.backend.to_numpy(model.forward(x.reshape(1, -1)))[0]

        J = numeric_jacobian(out, p)
        model.set_flat_params(p)
        return J
    xx = x.copy()
    return numeric_jacobian(lambda: model.backend.to_numpy(model.forward(xx.reshape(1, -1)))[0], xx)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wrt", ["params", "input"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_forward_equals_reverse_equals_finite_differences(act, residual, wrt, device):
    model, x = problem(act, residual)  # the CPU model gives the finite-difference reference
    reference = finite_differences(model, x, wrt)
    if device != "cpu":
        host_params, host_x = model.flat_params.copy(), x
        model, x = problem(act, residual, device)
        assert np.array_equal(model.backend.to_numpy(model.flat_params), host_params) and np.array_equal(x, host_x)
    assert model.is_residual == [False, residual, residual, False]
    fwd = gpubp.jacobian(model, x, wrt=wrt, mode="forward")
    rev = gpubp.jacobian(model, x, wrt=wrt, mode="reverse")
    columns = model.n_params if wrt == "params" else SIZES[0]
    assert isinstance(fwd, np.ndarray) and isinstance(rev, np.ndarray)
    assert fwd.shape == rev.shape == (SIZES[-1], columns)
    assert_close(fwd, rev, what="forward vs reverse")
    assert_close(rev, reference, scale=FD_SCALE, what="reverse vs finite differences")
    assert np.abs(reference).max() > 1e-3  # far above the atol 1e-10: the comparison is not vacuous


def test_input_shapes_and_bad_arguments():
    model, x = problem("tanh", True)
    J = gpubp.jacobian(model, x, wrt="input")
    assert_close(gpubp.jacobian(model, x.reshape(1, -1), wrt="input"), J, what="(1, n_in) input")
    with pytest.raises(ValueError, match=r"one input of shape \(3,\) or \(1, 3\), got \(2, 3\)"):
        gpubp.jacobian(model, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="wrt must be one of params, input"):
        gpubp.jacobian(model, x, wrt="weights")
    with pytest.raises(ValueError, match="mode must be one of forward, reverse"):
        gpubp.jacobian(model, x, mode="backward")


def test_reverse_rows_are_output_gradients():
    # row r of the parameter Jacobian is the gradient of y_r: the model's own backward
    # pass with mse against t = y - e_r / 2 starts from dL/dy = 2 (y - t) / n_out =
    # e_r / n_out, so its gradient is row r / n_out
    model, x = problem("silu", True)
    J = gpubp.jacobian(model, x, wrt="params", mode="reverse")
    y = model.forward(x.reshape(1, -1))
    for r in range(SIZES[-1]):
        e = np.zeros_like(y)
        e[0, r] = 1.0
        _, grads = model.loss_and_grads(x.reshape(1, -1), y - 0.5 * e)
        assert_close(model.flat_grads * SIZES[-1], J[r], what=f"row {r}")


@pytest.mark.parametrize("wrt", ["params", "input"])
@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_flop_formula_counts_the_gemms_the_code_runs(wrt, mode, residual, monkeypatch):
    # an independent count: wrap the backend's gemm and add up 2 m k n (+ m n for beta)
    model = gpubp.MLP([5, 6, 6, 3], "tanh", dtype="float64", residual=residual)
    counted = []
    original = model.backend.gemm

    def counting_gemm(a, b, out, trans_a=False, trans_b=False, beta=0.0):
        k = a.shape[0] if trans_a else a.shape[1]
        counted.append(2 * out.shape[0] * k * out.shape[1] + (out.size if beta else 0))
        return original(a, b, out, trans_a=trans_a, trans_b=trans_b, beta=beta)

    monkeypatch.setattr(model.backend, "gemm", counting_gemm)
    gpubp.jacobian(model, np.ones(5), wrt=wrt, mode=mode)
    primal = sum(2 * a * b for a, b in zip(model.sizes[:-1], model.sizes[1:]))  # the forward pass, m = 1
    assert sum(counted) - primal == jacobian_flops(model.sizes, model.is_residual, wrt, mode).gemm


def test_flop_formulas_show_the_crossover_and_the_gap():
    # wrt input: forward costs ~ n_in, reverse ~ n_out: they cross where n_out passes n_in
    for n_out, forward_cheaper in ((4, False), (16, None), (64, True)):
        sizes = [16, 32, 32, n_out]
        f = jacobian_flops(sizes, [False] * 3, "input", "forward").gemm
        r = jacobian_flops(sizes, [False] * 3, "input", "reverse").gemm
        if forward_cheaper is None:
            assert f == r  # n_out == n_in: the same GEMMs, transposed
        else:
            assert (f < r) == forward_cheaper
    # wrt params: forward carries P_<k rows, reverse n_out rows; the gap grows with the width
    ratios = []
    for h in (8, 16, 32):
        sizes = [16, h, h, 4]
        f = jacobian_flops(sizes, [False] * 3, "params", "forward").total
        r = jacobian_flops(sizes, [False] * 3, "params", "reverse").total
        ratios.append(f / r)
    assert 1 < ratios[0] < ratios[1] < ratios[2]


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_memory_estimate_matches_what_numpy_allocates(mode):
    # gpubp jacobian skips cases over --max-mb by this estimate: it must hold the big
    # buffers (tangent blocks, J). tracemalloc sees NumPy's allocations; the estimate
    # leaves out small vectors, so it may fall short by those, never by half.
    import tracemalloc

    from gpubp.jacobians import device_jacobian, jacobian_bytes

    model = gpubp.MLP([20, 64, 64, 64, 50], "tanh", dtype="float64", residual=True)
    x = np.ones(20)
    device_jacobian(model, x, "params", mode)  # workspaces are allocated once, before
    tracemalloc.start()
    try:
        device_jacobian(model, x, "params", mode)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert 0.9 * peak <= jacobian_bytes(model.sizes, "params", mode, 8) <= peak
