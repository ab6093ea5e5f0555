"""Shared fixtures: a local MNIST mirror, a scriptable faulty mirror, one Prefect harness."""

from __future__ import annotations

import compileall
import functools
import gzip
import http.server
import os
import signal
import socket
import subprocess
import sys
import struct
import tempfile
import threading
import time
import zlib
from pathlib import Path

import pytest

# Before Prefect is imported anywhere: no telemetry, results in a throwaway directory.
_STATE = Path(tempfile.mkdtemp(prefix="digitflow-tests-"))
os.environ.update({
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_HOME": str(_STATE / "prefect-home"),
    "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(_STATE / "results"),
    "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.3",
    # The suite's servers store events every second (not 5) and a served deployment polls for
    # its runs every second (not 10): tests wait on both, users rarely notice either.
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "1",
    "PREFECT_RUNNER_POLL_FREQUENCY": "1",
})
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("DIGITFLOW_EPHEMERAL", None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# CLI subprocesses without PREFECT_API_URL use digitflow's local server, as a user's would: one
# for the session (its own port and PREFECT_HOME), started by the first of them, stopped at the end.
os.environ["DIGITFLOW_SERVER_PORT"] = str(_free_port())


# A test that uses one of these runs Prefect flows, starts servers or reads the real MNIST: "slow".
SLOW_FIXTURES = {"prefect_harness", "api_url", "server", "first_run", "published", "home", "ingested", "mnist_server",
                 "faulty", "s3", "backend", "azure", "team", "browser", "own_server"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("e2e") or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def _stop_the_local_server():
    yield
    from flows import server

    pid = server.running_pid()
    if pid is not None:  # the test process's own connections keep it from a prompt graceful exit
        server._terminate(pid, grace=3.0)
os.environ.pop("DIGITFLOW_HOME", None)
os.environ.pop("DIGITFLOW_MIRRORS", None)

REPO = Path(__file__).resolve().parents[1]

# digitflow's own modules compiled once: where PYTHONDONTWRITEBYTECODE is set (as on the CI
# machine), each of the suite's CLI subprocesses would otherwise compile them again (~1 s each).
for package in ("flows", "tasks", "serving", "storage", "nn"):
    compileall.compile_dir(REPO / package, quiet=2)

MNIST_DIR = Path(os.environ.get("DIGITFLOW_MNIST_DIR", REPO.parent / "shared" / "mnist"))


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"the real MNIST is not at {MNIST_DIR} (set DIGITFLOW_MNIST_DIR)")
    return MNIST_DIR


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="session")
def api_url(prefect_harness) -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1, random port, stopped at teardown."""

    class _Quiet(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            pass  # a client that hangs up mid-answer (as the fault tests make it) is not news

    def __init__(self, handler):
        self.httpd = self._Quiet(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="session")
def mnist_server(mnist_dir):
    """The real ../shared/mnist served over HTTP, as a mirror."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(mnist_dir), **kw)

        def log_message(self, *a):
            pass

    server = _Server(Handler)
    yield server.url
    server.close()


@functools.lru_cache(maxsize=4)
def make_bomb(size: int) -> bytes:
    """A valid gzip stream of ``size`` zero bytes (a tiny archive that inflates hugely)."""
    c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    parts = [c.compress(block) for _ in range(size >> 20)]
    return b"".join(parts) + c.flush()


