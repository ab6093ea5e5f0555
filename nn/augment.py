"""Data augmentation in NumPy: small random translations of images (MNIST: 28×28)."""

from __future__ import annotations

import numpy as np


def random_shift(x: np.ndarray, rng: np.random.Generator, max_shift: int = 2,
                 shape: tuple[int, int] = (28, 28)) -> None:
    """Shift each flattened image in ``x`` (N, rows·cols) in place by a random (dy, dx) in
    [-max_shift, max_shift]², filling with 0. Images with the same shift move together."""
    n = len(x)
    rows, cols = shape
    images = x.reshape(n, rows, cols)
    dy = rng.integers(-max_shift, max_shift + 1, n)
    dx = rng.integers(-max_shift, max_shift + 1, n)
    for sy in range(-max_shift, max_shift + 1):
        for sx in range(-max_shift, max_shift + 1):
            if sy == 0 and sx == 0:
                continue
            idx = np.flatnonzero((dy == sy) & (dx == sx))
            if idx.size == 0:
                continue
            src = images[idx]                                   # (k, side, side) copy
            out = np.zeros_like(src)
            out[:, max(sy, 0):rows + min(sy, 0), max(sx, 0):cols + min(sx, 0)] = \
                src[:, max(-sy, 0):rows + min(-sy, 0), max(-sx, 0):cols + min(-sx, 0)]
            images[idx] = out
