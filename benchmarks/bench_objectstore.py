"""Local disk vs object storage, in one run: cold ingest, cold run, warm run (and, for the
bucket, a warm run from a second "machine" with an empty working copy and its own Prefect
state), with the bytes that crossed the wire.

    python benchmarks/bench_objectstore.py [--json] [--preset fast]

The object store is moto_server on 127.0.0.1 (or $DIGITFLOW_TEST_S3_ENDPOINT) behind a counting
proxy; the MNIST mirror is ../shared/mnist served on 127.0.0.1. Every step is a fresh
`digitflow` process in Prefect's ephemeral mode, as a user would type it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from _mirror import local_mirror  # noqa: E402
from tests.store_helpers import FaultProxy, machine, s3_endpoint, unique_prefix  # noqa: E402

DIGITFLOW = str(Path(sys.executable).with_name("digitflow"))


def step(work: Path, env: dict, *args) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([DIGITFLOW, *args], cwd=work, env=env, stdout=subprocess.DEVNULL,
                       stderr=open(work / "stderr.txt", "w"))
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"digitflow {' '.join(args)} failed:\n" + (work / "stderr.txt").read_text()[-3000:])
    return round(seconds, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--preset", default="fast")
    args = ap.parse_args()
    results = {"preset": args.preset}
    with tempfile.TemporaryDirectory() as tmp, local_mirror() as mirror, s3_endpoint(Path(tmp)) as (endpoint, bucket, env):
        tmp = Path(tmp)
        proxy = FaultProxy(endpoint)
        env = {**env, "AWS_ENDPOINT_URL": proxy.url}
        homes = {"local": None, "s3": f"s3://{bucket}/{unique_prefix('bench')}"}
        for kind, home in homes.items():
            work, e = machine(tmp, f"{kind}-a", env)
            home = home or str(work.parent / "home")
            row = {}
            for name, cmd in (("cold_ingest", ["ingest"]), ("cold_run", ["run", "--preset", args.preset]),
                              ("warm_run", ["run", "--preset", args.preset])):
                proxy.reset_counts()
                row[name] = {"seconds": step(work, e, *cmd, "--home", home, "--mirror", mirror)}
                if kind == "s3":
                    row[name].update(bytes_up=proxy.bytes_up, bytes_down=proxy.bytes_down, requests=proxy.requests)
            if kind == "s3":  # another machine: empty working copy, its own Prefect state
                work_b, e_b = machine(tmp, "s3-b", env)
                proxy.reset_counts()
                row["warm_run_other_machine"] = {"seconds": step(work_b, e_b, "run", "--preset", args.preset, "--home",
                                                                 home, "--mirror", "http://127.0.0.1:9/"),
                                                 "bytes_up": proxy.bytes_up, "bytes_down": proxy.bytes_down,
                                                 "requests": proxy.requests}
            results[kind] = row
        proxy.close()
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for kind in ("local", "s3"):
        for name, r in results[kind].items():
            extra = (f"  up {r['bytes_up'] / 1e6:7.1f} MB  down {r['bytes_down'] / 1e6:7.1f} MB  {r['requests']} requests"
                     if "bytes_up" in r else "")
            print(f"{kind:5s} {name:24s} {r['seconds']:7.2f} s{extra}")


if __name__ == "__main__":
    main()
