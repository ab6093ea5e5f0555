"""Weight initializers, drawn from a seeded numpy.random.Generator. Return (n_in, n_out)."""

import numpy as np


def he(rng: np.random.Generator, n_in: int, n_out: int) -> np.ndarray:
    """He/Kaiming normal: std = sqrt(2 / n_in), for ReLU layers."""
    return rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)


def xavier(rng: np.random.Generator, n_in: int, n_out: int) -> np.ndarray:
    """Xavier/Glorot uniform: U(-a, a), a = sqrt(6 / (n_in + n_out)), for tanh/sigmoid."""
    limit = np.sqrt(6.0 / (n_in + n_out))
    return rng.uniform(-limit, limit, (n_in, n_out))


INITIALIZERS = {"he": he, "xavier": xavier, "glorot": xavier}


def get(name: str):
    try:
        return INITIALIZERS[name]
    except KeyError:
        raise ValueError(f"unknown initializer {name!r}; choose from {sorted(INITIALIZERS)}") from None
