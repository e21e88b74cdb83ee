"""The reference activations: forward against PyTorch and closed forms, local
gradients against finite differences of the forward, at ordinary and edge values."""

import math

import numpy as np
import pytest

from gpubp.activations import ACTIVATIONS, SAVES_INPUT, make_activation
from gpubp.backend import numpy_ops

from .conftest import assert_close

POINTS = np.concatenate([np.linspace(-8, 8, 161), [-30.0, -1e-30, 0.0, 1e-30, 30.0, 1e-4, -1e-4, 0.5]])


def forward(name, z, slope=0.01):
    return numpy_ops.act_forward(z, make_activation(name, slope), np.empty_like(z))


def local_grad(name, z, slope=0.01):
    act = make_activation(name, slope)
    y = forward(name, z, slope)
    saved = z if act.saves == SAVES_INPUT else y
    return numpy_ops.act_backward(np.ones_like(z), saved, act, np.empty_like(z))


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_local_gradient_matches_central_difference(name):
    # away from kinks (|z| > 1e-3): (f(z + h) - f(z - h)) / 2h with h = 1e-6 has
    # truncation ~h^2 f''' and rounding ~eps |f| / h, together below 1e-8 here
    z = POINTS[np.abs(POINTS) > 1e-3]
    h = 1e-6
    fd = (forward(name, z + h) - forward(name, z - h)) / (2 * h)
    assert_close(local_grad(name, z), fd, scale=1e5, what=name)  # bound ~1e-7 relative


TORCH = {
    "identity": lambda F, z: z,
    "relu": lambda F, z: F.relu(z),
    "leaky_relu": lambda F, z: F.leaky_relu(z, 0.01),
    "elu": lambda F, z: F.elu(z),
    "gelu": lambda F, z: F.gelu(z),
    "gelu_tanh": lambda F, z: F.gelu(z, approximate="tanh"),
    "silu": lambda F, z: F.silu(z),
    "tanh": lambda F, z: F.tanh(z),
    "sigmoid": lambda F, z: F.sigmoid(z),
    "softplus": lambda F, z: F.softplus(z, threshold=1e9),  # ours has no linear cut-off
}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_against_pytorch(name, dtype):
    torch = pytest.importorskip("torch")
    z = POINTS.astype(dtype)
    zt = torch.tensor(z, requires_grad=True)
    yt = TORCH[name](torch.nn.functional, zt)
    yt.sum().backward()
    assert_close(forward(name, z), yt.detach().numpy(), dtype, what=f"{name} forward")
    # f' read from the output loses a few ulps of y near saturation (1 - y^2, y (1 - y)):
    # relative error eps |f| / |f'|, up to ~1e3 ulps at |z| = 8 in float32
    grad_scale = 100.0 if dtype == np.float32 else 10.0
    assert_close(local_grad(name, z), zt.grad.numpy(), dtype, scale=grad_scale, what=f"{name} gradient")


def test_closed_forms_at_special_points():
    assert forward("gelu", np.array([0.0]))[0] == 0.0
    assert_close(forward("gelu", np.array([1.0])), [0.5 * (1 + math.erf(1 / math.sqrt(2)))])
    assert_close(forward("sigmoid", np.array([0.0])), [0.5])
    assert_close(forward("softplus", np.array([0.0])), [math.log(2.0)])
    assert_close(forward("sigmoid", np.array([-800.0, 800.0])), [0.0, 1.0])
    assert_close(local_grad("softplus", np.array([-40.0])), [1.0 / (1.0 + math.exp(40.0))])
    assert_close(forward("leaky_relu", np.array([-2.0]), slope=0.2), [-0.4])
    assert_close(local_grad("leaky_relu", np.array([-2.0, 3.0]), slope=0.2), [0.2, 1.0])
    assert_close(local_grad("elu", np.array([-1.0])), [math.exp(-1.0)])


def test_negative_leaky_slope_is_refused():
    with pytest.raises(ValueError, match="leaky_relu_slope"):
        make_activation("leaky_relu", -0.1)
