"""Read back what the Prefect server recorded, as an operator would see it."""

from __future__ import annotations

import contextlib
import socket
import time

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentTaskRunId


def task_runs(flow_run_id, *, settle: float = 15.0, expect: int = 0) -> dict:
    """``{task run name: task run}`` of one flow run and its subflows, once every state is final
    and the count has held for a moment (task runs reach the server as events, some late), or at
    least ``expect`` of them are there."""
    deadline = time.monotonic() + settle
    seen = -1
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            final = runs and all(r.state and r.state.is_final() for r in runs)
            if final and len(runs) >= expect and (len(runs) == seen or expect) or time.monotonic() > deadline:
                break
            seen = len(runs) if final else -1
            time.sleep(0.3)
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_task_run_id=FlowRunFilterParentTaskRunId(any_=[r.id for r in runs]))) if runs else []
    found = {r.name: r for r in runs}
    for child in children:
        found.update(task_runs(child.id, settle=settle))
    return found


def state_names(flow_run_id, **kw) -> dict[str, str]:
    return {name: run.state.name for name, run in task_runs(flow_run_id, **kw).items()}


def flow_run_id(state):
    return state.state_details.flow_run_id


@contextlib.contextmanager
def client_for(url):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        with get_client(sync_client=True) as client:
            yield client


def flow_runs(client, flow_name):
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                 sort=FlowRunSort.START_TIME_DESC)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def newest_run_states(url: str, flow_name: str) -> dict[str, str]:
    """``{task run name: state name}`` of the newest run of ``flow_name`` (and its subflows) on
    the server at ``url``: what an operator sees in the dashboard."""
    with client_for(url) as client:
        run = flow_runs(client, flow_name)[0]
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        return {name: r.state.name for name, r in task_runs(run.id).items()}
