"""The training loop: seeded shuffles, mini-batches, validation, early stopping, history.

Inputs are given as the model consumes them *before* its ``preprocessing`` (for MNIST:
pixels/255), so augmentation works on images and preprocessing is applied once per epoch.
The hot loop allocates nothing large: one shuffle-gather per epoch into a preallocated
buffer, then views of it per batch, and every layer writes into its own reused buffers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import numpy as np

from nn.losses import SoftmaxCrossEntropy
from nn.model import Sequential
from nn.optim import Constant, Optimizer


class NonFiniteLossError(FloatingPointError):
    """Training diverged: the loss became NaN or infinite."""


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit this run (shapes, dtypes, names, counters): not resumed."""


@dataclass
class History:
    epochs: list[dict] = field(default_factory=list)  # one record per epoch
    best_epoch: int | None = None  # 1-based, by validation loss
    stopped_early: bool = False

    def column(self, key: str) -> list:
        return [e[key] for e in self.epochs]


def split_validation(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train_idx, val_idx) split of range(n)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    perm = np.random.default_rng([seed, 1]).permutation(n)
    k = int(round(n * fraction))
    return np.sort(perm[k:]), np.sort(perm[:k])


def evaluate(model: Sequential, x: np.ndarray, y: np.ndarray, batch_size: int = 2048) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on (x, y); x before preprocessing."""
    loss_fn = SoftmaxCrossEntropy()
    total_loss, correct = 0.0, 0
    chunk = np.empty((min(batch_size, len(x)), x.shape[1]), model.dtype)
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        logits = model.forward(model.preprocess(xb, out=chunk[: len(xb)]), training=False)
        correct += int(np.count_nonzero(logits.argmax(axis=1) == yb))
        loss, _ = loss_fn(logits, yb)
        total_loss += loss * len(xb)
    return total_loss / len(x), correct / len(x)


CHUNK_ROWS = 8192  # rows of an epoch gathered at a time (memory beyond the data: this many rows)
BATCH_REPORT = 16  # batches between two on_batch calls


def take_rows(x, idx: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Rows ``idx`` of ``x`` into ``out``. ``x`` is an array, or anything with ``take_rows`` (and
    ``len``, ``shape``, ``x[index array]``), e.g. a split on disk that reads only those rows."""
    if hasattr(x, "take_rows"):
        return x.take_rows(idx, out)
    return np.take(x, idx, axis=0, out=out, mode="clip")


