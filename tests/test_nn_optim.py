"""Optimizer steps against hand-computed values; schedules; clipping; max-norm."""

import math

import numpy as np
import pytest

import nn


def param(value, grad):
    return [("0.W", np.array(value, np.float64), np.array(grad, np.float64))]


def test_sgd_plain():
    p = param([1.0, -2.0], [0.5, 0.25])
    nn.SGD(p, lr=0.1).step()
    np.testing.assert_allclose(p[0][1], [0.95, -2.025])


def test_momentum_two_steps():
    p = param([1.0], [1.0])
    opt = nn.SGD(p, lr=0.1, momentum=0.9)
    opt.step()                       # v = 1,       w = 1 - 0.1·1 = 0.9
    p[0][2][...] = 2.0
    opt.step()                       # v = 0.9 + 2, w = 0.9 - 0.1·2.9 = 0.61
    np.testing.assert_allclose(p[0][1], [0.61])
    np.testing.assert_allclose(opt.velocity[0], [2.9])


def test_nesterov_two_steps():
    p = param([1.0], [1.0])
    opt = nn.SGD(p, lr=0.1, momentum=0.9, nesterov=True)
    opt.step()                       # v = 1;   w = 1 - 0.1·(1 + 0.9·1) = 0.81
    p[0][2][...] = 2.0
    opt.step()                       # v = 2.9; w = 0.81 - 0.1·(2 + 0.9·2.9) = 0.349
    np.testing.assert_allclose(p[0][1], [0.349])


def test_rmsprop_two_steps():
    p = param([1.0], [2.0])
    opt = nn.RMSprop(p, lr=0.01, rho=0.9, eps=1e-8)
    opt.step()                       # s = 0.1·4 = 0.4
    w1 = 1 - 0.01 * 2 / (math.sqrt(0.4) + 1e-8)
    np.testing.assert_allclose(p[0][1], [w1])
    p[0][2][...] = -1.0
    opt.step()                       # s = 0.36 + 0.1 = 0.46
    np.testing.assert_allclose(p[0][1], [w1 + 0.01 / (math.sqrt(0.46) + 1e-8)])


def test_adam_two_steps_with_bias_correction():
    p = param([1.0, 0.0], [0.5, -3.0])
    opt = nn.Adam(p, lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    w = np.array([1.0, 0.0])
    m = v = np.zeros(2)
    for t, g in enumerate([np.array([0.5, -3.0]), np.array([-1.0, 2.0])], start=1):
        p[0][2][...] = g
        opt.step()
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        w = w - 0.01 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
        np.testing.assert_allclose(p[0][1], w, rtol=1e-12)
    # the first step of Adam moves each weight by ≈ lr, whatever the gradient's scale
    p = param([0.0], [1e-3])
    nn.Adam(p, lr=0.01).step()
    assert p[0][1][0] == pytest.approx(-0.01, rel=1e-3)


@pytest.mark.parametrize("make", [
    lambda p: nn.SGD(p, lr=0.1, momentum=0.9),
    lambda p: nn.RMSprop(p, lr=0.1),
    lambda p: nn.Adam(p, lr=0.1),
])
def test_state_is_per_parameter(make):
    """Two identical parameters with different gradients must not share optimizer state."""
    params = [("0.W", np.zeros(3), np.ones(3)), ("1.W", np.zeros(3), np.ones(3))]
    opt = make(params)
    opt.step()
    params[1][2][...] = -1.0
    opt.step()
    solo = [("0.W", np.zeros(3), np.ones(3))]
    opt_solo = make(solo)
    opt_solo.step()
    opt_solo.step()
    np.testing.assert_array_equal(params[0][1], solo[0][1])  # unaffected by its neighbour
    assert not np.array_equal(params[0][1], params[1][1])


def test_invalid_hyperparameters():
    p = param([1.0], [1.0])
    with pytest.raises(ValueError, match="learning rate must be positive"):
        nn.SGD(p, lr=-0.1)
    with pytest.raises(ValueError, match="momentum"):
        nn.SGD(p, lr=0.1, momentum=1.5)
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'"):
        nn.make_optimizer("lbfgs", p, 0.1)


def test_schedules():
    step = nn.StepLR(0.1, step_size=2, gamma=0.5)
    assert [step(e) for e in range(5)] == [0.1, 0.1, 0.05, 0.05, 0.025]
    cos = nn.CosineLR(0.1, epochs=4, min_lr=0.0)
    assert [round(cos(e), 6) for e in range(5)] == [0.1, 0.085355, 0.05, 0.014645, 0.0]
    warm = nn.CosineLR(0.1, epochs=5, warmup=2)
    assert warm(0) == pytest.approx(0.05) and warm(1) == pytest.approx(0.1) and warm(2) == pytest.approx(0.1)


def test_clip_grad_norm():
    grads = [np.array([3.0, 0.0]), np.array([0.0, 4.0])]
    assert nn.clip_grad_norm(grads, 1.0) == pytest.approx(5.0)
    np.testing.assert_allclose(np.concatenate(grads), [0.6, 0, 0, 0.8])
    small = [np.array([0.3, 0.4])]
    nn.clip_grad_norm(small, 1.0)
    np.testing.assert_array_equal(small[0], [0.3, 0.4])


def test_max_norm_constraint():
    W = np.array([[3.0, 0.1], [4.0, 0.1]])
    nn.max_norm_(W, 2.0)
    np.testing.assert_allclose(np.linalg.norm(W, axis=0), [2.0, np.sqrt(0.02)])
    np.testing.assert_allclose(W[:, 0], [1.2, 1.6])
    p = [nn.Param("0.kernel", np.array([[3.0], [4.0]]), np.zeros((2, 1)), regularized=True)]
    nn.SGD(p, lr=0.1, max_norm=1.0).step()
    assert np.linalg.norm(p[0][1]) == pytest.approx(1.0)


def test_regularization_follows_the_explicit_flag_not_the_name():
    flagged = nn.Param("anything", np.ones((2, 2)), np.zeros((2, 2)), regularized=True)
    named_w = nn.Param("0.W", np.ones((2, 2)), np.zeros((2, 2)), regularized=False)
    nn.SGD([flagged, named_w], lr=0.1, weight_decay=0.5, max_norm=0.5).step()
    np.testing.assert_allclose(named_w[1], 1.0)  # no decay, no max-norm: it did not ask for them
    assert np.linalg.norm(flagged[1], axis=0) == pytest.approx([0.5, 0.5])
    model = nn.Sequential(nn.Dense(3, 2), nn.ReLU(), nn.Dense(2, 2), seed=0)
    assert [(p[0], p.regularized) for p in model.parameters()] == [
        ("0.W", True), ("0.b", False), ("2.W", True), ("2.b", False)]
