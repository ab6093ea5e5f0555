"""The training loop: seeded shuffles, mini-batches, validation, early stopping, history.

Inputs are given as the model consumes them *before* its ``preprocessing`` (for MNIST:
pixels/255), so augmentation works on images and preprocessing is applied once per epoch.
The hot loop allocates nothing large: one shuffle-gather per epoch into a preallocated
buffer, then views of it per batch, and every layer writes into its own reused buffers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

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
    checkpoint: Callable[[dict], None] | None = None,
    resume: dict | None = None,
    rows: np.ndarray | None = None,
) -> History:
    """Train ``model`` in place with mini-batch gradient descent; return the history.

    ``validation`` (x, y), or ``val_fraction`` of (x, y) held out by a seeded split, is
    evaluated after every epoch. With ``patience``, training stops once the validation loss
    has not improved for that many epochs, and the best epoch's weights are restored.
    Raises NonFiniteLossError as soon as a batch loss is NaN or infinite.

    ``on_batch(epoch, batch, batches, mean loss, accuracy so far)`` is called every
    ``BATCH_REPORT`` batches of an epoch (for a progress display; it costs nothing when None).

    ``checkpoint(state)`` is called after every epoch with everything needed to continue
    (weights, optimizer state, random generator states, history); ``resume=state`` continues
    from it, and the result is bit-identical to a run that was never interrupted.

    ``rows`` (indices into x) trains on those rows only, without copying them out of x. Each
    epoch's shuffled rows are gathered, augmented and preprocessed a chunk (~8192 rows, whole
    batches) at a time, so memory beyond x stays bounded whatever the number of rows. ``x`` may
    also be a row source (see ``take_rows``) that is never in memory whole.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be positive, got {epochs} and {batch_size}")
    y = np.asarray(y, np.intp)
    if validation is None and val_fraction > 0:
        train_idx, val_idx = split_validation(len(x), val_fraction, seed)
        validation = (x[val_idx], y[val_idx])
        rows = train_idx
    rows = np.arange(len(x)) if rows is None else np.asarray(rows, np.intp)
    n = len(rows)
    schedule = schedule or Constant(optimizer.lr)
    rng = np.random.default_rng([seed, 2])
    loss_fn = SoftmaxCrossEntropy()
    chunk = batch_size * max(1, CHUNK_ROWS // batch_size)  # whole batches: the same batches as one big gather
    xs = np.empty((min(n, chunk), x.shape[1]), model.dtype)  # a chunk of this epoch's shuffled inputs
    ys = np.empty(min(n, chunk), np.intp)
    identity = model.preprocessing == {"mean": 0.0, "std": 1.0}
    history = History()
    best_loss, best_params, waited = math.inf, None, 0
    # Random generators by name (shuffles, then each dropout layer's), saved and restored by name.
    generators = {"shuffle": rng, **{f"layer{i}": layer.rng for i, layer in enumerate(model.layers)
                                     if hasattr(layer, "rng")}}
    first = 0
    if resume is not None:
        check_resume(resume, model, optimizer, generators, epochs)  # everything checked before anything is set
        first, best_loss, waited = resume["epoch"], resume["best_loss"], resume["waited"]
        history.epochs, history.best_epoch = list(resume["history"]), resume["best_epoch"]
        arrays = resume["arrays"]
        for name, value, _ in model.parameters():
            value[...] = arrays[f"param.{name}"]
        optimizer.load_state({k[len("optim."):]: v for k, v in arrays.items() if k.startswith("optim.")})
        if any(k.startswith("best.") for k in arrays):
            best_params = [arrays[f"best.{name}"].copy() for name, _, _ in model.parameters()]
        for name, generator in generators.items():
            generator.bit_generator.state = resume["generators"][name]

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
                xb, yb = xc[start:start + batch_size], yc[start:start + batch_size]
                logits = model.forward(xb, training=True)
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
        history.epochs.append(record)
        if on_epoch is not None:
            on_epoch(record)
        if validation is not None:
            if record["val_loss"] < best_loss:
                best_loss, history.best_epoch, waited = record["val_loss"], epoch + 1, 0
                if patience is not None:
                    best_params = [v.copy() for _, v, _ in model.parameters()]
            else:
                waited += 1
                if patience is not None and waited >= patience:
                    history.stopped_early = True
                    break
        if checkpoint is not None and epoch + 1 < epochs:
            arrays = {f"param.{name}": value for name, value, _ in model.parameters()}
            arrays.update({f"optim.{k}": v for k, v in optimizer.state().items()})
            if best_params is not None:
                arrays.update({f"best.{name}": b for (name, _, _), b in zip(model.parameters(), best_params)})
            checkpoint({"epoch": epoch + 1, "best_loss": best_loss, "waited": waited, "history": history.epochs,
                        "best_epoch": history.best_epoch,
                        "generators": {name: g.bit_generator.state for name, g in generators.items()},
                        "arrays": arrays})
    if history.stopped_early and best_params is not None:
        for (_, value, _), best in zip(model.parameters(), best_params):
            value[...] = best
    return history


def check_resume(state, model: Sequential, optimizer: Optimizer, generators: dict, epochs: int) -> None:
    """Raise CheckpointMismatch unless ``state`` is exactly what this run's ``checkpoint`` would
    write: the same array names, each of the shape and dtype of the array it is copied into,
    counters in range, a history as long as its epoch, and generator states of the right kind.
    Checked against the model and optimizer built from the run's own hyperparameters, which
    the checkpoint file cannot rewrite."""
    def bad(why: str):
        raise CheckpointMismatch(f"checkpoint does not fit this run: {why}")

    if not isinstance(state, dict):
        bad("not a training state")
    epoch, arrays = state.get("epoch"), state.get("arrays")
    if type(epoch) is not int or not 1 <= epoch < epochs:
        bad(f"epoch {epoch!r} is not in 1..{epochs - 1}")
    if type(state.get("waited")) is not int or not 0 <= state["waited"] <= epoch:
        bad(f"waited {state.get('waited')!r}")
    if type(state.get("best_loss")) not in (int, float):
        bad(f"best_loss {state.get('best_loss')!r}")
    history, best = state.get("history"), state.get("best_epoch")
    if not (isinstance(history, list) and len(history) == epoch and all(isinstance(r, dict) for r in history)):
        bad(f"a history of {len(history) if isinstance(history, list) else 'no'} epochs at epoch {epoch}")
    if best is not None and (type(best) is not int or not 1 <= best <= epoch):
        bad(f"best_epoch {best!r}")
    expected = {f"param.{name}": value for name, value, _ in model.parameters()}
    expected.update({f"optim.{k}": v for k, v in optimizer.state().items()})
    if not isinstance(arrays, dict):
        bad("no arrays")
    best_arrays = {f"best.{name}": value for name, value, _ in model.parameters()}
    names = set(arrays)
    if names != set(expected) and names != set(expected) | set(best_arrays):
        missing, extra = sorted(set(expected) - names), sorted(names - set(expected) - set(best_arrays))
        bad(f"arrays missing {missing[:3]}" if missing else f"unexpected arrays {extra[:3] or sorted(best_arrays)[:3]}")
    for name, got in arrays.items():
        want = {**expected, **best_arrays}[name]
        if not isinstance(got, np.ndarray) or got.shape != np.shape(want) or got.dtype != np.asarray(want).dtype:
            bad(f"{name} is {getattr(got, 'dtype', type(got).__name__)} {getattr(got, 'shape', '')}, this run's is "
                f"{np.asarray(want).dtype} {np.shape(want)}")
        if got.dtype.kind == "f" and not np.isfinite(got).all():
            bad(f"{name} holds NaN or infinite values")
    saved = state.get("generators")
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
