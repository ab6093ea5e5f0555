"""Optimizers, learning-rate schedules, gradient clipping and the max-norm constraint.

Every optimizer keeps its state per parameter (one velocity / moment array per array it
updates, never shared across layers) and updates the parameters in place. ``weight_decay``
is L2 regularization: λ·W is added to the gradient of weights (not biases), which is the
gradient of (λ/2)·‖W‖².
"""

from __future__ import annotations

import math

import numpy as np


class Optimizer:
    def __init__(self, params, lr: float, *, weight_decay: float = 0.0, clip_norm: float | None = None,
                 max_norm: float | None = None):
        if not lr > 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be ≥ 0, got {weight_decay}")
        self.params = list(params)  # [(name, value, grad)], as from Sequential.parameters()
        self.lr, self.weight_decay, self.clip_norm, self.max_norm = lr, weight_decay, clip_norm, max_norm
        self.t = 0  # steps taken
        self.scratch = [np.empty_like(v) for _, v, _ in self.params]

    def step(self) -> None:
        self.t += 1
        if self.clip_norm is not None:
            clip_grad_norm([g for _, _, g in self.params], self.clip_norm)
        for i, param in enumerate(self.params):
            name, value, grad = param
            tmp = self.scratch[i]
            regularized = getattr(param, "regularized", False)  # set by the layer, e.g. Dense's W
            if self.weight_decay and regularized:
                grad += np.multiply(value, self.weight_decay, out=tmp)
            self.update(i, value, grad, tmp)
            if self.max_norm is not None and regularized:
                max_norm_(value, self.max_norm)

    def update(self, i: int, value: np.ndarray, grad: np.ndarray, tmp: np.ndarray) -> None:
        raise NotImplementedError

    buffers: tuple[str, ...] = ()  # names of the per-parameter state lists (e.g. "velocity")

    def state(self) -> dict[str, np.ndarray]:
        """Everything a resumed run needs to continue bit for bit: the step count and each
        buffer, named by the parameter it belongs to (``velocity.0.W``), never by position."""
        arrays = {f"{buf}.{name}": a for buf in self.buffers
                  for (name, _, _), a in zip(self.params, getattr(self, buf))}
        arrays["t"] = np.array(self.t)
        return arrays

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        for buf in self.buffers:
            for (name, _, _), a in zip(self.params, getattr(self, buf)):
                a[...] = arrays[f"{buf}.{name}"]
        self.t = int(arrays["t"])


class SGD(Optimizer):
    """v ← μ·v + g;  W ← W - lr·v   (Nesterov: W ← W - lr·(g + μ·v)). μ = 0: plain SGD."""

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False, **kw):
        super().__init__(params, lr, **kw)
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum, self.nesterov = momentum, nesterov
        self.velocity = [np.zeros_like(v) for _, v, _ in self.params]
        self.buffers = ("velocity",)

    def update(self, i, value, grad, tmp):
        if self.momentum == 0:
            np.multiply(grad, self.lr, out=tmp)
        else:
            v = self.velocity[i]
            v *= self.momentum
            v += grad
            if self.nesterov:
                np.multiply(v, self.momentum, out=tmp)
                tmp += grad
                tmp *= self.lr
            else:
                np.multiply(v, self.lr, out=tmp)
        value -= tmp


class RMSprop(Optimizer):
    """s ← ρ·s + (1-ρ)·g²;  W ← W - lr·g / (√s + ε)."""

    def __init__(self, params, lr: float = 1e-3, rho: float = 0.9, eps: float = 1e-8, **kw):
        super().__init__(params, lr, **kw)
        self.rho, self.eps = rho, eps
        self.square = [np.zeros_like(v) for _, v, _ in self.params]
        self.buffers = ("square",)

    def update(self, i, value, grad, tmp):
        s = self.square[i]
        s *= self.rho
        np.square(grad, out=tmp)
        tmp *= 1 - self.rho
        s += tmp
        np.sqrt(s, out=tmp)
        tmp += self.eps
        np.divide(grad, tmp, out=tmp)
        tmp *= self.lr
        value -= tmp


