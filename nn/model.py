"""Sequential: layers applied in order; backward runs them in reverse (the chain rule)."""

from __future__ import annotations

import numpy as np

from nn.layers import Dense, Dropout, Layer
from nn.losses import softmax


class Sequential:
    def __init__(self, *layers: Layer, seed: int | None = None, dtype=np.float32):
        self.layers = list(layers)
        dense = [l for l in self.layers if isinstance(l, Dense)]
        for a, b in zip(dense, dense[1:]):
            if a.n_out != b.n_in:
                raise ValueError(f"Dense({a.n_in}, {a.n_out}) cannot feed Dense({b.n_in}, {b.n_out})")
        for i, layer in enumerate(self.layers):
            if isinstance(layer, Dense):
                layer.needs_input_grad = i > 0  # nobody needs dL/dx for the input itself
        if seed is not None:
            self.reset(seed)
        self.to(dtype)
        # How raw pixels/255 become network input: x = (pixels/255 - mean) / std.
        self.preprocessing = {"mean": 0.0, "std": 1.0}

    def reset(self, seed: int) -> "Sequential":
        """Re-initialize every parameter (and dropout stream) from one seeded Generator."""
        rng = np.random.default_rng(seed)
        for layer in self.layers:
            if isinstance(layer, Dense):
                layer.reset(rng)
            elif isinstance(layer, Dropout):
                layer.rng = np.random.default_rng(rng.integers(2**63))
        return self.to(self.dtype) if hasattr(self, "dtype") else self

    def to(self, dtype) -> "Sequential":
        self.dtype = np.dtype(dtype)
        for layer in self.layers:
            layer.to(self.dtype)
        return self

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """(B, n_in) network input → (B, n_out) logits."""
        for layer in self.layers:
            x = layer.forward(x, training)
        return x

    def backward(self, dlogits: np.ndarray) -> None:
        """Fill every layer's ``grads`` from dL/dlogits (B, n_out)."""
        d = dlogits
        for layer in reversed(self.layers):
            d = layer.backward(d)

    def parameters(self) -> list["Param"]:
        """``[(name, value, grad)]``, e.g. ``("0.W", W, dW)``; arrays are updated in place. Each
        also says whether regularization (weight decay, max-norm) applies: ``p.regularized``."""
        return [Param(f"{i}.{k}", layer.params[k], layer.grads[k], k in layer.regularized)
                for i, layer in enumerate(self.layers) for k in layer.params]

    @property
    def dense_layers(self) -> list[Dense]:
        return [l for l in self.layers if isinstance(l, Dense)]

    def preprocess(self, pixels01: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """pixels/255 in [0, 1] → network input, with this model's preprocessing."""
        mean, std = self.preprocessing["mean"], self.preprocessing["std"]
        out = np.subtract(pixels01, mean, out=out, dtype=self.dtype)
        out /= std
        return out

    def predict_proba(self, pixels01: np.ndarray, batch_size: int = 8192) -> np.ndarray:
        """Class probabilities (N, n_out) for inputs given as pixels/255."""
        out = np.empty((len(pixels01), self.dense_layers[-1].n_out), self.dtype)
        chunk = np.empty((min(batch_size, len(pixels01)), pixels01.shape[1]), self.dtype)
        for i in range(0, len(pixels01), batch_size):
            part = pixels01[i:i + batch_size]
            x = self.preprocess(part, out=chunk[: len(part)])
            out[i:i + len(x)] = softmax(self.forward(x, training=False))
        return out

    def predict(self, pixels01: np.ndarray, batch_size: int = 8192) -> np.ndarray:
        return self.predict_proba(pixels01, batch_size).argmax(axis=1)

    def __repr__(self) -> str:
        return "Sequential(" + ", ".join(_describe(l) for l in self.layers) + ")"


class Param(tuple):
    """``(name, value, grad)`` plus the explicit flag ``regularized`` (set by the layer that owns
    the parameter, never guessed from its name)."""

    def __new__(cls, name: str, value: np.ndarray, grad: np.ndarray, regularized: bool = False):
        param = super().__new__(cls, (name, value, grad))
        param.regularized = regularized
        return param


def _describe(layer: Layer) -> str:
    if isinstance(layer, Dense):
        return f"Dense({layer.n_in}, {layer.n_out})"
    if isinstance(layer, Dropout):
        return f"Dropout({layer.p})"
    return type(layer).__name__ + "()"
