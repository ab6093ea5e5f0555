"""Layers. Each one has ``forward(x, training)`` and ``backward(dout)``, on one screen.

Shapes: B is the batch size, D the input width, H the output width. Buffers for outputs and
gradients are allocated once per batch capacity and reused (``_buf``), so the training loop
allocates nothing large per batch. Arrays returned by ``forward``/``backward`` are views into
those buffers: valid until the layer's next call.
"""

from __future__ import annotations

import numpy as np

from nn import init as initializers


class Layer:
    params: dict[str, np.ndarray]
    grads: dict[str, np.ndarray]
    regularized: frozenset[str] = frozenset()  # params that weight decay and max-norm apply to

    def __init__(self):
        self.params, self.grads = {}, {}
        self._buffers: dict[str, np.ndarray] = {}
        self.dtype = np.dtype(np.float32)

    def _buf(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A reusable (shape) array; grown when a bigger batch comes, else a view of it."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < shape[0] or buf.shape[1:] != shape[1:] or buf.dtype != self.dtype:
            buf = self._buffers[name] = np.empty(shape, self.dtype)
        return buf[: shape[0]]

    def to(self, dtype) -> "Layer":
        self.dtype = np.dtype(dtype)
        for key in self.params:
            self.params[key] = self.params[key].astype(self.dtype)
            self.grads[key] = np.zeros_like(self.params[key])
        self._buffers.clear()
        return self

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dout: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class Dense(Layer):
    """z = x·W + b.   x: (B, D), W: (D, H), b: (H,), z: (B, H)."""

    regularized = frozenset({"W"})  # the weights decay; the biases do not

    def __init__(self, n_in: int, n_out: int, *, init: str = "he", rng=None):
        super().__init__()
        if int(n_in) < 1 or int(n_out) < 1:
            raise ValueError(f"Dense needs positive sizes, got ({n_in}, {n_out})")
        self.n_in, self.n_out, self.init = int(n_in), int(n_out), init
        self.needs_input_grad = True  # Sequential turns it off for the first layer
        self.reset(np.random.default_rng(rng))

    def reset(self, rng: np.random.Generator) -> None:
        W = initializers.get(self.init)(rng, self.n_in, self.n_out)
        self.params = {"W": W.astype(self.dtype), "b": np.zeros(self.n_out, self.dtype)}
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}

    def forward(self, x, training=False):
        self.x = x                                               # (B, D), kept for backward
        z = self._buf("z", (x.shape[0], self.n_out))             # (B, H)
        np.matmul(x, self.params["W"], out=z)
        z += self.params["b"]                                    # broadcast (H,) over rows
        return z

    def backward(self, dz):
        # dz: (B, H) = dL/dz.  Then dL/dW = xᵀ·dz, dL/db = Σ_rows dz, dL/dx = dz·Wᵀ.
        np.matmul(self.x.T, dz, out=self.grads["W"])             # (D, B)·(B, H) → (D, H)
        np.sum(dz, axis=0, out=self.grads["b"])                  # (H,)
        if not self.needs_input_grad:
            return None
        dx = self._buf("dx", (dz.shape[0], self.n_in))           # (B, D)
        return np.matmul(dz, self.params["W"].T, out=dx)


class ReLU(Layer):
    """a = max(z, 0); da/dz = 1 where z > 0 else 0."""

    def forward(self, z, training=False):
        a = self._buf("a", z.shape)
        self.a = np.maximum(z, 0, out=a)                         # (B, H)
        return a

    def backward(self, da):
        dz = self._buf("dz", da.shape)
        np.greater(self.a, 0, out=dz)                            # the mask, as 0.0 / 1.0
        return np.multiply(dz, da, out=dz)                       # (B, H)


class Tanh(Layer):
    """a = tanh(z); da/dz = 1 - a²."""

    def forward(self, z, training=False):
        self.a = np.tanh(z, out=self._buf("a", z.shape))
        return self.a

    def backward(self, da):
        dz = self._buf("dz", da.shape)
        np.square(self.a, out=dz)
        np.subtract(1, dz, out=dz)
        return np.multiply(dz, da, out=dz)


class Sigmoid(Layer):
    """a = 1 / (1 + e^-z), computed as (1 + tanh(z/2)) / 2: no overflow for any |z|.
    da/dz = a (1 - a)."""

    def forward(self, z, training=False):
        a = self._buf("a", z.shape)
        np.multiply(z, 0.5, out=a)
        np.tanh(a, out=a)
        a += 1
        a *= 0.5
        self.a = a
        return a

    def backward(self, da):
        dz = self._buf("dz", da.shape)
        np.subtract(1, self.a, out=dz)
        dz *= self.a
        return np.multiply(dz, da, out=dz)


class Dropout(Layer):
    """Inverted dropout: in training keep each unit with probability 1-p and scale it by
    1/(1-p), so evaluation is the identity and expectations match."""

    def __init__(self, p: float = 0.5, rng=None):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = float(p)
        self.rng = np.random.default_rng(rng)

    def forward(self, x, training=False):
        self.active = training and self.p > 0
        if not self.active:
            return x
        mask = self._buf("mask", x.shape)                        # (B, H)
        self.rng.random(out=mask) if self.dtype == np.float64 else self.rng.random(dtype=np.float32, out=mask)
        np.greater_equal(mask, self.p, out=mask)                 # keep with probability 1-p
        mask *= 1.0 / (1.0 - self.p)
        self.mask = mask
        return np.multiply(x, mask, out=self._buf("a", x.shape))

    def backward(self, da):
        if not self.active:
            return da
        return np.multiply(da, self.mask, out=self._buf("dz", da.shape))


ACTIVATIONS = {"relu": ReLU, "tanh": Tanh, "sigmoid": Sigmoid}
