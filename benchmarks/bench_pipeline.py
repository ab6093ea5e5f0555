"""Wall time of `digitflow run` cold (empty home) and warm (nothing changed), and where the
warm run's time goes.

    python benchmarks/bench_pipeline.py [--preset default] [--api-url URL] [--warm-runs 3] [--json]

Each run is a fresh `digitflow` process against a local HTTP mirror over ../shared/mnist, so
the figures include interpreter and Prefect start-up. Without --api-url, Prefect runs in its
ephemeral mode (a temporary API server per process, with a throwaway PREFECT_HOME); with it,
runs report to that server (e.g. one started by `prefect server start`).

The breakdown of a warm run (best of --warm-runs) is measured piece by piece, each in a fresh
process where it matters:
- imports: `import flows.cli, flows.pipeline` (the CLI, Prefect, NumPy, pyarrow);
- prefect_startup and prefect_flow_and_task_overhead: a fresh process runs three empty nested
  flows (the pipeline's shape: retrain → ingest, retrain → publish) with 16 trivial tasks twice;
  the second call (every task cached) is Prefect's own per-flow and per-task overhead, the
  difference to the first is its start-up (ephemeral: its temporary API server);
- verification: what a warm run re-checks on use, in-process: hashing the four raw files,
  verifying both splits' shards, the trained model's and the published version's weights;
- prefect_client_backoff_after_server_busy: the seconds the Prefect client slept before retrying
  requests the server answered with a retryable status (Prefect's SQLite server answers 503,
  "database is locked", when a request's write collides with its own recording of the run's
  events; the client then waits 2**n s, jittered);
- the rest: digitflow's own flow bodies beyond those (cache-key computation, reads, API calls).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _mirror import local_mirror  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


BACKOFF = re.compile(r"retryable status code (\d+)\. Another attempt will be made in ([0-9.]+)s")


def run(home: str, mirror: str, preset: str, env: dict) -> tuple[float, dict, float]:
    """(seconds, the run's JSON summary, seconds the Prefect client slept before retrying
    requests the server answered with a retryable status, e.g. 503 for SQLite's "database is
    locked") of one fresh `digitflow run` process."""
    env = {**env, "PREFECT_LOGGING_LOGGERS_PREFECT_CLIENT_LEVEL": "DEBUG"}  # its retry lines
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--mirror", mirror, "--home", home,
                          "--preset", preset, "--json", "--verbose"], cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if out.returncode != 0:
        sys.exit(f"digitflow run failed:\n{out.stdout}\n{out.stderr}")
    summary = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    return seconds, summary, sum(float(m.group(2)) for m in BACKOFF.finditer(out.stderr))


FLOOR_SCRIPT = """
import logging, re, time
t0 = time.perf_counter()
import tasks.prefect_compat  # the same adjustment to Prefect's engine as digitflow's flows
from prefect import flow, task
from prefect.cache_policies import INPUTS
t1 = time.perf_counter()

backoffs = []  # seconds the client slept before retrying a request the server called busy

class Backoff(logging.Handler):
    def emit(self, record):
        if m := re.search(r"Another attempt will be made in ([0-9.]+)s", record.getMessage()):
            backoffs.append(float(m.group(1)))

logging.getLogger("prefect.client").setLevel(logging.DEBUG)
logging.getLogger("prefect.client").addHandler(Backoff())

@task(cache_policy=INPUTS)
def work(i):
    return i

@flow
def inner(n):
    return [work(i) for i in range(n)]

@flow
def outer():
    inner(12)
    [work(100 + i) for i in range(2)]
    inner(2)

outer()  # the first call also starts Prefect (ephemeral: its temporary API server)
t2, b2 = time.perf_counter(), sum(backoffs)
outer()  # the second call: every task cached, as in a warm run
t3, b3 = time.perf_counter(), sum(backoffs)
print(t1 - t0, (t2 - t1) - (t3 - t2), t3 - t2, b3 - b2)
"""


