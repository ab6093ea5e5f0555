"""Accuracy, training time and peak memory of the presets on the real MNIST (train → test).

    python benchmarks/bench_presets.py --preset default [--json]
    python benchmarks/bench_presets.py --preset all --json      # every preset, each in a fresh process

Trains exactly as the pipeline does (seeded validation hold-out from train, rows read in place),
then evaluates on the 10,000 test images. Prints the per-epoch history and one JSON summary
line: test accuracy, training seconds, and the process's peak RSS (which includes the 60,000
training and 10,000 test images as float32, 219 MiB together) and the BLAS kernel that ran.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import nn  # noqa: E402
from _data import load_mnist  # noqa: E402

TARGETS = {"default": (0.980, 15), "balanced": (0.986, 60), "best": (0.993, 900), "fast": (None, None)}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_one(name: str, epochs: int | None, seed: int | None, quiet: bool) -> dict:
    from threadpoolctl import threadpool_info

    hp = nn.presets.get(name, epochs=epochs, seed=seed)
    (x, y), (xt, yt) = load_mnist()

    def show(r):
        if not quiet:
            print(f"epoch {r['epoch']:3d}  lr {r['lr']:.4f}  train loss {r['train_loss']:.4f} "
                  f"acc {r['train_accuracy']:.4f}  val loss {r.get('val_loss', float('nan')):.4f} "
                  f"acc {r.get('val_accuracy', float('nan')):.4f}  {r['seconds']:.1f}s", flush=True)

    t = time.perf_counter()
    model, history = nn.presets.train(hp, x, y, on_epoch=show)
    train_seconds = time.perf_counter() - t
    loss, acc = nn.evaluate(model, xt, yt)
    accuracy_target, seconds_target = TARGETS.get(name, (None, None))
    return {"preset": name, "tuned_on": nn.presets.TUNED_ON.get(name), "hyperparameters": hp.to_dict(),
            "test_accuracy": round(acc, 4), "test_loss": round(loss, 4), "train_seconds": round(train_seconds, 1),
            "peak_rss_mib": round(peak_rss_mib()), "epochs_run": len(history.epochs),
            "target": {"accuracy": accuracy_target, "seconds": seconds_target},
            "blas": [f"{i.get('internal_api')} {i.get('architecture')} {i.get('num_threads')} threads"
                     for i in threadpool_info() if i.get("user_api") == "blas"],
            "cores": os.cpu_count()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="default", choices=sorted(nn.presets.PRESETS) + ["all"])
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--json", action="store_true", help="print only the JSON summary")
    args = p.parse_args()
    if args.preset != "all":
        print(json.dumps(run_one(args.preset, args.epochs, args.seed, args.json)))
        return
    results = []
    for name in ("fast", "default", "balanced", "best"):
        out = subprocess.run([sys.executable, __file__, "--preset", name, "--json"], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{name} failed:\n{out.stderr}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        if not args.json:
            r = results[-1]
            print(f"{name:9s} {r['test_accuracy']:.4f}  {r['train_seconds']:7.1f} s  {r['peak_rss_mib']:5d} MiB",
                  flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
