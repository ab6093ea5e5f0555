"""Does training cost grow linearly with the data, in bounded memory?

    python benchmarks/bench_scale.py [--rows 60000 250000 1000000] [--preset default] [--json]

For each size, a synthetic train split is written through the normal shard writer
(``storage.shards.write_split``) from shifted copies of the real MNIST training images (±2 px,
each shift a whole copy; labels kept), then a fresh process opens it the way `digitflow train`
does (``storage.rowstore``: a verified uint8 row file built from the shards, read row by row) and
trains one epoch of the preset. Printed per size: rows, row-file build seconds, epoch seconds,
microseconds per row, and the process's peak RSS. The splits are kept in --workdir (default: a
temp dir) so a rerun skips writing them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
MNIST = Path(os.environ.get("DIGITFLOW_MNIST_DIR", ROOT.parent / "shared" / "mnist"))


def synthetic_split(rows: int, out: Path) -> Path:
    """``out/train``: ``rows`` images, shifted copies of the MNIST training set, as shards."""
    import gzip

    from storage import shards

    split = out / "train"
    if (split / "manifest.json").is_file():
        return split
    with gzip.open(MNIST / "train-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(MNIST / "train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    shifts = [(0, 0)] + [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if (dy, dx) != (0, 0)]
    out.mkdir(parents=True, exist_ok=True)
    img_path, lab_path = out / "images-idx3-ubyte", out / "labels-idx1-ubyte"
    with open(img_path, "wb") as fi, open(lab_path, "wb") as fl:
        fi.write(np.array([0x803, rows, 28, 28], ">u4").tobytes())
        fl.write(np.array([0x801, rows], ">u4").tobytes())
        done = 0
        for dy, dx in shifts:
            take = min(len(images), rows - done)
            if take <= 0:
                break
            fi.write(np.roll(images[:take], (dy, dx), axis=(1, 2)).tobytes())
            fl.write(labels[:take].tobytes())
            done += take
    if done < rows:
        raise SystemExit(f"at most {len(shifts) * len(images)} rows from {len(shifts)} shifts")
    shards.write_split(img_path, lab_path, split, split="train", rows_per_shard=10_000)
    img_path.unlink()
    lab_path.unlink()
    return split


def train_one_epoch(split: Path, preset: str) -> dict:
    """(In a fresh process.) Open the split as `digitflow train` does and train one epoch."""
    import nn
    from storage.atomic import sha256_file
    from storage.rowstore import open_rows

    t0 = time.perf_counter()
    x, y, _ = open_rows(split, sha256_file(split / "manifest.json"))
    opened = time.perf_counter() - t0
    hp = nn.presets.get(preset, epochs=1)
    _, history = nn.presets.train(hp, x, y)
    epoch = history.epochs[0]["seconds"]
    from threadpoolctl import threadpool_info

    return {"rows": len(y), "open_seconds": round(opened, 2), "epoch_seconds": round(epoch, 2),
            "us_per_row": round(1e6 * epoch / len(y), 2), "val_accuracy": round(history.epochs[0]["val_accuracy"], 4),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "blas": sorted({i.get("internal_api", "?") + ":" + str(i.get("architecture")) for i in threadpool_info()})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[60_000, 250_000, 1_000_000])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--workdir")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--train", help=argparse.SUPPRESS)  # the fresh process: a split folder
    args = ap.parse_args()
    if args.train:
        print(json.dumps(train_one_epoch(Path(args.train), args.preset)))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-scale-"))
    results = []
    for rows in args.rows:
        t0 = time.perf_counter()
        split = synthetic_split(rows, work / f"rows-{rows}")
        written = time.perf_counter() - t0
        out = subprocess.run([sys.executable, __file__, "--train", str(split), "--preset", args.preset],
                             capture_output=True, text=True, check=True)
        results.append({**json.loads(out.stdout.strip().splitlines()[-1]), "write_seconds": round(written, 1)})
    base = results[0]["us_per_row"]
    for r in results:
        r["per_row_vs_first"] = round(r["us_per_row"] / base, 3)
    if args.json:
        print(json.dumps({"preset": args.preset, "results": results}, indent=2))
        return
    for r in results:
        print(f"{r['rows']:>9,} rows: epoch {r['epoch_seconds']:7.2f} s ({r['us_per_row']:.2f} µs/row, "
              f"×{r['per_row_vs_first']:.3f}), open {r['open_seconds']:.2f} s, peak RSS {r['peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
