"""Reverse mode against finite differences: every activation x every loss, float64."""

import numpy as np
import pytest

from gpubp import MLP
from gpubp.activations import ACTIVATIONS
from gpubp.gradcheck import check_model, kink_margin, max_rel_error, numeric_grad
from gpubp.losses import LOSSES

from .conftest import targets_for

# The bound. Fourth-order differences with h = 1e-3 leave ~1e-10 relative
# error on well-scaled entries (see gpubp/gradcheck.py), so 1e-6 still catches any
# wrong derivative, which is off by O(1).
MAX_REL_ERROR = 1e-6


def problem(act, loss, residual, out_act="identity", sizes=(3, 4, 4, 2)):
    """A tiny float64 problem whose pre-activations stay clear of every kink."""
    for seed in range(100):
        rng = np.random.default_rng(seed)
        model = MLP(list(sizes), act, out_act, loss, dtype="float64", seed=seed, init="xavier_normal",
                    residual=residual, leaky_relu_slope=0.1)  # fmt: skip
        x = rng.normal(size=(5, sizes[0]))
        y = targets_for(loss, rng, 5, sizes[-1])
        if kink_margin(model, x, y) > 0.02:  # > 4 h |x|: no difference straddles a kink
            return model, x, y
    raise AssertionError("no kink-free problem found")


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_hidden_activation_and_loss(act, loss, residual):
    model, x, y = problem(act, loss, residual)
    reports = check_model(model, x, y)
    worst = max(max(r.weight_error, r.bias_error) for r in reports)
    assert worst < MAX_REL_ERROR, reports


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_output_activation(act):
    # the output activation sits between the last GEMM and the loss
    model, x, y = problem("tanh", "mse", False, out_act=act)
    reports = check_model(model, x, y)
    assert max(max(r.weight_error, r.bias_error) for r in reports) < MAX_REL_ERROR, reports


def test_input_gradient_matches_finite_differences():
    model, x, y = problem("gelu", "softmax_cross_entropy", True, sizes=(4, 4, 4, 3))
    analytic = model.input_grad(x, y)
    xx = x.copy()

    def loss():
        return model.loss_and_grads(xx, y)[0]

    assert max_rel_error(analytic, numeric_grad(loss, xx)) < MAX_REL_ERROR


def test_a_wrong_derivative_is_caught(monkeypatch):
    # the check must fail when the backward pass is wrong: break tanh's f' by 1%
    from gpubp.backend import numpy_ops

    model, x, y = problem("tanh", "mse", False)
    original = numpy_ops.act_backward

    def wrong(d, saved, act, out):
        original(d, saved, act, out)
        if act.name == "tanh":
            out *= 1.01
        return out

    monkeypatch.setattr(model.backend, "act_backward", wrong)
    monkeypatch.setattr(numpy_ops, "act_backward", wrong)  # as act_backward_bias_grad calls it
    worst = max(max(r.weight_error, r.bias_error) for r in check_model(model, x, y))
    assert worst > 1e-3
