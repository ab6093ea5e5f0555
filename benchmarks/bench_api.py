"""Throughput and latency of `digitflow api`, measured from outside by a load generator.

    python benchmarks/bench_api.py [--seconds 30] [--workers 2] [--clients 1,8,32] [--home DIR] [--json]

Starts a real `digitflow api` subprocess on a random port (per-request logging off:
--log-level warning) serving a 784-512-10 model (the `default` architecture; published into a
temporary home unless --home is given), then drives it with keep-alive HTTP/1.1 clients written
on raw asyncio streams (the generator runs in its own process, on the same 2 cores):

- single-image PNG requests (a real test digit drawn dark on white, 112×112, multipart) at each
  client count → requests/s, p50/p99 latency, errors;
- JSON batches of 1,000 images ({"pixels": [[784 floats]]}) and the same 1,000 images as raw
  uint8 bytes (application/octet-stream) → images/s.

Each phase runs for --seconds (bounded), after a 1-second warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import io
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from _mirror import MNIST_DIR  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_images(n: int) -> np.ndarray:
    with gzip.open(MNIST_DIR / "t10k-images-idx3-ubyte.gz") as f:
        f.read(16)
        return np.frombuffer(f.read(n * 784), np.uint8).reshape(n, 28, 28)


def publish_model(home: Path) -> None:
    """A 784-512-10 network as v1 champion of mnist-mlp (speed does not depend on the weights)."""
    import nn
    from storage.atomic import write_json
    from storage.registry import Registry
    from tests.store_helpers import metrics_record

    model = nn.presets.build(nn.presets.get("default"))
    registry = Registry(home)

    def build(folder: Path, version: int) -> dict:
        nn.save(model, folder)
        write_json(folder / "metrics.json", metrics_record(0.0, classes=10))  # untrained: speed only
        return {}

    version, _ = registry.publish(nn.digest(model), build)
    registry.promote(version, reason="benchmark", by="bench_api")


def multipart(name: str, data: bytes, content_type: str) -> tuple[bytes, str]:
    boundary = "digitflowbench7f3a"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            f"Content-Type: {content_type}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def request_bytes(port: int, body: bytes, content_type: str) -> bytes:
    return (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def client(port: int, request: bytes, stop_at: float, warm_until: float, latencies: list, errors: list):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while True:
            start = time.perf_counter()
            if start >= stop_at:
                return
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if start >= warm_until:
                latencies.append(time.perf_counter() - start)
                if status != 200:
                    errors.append(status)
    finally:
        writer.close()


def load(port: int, request: bytes, clients: int, seconds: float, queue) -> None:
    """One phase, run in its own process: `clients` keep-alive connections for `seconds`."""
    async def main():
        latencies, errors = [], []
        now = time.perf_counter()
        warm_until, stop_at = now + 1.0, now + 1.0 + seconds
        results = await asyncio.gather(*(client(port, request, stop_at, warm_until, latencies, errors)
                                         for _ in range(clients)), return_exceptions=True)
        failures = [repr(r) for r in results if isinstance(r, BaseException)]
        return latencies, errors, failures
    latencies, errors, failures = asyncio.run(main())
    queue.put((latencies, errors, failures))


def phase(port: int, request: bytes, clients: int, seconds: float, images_per_request: int = 1) -> dict:
    queue = multiprocessing.get_context("fork").Queue()
    proc = multiprocessing.get_context("fork").Process(target=load, args=(port, request, clients, seconds, queue))
    proc.start()
    latencies, errors, failures = queue.get(timeout=seconds + 120)
    proc.join(30)
    lat = np.array(latencies) * 1e3
    n = len(lat)
    return {"clients": clients, "requests": n, "requests_per_s": round(n / seconds, 1),
            "images_per_s": round(n * images_per_request / seconds),
            "p50_ms": round(float(np.percentile(lat, 50)), 2) if n else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 2) if n else None,
            "errors": len(errors) + len(failures), "failures": failures[:3]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--home", help="serve this home's champion (default: a temporary home with a 784-512-10 model)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    from PIL import Image
    from threadpoolctl import threadpool_info

    digits = test_images(args.batch)
    png = io.BytesIO()
    Image.fromarray(255 - digits[0]).resize((112, 112), Image.Resampling.BILINEAR).save(png, "PNG")
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(args.home) if args.home else Path(tmp) / "home"
        if not args.home:
            publish_model(home)
        port = free_port()
        env = {**os.environ, "DO_NOT_TRACK": "1"}
        server = subprocess.Popen([sys.executable, "-m", "flows.cli", "api", "--home", str(home), "--port", str(port),
                                   "--workers", str(args.workers), "--log-level", "warning",
                                   "--max-body", str(16 << 20), "--max-images", "10000"],
                                  cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                        s.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
                        if b" 200 " in s.recv(1024):
                            break
                except OSError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"digitflow api did not become ready: {server.stderr.read()}")
                time.sleep(0.2)
            if args.workers > 1:
                time.sleep(2)  # every worker up and holding the model
            body, kind = multipart("digit.png", png.getvalue(), "image/png")
            single = request_bytes(port, body, kind)
            results = {"png_single": [phase(port, single, int(c), args.seconds) for c in args.clients.split(",")]}
            pixels = (digits.reshape(len(digits), 784) / 255).round(4).tolist()
            json_body = json.dumps({"pixels": pixels}).encode()
            results["json_batch"] = phase(port, request_bytes(port, json_body, "application/json"), 2,
                                          args.seconds, images_per_request=len(digits))
            results["json_batch"]["body_bytes"] = len(json_body)
            results["raw_batch"] = phase(port, request_bytes(port, digits.tobytes(), "application/octet-stream"), 2,
                                         args.seconds, images_per_request=len(digits))
        finally:
            server.terminate()
            server.wait(30)
    blas = [f"{i.get('internal_api')} {i.get('architecture')}" for i in threadpool_info() if i.get("user_api") == "blas"]
    out = {"workers": args.workers, "seconds": args.seconds, "cores": os.cpu_count(), "png_bytes": len(png.getvalue()),
           "batch": len(digits), "blas": blas, **results}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for r in results["png_single"]:
        print(f"PNG single, {r['clients']:>2} clients: {r['requests_per_s']:>7.0f} req/s  p50 {r['p50_ms']} ms  "
              f"p99 {r['p99_ms']} ms  errors {r['errors']}")
    for key in ("json_batch", "raw_batch"):
        r = results[key]
        print(f"{key} of {len(digits)}: {r['images_per_s']:>9,} images/s  p50 {r['p50_ms']} ms  errors {r['errors']}")


if __name__ == "__main__":
    main()
