"""Ctrl-C and SIGTERM end any ``digitflow`` command within seconds, with one line.

A terminal's Ctrl-C sends SIGINT to the whole foreground process group. Left to itself, that
kills Prefect's temporary API server (a child process) along with us, and the run then spends
minutes retrying a server that is gone. So:

- the temporary server is started in a session of its own (the terminal's signal does not
  reach it), and stopped by us;
- on SIGINT/SIGTERM the main thread stops where it is; a helper thread records the flow and
  task runs in flight as Crashed (bounded in time), stops our child processes (the temporary
  server, a sweep's Dask workers), prints one line and exits 130 (SIGINT) or 143 (SIGTERM).
  A hard timer ends the process even if the server does not answer.

Nothing half-written is visible afterwards: every write is a temp file or staging folder
renamed into place, and the next run clears what an interrupted writer left.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}
NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}
GRACE = 3.5  # seconds for recording states and stopping children, then exit regardless

_command = "digitflow"
_fired = threading.Event()


def install(command: str) -> None:
    """Handle SIGINT/SIGTERM for the rest of this process (call from the main thread)."""
    global _command
    _command = command
    for sig in EXIT_STATUS:
        signal.signal(sig, _on_signal)


def _on_signal(signum, frame) -> None:
    code = EXIT_STATUS[signum]
    if _fired.is_set():  # a second Ctrl-C: out now
        os._exit(code)
    _fired.set()
    flow_run_id = _current_flow_run_id()  # read here: the run context lives in this (main) thread
    line = (f"digitflow: interrupted by {NAMES[signum]}: {_command} stopped"
            + ("" if _command.split()[-1:] in (["api"], ["server"], ["serve"]) else  # a server: its runs, if any,
               # are processes of their own; nothing of this one's was being written
               "; nothing half-written is visible, and a rerun resumes from the cached work"))
    hard_stop = threading.Timer(GRACE + 1.0, _exit, (code, line))
    hard_stop.daemon = True
    hard_stop.start()
    threading.Thread(target=_shut_down, args=(code, line, flow_run_id), daemon=True).start()
    threading.Event().wait()  # the main thread goes no further; the helper thread exits the process


def _exit(code: int, line: str) -> None:
    try:
        sys.stderr.flush()
    except Exception:
        pass
    show_cursor = "\x1b[?25h" if os.isatty(2) else ""  # a progress display hides it; we exit past its cleanup
    os.write(2, (show_cursor + "\n" + line + "\n").encode())
    os._exit(code)


def _shut_down(code: int, line: str, flow_run_id) -> None:
    crashed: list[str] = []
    if flow_run_id is not None:
        from storage import within

        within(GRACE - 1.0, lambda: _record_crashed(flow_run_id, crashed), "digitflow-crashed")
    _stop_children()
    if crashed:
        line += f" (marked Crashed: {', '.join(crashed)})"
    _exit(code, line)


def _current_flow_run_id():
    if "prefect" not in sys.modules:
        return None
    try:
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        return ctx.flow_run.id if ctx and ctx.flow_run else None
    except Exception:
        return None


def _record_crashed(flow_run_id, crashed: list[str]) -> None:
    """Mark the in-flight task runs, the flow run and its parents as Crashed on the API."""
    try:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, \
            TaskRunFilterState, TaskRunFilterStateType
        from prefect.client.schemas.objects import StateType
        from prefect.states import Crashed

        message = "Interrupted by a signal; nothing half-written is visible"
        with get_client(sync_client=True) as client:
            run_id = flow_run_id
            while run_id is not None:
                flow_run = client.read_flow_run(run_id)
                active = client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])),
                    task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(
                        any_=[StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED]))))
                for task_run in active:
                    client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
                    crashed.append(task_run.name)
                if flow_run.state is None or not flow_run.state.is_final():
                    client.set_flow_run_state(run_id, Crashed(message=message), force=True)
                    crashed.append(flow_run.name)
                parent = flow_run.parent_task_run_id
                run_id = client.read_task_run(parent).flow_run_id if parent else None
                if parent:
                    client.set_task_run_state(parent, Crashed(message=message), force=True)
    except Exception:  # the server may be gone too: the exit must not wait on it
        pass


def _stop_children() -> None:
    """Terminate our child processes (temporary API server, local Dask workers), then kill; not
    the local Prefect server (flows/server.py), which outlives the command that started it."""
    try:
        import psutil
    except ImportError:
        return
    from flows import server

    shared = server.running_pid()  # the local Prefect server this command may have started serves others too
    children = [c for c in psutil.Process().children(recursive=True) if c.pid != shared]
    if shared is not None:
        try:
            spared = {c.pid for c in psutil.Process(shared).children(recursive=True)}
            children = [c for c in children if c.pid not in spared]
        except psutil.Error:
            pass
    for child in children:
        try:
            child.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=1.0)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            pass


def _server_log():
    """Prefect's temporary server's log: ``<PREFECT_HOME>/digitflow-temporary-server.log``."""
    from prefect.settings import get_current_settings

    home = get_current_settings().home
    home.mkdir(parents=True, exist_ok=True)
    return open(home / "digitflow-temporary-server.log", "ab")


def detach_ephemeral_server() -> None:
    """Start Prefect's temporary API server (when one is used) in a session of its own, so a
    terminal's Ctrl-C does not kill it under us (``_stop_children`` or Prefect's exit handler
    stops it), its output in a log file (``tasks.prefect_compat.detach_temporary_server``)."""
    try:
        from prefect.settings import get_current_settings

        if get_current_settings().api.url:  # a real server: nothing of ours to protect
            return
    except ImportError:
        return
    from tasks.prefect_compat import detach_temporary_server

    detach_temporary_server(_server_log)
