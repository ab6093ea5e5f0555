"""The local Prefect server digitflow uses by default, so every run shows in a dashboard.

Without ``PREFECT_API_URL``, a command that runs flows uses one ``prefect server start`` on
``127.0.0.1:4200`` (``DIGITFLOW_SERVER_PORT``), with Prefect's own home (``PREFECT_HOME``, default
``~/.prefect``), run as ``python -m flows.server server start …`` (Prefect's CLI, its SQLite
writers waiting for the lock rather than answering 503: ``tasks.prefect_compat``, entry 8). The first command that needs it starts it in the background (its own session:
a terminal's Ctrl-C does not reach it) and waits until ``/api/health`` answers; later commands,
on this machine and at the same time, find it and reuse it. Starting is serialized by a lock
file, so several commands at once start one server; a dead one is started again.

    <PREFECT_HOME>/digitflow-server/server.pid   the server's process id
    <PREFECT_HOME>/digitflow-server/server.log   its output and digitflow's dated start/stop lines
                                                 (`digitflow server logs`; over 8 MiB at a start: .log.1)

With ``PREFECT_API_URL`` set, nothing here runs: that server is used as it is. With
``DIGITFLOW_EPHEMERAL=1``, Prefect's temporary per-process server is used (nothing is left
running, and nothing is left to look at). No Prefect import here: it must run before Prefect
reads its settings.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from storage import DigitflowError
from storage.settings import settings

HOST = "127.0.0.1"
START_TIMEOUT = 120.0  # seconds for a first start (database migrations on a fresh PREFECT_HOME)
LOG_LIMIT = 8 << 20  # bytes of server.log kept; at a start, a longer one becomes server.log.1


def port() -> int:
    return settings().server_port


def api_url() -> str:
    return f"http://{HOST}:{port()}/api"


def ui_url() -> str:
    """The dashboard's address for the server in use (a set PREFECT_UI_URL wins)."""
    if os.environ.get("PREFECT_UI_URL"):
        return os.environ["PREFECT_UI_URL"].rstrip("/")
    url = os.environ.get("PREFECT_API_URL") or api_url()
    return url.rstrip("/").removesuffix("/api")


def prefect_home() -> Path:
    """Prefect's home as Prefect resolves it (``PREFECT_HOME``, else ``~/.prefect``), without importing it."""
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()


def state_dir() -> Path:
    return prefect_home() / "digitflow-server"


def ephemeral() -> bool:
    return settings().ephemeral


def healthy(url: str | None = None, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url or api_url()}/health", timeout=timeout) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def answers(url: str, timeout: float = 5.0) -> bool:
    """Does anything answer HTTP at ``url``'s health endpoint? Any status counts (a server that
    wants a key, like Prefect Cloud, says 401): only a refused, unreachable or silent address does not.
    (requests, as Prefect's client does: user info in the URL sent as Basic auth, its CA settings.)"""
    import requests

    try:
        requests.get(f"{url.rstrip('/')}/health", timeout=timeout, allow_redirects=False).close()
        return True
    except (requests.RequestException, ValueError):
        return False


