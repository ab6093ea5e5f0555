"""Wall time of `digitflow run` cold (empty home) and warm (nothing changed).

    python benchmarks/bench_pipeline.py [--preset default] [--api-url URL] [--json]

Each run is a fresh `digitflow` process against a local HTTP mirror over ../shared/mnist, so
the figures include interpreter and Prefect start-up. Without --api-url, Prefect runs in its
ephemeral mode (a temporary API server per process, with a throwaway PREFECT_HOME); with it,
runs report to that server (e.g. one started by `prefect server start`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _mirror import local_mirror  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run(home: str, mirror: str, preset: str, env: dict) -> tuple[float, dict]:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--mirror", mirror, "--home", home,
                          "--preset", preset, "--json"], cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if out.returncode != 0:
        sys.exit(f"digitflow run failed:\n{out.stdout}\n{out.stderr}")
    summary = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    return seconds, summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="default")
    p.add_argument("--api-url", help="report to this Prefect server instead of ephemeral mode")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp, local_mirror() as mirror:
        env = {**os.environ, "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        if args.api_url:
            env["PREFECT_API_URL"] = args.api_url
        else:
            env.pop("PREFECT_API_URL", None)
            env["PREFECT_HOME"] = str(Path(tmp) / "prefect")
        env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(Path(tmp) / "results")
        home = str(Path(tmp) / "home")
        cold, first = run(home, mirror, args.preset, env)
        warm, second = run(home, mirror, args.preset, env)
    result = {"preset": args.preset, "prefect": "server " + args.api_url if args.api_url else "ephemeral",
              "cold_seconds": round(cold, 1), "warm_seconds": round(warm, 1),
              "test_accuracy": round(first["test_accuracy"], 4), "version": first["version"],
              "warm_created_new_version": second["created"], "cores": os.cpu_count()}
    print(json.dumps(result) if args.json else "\n".join(f"{k:26s} {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
