"""The local Prefect server digitflow uses by default (flows/server.py): started once by the
first command that needs it, reused by the next ones (also when several start at once), shown
by `digitflow server status`, stopped by `server stop` and started again when dead; commands
that need no Prefect never start it. Each run prints its dashboard link once."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flows import server

DIGITFLOW = str(Path(sys.executable).with_name("digitflow"))
pytestmark = pytest.mark.e2e


def digitflow(*args, env=None, timeout=300):
    return subprocess.run([DIGITFLOW, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


@pytest.fixture
def own_server(tmp_path, monkeypatch, request):
    """A local server of this test's own (port and PREFECT_HOME), stopped after. Its database is
    a copy of the session server's (made with SQLite's online backup): migrating a new one takes
    ~10 s here, and starting and reusing the server is what is tested, not Prefect's migrations."""
    import sqlite3

    request.getfixturevalue("server")  # the session's server is up: its database is migrated
    home = tmp_path / "prefect-home"
    home.mkdir()
    with sqlite3.connect(Path(os.environ["PREFECT_HOME"]) / "prefect.db") as source, \
            sqlite3.connect(home / "prefect.db") as copy:
        source.backup(copy)
    monkeypatch.setenv("DIGITFLOW_SERVER_PORT", str(_free_port()))
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    yield
    server.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_first_command_starts_the_server_the_next_reuse_it(own_server, tmp_path, mnist_server):
    home = str(tmp_path / "home")
    (tmp_path / "home").mkdir()
    t = time.monotonic()
    r = digitflow("models", "list", "--home", home)  # needs no Prefect: starts nothing, answers at once
    assert r.returncode == 0 and "no versions of mnist-mlp yet" in r.stdout and time.monotonic() - t < 5
    assert not server.healthy() and server.running_pid() is None

    # Two commands at once: one server is started (the lock), both runs are recorded on it.
    runs = [subprocess.Popen([DIGITFLOW, "ingest", "--home", home, "--mirror", mnist_server], text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ})
            for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in runs]
    assert [p.returncode for p in runs] == [0, 0], outs
    starting = [err for _, err in outs if "starting the local Prefect server" in err]
    assert len(starting) == 1, outs
    links = [line for _, err in outs for line in err.splitlines() if line.startswith("dashboard: ")]
    assert len(links) == 2 and all(link.startswith(f"dashboard: {server.ui_url()}/runs/flow-run/") for link in links)
    pid = server.running_pid()
    assert pid is not None and server.healthy()
    # Prefect's own `server start`, in a process whose SQLite writers wait instead of answering 503.
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:6] == [b"-P", b"-m", b"flows.server", b"server", b"start"]

    # The next command reuses it: no start, and the run is there to see.
    r = digitflow("ingest", "--home", home, "--mirror", mnist_server)
    assert r.returncode == 0 and "starting the local Prefect server" not in r.stderr
    assert server.running_pid() == pid
    run_id = next(line for line in r.stderr.splitlines() if line.startswith("dashboard: ")).rsplit("/", 1)[1]
    import httpx

    assert httpx.get(f"{server.api_url()}/flow_runs/{run_id}").json()["state"]["type"] == "COMPLETED"

    status = digitflow("server", "status")
    assert status.returncode == 0 and f"local server {server.api_url()}: answering, pid {pid}" in status.stdout

    # Stopped, it is not answering; the next command that needs it starts it again.
    assert digitflow("server", "stop").stdout.strip() == "local server stopped"
    assert not server.healthy() and digitflow("server", "status").returncode == 1
    r = digitflow("ingest", "--home", home, "--mirror", mnist_server)
    assert r.returncode == 0 and "starting the local Prefect server" in r.stderr and server.healthy()
    logs = digitflow("server", "logs", "-n", "200").stdout
    assert f"Check out the dashboard at {server.ui_url()}" in logs
    # digitflow's own dated lines: each start, when it answered, the stop.
    events = [line.split(" | digitflow | ")[1] for line in logs.splitlines() if " | digitflow | " in line]
    assert [e.split(" on ")[0] if e.startswith("starting") else e.split(" after ")[0] for e in events] == [
        "starting `prefect server start`", f"pid {pid} answering", f"pid {pid} stopped by `digitflow server stop`",
        "starting `prefect server start`", f"pid {server.running_pid()} answering"], events