def running_pid() -> int | None:
    """The pid recorded by the last start, if that process is alive."""
    try:
        pid = int((state_dir() / "server.pid").read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _shown_api_url() -> str:
    """PREFECT_API_URL as printed: without its user info, escaped for the terminal."""
    from storage.download import redact
    from storage.text import terminal

    return terminal(redact(os.environ["PREFECT_API_URL"]))


def describe() -> str:
    """Which Prefect server this process will use, for the command's first line (no secrets)."""
    if os.environ.get("PREFECT_API_URL"):
        return f"Prefect at {_shown_api_url()}"
    if ephemeral():
        return "Prefect's temporary server (DIGITFLOW_EPHEMERAL)"
    return f"Prefect at {api_url()} (the local server)"


def use(start_if_down: bool = True) -> str | None:
    """Point this process at the server it should use; start the local one if needed (unless
    ``start_if_down`` is False: then a local server that does not answer is an error). Returns the API
    URL of a local server it uses, None when PREFECT_API_URL or ephemeral mode decides."""
    if os.environ.get("PREFECT_API_URL"):
        if not answers(os.environ["PREFECT_API_URL"]):
            raise DigitflowError(f"no Prefect server answers at {_shown_api_url()} "
                                 "(PREFECT_API_URL): start it, or unset the variable to use the local server")
        return None
    if ephemeral():
        return None
    url = api_url()
    if not healthy(url):
        if not start_if_down:
            raise DigitflowError(f"no local Prefect server answers at {url}: no run can be waiting there "
                                 "(set PREFECT_API_URL to the server the run reports to)")
        start(url)
    os.environ["PREFECT_API_URL"] = url
    if "prefect" in sys.modules:  # imported already: make it read the variable again
        from tasks.prefect_compat import refresh_settings

        refresh_settings()
    return url


def start(url: str) -> None:
    """Start ``prefect server start`` in the background unless another command just did, and
    wait until it answers. One starter per machine (a lock file); a dead server is replaced."""
    from storage.atomic import file_lock

    folder = state_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(folder / "start.lock"):
        if healthy(url):
            return  # another command started it while we waited for the lock
        stale = running_pid()
        if stale is not None:  # alive but not answering: a server stuck or still starting
            if _wait(url, 15.0):
                return
            _log(f"pid {stale} did not answer at {url} within 15 s: "
                 + ("stopped" if _terminate(stale) else "already gone"))
        print(f"digitflow: starting the local Prefect server (dashboard {ui_url()}); later commands reuse it "
              "— `digitflow server stop` stops it", file=sys.stderr, flush=True)
        _rotate_log()
        _log(f"starting `prefect server start` on {url}")
        started = time.monotonic()
        log_fd = open_log()
        try:
            proc = subprocess.Popen(  # `prefect server start`, through main() below; -P and cwd: a folder
                # the command ran in (a project's own flows/ or prefect/) is never on its import path
                [sys.executable, "-P", "-m", "flows.server", "server", "start", "--host", HOST, "--port", str(port())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL if log_fd is None else log_fd,
                stderr=subprocess.STDOUT, start_new_session=True, cwd=folder,
                env={**os.environ, "PREFECT_UI_API_URL": url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
        finally:
            if log_fd is not None:
                os.close(log_fd)
        (folder / "server.pid").write_text(f"{proc.pid}\n")
        if not _wait(url, START_TIMEOUT, proc):
            _terminate(proc.pid)
            _log(f"pid {proc.pid} exited or did not answer within {START_TIMEOUT:.0f} s (its output above)")
            raise DigitflowError(f"the local Prefect server did not answer at {url} within {START_TIMEOUT:.0f} s "
                                 f"(its log: {folder / 'server.log'}); set PREFECT_API_URL to a running server, "
                                 "or DIGITFLOW_EPHEMERAL=1")
        _log(f"pid {proc.pid} answering after {time.monotonic() - started:.1f} s")


def _rotate_log() -> None:
    """At a start: a ``server.log`` over ``LOG_LIMIT`` becomes ``server.log.1`` (the one before
    is replaced); when that cannot be done, the log goes on growing and the server starts."""
    log_path = state_dir() / "server.log"
    try:
        if log_path.is_file() and not log_path.is_symlink() and log_path.stat().st_size > LOG_LIMIT:
            os.replace(log_path, log_path.with_name("server.log.1"))
    except OSError:
        pass


def open_log(flags: int = os.O_WRONLY | os.O_APPEND | os.O_CREAT) -> int | None:
    """``server.log`` opened (to append, by default), or None when it is not a regular file of its
    own (a FIFO would block the command, a symlink would send the lines elsewhere or show another
    file): never waits, never raises."""
    try:
        fd = os.open(state_dir() / "server.log", flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError:
        return None
    import stat

    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    os.set_blocking(fd, True)
    return fd


def _log(event: str) -> None:
    """A dated line of digitflow's own in the server's log (what ``digitflow server logs`` shows
    beside Prefect's output): when it was started, answered, replaced or stopped."""
    fd = open_log()
    if fd is None:
        return  # a log line is never worth failing or holding a command
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    try:
        os.write(fd, f"{stamp} UTC | digitflow | {event}\n".encode())
    except OSError:
        pass
    finally:
        os.close(fd)


def _wait(url: str, seconds: float, proc: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if healthy(url, timeout=0.5):
            return True
        if proc is not None and proc.poll() is not None:
            return False  # it exited: the port is taken, or the database is broken (see the log)
        time.sleep(0.25)
    return False


def _terminate(pid: int, grace: float = 10.0) -> bool:
    """SIGTERM the server's process group, then SIGKILL after ``grace`` seconds."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except OSError:
        return False
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            return True
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    return True


def stop() -> bool:
    """Stop the local server this machine's digitflow started; False when none was running."""
    pid = running_pid()
    stopped = _terminate(pid) if pid is not None else False
    (state_dir() / "server.pid").unlink(missing_ok=True)
    if stopped:
        _log(f"pid {pid} stopped by `digitflow server stop`")
    return stopped


# ---- the dashboard link, printed once per command ------------------------------------------

_announced: set[str] = set()
announce = False  # set by the CLI: print where each top-level run can be watched


def announce_run(flow, flow_run, state) -> None:
    """A flow's ``on_running`` hook: ``dashboard: <ui>/runs/flow-run/<id>`` on stderr, once per
    command, for the top-level run the CLI started (not its subflows, not in ephemeral mode)."""
    if not announce or flow_run.parent_task_run_id or ephemeral() or _announced:
        return
    _announced.add(str(flow_run.id))
    print(f"dashboard: {ui_url()}/runs/flow-run/{flow_run.id}", file=sys.stderr, flush=True)


def main() -> None:
    """``python -m flows.server server start …``: Prefect's own CLI, in a process whose SQLite
    writers wait for the lock instead of answering 503 (``tasks.prefect_compat``, entry 8)."""
    from prefect.cli import app

    from tasks.prefect_compat import immediate_sqlite_writes

    immediate_sqlite_writes()
    sys.exit(app())


if __name__ == "__main__":
    main()
