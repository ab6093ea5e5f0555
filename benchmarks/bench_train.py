"""Training speed of nn/ on the real MNIST, and a plain PyTorch loop for reference.

    python benchmarks/bench_train.py --hidden 256 --batch-size 128 --epochs 3 --json

Trains a 784-H-10 ReLU MLP with SGD + momentum and prints one JSON object with
``epoch_seconds`` (a list), ``steady_epoch_seconds`` (median of the epochs after the first),
``test_accuracy``, peak memory, the BLAS kernel in use and, when torch is importable, the same
figures for PyTorch on the CPU (``torch``). ``--no-torch`` skips the reference.
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

# Idle OpenBLAS workers spin for ~2^28 cycles by default; on 2 (hyper)threads that spinning
# slows the element-wise work between matrix products. Must be set before NumPy loads.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import numpy as np  # noqa: E402

import nn  # noqa: E402
from _data import load_mnist  # noqa: E402


def matmul_floor(hidden: int, batch: int, n: int) -> float:
    """Seconds per epoch of just the two large products (x·W1 and xᵀ·dz1)."""
    rng = np.random.default_rng(0)
    x = rng.random((batch, 784), dtype=np.float32)
    W = rng.random((784, hidden), dtype=np.float32)
    z = np.empty((batch, hidden), np.float32)
    dW = np.empty_like(W)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(n // batch):
            np.matmul(x, W, out=z)
            np.matmul(x.T, z, out=dW)
        best = min(best, time.perf_counter() - t)
    return best


def bench_numpy(data, hidden, batch_size, epochs, lr, momentum, seed):
    (x, y), (xt, yt) = data
    model = nn.Sequential(nn.Dense(784, hidden), nn.ReLU(), nn.Dense(hidden, 10), seed=seed)
    opt = nn.SGD(model.parameters(), lr=lr, momentum=momentum)
    history = nn.fit(model, x, y, optimizer=opt, epochs=epochs, batch_size=batch_size, seed=seed)
    _, acc = nn.evaluate(model, xt, yt)
    seconds = history.column("seconds")
    return {"epoch_seconds": [round(s, 4) for s in seconds],
            "steady_epoch_seconds": round(statistics.median(seconds[1:] or seconds), 4),
            "test_accuracy": round(acc, 4)}


def bench_torch(data, hidden, batch_size, epochs, lr, momentum, seed):
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count())
    (x, y), (xt, yt) = data
    x, y, xt, yt = map(torch.from_numpy, (x, y, xt, yt))
    model = torch.nn.Sequential(torch.nn.Linear(784, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    loss_fn = torch.nn.CrossEntropyLoss()
    seconds = []
    for _ in range(epochs):
        t = time.perf_counter()
        perm = torch.randperm(len(x))
        xs, ys = x[perm], y[perm]
        for i in range(0, len(x), batch_size):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xs[i:i + batch_size]), ys[i:i + batch_size])
            loss.backward()
            opt.step()
        seconds.append(time.perf_counter() - t)
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    return {"version": torch.__version__, "threads": torch.get_num_threads(),
            "epoch_seconds": [round(s, 4) for s in seconds],
            "steady_epoch_seconds": round(statistics.median(seconds[1:] or seconds), 4),
            "test_accuracy": round(acc, 4)}


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
    result = bench_numpy(data, *cfg)
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["matmul_floor_seconds"] = round(matmul_floor(args.hidden, args.batch_size, len(data[0][1])), 4)
    result["blas"] = [{k: i.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                      for i in threadpool_info() if i.get("user_api") == "blas"]
    result["env"] = {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_THREAD_TIMEOUT")}
    result["config"] = dict(zip(("hidden", "batch_size", "epochs", "lr", "momentum", "seed"), cfg))
    result["cores"] = os.cpu_count()
    if not args.no_torch:
        try:
            result["torch"] = bench_torch(data, *cfg)
        except ImportError:
            result["torch"] = None
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
