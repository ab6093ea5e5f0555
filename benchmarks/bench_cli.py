"""How long a user waits: first output of each command, a cached `evaluate` and a warm `run`,
with digitflow's local Prefect server (up) against Prefect's temporary per-process server
(`DIGITFLOW_EPHEMERAL=1`, what every command did before the local server), and `models` /
`predict`, which never start Prefect.

    python benchmarks/bench_cli.py [--repeats 3] [--json]

Every figure is a fresh `digitflow` process (interpreter and imports included) against a local
HTTP mirror over ../shared/mnist, in a throwaway home and PREFECT_HOME; the local server is
started once first (its start-up is reported apart) and stopped at the end. "First output" is
the time to the first byte the command writes on stdout or stderr. Medians of --repeats runs.
The project's modules are compiled to bytecode first, as any run leaves them (unless
PYTHONDONTWRITEBYTECODE is set, as on this machine: then every process would compile them again).
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _mirror import local_mirror  # noqa: E402

DIGITFLOW = str(Path(sys.executable).with_name("digitflow"))


def timed(args: list[str], env: dict) -> tuple[float, float, str, str]:
    """(seconds to the first output byte, seconds in all, stdout, stderr) of one process."""
    t = time.perf_counter()
    proc = subprocess.Popen([DIGITFLOW, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    sel.register(proc.stderr, selectors.EVENT_READ)
    first, chunks = None, {proc.stdout: b"", proc.stderr: b""}
    while sel.get_map():
        for key, _ in sel.select():
            data = os.read(key.fd, 65536)
            if not data:
                sel.unregister(key.fileobj)
                continue
            first = first if first is not None else time.perf_counter() - t
            chunks[key.fileobj] += data
    proc.wait()
    total = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"digitflow {' '.join(args)} failed:\n{chunks[proc.stderr].decode()}")
    return first if first is not None else total, total, chunks[proc.stdout].decode(), chunks[proc.stderr].decode()


def median(values) -> float:
    return round(statistics.median(values), 2)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    import compileall

    root = Path(__file__).resolve().parents[1]
    for package in ("flows", "tasks", "storage", "nn", "publishing", "serving"):
        compileall.compile_dir(root / package, quiet=1)
    with tempfile.TemporaryDirectory() as tmp, local_mirror() as mirror:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_HOME": str(Path(tmp) / "prefect"), "DIGITFLOW_SERVER_PORT": str(port)}
        env.pop("PREFECT_API_URL", None)
        env.pop("DIGITFLOW_EPHEMERAL", None)
        home = str(Path(tmp) / "home")
        run = ["run", "--home", home, "--mirror", mirror, "--preset", "fast"]
        figures: dict = {}
        try:
            # The first command starts the local server; a cold run fills the home.
            t = time.perf_counter()
            timed(run, env)
            figures["first_run_with_server_start_s"] = round(time.perf_counter() - t, 2)
            modes = {"local_server": env, "ephemeral": {**env, "DIGITFLOW_EPHEMERAL": "1"}}
            for mode, e in modes.items():
                warm = [timed(run, e) for _ in range(args.repeats)]
                evaluate = [timed(["evaluate", "--home", home], e) for _ in range(args.repeats)]
                figures[mode] = {
                    "warm_run_s": median(w[1] for w in warm),
                    "warm_run_first_output_s": median(w[0] for w in warm),
                    "warm_run_terminal_lines": max(len((w[2] + w[3]).strip().splitlines()) for w in warm),
                    "cached_evaluate_s": median(v[1] for v in evaluate),
                    "cached_evaluate_first_output_s": median(v[0] for v in evaluate),
                }
            figures["ratio_warm_run_ephemeral_to_local"] = round(
                figures["ephemeral"]["warm_run_s"] / figures["local_server"]["warm_run_s"], 2)
            figures["ratio_cached_evaluate_ephemeral_to_local"] = round(
                figures["ephemeral"]["cached_evaluate_s"] / figures["local_server"]["cached_evaluate_s"], 2)
            # Commands that need no Prefect: they answer without any server.
            subprocess.run([DIGITFLOW, "server", "stop"], env=env, capture_output=True)
            digit = Path(tmp) / "digits.idx"
            import gzip

            with gzip.open(Path(mirror_dir()) / "t10k-images-idx3-ubyte.gz") as f:
                head, body = f.read(16), f.read(100 * 784)
            digit.write_bytes(head[:4] + (100).to_bytes(4, "big") + head[8:] + body)
            for name, cmd in {"help": ["--help"], "models_list": ["models", "list", "--home", home],
                              "predict_100": ["predict", "--home", home, str(digit)]}.items():
                runs = [timed(cmd, env) for _ in range(args.repeats)]
                figures[name] = {"first_output_s": median(r[0] for r in runs), "total_s": median(r[1] for r in runs)}
            figures["server_started_by_models_or_predict"] = bool(
                subprocess.run([DIGITFLOW, "server", "status"], env=env, capture_output=True).returncode == 0)
        finally:
            subprocess.run([DIGITFLOW, "server", "stop"], env=env, capture_output=True)
    import numpy  # noqa: F401  (loads the BLAS the commands use, so threadpoolctl can name its kernel)
    from threadpoolctl import threadpool_info

    figures["blas"] = [(i.get("internal_api"), i.get("architecture")) for i in threadpool_info()]
    if args.json:
        print(json.dumps(figures))
    else:
        for k, v in figures.items():
            print(f"{k}: {v}")


def mirror_dir() -> Path:
    from _mirror import MNIST_DIR

    return MNIST_DIR


if __name__ == "__main__":
    main()
