"""Real object stores for tests and benchmarks, and a scriptable proxy in front of them.

``azurite_endpoint()`` starts Azurite's blob service (``azurite-blob``, the Azure Storage
emulator from npm) on a random 127.0.0.1 port, in memory, and creates a container.

``s3_endpoint()`` starts the `moto_server` command (moto's S3 over HTTP on 127.0.0.1, which
enforces If-None-Match / If-Match) unless ``DIGITFLOW_TEST_S3_ENDPOINT`` names another endpoint
(MinIO, AWS): then that one is used with the AWS_* credentials of the environment, and
``DIGITFLOW_TEST_S3_BUCKET`` (default ``digitflow-test``) must exist or be creatable.

``FaultProxy`` forwards to the endpoint and counts the bytes each way; it can answer 503 to the
next N requests (S3's "slow down") or drop every connection (the store going away).
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit
import json

import requests

MOTO = str(Path(sys.executable).with_name("moto_server"))
# Azurite's one well-known development account (public, in Microsoft's documentation).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def s3_endpoint(log_dir: Path):
    """Yield ``(endpoint URL, bucket, env)``: env holds the AWS_* variables a client needs."""
    given = os.environ.get("DIGITFLOW_TEST_S3_ENDPOINT")
    bucket = os.environ.get("DIGITFLOW_TEST_S3_BUCKET", "digitflow-test")
    if given:
        env = {"AWS_ENDPOINT_URL": given}
        _create_bucket(bucket, env)
        yield given, bucket, env
        return
    with moto_server(log_dir) as url:
        env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
               "AWS_REGION": "us-east-1"}
        _create_bucket(bucket, env)
        yield url, bucket, env


@contextlib.contextmanager
def _endpoint_process(name: str, argv: list[str], url: str, log_dir: Path, env: dict | None = None):
    """Start an emulator (its own process group), wait until ``url`` answers, stop it after."""
    log = open(log_dir / f"{name}.log", "w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(url, timeout=1)
                break
            except requests.RequestException:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"{name} did not start:\n" + (log_dir / f"{name}.log").read_text())
                time.sleep(0.2)
        yield
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(10)
        log.close()


@contextlib.contextmanager
def moto_server(log_dir: Path, **env):
    """The `moto_server` command on a random 127.0.0.1 port (``env``: e.g. authentication on with
    INITIAL_NO_AUTH_ACTION_COUNT=0); yields its URL, stops it after."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with _endpoint_process("moto", [MOTO, "-H", "127.0.0.1", "-p", str(port)], url, log_dir, env):
        yield url


@contextlib.contextmanager
def azurite_endpoint(log_dir: Path, container: str = "digitflow-test"):
    """Yield ``(endpoint URL, container, env)``: env holds the AZURE_STORAGE_* variables a client
    needs. Azurite keeps everything in memory and is stopped after."""
    exe = shutil.which("azurite-blob")
    if exe is None:
        raise RuntimeError("azurite-blob is not installed: npm install -g azurite (the README's test command does)")
    port = free_port()
    url = f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
    with _endpoint_process("azurite", [exe, "--silent", "--inMemoryPersistence", "--disableTelemetry",
                                       "--skipApiVersionCheck", "--blobHost", "127.0.0.1", "--blobPort", str(port)],
                           url, log_dir):
        env = {"AZURE_STORAGE_ACCOUNT_NAME": AZURITE_ACCOUNT, "AZURE_STORAGE_ACCOUNT_KEY": AZURITE_KEY,
               "AZURE_STORAGE_ENDPOINT": url}
        azure_container(env, container).create_container()
        yield url, container, env


def azure_container(env: dict, container: str = "digitflow-test"):
    """An Azure SDK client for the container (the tests' independent view of it)."""
    from azure.storage.blob import ContainerClient

    return ContainerClient(env["AZURE_STORAGE_ENDPOINT"], container, credential={
        "account_name": env["AZURE_STORAGE_ACCOUNT_NAME"], "account_key": env["AZURE_STORAGE_ACCOUNT_KEY"]})


def _create_bucket(bucket: str, env: dict) -> None:
    client = boto3_client(env)
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass


def boto3_client(env: dict, endpoint: str | None = None):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint or env["AWS_ENDPOINT_URL"],
                        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID", os.environ.get("AWS_ACCESS_KEY_ID")),
                        aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY", os.environ.get("AWS_SECRET_ACCESS_KEY")),
                        region_name=env.get("AWS_REGION", os.environ.get("AWS_REGION", "us-east-1")))


def unique_prefix(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of an S3 endpoint (pass-through by default)."""

    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream)
        self.bytes_up = self.bytes_down = self.requests = 0
        self.fail_next = 0          # answer this many next requests with 503 SlowDown
        self.down = False           # drop every connection without an answer
        self.down_after_bytes = None  # go down once this many request-body bytes went through
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _drop(self):
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(2)

            def handle_one(self):
                body = self._body()
                with proxy.lock:
                    proxy.requests += 1
                    proxy.bytes_up += len(body)
                    if proxy.down_after_bytes is not None and proxy.bytes_up > proxy.down_after_bytes:
                        proxy.down = True
                    down, fail = proxy.down, proxy.fail_next > 0
                    if fail:
                        proxy.fail_next -= 1
                if down:
                    return self._drop()
                if fail:
                    msg = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding",)}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
                with proxy.lock:
                    proxy.bytes_down += len(data)
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(k, v)
                # A HEAD's Content-Length is the object's size (there is no body to count).
                self.send_header("Content-Length", r.getheader("Content-Length", "0") if self.command == "HEAD"
                                 else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_one

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def reset_counts(self) -> None:
        with self.lock:
            self.bytes_up = self.bytes_down = self.requests = 0

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def machine(root: Path, name: str, env: dict, **extra) -> tuple[Path, dict]:
    """A "machine" on this box: its own working directory, HOME, PREFECT_HOME and working copy
    (no local path shared with another), the same object store credentials."""
    d = root / name
    if d.exists():
        shutil.rmtree(d)
    (d / "work").mkdir(parents=True)
    environ = {**os.environ, **env, "HOME": str(d), "PREFECT_HOME": str(d / ".prefect"),
               "DIGITFLOW_CACHE": str(d / "cache"), "TMPDIR": str(d), **extra}
    for shared in ("PREFECT_RESULTS_LOCAL_STORAGE_PATH", "DIGITFLOW_HOME", "PREFECT_LOCAL_STORAGE_PATH"):
        if shared not in extra:
            environ.pop(shared, None)
    return d / "work", environ


def metrics_record(accuracy: float, loss: float = 0.1, classes: int = 2) -> dict:
    """A complete ``metrics.json`` (``storage.records.Metrics``) for a version built by hand."""
    return {"test_accuracy": accuracy, "test_loss": loss, "macro_f1": accuracy,
            "per_class": [{"class": c, "precision": accuracy, "recall": accuracy, "f1": accuracy, "support": 1}
                          for c in range(classes)],
            "confusion_matrix": [[int(i == j) for j in range(classes)] for i in range(classes)],
            "most_confident_errors": [], "test_images": classes, "inference_images_per_second": 1.0,
            "test_manifest_sha256": "0" * 64}


def metrics_json(accuracy: float, loss: float = 0.1) -> str:
    return json.dumps(metrics_record(accuracy, loss))