class Adam(Optimizer):
    """m ← β1·m + (1-β1)·g;  v ← β2·v + (1-β2)·g²;
    W ← W - lr·m̂ / (√v̂ + ε) with bias corrections m̂ = m/(1-β1ᵗ), v̂ = v/(1-β2ᵗ)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, **kw):
        super().__init__(params, lr, **kw)
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.m = [np.zeros_like(v) for _, v, _ in self.params]
        self.v = [np.zeros_like(v) for _, v, _ in self.params]
        self.buffers = ("m", "v")

    def update(self, i, value, grad, tmp):
        m, v, b1, b2 = self.m[i], self.v[i], self.beta1, self.beta2
        m *= b1
        np.multiply(grad, 1 - b1, out=tmp)
        m += tmp
        v *= b2
        np.square(grad, out=tmp)
        tmp *= 1 - b2
        v += tmp
        # lr·m̂/(√v̂+ε) = lr_t·m/(√v + ε·√(1-β2ᵗ)), lr_t = lr·√(1-β2ᵗ)/(1-β1ᵗ)
        c2 = math.sqrt(1 - b2 ** self.t)
        lr_t = self.lr * c2 / (1 - b1 ** self.t)
        np.sqrt(v, out=tmp)
        tmp += self.eps * c2
        np.divide(m, tmp, out=tmp)
        tmp *= lr_t
        value -= tmp


OPTIMIZERS = {"sgd": SGD, "momentum": SGD, "nesterov": SGD, "rmsprop": RMSprop, "adam": Adam}


def make(name: str, params, lr: float, *, momentum: float = 0.9, **kw) -> Optimizer:
    """Build an optimizer by name: sgd, momentum, nesterov, rmsprop, adam."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(OPTIMIZERS)}")
    if name == "sgd":
        return SGD(params, lr, momentum=0.0, **kw)
    if name in ("momentum", "nesterov"):
        return SGD(params, lr, momentum=momentum, nesterov=name == "nesterov", **kw)
    return OPTIMIZERS[name](params, lr, **kw)


def clip_grad_norm(grads: list[np.ndarray], max_norm: float) -> float:
    """Scale all gradients together so their global L2 norm is at most ``max_norm``."""
    norm = math.sqrt(sum(float(np.dot(g.ravel(), g.ravel())) for g in grads))
    if norm > max_norm:
        for g in grads:
            g *= max_norm / (norm + 1e-12)
    return norm


def max_norm_(W: np.ndarray, c: float) -> None:
    """Rescale, in place, each unit's incoming weight vector (a column of W) to norm ≤ c."""
    norms = np.sqrt(np.einsum("ij,ij->j", W, W))
    scale = np.minimum(1.0, c / np.maximum(norms, 1e-12)).astype(W.dtype)
    W *= scale


# ---- learning-rate schedules: epoch (0-based) → lr ----------------------------------

class Constant:
    def __init__(self, lr: float):
        self.lr = lr

    def __call__(self, epoch: int) -> float:
        return self.lr


class StepLR:
    """lr · γ^(epoch // step_size)."""

    def __init__(self, lr: float, step_size: int, gamma: float = 0.1):
        self.lr, self.step_size, self.gamma = lr, step_size, gamma

    def __call__(self, epoch: int) -> float:
        return self.lr * self.gamma ** (epoch // self.step_size)


class CosineLR:
    """Cosine from lr to min_lr over ``epochs``, after ``warmup`` linear warm-up epochs."""

    def __init__(self, lr: float, epochs: int, min_lr: float = 0.0, warmup: int = 0):
        self.lr, self.epochs, self.min_lr, self.warmup = lr, epochs, min_lr, warmup

    def __call__(self, epoch: int) -> float:
        if epoch < self.warmup:
            return self.lr * (epoch + 1) / self.warmup
        span = max(1, self.epochs - self.warmup)
        progress = min(1.0, (epoch - self.warmup) / span)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))


SCHEDULES = {"constant": Constant, "step": StepLR, "cosine": CosineLR}
