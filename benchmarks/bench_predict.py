"""Batch prediction throughput from an IDX file, as `digitflow predict` does it.

    python benchmarks/bench_predict.py [--hidden 512] [--json]

Builds a 784-H-10 network (prediction speed does not depend on the weights' values), reads the
10,000 real test images from ../shared/mnist, and times predict_proba over them (best of 5).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import nn  # noqa: E402
from _mirror import MNIST_DIR  # noqa: E402
from serving.images import read_idx_images  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t10k-images-idx3-ubyte"
        path.write_bytes(gzip.decompress((MNIST_DIR / "t10k-images-idx3-ubyte.gz").read_bytes()))
        t = time.perf_counter()
        x = read_idx_images(path)
        read_seconds = time.perf_counter() - t
    model = nn.presets.build(nn.presets.get("default", hidden=[args.hidden]))
    model.predict_proba(x)
    best = min(_time(lambda: model.predict_proba(x)) for _ in range(5))
    result = {"hidden": args.hidden, "images": len(x), "images_per_second": round(len(x) / best),
              "predict_seconds": round(best, 4), "read_idx_seconds": round(read_seconds, 4), "cores": os.cpu_count()}
    print(json.dumps(result) if args.json else "\n".join(f"{k:20s} {v}" for k, v in result.items()))


def _time(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
