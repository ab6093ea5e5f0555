"""One adjustment to how Prefect runs our flows: a finished flow run does not wait for its
heartbeat thread.

Prefect (3.9) starts a daemon thread per flow run that emits a heartbeat at once and then every
``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds (180), sleeping in 1-second steps; when the run
ends, the engine sets a stop flag and, in its sync engine, joins the thread, i.e. waits out the
current 1-second sleep. A warm ``digitflow run`` is three flow runs of well under a second each,
so those joins were ~2 s of a ~6.7 s run (py-spy: ``_send_heartbeats`` → ``Thread.join``).

Prefect's async engine already skips that join (``join_on_exit=False``): the thread sees the stop
flag within a second and returns without emitting again. We ask the same of the sync engine.
Heartbeats (and the crash detection built on them) are unchanged. If a Prefect release changes
this private function's signature, the adjustment is skipped and Prefect's own behaviour stays.
"""

from __future__ import annotations

import functools
import inspect

from prefect import flow_engine


def _install() -> bool:
    original = getattr(flow_engine, "_send_heartbeats", None)
    if original is None or getattr(original, "_digitflow", False):
        return original is not None
    if list(inspect.signature(original).parameters) != ["engine", "join_on_exit"]:
        return False

    send_heartbeats = functools.partial(original, join_on_exit=False)
    send_heartbeats._digitflow = True
    flow_engine._send_heartbeats = send_heartbeats
    return True


INSTALLED = _install()
