"""Each loss against its formula written out element by element, and against PyTorch."""

import math

import numpy as np
import pytest

from gpubp.backend import numpy_ops
from gpubp.losses import make_loss

from .conftest import assert_close


def loop_cross_entropy(x, y, eps):
    # -(1/N) sum_i [(1 - eps) log p_i,y_i + eps/C sum_c log p_ic], p = softmax
    n, c = x.shape
    total = 0.0
    for i in range(n):
        lse = math.log(math.fsum(math.exp(v) for v in x[i]))
        logp = [v - lse for v in x[i]]
        total += -((1 - eps) * logp[y[i]] + eps / c * math.fsum(logp))
    return total / n


def loop_bce(x, t):
    # mean of -[t log s + (1 - t) log(1 - s)], s = sigmoid(x)
    vals = []
    for xv, tv in zip(x.ravel(), t.ravel()):
        s = 1.0 / (1.0 + math.exp(-xv))
        vals.append(-(tv * math.log(s) + (1 - tv) * math.log(1 - s)))
    return math.fsum(vals) / len(vals)


def loop_mse(x, t):
    return math.fsum((a - b) ** 2 for a, b in zip(x.ravel(), t.ravel())) / x.size


def loop_huber(x, t, d):
    vals = []
    for a, b in zip(x.ravel(), t.ravel()):
        r = abs(a - b)
        vals.append(0.5 * r * r if r < d else d * (r - 0.5 * d))
    return math.fsum(vals) / x.size


def numeric(fn, x, h=1e-5):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + h
        fp = fn(x)
        x[i] = old - h
        fm = fn(x)
        x[i] = old
        g[i] = (fp - fm) / (2 * h)
    return g


CASES = [
    ("softmax_cross_entropy", {}),
    ("softmax_cross_entropy", {"label_smoothing": 0.2}),
    ("binary_cross_entropy", {}),
    ("mse", {}),
    ("huber", {"huber_delta": 0.7}),
]


def reference(name, opts, x, t):
    if name == "softmax_cross_entropy":
        return loop_cross_entropy(x, t, opts.get("label_smoothing", 0.0))
    if name == "binary_cross_entropy":
        return loop_bce(x, t)
    if name == "mse":
        return loop_mse(x, t)
    return loop_huber(x, t, opts["huber_delta"])


def data(name, rng, n=6, c=4):
    x = rng.normal(scale=2.0, size=(n, c))
    if name == "softmax_cross_entropy":
        return x, rng.integers(0, c, size=n)
    if name == "binary_cross_entropy":
        return x, rng.uniform(size=(n, c))
    return x, rng.normal(size=(n, c))


@pytest.mark.parametrize("name,opts", CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_value_and_gradient_against_formula(name, opts):
    rng = np.random.default_rng(3)
    x, t = data(name, rng)
    loss = make_loss(name, **opts)
    grad = np.empty_like(x)
    value = numpy_ops.loss_forward_backward(x, t, loss, grad)
    assert_close(value, reference(name, opts, x, t), what="value")
    # central differences of the element-wise reference: truncation h^2 ~ 1e-10
    g_ref = numeric(lambda v: reference(name, opts, v, t), x.copy())
    assert_close(grad, g_ref, scale=1e4, what="gradient")  # FD leaves ~1e-9 absolute
    no_grad = numpy_ops.loss_forward_backward(x, t, loss, None)
    assert float(no_grad) == float(value)


def test_cross_entropy_is_stable_for_huge_logits():
    x = np.array([[1000.0, 0.0, -1000.0], [-1e4, 1e4, 0.0]])
    y = np.array([0, 1])
    grad = np.empty_like(x)
    value = numpy_ops.loss_forward_backward(x, y, make_loss("softmax_cross_entropy"), grad)
    assert value == 0.0 and np.all(np.isfinite(grad))
    value = numpy_ops.loss_forward_backward(x, np.array([2, 0]), make_loss("softmax_cross_entropy"), grad)
    assert_close(value, (2000.0 + 2e4) / 2, what="value")


def test_bce_is_stable_for_huge_logits():
    x = np.array([[800.0, -800.0]])
    t = np.array([[0.0, 1.0]])
    grad = np.empty_like(x)
    value = numpy_ops.loss_forward_backward(x, t, make_loss("binary_cross_entropy"), grad)
    assert_close(value, 800.0, what="value")
    assert_close(grad, [[0.5, -0.5]], what="grad")


@pytest.mark.parametrize("name,opts", CASES, ids=[f"{n}-{o}" for n, o in CASES])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_against_pytorch(name, opts, dtype):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(7)
    x, t = data(name, rng, n=9, c=5)
    x = x.astype(dtype)
    if name != "softmax_cross_entropy":
        t = t.astype(dtype)
    grad = np.empty_like(x)
    value = numpy_ops.loss_forward_backward(x, t, make_loss(name, **opts), grad)
    xt = torch.tensor(x, requires_grad=True)
    tt = torch.tensor(t)
    fn = {
        "softmax_cross_entropy": lambda: F.cross_entropy(xt, tt, label_smoothing=opts.get("label_smoothing", 0.0)),
        "binary_cross_entropy": lambda: F.binary_cross_entropy_with_logits(xt, tt),
        "mse": lambda: F.mse_loss(xt, tt),
        "huber": lambda: F.huber_loss(xt, tt, delta=opts.get("huber_delta", 1.0)),
    }[name]
    ref = fn()
    ref.backward()
    assert_close(value, ref.item(), dtype, what="value")
    assert_close(grad, xt.grad.numpy(), dtype, what="grad")
