"""Every use of a Prefect internal, in one place (tested against the Prefect versions
``pyproject.toml`` allows). Each entry says what upstream behaviour it works around; if a
Prefect release removes what one relies on, that adjustment is skipped and Prefect's own
behaviour stays (the function says so by returning False, and a test notices).

1. ``skip_heartbeat_join``: Prefect's sync flow engine joins each flow run's heartbeat thread
   when the run ends; the thread sleeps in 1-second steps, so every flow run waited up to a
   second (a warm ``digitflow run`` is three flow runs: ~2 s of it). Prefect's async engine
   already passes ``join_on_exit=False``; we ask the same of the sync engine. Heartbeats and the
   crash detection built on them are unchanged.
2. ``detach_temporary_server``: in ephemeral mode Prefect starts its temporary API server as a
   child in our process group, so a terminal's Ctrl-C kills it under the run, which then spends
   minutes retrying. We start it in a session of its own (our signal handler stops it) and send
   its output to a log file (its shutdown after a failed run prints CancelledError tracebacks).
3. ``async_dispatch``: the decorator Prefect's own filesystems use to offer one method to sync
   and async callers; our result storage (``tasks.common.ObjectResults``) implements the same
   interface.
4. ``dask_cluster``: Prefect's DaskTaskRunner keeps the cluster it created in ``_cluster``; the
   sweep says in its log whether it made a temporary cluster or joined an existing one.
5. ``refresh_settings``: Prefect reads its settings once, at import; the CLI points it at the
   local server after that (``flows.server``).
6. ``quick_first_retries``: the client's first two waits after a 503 are ~0.25 and 0.5 s, not
   2 and 4 s: a SQLite server answers 503 whenever two writers meet (see the function).
7. ``plain_form_fields``: a deployment's parameter schema is private to it until registered;
   its optional parameters are made plain inputs of the dashboard's Run form (see the function).
8. ``immediate_sqlite_writes``: in the local server's own process (``python -m flows.server``),
   the SQLite database's write transactions wait for the lock instead of failing with a 503 when
   two writers meet (see the function).
"""

from __future__ import annotations

import functools
import inspect
import os
import subprocess

from prefect._internal.compatibility.async_dispatch import async_dispatch  # noqa: F401  (3.)


def skip_heartbeat_join() -> bool:
    """1. A finished flow run does not wait for its heartbeat thread."""
    from prefect import flow_engine

    original = getattr(flow_engine, "_send_heartbeats", None)
    if original is None or getattr(original, "_digitflow", False):
        return original is not None
    if list(inspect.signature(original).parameters) != ["engine", "join_on_exit"]:
        return False
    send_heartbeats = functools.partial(original, join_on_exit=False)
    send_heartbeats._digitflow = True
    flow_engine._send_heartbeats = send_heartbeats
    return True


def detach_temporary_server(log_file) -> bool:
    """2. Prefect's temporary server in a session of its own, its output into ``log_file()``
    (a callable opening the log; not called with ``DIGITFLOW_DEBUG`` set: then it goes to the
    terminal as before)."""
    try:
        from prefect.server.api.server import SubprocessASGIServer
    except ImportError:
        return False
    original = getattr(SubprocessASGIServer, "_run_uvicorn_command", None)
    if original is None:
        return False
    if getattr(original, "_digitflow_detached", False):
        return True

    def run_detached(self):
        real_popen = subprocess.Popen

        def popen(*args, **kwargs):
            kwargs.setdefault("start_new_session", True)
            from storage.settings import debug

            if not debug():
                kwargs.setdefault("stdout", log_file())
                kwargs.setdefault("stderr", subprocess.STDOUT)
            return real_popen(*args, **kwargs)

        subprocess.Popen = popen
        try:
            return original(self)
        finally:
            subprocess.Popen = real_popen

    run_detached._digitflow_detached = True
    SubprocessASGIServer._run_uvicorn_command = run_detached
    return True


def dask_cluster(runner):
    """4. The cluster a DaskTaskRunner created itself (None when it joined an existing one)."""
    return getattr(runner, "_cluster", None)


def refresh_settings() -> None:
    """5. Make Prefect read its settings (PREFECT_API_URL) from the environment again."""
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()


