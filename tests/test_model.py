"""The MLP API: shapes, flat buffers, set_params, forward against the formula."""

import numpy as np
import pytest

import gpubp
from gpubp.activations import make_activation
from gpubp.backend import numpy_ops

from .conftest import assert_close


def reference_forward(params, x, acts, residual_layers=()):
    # x_{k+1} = f_k(x_k W_k + b_k) (+ x_k), written out independently of the model
    for k in range(len(params) // 2):
        W, b = params[2 * k], params[2 * k + 1]
        z = x @ W + b
        y = numpy_ops.act_forward(z, make_activation(acts[k]), np.empty_like(z))
        x = x + y if k in residual_layers else y
    return x


def test_api_shapes_and_views():
    model = gpubp.MLP([64, 128, 10], activation="relu", output_activation="identity",
                      loss="softmax_cross_entropy", dtype="float64", device="cpu", seed=0)  # fmt: skip
    assert [p.shape for p in model.params] == [(64, 128), (128,), (128, 10), (10,)]
    assert model.n_params == 64 * 128 + 128 + 128 * 10 + 10
    # every W_k, b_k is a view into the one flat buffer
    for p in model.params:
        assert np.shares_memory(p, model.flat_params)
    model.params[0][0, 0] = 42.0
    assert model.flat_params[0] == 42.0
    x = np.random.default_rng(0).normal(size=(5, 64))
    assert model.forward(x).shape == (5, 10)
    loss, grads = model.loss_and_grads(x, np.arange(5))
    assert isinstance(loss, float)
    assert [g.shape for g in grads] == [p.shape for p in model.params]


def test_init_is_seeded_and_scaled():
    a = gpubp.MLP([200, 300, 10], seed=5, dtype="float64")
    b = gpubp.MLP([200, 300, 10], seed=5, dtype="float64")
    c = gpubp.MLP([200, 300, 10], seed=6, dtype="float64")
    assert np.array_equal(a.flat_params, b.flat_params)
    assert not np.array_equal(a.flat_params, c.flat_params)
    W = a.params[0]
    assert abs(W.std() - np.sqrt(2 / 200)) < 0.02 * np.sqrt(2 / 200) * 5  # he_normal; 60000 draws
    assert np.all(a.params[1] == 0)
    u = gpubp.MLP([200, 300], seed=0, init="xavier_uniform", dtype="float64").params[0]
    assert np.abs(u).max() <= np.sqrt(6 / 500)
    assert gpubp.MLP([3, 4], dtype="float32").flat_params.dtype == np.float32


@pytest.mark.parametrize("residual", [False, True])
def test_forward_matches_formula(residual):
    model = gpubp.MLP([4, 6, 6, 6, 3], "gelu", "sigmoid", "mse", dtype="float64", seed=2, residual=residual)
    x = np.random.default_rng(1).normal(size=(7, 4))
    acts = ["gelu"] * 3 + ["sigmoid"]
    res = {1, 2} if residual else set()  # hidden layers of equal width (6 -> 6)
    assert model.is_residual == [k in res for k in range(4)]
    assert_close(model.forward(x), reference_forward(model.params, x, acts, res))


def test_set_params_round_trip_and_checks():
    model = gpubp.MLP([3, 4, 2], dtype="float64")
    rng = np.random.default_rng(0)
    new = [rng.normal(size=p.shape) for p in model.params]
    model.set_params(new)
    for p, q in zip(model.params, new):
        assert np.array_equal(p, q)
    with pytest.raises(ValueError, match="shape"):
        model.set_params([np.zeros((4, 3))] + new[1:])
    with pytest.raises(ValueError, match="expected 4 arrays"):
        model.set_params(new[:2])


def test_bad_inputs_to_model():
    model = gpubp.MLP([3, 2], loss="softmax_cross_entropy")
    with pytest.raises(ValueError, match=r"\(batch, 3\)"):
        model.forward(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="labels"):
        model.loss_and_grads(np.zeros((2, 3)), np.zeros(3))
    with pytest.raises(ValueError):
        gpubp.MLP([3])
    with pytest.raises(ValueError):
        gpubp.MLP([3, 2], dtype="int8")


def test_batch_of_one_and_changing_batch_sizes():
    model = gpubp.MLP([3, 5, 2], "tanh", dtype="float64", seed=0)
    x = np.random.default_rng(0).normal(size=(9, 3))
    full = model.forward(x)
    rows = np.concatenate([model.forward(x[i : i + 1]) for i in range(9)])
    assert_close(rows, full)


def test_training_reduces_loss_with_each_optimizer():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 2))
    y = (x[:, 0] * x[:, 1] > 0).astype(int)
    for make in (lambda m: gpubp.SGD(m, lr=0.1, momentum=0.9), lambda m: gpubp.Adam(m, lr=0.01),
                 lambda m: gpubp.AdamW(m, lr=0.01)):  # fmt: skip
        model = gpubp.MLP([2, 16, 2], "tanh", loss="softmax_cross_entropy", dtype="float64", seed=0)
        opt = make(model)
        first, _ = model.loss_and_grads(x, y)
        for _ in range(200):
            loss, grads = model.loss_and_grads(x, y)
            opt.step(grads)
        assert loss < 0.5 * first


def test_labels_out_of_range_are_refused_on_the_host():
    model = gpubp.MLP([3, 4], loss="softmax_cross_entropy")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\), got -1..2"):
        model.loss_and_grads(np.zeros((2, 3)), np.array([-1, 2]))
    with pytest.raises(ValueError, match=r"got 0..4"):
        model.loss_and_grads(np.zeros((2, 3)), [0, 4])
