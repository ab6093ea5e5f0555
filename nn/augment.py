"""Data augmentation in NumPy, vectorized over the batch and seeded: random translations, and
affine + elastic distortions (images are MNIST's 28×28 unless told otherwise)."""

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


def _smoothing(n: int, sigma: float) -> np.ndarray:
    """(n, n) Gaussian smoothing matrix (rows normalized): G @ field smooths a field along one axis."""
    i = np.arange(n, dtype=np.float32)
    g = np.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)
    return (g / g.sum(axis=1, keepdims=True)).astype(np.float32)


def random_distort(x: np.ndarray, rng: np.random.Generator, *, elastic: float = 0.0, sigma: float = 4.0,
                   rotate: float = 0.0, scale: float = 0.0, shape: tuple[int, int] = (28, 28)) -> None:
    """Distort each flattened image in ``x`` (N, rows·cols) in place, vectorized over the batch:
    a random affine map (rotation by up to ±``rotate`` degrees, scaling by up to ±``scale``)
    plus an elastic displacement field (uniform noise in [-1, 1] smoothed by a Gaussian of
    ``sigma`` pixels, times ``elastic`` pixels; Simard et al. 2003), sampled bilinearly with
    zeros outside. Deterministic for a seeded ``rng``."""
    n = len(x)
    rows, cols = shape
    images = x.reshape(n, rows, cols)
    cy, cx = (rows - 1) / 2, (cols - 1) / 2
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    yy, xx = yy - cy, xx - cx                                        # (rows, cols), centered
    angle = np.deg2rad(rng.uniform(-rotate, rotate, n)).astype(np.float32)
    zoom = (1 + rng.uniform(-scale, scale, n)).astype(np.float32)
    cos, sin = (np.cos(angle) / zoom)[:, None, None], (np.sin(angle) / zoom)[:, None, None]
    sy = cy + cos * yy - sin * xx                                    # (n, rows, cols): where each
    sx = cx + sin * yy + cos * xx                                    # output pixel samples from
    if elastic:
        g_rows, g_cols = _smoothing(rows, sigma), _smoothing(cols, sigma)
        for field in (sy, sx):
            noise = rng.random((n, rows, cols), np.float32) * 2 - 1
            # Smooth along columns, then rows: two large matrix products (not n small ones).
            noise = (noise.reshape(n * rows, cols) @ g_cols.T).reshape(n, rows, cols)
            noise = (noise.transpose(0, 2, 1).reshape(n * cols, rows) @ g_rows.T).reshape(n, cols, rows)
            field += elastic * noise.transpose(0, 2, 1)
    y0, x0 = np.floor(sy), np.floor(sx)
    wy, wx = sy - y0, sx - x0
    padded = np.zeros((n, rows + 2, cols + 2), np.float32)          # a zero border: outside is ink-free
    padded[:, 1:-1, 1:-1] = images
    flat = padded.reshape(n, -1)
    base = (np.arange(n) * (rows + 2) * (cols + 2))[:, None, None]
    def index(r, c):  # flat indices into the padded images; anything outside lands on the zero border
        return base + (np.clip(r, -1, rows) + 1) * (cols + 2) + np.clip(c, -1, cols) + 1
    r0, c0 = y0.astype(np.intp), x0.astype(np.intp)
    flat = flat.ravel()
    top = flat[index(r0, c0)] * (1 - wx) + flat[index(r0, c0 + 1)] * wx
    bottom = flat[index(r0 + 1, c0)] * (1 - wx) + flat[index(r0 + 1, c0 + 1)] * wx
    images[...] = top * (1 - wy) + bottom * wy