class FaultyMirror:
    """A mirror whose answers are scripted per file: a queue of behaviours, then 'ok'.

    ok        the real archive
    404/500/429/503  that status
    reset     TCP reset right after the headers
    truncate  announce the full length, send half, close
    wrong     a valid gzip of the real content with one byte changed
    slow      answer nothing for 3 s
    bomb      a gzip of 100 MB of zeros
    loop      redirect to itself, forever
    ftp       redirect to an ftp:// URL
    trickle   the real archive, one byte every 0.5 s
    """

    def __init__(self, mnist_dir: Path):
        self.dir = mnist_dir
        self.script: dict[str, list[str]] = {}
        self.requests: list[tuple[str, str]] = []
        self.default = "ok"
        self._bomb = None
        self._wrong: dict[str, bytes] = {}
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                queue = mirror.script.get(name, [])
                behaviour = queue.pop(0) if queue else mirror.default
                mirror.requests.append((name, behaviour))
                mirror.serve(self, name, behaviour)

        self.server = _Server(Handler)
        self.url = self.server.url

    def archive(self, name: str) -> bytes:
        return (self.dir / name).read_bytes()

    def serve(self, h, name, behaviour):
        if behaviour in ("loop", "ftp"):
            h.send_response(302)
            h.send_header("Location", h.path if behaviour == "loop" else f"ftp://127.0.0.1/{name}")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if behaviour.isdigit():
            h.send_response(int(behaviour))
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if not (self.dir / name).exists():
            h.send_response(404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        body = self.archive(name)
        if behaviour == "wrong":
            body = self.wrong(name)
        elif behaviour == "bomb":
            if self._bomb is None:
                self._bomb = make_bomb(100 << 20)  # (built once per session: ~1 s, longer than a 0.5-s timeout)
            body = self._bomb
        elif behaviour == "slow":
            time.sleep(3)
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if behaviour == "reset":
            h.wfile.flush()
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.connection.close()
            h.close_connection = True
            return
        if behaviour == "trickle":
            try:
                for i in range(len(body)):
                    h.wfile.write(body[i:i + 1])
                    h.wfile.flush()
                    time.sleep(0.5)
            except OSError:  # the client gave up, as it should
                pass
            h.close_connection = True
            return
        if behaviour == "truncate":
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        h.wfile.write(body)

    def wrong(self, name: str) -> bytes:
        """The real archive's content with one byte changed, gzipped (cached per file)."""
        if name not in self._wrong:
            raw = bytearray(gzip.decompress(self.archive(name)))
            raw[len(raw) // 2] ^= 0xFF
            self._wrong[name] = gzip.compress(bytes(raw), compresslevel=1, mtime=0)
        return self._wrong[name]

    def fail(self, name: str, *behaviours: str):
        self.script[name] = list(behaviours)

    def close(self):
        self.server.close()


@pytest.fixture
def faulty(mnist_dir):
    make_bomb(100 << 20)  # built before any request: its ~1 s must not count against a client's timeout
    mirror = FaultyMirror(mnist_dir)
    yield mirror
    mirror.close()


@pytest.fixture(scope="session")
def first_run(tmp_path_factory, mnist_server, prefect_harness):
    """One home where the real pipeline published a fast model as v1: (home, run summary)."""
    from flows.pipeline import retrain

    home = tmp_path_factory.mktemp("pipeline-home")
    state = retrain(home=str(home), mirrors=[mnist_server], preset="fast", return_state=True)
    assert state.is_completed()
    return home, state.result()


@pytest.fixture
def published(first_run, tmp_path):
    """A private copy of that home, for tests that change the registry."""
    import shutil

    home = tmp_path / "home"
    for part in ("models", "data", "raw"):
        shutil.copytree(first_run[0] / part, home / part, symlinks=True)
    return home


@pytest.fixture
def ingested(first_run, tmp_path):
    """A new home holding only verified MNIST (raw archives and shards, copied from that home): for
    tests about what happens after ingest, without paying for a fresh one."""
    import shutil

    home = tmp_path / "ingested"
    for part in ("data", "raw"):
        shutil.copytree(first_run[0] / part, home / part, symlinks=True)
    return home


@pytest.fixture
def receiver():
    """A local webhook receiver: (url, list of the JSON bodies POSTed to it)."""
    import json

    got = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = _Server(Handler)
    yield server.url + "hook", got
    server.close()


PREFECT = str(Path(sys.executable).with_name("prefect"))


@pytest.fixture(scope="session")
def server():
    """A real Prefect server (SQLite, its UI on and talking to its own API): digitflow's local
    server of this session (its own port and PREFECT_HOME, see above), started as a user's first
    command starts it: ``prefect server start`` in the background. CLI subprocesses without
    PREFECT_API_URL report to it as well."""
    from flows import server as local

    url = local.api_url()
    if not local.healthy(url):
        local.start(url)
    return url


