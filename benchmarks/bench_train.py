"""Training speed of nn/ on the real MNIST, and a plain PyTorch loop for reference.

    python benchmarks/bench_train.py --hidden 256 --batch-size 128 --epochs 6 --json

Trains a 784-H-10 ReLU MLP with SGD + momentum and prints one JSON object with
``epoch_seconds`` (a list), ``steady_epoch_seconds`` (median of the epochs after the first),
``test_accuracy``, the BLAS kernel in use, and, measured in alternating rounds with nn/'s epochs:
``matmul_floor_seconds`` (one epoch of just the two large products) and, when torch is
importable, the same loop in PyTorch on the CPU (``torch``). ``times_floor`` and
``speedup_vs_torch`` are medians of the per-round ratios. ``--no-torch`` skips the reference.
Peak RSS includes PyTorch when it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import nn  # noqa: E402  (before NumPy: it sets OpenBLAS's thread timeout)
import numpy as np  # noqa: E402
from _data import load_mnist  # noqa: E402


def floor_epoch(hidden: int, batch: int, n: int):
    """A function timing one epoch of just the two large products (x·W1 and xᵀ·dz1)."""
    rng = np.random.default_rng(0)
    x = rng.random((batch, 784), dtype=np.float32)
    W = rng.random((784, hidden), dtype=np.float32)
    z = np.empty((batch, hidden), np.float32)
    dW = np.empty_like(W)

    def epoch() -> float:
        t = time.perf_counter()
        for _ in range(n // batch):
            np.matmul(x, W, out=z)
            np.matmul(x.T, z, out=dW)
        return time.perf_counter() - t
    return epoch


def torch_epochs(data, hidden, batch_size, lr, momentum, seed):
    """(epoch function, accuracy function) for the same model and loop in PyTorch."""
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count())
    (x, y), (xt, yt) = data
    x, y, xt, yt = map(torch.from_numpy, (x, y, xt, yt))
    model = torch.nn.Sequential(torch.nn.Linear(784, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    loss_fn = torch.nn.CrossEntropyLoss()

    def epoch() -> float:
        t = time.perf_counter()
        perm = torch.randperm(len(x))
        xs, ys = x[perm], y[perm]
        for i in range(0, len(x), batch_size):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xs[i:i + batch_size]), ys[i:i + batch_size])
            loss.backward()
            opt.step()
        return time.perf_counter() - t

    def accuracy() -> float:
        with torch.no_grad():
            return (model(xt).argmax(1) == yt).float().mean().item()
    return epoch, accuracy, torch.__version__, torch.get_num_threads()


def steady(values: list[float]) -> float:
    """Median of the rounds after the first (which pays for warm-up)."""
    return round(statistics.median(values[1:] or values), 4)


def bench(data, hidden, batch_size, epochs, lr, momentum, seed, with_torch: bool) -> dict:
    """Train nn/ for ``epochs``; after each of its epochs (outside its timing) run one epoch of
    the PyTorch loop and one of the matmul floor. Rounds alternate, so on a shared machine whose
    speed drifts each ratio compares figures measured moments apart."""
    (x, y), (xt, yt) = data
    floor = floor_epoch(hidden, batch_size, len(y))
    ref = None
    if with_torch:
        try:
            ref = torch_epochs(data, hidden, batch_size, lr, momentum, seed)
        except ImportError:
            pass
    floor_s, torch_s = [], []

    def between(record: dict) -> None:
        if ref is not None:
            torch_s.append(ref[0]())
            time.sleep(0.3)  # let PyTorch's OpenMP workers stop spinning before nn/ goes on
        floor_s.append(floor())

    model = nn.Sequential(nn.Dense(784, hidden), nn.ReLU(), nn.Dense(hidden, 10), seed=seed)
    opt = nn.SGD(model.parameters(), lr=lr, momentum=momentum)
    history = nn.fit(model, x, y, optimizer=opt, epochs=epochs, batch_size=batch_size, seed=seed, on_epoch=between)
    _, acc = nn.evaluate(model, xt, yt)
    seconds = history.column("seconds")
    result = {"epoch_seconds": [round(s, 4) for s in seconds], "steady_epoch_seconds": steady(seconds),
              "test_accuracy": round(acc, 4),
              "matmul_floor_epoch_seconds": [round(s, 4) for s in floor_s],
              "matmul_floor_seconds": steady(floor_s),
              "times_floor": steady([a / b for a, b in zip(seconds, floor_s)])}
    if ref is not None:
        result["torch"] = {"version": ref[2], "threads": ref[3], "epoch_seconds": [round(s, 4) for s in torch_s],
                           "steady_epoch_seconds": steady(torch_s), "test_accuracy": round(ref[1](), 4)}
        result["speedup_vs_torch"] = steady([b / a for a, b in zip(seconds, torch_s)])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    args = p.parse_args()

    from threadpoolctl import threadpool_info

    data = load_mnist()
    cfg = (args.hidden, args.batch_size, args.epochs, args.lr, args.momentum, args.seed)
    result = bench(data, *cfg, with_torch=not args.no_torch)
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["blas"] = [{k: i.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                      for i in threadpool_info() if i.get("user_api") == "blas"]
    result["env"] = {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_THREAD_TIMEOUT")}
    result["config"] = dict(zip(("hidden", "batch_size", "epochs", "lr", "momentum", "seed"), cfg))
    result["cores"] = os.cpu_count()
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
