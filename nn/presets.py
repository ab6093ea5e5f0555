"""Named hyperparameter sets, and one function that trains a model from them.

    hp = nn.presets.get("default", epochs=5)        # a preset, with overrides
    model, history = nn.presets.train(hp, x, y)      # x: pixels/255 (n, 784), y: (n,)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np

from nn.augment import random_distort, random_shift
from nn.layers import ACTIVATIONS, Dense, Dropout
from nn.model import Sequential
from nn.optim import OPTIMIZERS, SCHEDULES, Constant, CosineLR, StepLR, make
from nn.train import History, TrainState, fit, split_validation

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # of the training pixels/255
MAX_LAYERS, MAX_PARAMETERS = 16, 50_000_000  # bounds checked before any work


def hp(default, help: str, *, low=None, high=None, low_open=False, high_open=False, choices=None,
       items=None, max_items=None):
    """A hyperparameter: its default, help text and bounds, written once. The CLI flags, the
    sweep grid, the flow's typed parameters (the dashboard's Run form) and ``validate`` are all
    generated from these."""
    return dataclasses.field(default=default, metadata={
        "help": help, "low": low, "high": high, "low_open": low_open, "high_open": high_open,
        "choices": choices, "items": items, "max_items": max_items})


@dataclass(frozen=True)
class Hyperparameters:
    hidden: tuple[int, ...] = hp((512,), "Hidden layer sizes, e.g. 512 or 512x256.", items=(1, 16_384),
                                 max_items=MAX_LAYERS)
    activation: str = hp("relu", "Hidden activation.", choices=tuple(sorted(ACTIVATIONS)))
    optimizer: str = hp("momentum", "Optimizer.", choices=tuple(sorted(OPTIMIZERS)))
    lr: float = hp(0.05, "Learning rate.", low=0.0, low_open=True, high=1e6)
    momentum: float = hp(0.9, "Momentum (momentum and nesterov).", low=0.0, high=1.0, high_open=True)
    batch_size: int = hp(128, "Mini-batch size.", low=1, high=65_536)
    epochs: int = hp(12, "Epochs.", low=1, high=10_000)
    schedule: str = hp("cosine", "Learning-rate schedule.", choices=tuple(sorted(SCHEDULES)))
    l2: float = hp(0.0, "L2 weight decay λ (gradient of λ/2·‖W‖²).", low=0.0, high=1.0)
    dropout: float = hp(0.0, "Dropout probability after each hidden layer.", low=0.0, high=1.0, high_open=True)
    max_norm: float | None = hp(None, "Max-norm bound of each unit's incoming weights (none: off).", low=0.0,
                                low_open=True, high=1e6)
    shift: int = hp(0, "Random translations of up to ±N pixels.", low=0, high=4)
    elastic: float = hp(0.0, "Elastic distortion strength in pixels (0: off; Simard et al. used 34 with σ = 4).",
                        low=0.0, high=64.0)
    rotate: float = hp(0.0, "Random rotations of up to ±N degrees.", low=0.0, high=45.0)
    scale: float = hp(0.0, "Random scaling by up to ±this fraction.", low=0.0, high=0.5)
    standardize: bool = hp(True, "Standardize inputs: (pixels/255 − 0.1307) / 0.3081.")
    val_fraction: float = hp(5000 / 60000, "Fraction of train held out for validation (seeded).", low=0.0, high=0.9)
    patience: int | None = hp(None, "Early-stopping patience in epochs (none: off).", low=1, high=10_000)
    seed: int = hp(0, "Random seed (initialization, shuffles, validation split).", low=0, high=2**32 - 1)

    @classmethod
    def fields(cls) -> dict[str, tuple[type, dataclasses.Field]]:
        """name → (type, field with default and metadata), in declaration order."""
        import typing

        hints = typing.get_type_hints(cls)
        return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls)}

    def validate(self, n_in: int = 784, n_out: int = 10) -> "Hyperparameters":
        """Raise ValueError naming the first bad value; return self when all are sound.

        Upper bounds keep a typo from asking for absurd work or memory before anything runs;
        ``n_in`` and ``n_out`` (the dataset's pixels and classes) are checked with them, so a
        network that could not be built or saved is refused before any download."""
        for name, (kind, f) in self.fields().items():
            problem = check_value(name, kind, f.metadata, getattr(self, name))
            if problem:
                raise ValueError(problem)
        from nn.io import MAX_UNITS

        if not (1 <= n_in <= MAX_UNITS and 2 <= n_out <= MAX_UNITS):
            raise ValueError(f"a network of {n_in:,} inputs and {n_out:,} outputs cannot be built: inputs (image "
                             f"pixels) and outputs (classes) must be at most {MAX_UNITS:,}")
        sizes = [n_in, *self.hidden, n_out]
        parameters = sum(a * b + b for a, b in zip(sizes, sizes[1:]))
        if parameters > MAX_PARAMETERS:
            raise ValueError(f"a {'-'.join(map(str, sizes))} network has {parameters:,} parameters, "
                             f"more than the {MAX_PARAMETERS:,} allowed")
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d


def describe_bounds(meta) -> str:
    """'in (0, 1e6]', 'in 0..4', 'one of adam, momentum, …' — for messages and help texts."""
    if meta["choices"]:
        return "one of " + ", ".join(meta["choices"])
    if meta["items"]:
        low, high = meta["items"]
        return f"1 to {meta['max_items']} integers in {low}..{high}"
    low, high = meta["low"], meta["high"]
    if low is None:
        return ""
    if isinstance(low, int) and not meta["low_open"] and not meta["high_open"]:
        return f"in {low}..{high}"
    return f"in {'(' if meta['low_open'] else '['}{low:g}, {high:g}{')' if meta['high_open'] else ']'}"


def check_value(name: str, kind, meta, value) -> str | None:
    """Why ``value`` is not a valid ``name`` (None when it is)."""
    import typing

    def whole(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if value is None:
        return None if type(None) in typing.get_args(kind) else f"{name} must be set"
    bounds = describe_bounds(meta)
    if meta["items"]:
        low, high = meta["items"]
        ok = (isinstance(value, (tuple, list)) and 1 <= len(value) <= meta["max_items"]
              and all(whole(v) and low <= v <= high for v in value))
        return None if ok else f"{name} must be {bounds}, got {list(value) if isinstance(value, tuple) else value}"
    if meta["choices"]:
        return None if value in meta["choices"] else f"unknown {name} {value!r}; {bounds}"
    base = [t for t in (typing.get_args(kind) or (kind,)) if t is not type(None)][0]
    if base is bool:
        return None if isinstance(value, bool) else f"{name} must be true or false, got {value!r}"
    if base is int and not whole(value) or base is float and (isinstance(value, bool)
                                                            or not isinstance(value, (int, float))):
        return f"{name} must be {'an integer' if base is int else 'a number'} {bounds}, got {value!r}"
    low, high = meta["low"], meta["high"]
    if low is not None and not (value > low if meta["low_open"] else value >= low) \
            or high is not None and not (value < high if meta["high_open"] else value <= high) \
            or base is float and value != value:
        return f"{name} must be {'an integer' if base is int else 'a number'} {bounds}, got {value!r}"
    return None


PRESETS: dict[str, Hyperparameters] = {
    # ≥ 98 % in well under 30 s on 2 cores.
    "default": Hyperparameters(),
    # ≥ 99.3 % in ≤ 15 min: a wider, deeper net with dropout and max-norm, trained on elastic and
    # affine distortions (Simard et al. 2003: an 800-unit MLP with elastic distortions, 99.3 %).
    "best": Hyperparameters(hidden=(1024, 1024), dropout=0.2, max_norm=3.5, elastic=34.0, rotate=10.0, scale=0.1,
                            epochs=100, val_fraction=2000 / 60000),
    # ≥ 98.6 % in ≤ 60 s with peak RSS ≤ 500 MiB: one wide layer and ±1-pixel translations.
    "balanced": Hyperparameters(hidden=(1024,), shift=1, epochs=20),
    # A few seconds: for tests and smoke runs (≈ 97.5 %).
    "fast": Hyperparameters(hidden=(128,), epochs=3),
}
# Which dataset each preset was tuned on (and measured on: README). On Fashion-MNIST, `default`
# is the default too (its own benchmark lists an MLP 256-128-100 at 88.33 %); not measured here,
# where only its labels are available.
TUNED_ON = {"default": "mnist", "best": "mnist", "balanced": "mnist", "fast": "mnist"}


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


def build(hp: Hyperparameters, n_in: int = 784, n_out: int = 10) -> Sequential:
    """The network these hyperparameters describe for ``n_in`` inputs (MNIST: 28×28 = 784) and
    ``n_out`` classes (MNIST: 10), initialized from ``hp.seed``."""
    layers = []
    for h in hp.hidden:
        layers += [Dense(n_in, h, init="he" if hp.activation == "relu" else "xavier"), ACTIVATIONS[hp.activation]()]
        if hp.dropout:
            layers.append(Dropout(hp.dropout))
        n_in = h
    layers.append(Dense(n_in, n_out, init="xavier"))
    model = Sequential(*layers, seed=hp.seed)
    if hp.standardize:
        model.preprocessing = {"mean": MNIST_MEAN, "std": MNIST_STD}
    return model


def train(hp: Hyperparameters, x: np.ndarray, y: np.ndarray,
          on_epoch: Callable[[dict], None] | None = None, checkpoint: Callable[[TrainState], None] | None = None,
          on_batch: Callable[[int, int, int, float, float], None] | None = None,
          resume: TrainState | None = None, n_classes: int = 10,
          image_shape: tuple[int, int] = (28, 28)) -> tuple[Sequential, History]:
    """Build and train a model on (pixels/255 (N, n_in), labels in 0..n_classes-1), holding out
    ``val_fraction``."""
    hp.validate()
    model = build(hp, n_in=x.shape[1], n_out=n_classes)
    optimizer = make(hp.optimizer, model.parameters(), hp.lr, momentum=hp.momentum, weight_decay=hp.l2,
                     max_norm=hp.max_norm)
    schedule = {"constant": lambda: Constant(hp.lr), "cosine": lambda: CosineLR(hp.lr, hp.epochs),
                "step": lambda: StepLR(hp.lr, max(1, hp.epochs // 3), 0.1)}[hp.schedule]()
    validation, rows = None, None
    if hp.val_fraction > 0:
        rows, val_idx = split_validation(len(x), hp.val_fraction, hp.seed)
        validation = (x[val_idx], y[val_idx])  # small; the training rows are read in place (no copy)
    shape, distort = tuple(image_shape), bool(hp.elastic or hp.rotate or hp.scale)

    def augment(xs: np.ndarray, rng: np.random.Generator) -> None:  # distortions first, then translations
        if distort:
            random_distort(xs, rng, elastic=hp.elastic, rotate=hp.rotate, scale=hp.scale, shape=shape)
        if hp.shift:
            random_shift(xs, rng, hp.shift, shape)

    history = fit(model, x, y, optimizer=optimizer, epochs=hp.epochs, batch_size=hp.batch_size,
                  validation=validation, schedule=schedule, patience=hp.patience,
                  augment=augment if distort or hp.shift else None,
                  seed=hp.seed, on_epoch=on_epoch, on_batch=on_batch, checkpoint=checkpoint, resume=resume,
                  rows=rows)
    return model, history