@dataclass
class TrainState:
    """Everything a run needs to continue where it stopped, each part by name. A checkpoint is
    this, saved whole (``nn.save_checkpoint``) and loaded whole (``nn.load_checkpoint``)."""

    epoch: int = 0                      # epochs completed
    history: list[dict] = field(default_factory=list)  # one record per completed epoch
    best_loss: float = math.inf         # the lowest validation loss so far
    best_epoch: int | None = None       # 1-based epoch of best_loss
    waited: int = 0                     # epochs since best_loss last improved
    params: dict[str, np.ndarray] = field(default_factory=dict)     # parameter name -> weights
    optimizer: dict[str, np.ndarray] = field(default_factory=dict)  # optimizer buffer name -> array
    best: dict[str, np.ndarray] | None = None  # parameter name -> weights at best_epoch (early stopping)
    generators: dict[str, dict] = field(default_factory=dict)       # generator name -> its state
    training_id: str | None = None      # which training wrote it (set by the caller)

    PARTS = {"param.": "params", "optim.": "optimizer", "best.": "best"}  # array name prefix -> field
    META = ("epoch", "history", "best_loss", "best_epoch", "waited", "generators", "training_id")  # saved as JSON

    def capture(self, model: Sequential, optimizer: Optimizer, generators: dict) -> "TrainState":
        """Point the state at the live arrays (no copy: save it before training goes on)."""
        self.params = {name: value for name, value, _ in model.parameters()}
        self.optimizer = optimizer.state()
        self.generators = {name: g.bit_generator.state for name, g in generators.items()}
        return self

    def restore(self, model: Sequential, optimizer: Optimizer, generators: dict) -> None:
        """Copy the state into the live model, optimizer and generators (``check`` it first)."""
        for name, value, _ in model.parameters():
            value[...] = self.params[name]
        optimizer.load_state(self.optimizer)
        for name, generator in generators.items():
            generator.bit_generator.state = self.generators[name]

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array by its name in a checkpoint file (``param.0.W``, ``optim.m.0.W``, ``best.0.W``)."""
        return {prefix + name: a for prefix, part in self.PARTS.items() for name, a in (getattr(self, part) or {}).items()}

    def meta(self) -> dict:
        """Everything else, as JSON."""
        return {k: getattr(self, k) for k in self.META}

    @classmethod
    def from_saved(cls, meta: dict, arrays: dict[str, np.ndarray]) -> "TrainState":
        """The state a checkpoint file holds, as read: nothing is trusted yet (see ``check``).
        An array whose name has no known prefix is a ValueError."""
        parts: dict[str, dict] = {"params": {}, "optimizer": {}, "best": {}}
        for key, a in arrays.items():
            prefix = next((p for p in cls.PARTS if key.startswith(p)), None)
            if prefix is None:
                raise ValueError(f"unknown array {key[:40]!r}")
            parts[cls.PARTS[prefix]][key[len(prefix):]] = a
        return cls(**{k: meta[k] for k in cls.META if k in meta}, params=parts["params"],
                   optimizer=parts["optimizer"], best=parts["best"] or None)

    def check(self, model: Sequential, optimizer: Optimizer, generators: dict, epochs: int) -> None:
        """Raise CheckpointMismatch unless this state is exactly what this run would save: the
        same names, each array of the shape and dtype of the one it is copied into, counters in
        range, a history as long as its epoch, generator states of the right kind. Checked
        against the model and optimizer built from the run's own hyperparameters, which the
        checkpoint file cannot rewrite."""
        def bad(why: str):
            raise CheckpointMismatch(f"checkpoint does not fit this run: {why}")

        epoch, history, best = self.epoch, self.history, self.best_epoch
        if type(epoch) is not int or not 1 <= epoch < epochs:
            bad(f"epoch {epoch!r} is not in 1..{epochs - 1}")
        if type(self.waited) is not int or not 0 <= self.waited <= epoch:
            bad(f"waited {self.waited!r}")
        if type(self.best_loss) not in (int, float):
            bad(f"best_loss {self.best_loss!r}")
        if not (isinstance(history, list) and len(history) == epoch and all(isinstance(r, dict) for r in history)):
            bad(f"a history of {len(history) if isinstance(history, list) else 'no'} epochs at epoch {epoch}")
        if best is not None and (type(best) is not int or not 1 <= best <= epoch):
            bad(f"best_epoch {best!r}")
        live = {name: value for name, value, _ in model.parameters()}
        for part, got, want in (("param", self.params, live), ("optim", self.optimizer, optimizer.state()),
                                ("best", self.best, live)):
            if part == "best" and got is None:
                continue
            if set(got) != set(want):
                missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
                bad(f"{part} arrays missing {missing[:3]}" if missing else f"unexpected {part} arrays {extra[:3]}")
            for name, a in got.items():
                w = np.asarray(want[name])
                if not isinstance(a, np.ndarray) or a.shape != w.shape or a.dtype != w.dtype:
                    bad(f"{part}.{name} is {getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}, "
                        f"this run's is {w.dtype} {w.shape}")
                if a.dtype.kind == "f" and not np.isfinite(a).all():
                    bad(f"{part}.{name} holds NaN or infinite values")
        saved = self.generators
        if not isinstance(saved, dict) or set(saved) != set(generators):
            bad(f"random generators {sorted(saved) if isinstance(saved, dict) else saved!r}, this run has "
                f"{sorted(generators)}")
        for name, generator in generators.items():
            g = saved[name]
            if not isinstance(g, dict) or g.get("bit_generator") != type(generator.bit_generator).__name__:
                bad(f"generator {name} is not a {type(generator.bit_generator).__name__} state")
            try:  # the bit generator checks its own state's fields; tried on a copy
                type(generator.bit_generator)().state = g
            except (TypeError, ValueError, KeyError, OverflowError) as e:
                bad(f"generator {name}: {e}")


def train_epochs(model: Sequential, x, y: np.ndarray, rows: np.ndarray, *, optimizer: Optimizer, first: int,
                 epochs: int, batch_size: int, schedule: Callable[[int], float], rng: np.random.Generator,
                 augment=None, validation=None, on_batch=None) -> Iterator[dict]:
    """Train epoch after epoch from ``first`` (0-based) to ``epochs``; yield each one's record.

    Per epoch: a seeded shuffle of ``rows``; then a chunk (~8192 rows, whole batches) at a time:
    one gather into a preallocated buffer, augmentation, preprocessing, and for each batch
    forward → loss → backward → step. Then validation, if given.
    """
    n = len(rows)
    loss_fn = SoftmaxCrossEntropy()
    chunk = batch_size * max(1, CHUNK_ROWS // batch_size)  # whole batches: the same batches as one big gather
    xs = np.empty((min(n, chunk), x.shape[1]), model.dtype)  # a chunk of this epoch's shuffled inputs (N, D)
    ys = np.empty(min(n, chunk), np.intp)
    identity = model.preprocessing == {"mean": 0.0, "std": 1.0}
    for epoch in range(first, epochs):
        t0 = time.perf_counter()
        optimizer.lr = lr = schedule(epoch)
        order = rows[rng.permutation(n)]
        loss_sum, correct = 0.0, 0
        for c0 in range(0, n, chunk):
            part = order[c0:c0 + chunk]
            xc, yc = xs[:len(part)], ys[:len(part)]
            take_rows(x, part, xc)  # one gather per chunk, not per batch
            np.take(y, part, out=yc, mode="clip")
            if augment is not None:
                augment(xc, rng)
            if not identity:
                model.preprocess(xc, out=xc)
            for start in range(0, len(part), batch_size):
                xb, yb = xc[start:start + batch_size], yc[start:start + batch_size]  # (B, D), (B,)
                logits = model.forward(xb, training=True)  # (B, classes)
                correct += int(np.count_nonzero(logits.argmax(axis=1) == yb))
                loss, dlogits = loss_fn(logits, yb)
                if not math.isfinite(loss):
                    raise NonFiniteLossError(
                        f"loss became {loss} at epoch {epoch + 1}, batch {(c0 + start) // batch_size + 1} "
                        f"(learning rate {lr:g}): training diverged")
                loss_sum += loss * len(yb)
                model.backward(dlogits)
                optimizer.step()
                batch = (c0 + start) // batch_size + 1
                if on_batch is not None and batch % BATCH_REPORT == 0:
                    seen = c0 + start + len(yb)
                    on_batch(epoch + 1, batch, -(-n // batch_size), loss_sum / seen, correct / seen)
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / n, "train_accuracy": correct / n}
        if validation is not None:
            record["val_loss"], record["val_accuracy"] = evaluate(model, *validation)
        record["seconds"] = time.perf_counter() - t0
        yield record


def fit(
    model: Sequential,
    x: np.ndarray,
    y: np.ndarray,
    *,
    optimizer: Optimizer,
    epochs: int,
    batch_size: int = 128,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    val_fraction: float = 0.0,
    schedule: Callable[[int], float] | None = None,
    patience: int | None = None,
    augment: Callable[[np.ndarray, np.random.Generator], None] | None = None,
    seed: int = 0,
    on_epoch: Callable[[dict], None] | None = None,
    on_batch: Callable[[int, int, int, float, float], None] | None = None,
    checkpoint: Callable[[TrainState], None] | None = None,
    resume: TrainState | None = None,
    rows: np.ndarray | None = None,
) -> History:
    """Train ``model`` in place with mini-batch gradient descent; return the history.

    ``validation`` (x, y), or ``val_fraction`` of (x, y) held out by a seeded split, is
    evaluated after every epoch. With ``patience``, training stops once the validation loss
    has not improved for that many epochs, and the best epoch's weights are restored.
    Raises NonFiniteLossError as soon as a batch loss is NaN or infinite.

    ``on_batch(epoch, batch, batches, mean loss, accuracy so far)`` is called every
    ``BATCH_REPORT`` batches of an epoch (for a progress display; it costs nothing when None).

    ``checkpoint(state)`` is given the ``TrainState`` after every epoch but the last (weights,
    optimizer state, random generator states, history, early-stopping memory); ``resume=state``
    continues from it, and the result is bit-identical to a run that was never interrupted.

    ``rows`` (indices into x) trains on those rows only, without copying them out of x. Memory
    beyond x stays bounded whatever the number of rows (see ``train_epochs``); ``x`` may also be
    a row source (see ``take_rows``) that is never in memory whole.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be positive, got {epochs} and {batch_size}")
    y = np.asarray(y, np.intp)
    if validation is None and val_fraction > 0:
        rows, val_idx = split_validation(len(x), val_fraction, seed)
        validation = (x[val_idx], y[val_idx])
    rows = np.arange(len(x)) if rows is None else np.asarray(rows, np.intp)
    rng = np.random.default_rng([seed, 2])
    # Random generators by name (shuffles, then each dropout layer's), saved and restored by name.
    generators = {"shuffle": rng, **{f"layer{i}": layer.rng for i, layer in enumerate(model.layers)
                                     if hasattr(layer, "rng")}}
    state = TrainState()
    if resume is not None:
        resume.check(model, optimizer, generators, epochs)  # everything checked before anything is set
        resume.restore(model, optimizer, generators)
        state = replace(resume, history=list(resume.history),  # the caller's state is left as it was
                        best=None if resume.best is None else {k: v.copy() for k, v in resume.best.items()})
    stopped = False
    for record in train_epochs(model, x, y, rows, optimizer=optimizer, first=state.epoch, epochs=epochs,
                               batch_size=batch_size, schedule=schedule or Constant(optimizer.lr), rng=rng,
                               augment=augment, validation=validation, on_batch=on_batch):
        state.epoch += 1
        state.history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        if validation is not None:
            if record["val_loss"] < state.best_loss:
                state.best_loss, state.best_epoch, state.waited = record["val_loss"], state.epoch, 0
                if patience is not None:
                    state.best = {name: v.copy() for name, v, _ in model.parameters()}
            else:
                state.waited += 1
                if patience is not None and state.waited >= patience:
                    stopped = True
                    break
        if checkpoint is not None and state.epoch < epochs:
            checkpoint(state.capture(model, optimizer, generators))
    if stopped and state.best is not None:
        for name, value, _ in model.parameters():
            value[...] = state.best[name]
    return History(state.history, state.best_epoch, stopped)