def prefect_floor(env: dict) -> tuple[float, float, float, float]:
    """(Prefect import seconds, start-up seconds, seconds of the pipeline-shaped empty flows with
    every task cached, the client's back-off seconds within those) in a fresh process. Start-up =
    first call − second call."""
    out = subprocess.run([sys.executable, "-c", FLOOR_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"the Prefect floor script failed:\n{out.stderr}")
    imports, startup, flows, backoff = map(float, out.stdout.split()[-4:])
    return imports, startup, flows, backoff


def imports_seconds(env: dict) -> float:
    code = "import time; t = time.perf_counter(); import flows.cli, flows.pipeline; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    return float(out.stdout.split()[-1])


def verification_seconds(home: str) -> dict:
    """What a warm run re-verifies on use, timed in this process (page cache warm)."""
    sys.path.insert(0, str(REPO))
    from storage.download import is_verified
    from storage.home import Home
    from storage.mnist import FILES
    from storage.registry import Registry
    from storage.shards import verify_split

    h = Home(home)
    t = time.perf_counter()
    assert all(is_verified(f, h.raw / f.idx_name) for f in FILES.values())
    raw = time.perf_counter() - t
    t = time.perf_counter()
    for split in ("train", "test"):
        verify_split(h.split(split))
    shards = time.perf_counter() - t
    t = time.perf_counter()
    reg = Registry(home)
    reg.load_model(reg.aliases().latest)
    model = (time.perf_counter() - t) * 2  # the trained folder and the published version
    return {"hash_raw_files": round(raw, 3), "verify_shards": round(shards, 3), "verify_model_weights": round(model, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="default")
    p.add_argument("--api-url", help="report to this Prefect server instead of ephemeral mode")
    p.add_argument("--warm-runs", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp, local_mirror() as mirror:
        env = {**os.environ, "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        if args.api_url:
            env["PREFECT_API_URL"] = args.api_url
        else:
            env.pop("PREFECT_API_URL", None)
            env["DIGITFLOW_EPHEMERAL"] = "1"  # Prefect's temporary server per process, as documented above
            env["PREFECT_HOME"] = str(Path(tmp) / "prefect")
        env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(Path(tmp) / "results")
        home = str(Path(tmp) / "home")
        cold, first, _ = run(home, mirror, args.preset, env)
        warms = [run(home, mirror, args.preset, env) for _ in range(args.warm_runs)]
        warm, second, backoff = min(warms, key=lambda w: w[0])
        imports = imports_seconds(env)
        prefect_imports, startup, flows, floor_backoff = prefect_floor(env)
        checks = verification_seconds(home)
    rest = warm - imports - startup - flows - backoff - sum(checks.values())
    result = {"preset": args.preset, "prefect": "server " + args.api_url if args.api_url else "ephemeral",
              "cold_seconds": round(cold, 1), "warm_seconds": round(warm, 1),
              "warm_runs_seconds": [round(w[0], 1) for w in warms],
              "warm_runs_server_busy_backoff_seconds": [round(w[2], 1) for w in warms],
              "warm_breakdown_seconds": {
                  "imports": round(imports, 2),
                  "prefect_startup": round(startup, 2),
                  "prefect_flow_and_task_overhead_3_flows_16_cached_tasks": round(flows, 2),
                  "prefect_client_backoff_after_server_busy": round(backoff, 2),
                  **checks,
                  "digitflow_flow_bodies_and_rest": round(rest, 2)},
              "prefect_import_seconds": round(prefect_imports, 2),
              "prefect_floor_backoff_seconds (within its overhead figure)": round(floor_backoff, 2),
              "test_accuracy": round(first["test_accuracy"], 4), "version": first["version"],
              "warm_created_new_version": any(w[1]["created"] for w in warms), "cores": os.cpu_count()}
    print(json.dumps(result) if args.json else "\n".join(f"{k:26s} {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
