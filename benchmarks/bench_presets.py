"""Accuracy and training time of a preset on the real MNIST (train → test).

    python benchmarks/bench_presets.py --preset default [--json]

Trains exactly as the pipeline does (seeded validation hold-out from train), then evaluates
on the 10,000 test images. Prints the per-epoch history and one JSON summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import nn  # noqa: E402
from _data import load_mnist  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="default", choices=sorted(nn.presets.PRESETS))
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--json", action="store_true", help="print only the JSON summary")
    args = p.parse_args()
    hp = nn.presets.get(args.preset, epochs=args.epochs, seed=args.seed)
    (x, y), (xt, yt) = load_mnist()

    def show(r):
        if not args.json:
            print(f"epoch {r['epoch']:3d}  lr {r['lr']:.4f}  train loss {r['train_loss']:.4f} "
                  f"acc {r['train_accuracy']:.4f}  val loss {r.get('val_loss', float('nan')):.4f} "
                  f"acc {r.get('val_accuracy', float('nan')):.4f}  {r['seconds']:.1f}s", flush=True)

    t = time.perf_counter()
    model, history = nn.presets.train(hp, x, y, on_epoch=show)
    train_seconds = time.perf_counter() - t
    loss, acc = nn.evaluate(model, xt, yt)
    print(json.dumps({"preset": args.preset, "hyperparameters": hp.to_dict(), "test_accuracy": round(acc, 4),
                      "test_loss": round(loss, 4), "train_seconds": round(train_seconds, 1),
                      "epochs_run": len(history.epochs), "cores": os.cpu_count()}))


if __name__ == "__main__":
    main()
