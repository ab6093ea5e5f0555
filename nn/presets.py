"""Named hyperparameter sets, and one function that trains a model from them.

    hp = nn.presets.get("default", epochs=5)        # a preset, with overrides
    model, history = nn.presets.train(hp, x, y)      # x: pixels/255 (n, 784), y: (n,)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np

from nn.augment import random_shift
from nn.layers import ACTIVATIONS, Dense, Dropout
from nn.model import Sequential
from nn.optim import OPTIMIZERS, SCHEDULES, Constant, CosineLR, StepLR, make
from nn.train import History, fit, split_validation

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # of the training pixels/255
MAX_LAYERS, MAX_UNITS, MAX_PARAMETERS = 16, 16_384, 50_000_000  # bounds checked before any work


@dataclass(frozen=True)
class Hyperparameters:
    hidden: tuple[int, ...] = (512,)
    activation: str = "relu"
    optimizer: str = "momentum"          # sgd | momentum | nesterov | rmsprop | adam
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 128
    epochs: int = 12
    schedule: str = "cosine"             # constant | step | cosine
    l2: float = 0.0                      # weight decay λ (gradient of λ/2·‖W‖²)
    dropout: float = 0.0                 # after each hidden activation
    max_norm: float | None = None        # per-unit incoming weight norm bound
    shift: int = 0                       # random translations of up to ±shift pixels
    standardize: bool = True             # input (pixels/255 - 0.1307) / 0.3081
    val_fraction: float = 5000 / 60000   # held out of train, seeded
    patience: int | None = None          # early stopping on validation loss
    seed: int = 0

    def validate(self) -> "Hyperparameters":
        """Raise ValueError naming the first bad value; return self when all are sound.

        Upper bounds keep a typo from asking for absurd work or memory before anything runs."""
        def whole(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        sizes = [784, *self.hidden, 10] if all(whole(h) for h in self.hidden) else []
        parameters = sum(a * b + b for a, b in zip(sizes, sizes[1:]))
        checks = [
            (1 <= len(self.hidden) <= MAX_LAYERS and all(whole(h) and 1 <= h <= MAX_UNITS for h in self.hidden),
             f"hidden sizes must be 1 to {MAX_LAYERS} integers in 1..{MAX_UNITS}, got {list(self.hidden)}"),
            (parameters <= MAX_PARAMETERS,
             f"hidden sizes {list(self.hidden)} make {parameters:,} parameters, more than the {MAX_PARAMETERS:,} allowed"),
            (self.activation in ACTIVATIONS, f"unknown activation {self.activation!r}; choose from {sorted(ACTIVATIONS)}"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose from {sorted(OPTIMIZERS)}"),
            (self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; choose from {sorted(SCHEDULES)}"),
            (0 < self.lr <= 1e6, f"learning rate must be positive and at most 1e6, got {self.lr}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (whole(self.batch_size) and 1 <= self.batch_size <= 65536,
             f"batch size must be an integer in 1..65536, got {self.batch_size}"),
            (whole(self.epochs) and 1 <= self.epochs <= 10_000, f"epochs must be an integer in 1..10000, got {self.epochs}"),
            (0 <= self.l2 <= 1, f"l2 must be in [0, 1], got {self.l2}"),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.max_norm is None or 0 < self.max_norm <= 1e6, f"max_norm must be in (0, 1e6], got {self.max_norm}"),
            (whole(self.shift) and 0 <= self.shift <= 4, f"shift must be in 0..4 pixels, got {self.shift}"),
            (0 <= self.val_fraction <= 0.9, f"validation fraction must be in [0, 0.9], got {self.val_fraction}"),
            (self.patience is None or (whole(self.patience) and 1 <= self.patience <= 10_000),
             f"patience must be an integer in 1..10000, got {self.patience}"),
            (whole(self.seed) and 0 <= self.seed < 2**32, f"seed must be an integer in 0..{2**32 - 1}, got {self.seed}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d


PRESETS: dict[str, Hyperparameters] = {
    # ≥ 98 % in well under 30 s on 2 cores.
    "default": Hyperparameters(),
    # ≥ 98.8 %: a wider, deeper net with dropout, max-norm and ±2-pixel translations.
    "best": Hyperparameters(hidden=(1024, 1024), dropout=0.3, max_norm=3.5, shift=2, epochs=30,
                            val_fraction=2000 / 60000),
    # A few seconds: for tests and smoke runs (≈ 97.5 %).
    "fast": Hyperparameters(hidden=(128,), epochs=3),
}


def get(name: str, **overrides) -> Hyperparameters:
    """A preset by name with ``overrides`` applied (None values are ignored), validated."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(Hyperparameters)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {sorted(unknown)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    if "hidden" in changes:
        changes["hidden"] = tuple(changes["hidden"])
    return dataclasses.replace(PRESETS[name], **changes).validate()


def build(hp: Hyperparameters) -> Sequential:
    """The network these hyperparameters describe, initialized from ``hp.seed``."""
    layers, n_in = [], 784
    for h in hp.hidden:
        layers += [Dense(n_in, h, init="he" if hp.activation == "relu" else "xavier"), ACTIVATIONS[hp.activation]()]
        if hp.dropout:
            layers.append(Dropout(hp.dropout))
        n_in = h
    layers.append(Dense(n_in, 10, init="xavier"))
    model = Sequential(*layers, seed=hp.seed)
    if hp.standardize:
        model.preprocessing = {"mean": MNIST_MEAN, "std": MNIST_STD}
    return model


def train(hp: Hyperparameters, x: np.ndarray, y: np.ndarray,
          on_epoch: Callable[[dict], None] | None = None) -> tuple[Sequential, History]:
    """Build and train a model on (pixels/255, labels), holding out ``val_fraction``."""
    hp.validate()
    model = build(hp)
    optimizer = make(hp.optimizer, model.parameters(), hp.lr, momentum=hp.momentum, weight_decay=hp.l2,
                     max_norm=hp.max_norm)
    schedule = {"constant": lambda: Constant(hp.lr), "cosine": lambda: CosineLR(hp.lr, hp.epochs),
                "step": lambda: StepLR(hp.lr, max(1, hp.epochs // 3), 0.1)}[hp.schedule]()
    validation = None
    if hp.val_fraction > 0:
        train_idx, val_idx = split_validation(len(x), hp.val_fraction, hp.seed)
        validation = (x[val_idx], y[val_idx])
        x, y = x[train_idx], y[train_idx]
    augment = (lambda xs, rng: random_shift(xs, rng, hp.shift)) if hp.shift else None
    history = fit(model, x, y, optimizer=optimizer, epochs=hp.epochs, batch_size=hp.batch_size,
                  validation=validation, schedule=schedule, patience=hp.patience, augment=augment,
                  seed=hp.seed, on_epoch=on_epoch)
    return model, history