class _QuickFirstRetries:
    """A stand-in for a module (``time`` or ``anyio``) whose short sleeps (under 6 s: Prefect's
    first two retry waits, jittered around 2 and 4 s) last an eighth as long; the rest as is."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)

    def sleep(self, seconds, *args, **kwargs):
        return self._module.sleep(seconds / 8 if seconds < 6 else seconds, *args, **kwargs)


def quick_first_retries() -> bool:
    """6. Prefect's client waits ~2, 4, 8, 16, 32 s before its retries of a 503. A SQLite server
    answers 503 whenever two writers meet (SQLITE_BUSY_SNAPSHOT fails at once: ``busy_timeout``
    does not apply), which happens on most runs with subflows, each time a 2-s pause (digitflow's
    local server no longer answers these: entry 8; other SQLite servers still do). The first two
    waits become ~0.25 and 0.5 s, the later ones stay (~57 s of patience instead of ~62, for a
    server that is really down). ``prefect.client.base`` uses its ``time.sleep`` and
    ``anyio.sleep`` for nothing but these waits."""
    import time

    import anyio
    from prefect.client import base

    if isinstance(getattr(base, "time", None), _QuickFirstRetries):
        return True
    if getattr(base, "time", None) is not time or getattr(base, "anyio", None) is not anyio:
        return False
    base.time, base.anyio = _QuickFirstRetries(time), _QuickFirstRetries(anyio)
    return True


def plain_form_fields(deployment, switches: dict[str, bool]) -> bool:
    """7. The dashboard's Run form shows a parameter typed ``X | None = None`` as a toggle between
    "X" and "None" that opens on 'Property is type "None"'. Described as a plain X without a
    default, it opens as an empty input; left empty, the parameter is not sent and the flow gets
    its default, None (for a hyperparameter: the preset's value, as the field's description
    says). A switch cannot be left empty: a ``bool | None`` parameter named in ``switches`` opens
    on the value given there (the form always sends it). The type Prefect enforces for a run's
    parameters is the flow's signature, unchanged; the server's check of a run from the form
    still applies X's bounds."""
    schema = getattr(deployment, "_parameter_openapi_schema", None)
    properties = getattr(schema, "properties", None)
    if not isinstance(properties, dict):
        return False
    for prop in properties.values():
        branches = prop.get("anyOf") or []
        kept = [b for b in branches if b != {"type": "null"}]
        if prop.get("default", False) is None and len(branches) == 2 and len(kept) == 1:
            if kept[0].get("type") == "boolean":
                if prop.get("title") not in switches:
                    continue  # left as Prefect made it, rather than a switch that sends False
                prop["default"] = switches[prop["title"]]
            else:
                del prop["default"]
            del prop["anyOf"]
            prop.update(kept[0])
    return True


def immediate_sqlite_writes() -> bool:
    """8. For the server's process only. Prefect's SQLite server begins its write transactions
    DEFERRED: one that has read, when another writer commits first, cannot write (SQLITE_BUSY_SNAPSHOT
    fails at once: ``busy_timeout`` does not apply) and the request is answered 503. A warm
    ``digitflow run`` met it on most runs (the ``publish`` subflow created while the server
    recorded the ingest's task runs: ~0.3 s of the client's back-off). The server's own comment
    names the cure, the IMMEDIATE mode its ``with_for_update`` transactions use: a writer then
    takes the write lock first, waiting for it up to the 60-s ``busy_timeout``. Reads outside
    these transactions are unaffected (WAL: readers never wait)."""
    import contextlib

    try:
        from prefect.server.database import configurations
    except ImportError:
        return False
    sqlite = getattr(configurations, "AioSqliteConfiguration", None)
    original = getattr(sqlite, "begin_transaction", None)
    if original is None:
        return False
    if getattr(original, "_digitflow", False):
        return True
    if "with_for_update" not in inspect.signature(original).parameters:
        return False

    @contextlib.asynccontextmanager
    async def begin_transaction(self, session, with_for_update: bool = False):
        async with original(self, session, with_for_update=True) as transaction:
            yield transaction

    begin_transaction._digitflow = True
    sqlite.begin_transaction = begin_transaction
    return True


HEARTBEAT_JOIN_SKIPPED = skip_heartbeat_join()
QUICK_FIRST_RETRIES = quick_first_retries()
