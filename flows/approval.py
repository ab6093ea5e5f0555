"""A person in the loop: with ``approval="required"``, a version the gate would promote waits for
someone to approve or reject it before the champion moves.

The publish flow run pauses with a Prefect input form (``Approval``): the dashboard shows it on
the paused run ("Resume" asks for approve / reason / by), and ``digitflow models approve N`` /
``models reject N`` answers it from the command line through the same API call
(``resume_flow_run`` with the form's values). No answer within the timeout (24 h by default)
is a rejection. The answer is validated where it enters (lengths, one line, no control
characters) and recorded with the decision: who, when, why.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pydantic import Field, field_validator
from prefect.input import RunInput

from storage import DigitflowError
from storage.text import has_control
from tasks.refs import Answer, Published

POLL_SECONDS = 2                     # how often the paused run asks whether it was answered
WAITING_TAG = "awaiting-approval"


ONE_LINE = r"^[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f][^\x00-\x1f\x7f]*$"  # in the form's schema: the server checks it too


class Approval(RunInput):
    """The form a paused publish run shows in the dashboard."""

    approve: bool = Field(description="Tick to make this version the champion; leave unticked to reject it.")
    reason: str = Field(min_length=1, max_length=500, pattern=ONE_LINE,
                        description="Why (one line, recorded with the decision).")
    by: str = Field(min_length=1, max_length=100, pattern=ONE_LINE,
                    description="Who decides (one line, recorded with the decision).")

    @field_validator("reason", "by")
    @classmethod
    def _one_plain_line(cls, value: str) -> str:
        if has_control(value) or not value.strip():
            raise ValueError("must be one line of text without control characters")
        return value.strip()


def version_tag(name: str, version: int) -> str:
    return f"approve:{name}:v{version}"


def wait_for_approval(published: Published, timeout: float) -> Answer:
    """Pause this flow run until a person answers (returns their answer) or ``timeout`` passes
    (returns the timeout's rejection). The run carries tags the CLI finds it by."""
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run
    from prefect.runtime import flow_run
    from pydantic import ValidationError

    from flows.pipeline import update_run

    tag = version_tag(published.name, published.version)
    update_run(tags=[WAITING_TAG, tag], name=f"publish: v{published.version} awaiting approval")
    announce(published)
    try:
        answer = pause_flow_run(wait_for_input=Approval, timeout=int(timeout), poll_interval=POLL_SECONDS,
                                key=f"approve-v{published.version}")
        result = Answer(approve=answer.approve, by=answer.by, reason=answer.reason, at=now())
    except FlowPauseTimeout:  # still Paused on the server: running again, to record the rejection
        _running_again(flow_run.id)
        result = Answer(approve=False, by="timeout", reason=f"no approval within {timeout:g} s", at=now())
    except ValidationError:  # an answer the form's schema let through but the form refuses
        result = Answer(approve=False, by="invalid answer", reason="the answer given was not valid", at=now())
    _untag(flow_run.id, {WAITING_TAG, tag})
    return result


def announce(published: Published) -> None:
    """One line on the terminal (and the run's log) saying what waits and how to answer."""
    from prefect import get_run_logger

    get_run_logger().warning("%s v%d awaits approval: answer in the dashboard (Resume) or with `digitflow models "
                             "approve %d --reason …` / `digitflow models reject %d --reason …`",
                             published.name, published.version, published.version, published.version)


def _running_again(run_id) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Running(), force=True)


def _untag(run_id, tags: set[str]) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        client.update_flow_run(run_id, tags=sorted(set(run.tags) - tags))


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---- answering from the command line -------------------------------------------------------

def answer(name: str, version: int, *, approve: bool, reason: str, by: str) -> str:
    """Resume the paused run waiting on ``name`` v``version`` with this answer (validated by the
    same form the dashboard uses); returns the run's id."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType, \
        FlowRunFilterTags
    from prefect.client.schemas.objects import StateType
    from prefect.flow_runs import resume_flow_run
    from pydantic import ValidationError

    try:
        form = Approval(approve=approve, reason=reason, by=by)
    except ValidationError as e:
        first = e.errors()[0]
        raise DigitflowError(f"--{first['loc'][0]}: {first['msg']}") from None
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[version_tag(name, version)]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))), limit=2)
    if not runs:
        raise DigitflowError(f"no run is waiting for approval of {name} v{version} (`digitflow models list` shows "
                             "its status)")
    resume_flow_run(runs[0].id, run_input=form.model_dump(include={"approve", "reason", "by"}))
    return str(runs[0].id)


