"""Wall time of a cold ingest from a local mirror, and of a cached rerun.

    python benchmarks/bench_ingest.py [--json]

Prefect's own start-up (the ephemeral API server, or the connection to PREFECT_API_URL) is
measured separately with an empty flow and reported apart, as the targets exclude it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import flows  # noqa: F401,E402  (telemetry off)

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        # A throwaway Prefect home and result store (before Prefect loads): a truly cold cache.
        os.environ["PREFECT_HOME"] = str(Path(tmp) / "prefect")
        os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(Path(tmp) / "results")
        os.environ.pop("PREFECT_API_URL", None)
        result = measure(str(Path(tmp) / "home"))
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:26s} {v}")


def measure(home: str) -> dict:
    from _mirror import local_mirror
    from prefect import flow

    from flows.ingest import ingest

    @flow
    def empty():
        return None

    with local_mirror() as mirror:
        t = time.perf_counter()
        empty()
        startup = time.perf_counter() - t
        t = time.perf_counter()
        empty()
        empty_flow = time.perf_counter() - t
        t = time.perf_counter()
        refs = ingest(home=home, mirrors=[mirror])
        cold = time.perf_counter() - t
        t = time.perf_counter()
        ingest(home=home, mirrors=[mirror])
        cached = time.perf_counter() - t
    return {
        "prefect_startup_seconds": round(startup, 2),
        "empty_flow_seconds": round(empty_flow, 3),
        "cold_ingest_seconds": round(cold, 2),
        "cached_rerun_seconds": round(cached, 2),
        "rows": {split: ref.rows for split, ref in refs.items()},
        "cores": os.cpu_count(),
    }


if __name__ == "__main__":
    main()
