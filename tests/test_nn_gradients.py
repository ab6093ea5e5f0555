"""Finite-difference gradient checks in float64: every layer, the loss, whole networks."""

import numpy as np
import pytest

import nn

EPS = 1e-6


def rel_error(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(a) + np.linalg.norm(b), 1e-300)


def numeric_grad(f, x):
    """Central differences of scalar f() with respect to array x (perturbed in place)."""
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + EPS
        fp = f()
        x[i] = old - EPS
        fm = f()
        x[i] = old
        g[i] = (fp - fm) / (2 * EPS)
    return g


def away_from_zero(rng, shape, margin=0.05):
    """Values with |v| ≥ margin, so ReLU kinks are never straddled by ±EPS."""
    v = rng.standard_normal(shape)
    return np.where(np.abs(v) < margin, np.sign(v + 1e-12) * margin, v)


def check_layer(layer, x, rng, training=False, reseed=None):
    """Compare backward() with finite differences of L = Σ forward(x) * R."""
    layer.to(np.float64)
    out = layer.forward(x.copy(), training)
    R = rng.standard_normal(out.shape)

    def loss():
        if reseed:
            reseed()
        return float(np.sum(layer.forward(x, training) * R))

    if reseed:
        reseed()
    layer.forward(x, training)
    dx = layer.backward(R.copy())
    dx = None if dx is None else dx.copy()
    analytic = {k: g.copy() for k, g in layer.grads.items()}
    if dx is not None:
        assert rel_error(dx, numeric_grad(loss, x)) < 1e-6
    for k, p in layer.params.items():
        assert rel_error(analytic[k], numeric_grad(loss, p)) < 1e-6, k


def test_dense(rng=np.random.default_rng(0)):
    check_layer(nn.Dense(5, 4, rng=1), rng.standard_normal((3, 5)), rng)


def test_dense_xavier_and_he_scales():
    rng = np.random.default_rng(0)
    he = nn.Dense(1000, 500, init="he", rng=rng).params["W"]
    xa = nn.Dense(1000, 500, init="xavier", rng=rng).params["W"]
    assert abs(he.std() - np.sqrt(2 / 1000)) < 2e-3
    assert abs(xa.std() - np.sqrt(2 / 1500)) < 2e-3 and np.abs(xa).max() <= np.sqrt(6 / 1500)
    with pytest.raises(ValueError, match="unknown initializer"):
        nn.Dense(3, 3, init="zeros")


@pytest.mark.parametrize("layer", [nn.ReLU, nn.Tanh, nn.Sigmoid])
def test_activations(layer):
    rng = np.random.default_rng(1)
    check_layer(layer(), away_from_zero(rng, (4, 6)), rng)


def test_dropout_in_training_and_identity_in_eval():
    rng = np.random.default_rng(2)
    layer = nn.Dropout(0.4)

    def reseed():
        layer.rng = np.random.default_rng(7)

    check_layer(layer, rng.standard_normal((5, 8)), rng, training=True, reseed=reseed)
    x = rng.standard_normal((5, 8))
    np.testing.assert_array_equal(layer.forward(x, training=False), x)
    layer.to(np.float32)
    big = np.ones((2000, 100), np.float32)
    out = layer.forward(big, training=True)
    assert abs((out == 0).mean() - 0.4) < 0.01          # drops p of the units
    assert set(np.unique(out)) == {0.0, np.float32(1 / 0.6)}  # scales the rest by 1/(1-p)
    assert abs(out.mean() - 1) < 0.02                   # so the expectation is unchanged


def test_softmax_cross_entropy_gradient():
    rng = np.random.default_rng(3)
    z = rng.standard_normal((6, 10)) * 3
    y = rng.integers(0, 10, 6)
    loss, grad = nn.softmax_cross_entropy(z, y)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    assert abs(loss - np.mean(-np.log(p[np.arange(6), y]))) < 1e-12
    assert rel_error(grad, numeric_grad(lambda: nn.softmax_cross_entropy(z, y)[0], z)) < 1e-6


def test_softmax_cross_entropy_is_stable_for_huge_logits():
    z = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4], [1e4, 1e4, -1e4]], np.float32)
    loss, grad = nn.softmax_cross_entropy(z, np.array([1, 2, 0]))
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    assert loss == pytest.approx((2e4 + 0 + np.log(2)) / 3, rel=1e-6)
    np.testing.assert_allclose(grad.sum(axis=1), 0, atol=1e-6)


def test_sigmoid_is_stable_for_large_inputs():
    with np.errstate(all="raise"):
        a = nn.Sigmoid().forward(np.array([[-1e4, -50, 0, 50, 1e4]], np.float32))
    np.testing.assert_allclose(a, [[0, 0, 0.5, 1, 1]], atol=1e-7)


@pytest.mark.parametrize("acts", [(nn.ReLU, nn.ReLU), (nn.Tanh, nn.Sigmoid)])
def test_whole_three_layer_network(acts):
    rng = np.random.default_rng(4)
    model = nn.Sequential(nn.Dense(7, 6), acts[0](), nn.Dense(6, 5), acts[1](), nn.Dense(5, 4),
                          seed=0, dtype=np.float64)
    x = rng.standard_normal((8, 7))
    y = rng.integers(0, 4, 8)

    def loss():
        return nn.softmax_cross_entropy(model.forward(x, training=True), y)[0]

    _, d = nn.softmax_cross_entropy(model.forward(x, training=True), y)
    model.backward(d)
    analytic = {name: g.copy() for name, _, g in model.parameters()}
    assert len(analytic) == 6
    for name, value, _ in model.parameters():
        assert rel_error(analytic[name], numeric_grad(loss, value)) < 1e-6, name


def test_l2_weight_decay_is_the_gradient_of_half_lambda_w_squared():
    model = nn.Sequential(nn.Dense(3, 2), seed=0, dtype=np.float64)
    W = model.layers[0].params["W"]
    W0, b0 = W.copy(), model.layers[0].params["b"].copy()
    model.layers[0].grads["W"][...] = 0.5
    model.layers[0].grads["b"][...] = 0.5
    nn.SGD(model.parameters(), lr=0.1, weight_decay=0.01).step()
    np.testing.assert_allclose(W, W0 - 0.1 * (0.5 + 0.01 * W0))
    np.testing.assert_allclose(model.layers[0].params["b"], b0 - 0.1 * 0.5)  # biases are not decayed