def test_with_prefect_api_url_set_nothing_is_started(own_server, tmp_path, api_url):
    r = digitflow("server", "status", env={"PREFECT_API_URL": api_url})
    assert r.returncode == 0 and "digitflow starts no server of its own" in r.stdout and "answering" in r.stdout
    assert server.running_pid() is None


def test_the_local_servers_sqlite_writers_take_the_lock_first(tmp_path):
    """tasks/prefect_compat.py entry 8 (applied by ``python -m flows.server``): every write
    transaction of Prefect's SQLite configuration begins IMMEDIATE, so two writers meeting wait
    for each other (busy_timeout) instead of one failing at once (a 503 to the client). In a
    fresh process: Prefect's own modes first, then the patched ones."""
    script = textwrap.dedent(f"""
        import asyncio
        from prefect.server.database.configurations import SQLITE_BEGIN_MODE, AioSqliteConfiguration
        from tasks.prefect_compat import immediate_sqlite_writes

        async def modes(path):
            config = AioSqliteConfiguration(connection_url=f"sqlite+aiosqlite:///{{path}}")
            engine = await config.engine()
            seen = []
            for with_for_update in (False, True):
                async with config.begin_transaction(await config.session(engine), with_for_update=with_for_update):
                    seen.append(SQLITE_BEGIN_MODE.get())
            await engine.dispose()
            return seen

        before = asyncio.run(modes({str(tmp_path / "a.db")!r}))
        applied = immediate_sqlite_writes() and immediate_sqlite_writes()
        print(before, applied, asyncio.run(modes({str(tmp_path / "b.db")!r})))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.stdout.strip() == "['DEFERRED', 'IMMEDIATE'] True ['IMMEDIATE', 'IMMEDIATE']", r.stderr[-2000:]


def test_the_health_check_counts_any_answer_and_follows_nothing():
    """``answers``: a status of any kind (a server that wants a key says 401) is an answer; a
    redirect is one too and is never followed; a refused or silent address is not."""
    import http.server
    import socket
    import threading

    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            status = 401 if self.path.startswith("/locked") else 302
            self.send_response(status)
            self.send_header("Location", "/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        assert server.answers(base + "/locked/api") and server.answers(base + "/moved/api")
        assert hits == ["/locked/api/health", "/moved/api/health"]  # the redirect was not followed
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            refused = s.getsockname()[1]
        assert not server.answers(f"http://127.0.0.1:{refused}/api")
        t = time.monotonic()
        assert not server.answers(f"http://127.0.0.1:{silent.getsockname()[1]}/api", timeout=0.5)
        assert time.monotonic() - t < 3
        assert not server.answers("not a url")
        assert not server.answers("file:///etc") and not server.answers("data:,ok")  # http(s) only
    finally:
        httpd.shutdown()
        silent.close()


def test_the_server_log_is_written_and_read_only_as_a_regular_file(tmp_path, monkeypatch):
    """A FIFO, a directory or a symlink where server.log should be: digitflow's lines are dropped
    at once (a FIFO never blocks a command, a symlink's target is never written), `server logs`
    says so in one line; a log over the limit becomes server.log.1 at a start, and a rotation that
    cannot be done leaves the log as it was."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    folder = server.state_dir()
    folder.mkdir(parents=True)
    log = folder / "server.log"

    server._log("started")  # a regular file: created and appended to
    assert log.read_text().endswith(" UTC | digitflow | started\n")
    log.unlink()
    target = tmp_path / "elsewhere"
    target.write_text("kept\n")
    log.symlink_to(target)
    server._log("through the link")
    assert target.read_text() == "kept\n"
    r = digitflow("server", "logs")
    assert r.returncode == 0 and r.stdout.strip() == f"{log} is not a regular file: not read", r.stdout
    log.unlink()
    os.mkfifo(log)
    t = time.monotonic()
    server._log("into a fifo nobody reads")
    r = digitflow("server", "logs")
    assert time.monotonic() - t < 30 and r.stdout.strip() == f"{log} is not a regular file: not read"
    log.unlink()

    log.write_bytes(b"x" * (server.LOG_LIMIT + 1))
    (folder / "server.log.1").mkdir()  # the rotation cannot replace a folder: nothing changes
    server._rotate_log()
    assert log.stat().st_size == server.LOG_LIMIT + 1
    (folder / "server.log.1").rmdir()
    server._rotate_log()
    assert not log.exists() and (folder / "server.log.1").stat().st_size == server.LOG_LIMIT + 1
