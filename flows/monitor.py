"""The monitor flow: read a running API's ``/drift``, record it, and raise a Prefect event when
the served inputs drifted from the served version's test split.

    digitflow monitor --api http://127.0.0.1:8000               # once
    digitflow monitor --api http://127.0.0.1:8000 --cron "*/15 * * * *"   # served on a schedule

The event, ``digitflow.drift.detected`` (resource ``digitflow.model.<name>``, the statistics in
its payload), is what ``digitflow deploy --retrain-on-drift`` makes an automation react to: it
runs the retraining deployment. The API's answer is input like any other: its size is bounded
before it is read, it must parse into ``DriftReport``, and its text is escaped where it lands.
"""

from __future__ import annotations

from typing import Annotated, Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.events import emit_event
from pydantic import BaseModel, ConfigDict, Field

from flows.server import announce_run
import tasks.prefect_compat  # noqa: F401  (flow runs end without waiting for their heartbeat thread)
from storage import DigitflowError
from storage.drift import MIN_IMAGES, PSI_THRESHOLD, STATISTICS
from storage.settings import settings
from tasks.common import artifact_key
from tasks.refs import DriftOutcome

DRIFT_EVENT = "digitflow.drift.detected"
MAX_ANSWER = 1 << 20   # bytes of /drift read at most
TIMEOUT = 10.0         # seconds for the whole request
ApiUrl = Annotated[str, Field(pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$", max_length=2048,
                              description="Base URL of a running `digitflow api`")]
Threshold = Annotated[float, Field(gt=0, le=100, description="PSI above which a statistic counts as drifted")]
MinImages = Annotated[int, Field(ge=1, le=1_000_000, description="Images the window needs before it is judged")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Statistic(_Strict):
    psi: Optional[float] = None
    ks: Optional[float] = None
    window: list[float] = Field(max_length=1000)
    reference: Optional[list[float]] = Field(default=None, max_length=1000)


class Served(_Strict):
    name: str = Field(max_length=100)
    version: int


class DriftReport(_Strict):
    """What ``GET /drift`` answers (the fields the monitor uses)."""

    model: Served
    window_images: int = Field(ge=0)
    compared: bool
    statistics: dict[str, Statistic]


@task(task_run_name="read {api_url}/drift", retries=2, retry_delay_seconds=[2, 4])
def read_drift(api_url: str) -> DriftReport:
    """GET /drift with the API's token (``$DIGITFLOW_API_TOKEN``, never a parameter), bounded."""
    import requests

    token = settings().api_token
    headers = {"authorization": f"Bearer {token.get_secret_value()}"} if token else {}
    try:
        with requests.get(api_url.rstrip("/") + "/drift", headers=headers, timeout=TIMEOUT, stream=True,
                          allow_redirects=False) as r:
            body = r.raw.read(MAX_ANSWER + 1, decode_content=True)
            status = r.status_code
    except requests.RequestException as e:
        raise DigitflowError(f"{api_url}: no answer ({type(e).__name__})") from None
    if status != 200:
        raise DigitflowError(f"{api_url}/drift answered {status}")
    if len(body) > MAX_ANSWER:
        raise DigitflowError(f"{api_url}/drift answered more than {MAX_ANSWER:,} bytes")
    try:
        return DriftReport.model_validate_json(body)
    except ValueError as e:
        raise DigitflowError(f"{api_url}/drift is not a drift report ({type(e).__name__})") from None


def judge(report: DriftReport, threshold: float, min_images: int) -> list[str]:
    """The statistics whose PSI crossed ``threshold`` (none before ``min_images`` images)."""
    if not report.compared or report.window_images < min_images:
        return []
    return [name for name in STATISTICS if (s := report.statistics.get(name)) and s.psi is not None
            and s.psi > threshold]


@flow(name="monitor", flow_run_name="monitor", on_running=[announce_run])
def monitor(api_url: ApiUrl = "http://127.0.0.1:8000", threshold: Threshold = PSI_THRESHOLD,
            min_images: MinImages = MIN_IMAGES) -> DriftOutcome:
    """Compare what a running API was asked with its served version's test split; emit
    `digitflow.drift.detected` when a statistic's PSI crosses the threshold.

    Args:
        api_url: Base URL of a running `digitflow api` (its token from $DIGITFLOW_API_TOKEN).
        threshold: PSI above which a statistic counts as drifted (0.25: a significant shift).
        min_images: Images the API's window needs before anything is judged.
    """
    from prefect.runtime import flow_run

    from flows.pipeline import update_run

    log = get_run_logger()
    report = read_drift(api_url)
    drifted = judge(report, threshold, min_images)
    name, version = report.model.name, report.model.version
    rows = [{"statistic": s, "psi": report.statistics[s].psi, "ks": report.statistics[s].ks,
             "threshold": threshold, "drifted": s in drifted} for s in STATISTICS if s in report.statistics]
    create_table_artifact(rows, key=artifact_key(name, "drift"),
                          description=f"{name} v{version}: {report.window_images} served images"
                                      + (f", drifted: {', '.join(drifted)}" if drifted else ""))
    summary = DriftOutcome(model=name, version=version, window_images=report.window_images, compared=report.compared,
                           drifted=drifted, psi={s: report.statistics[s].psi for s in STATISTICS if s in report.statistics})
    if drifted:
        log.warning("%s v%d: served inputs drifted (%s); event %s emitted", name, version,
                    ", ".join(f"{s} PSI {report.statistics[s].psi:.2f}" for s in drifted), DRIFT_EVENT)
        emit_event(event=DRIFT_EVENT, resource={"prefect.resource.id": f"digitflow.model.{name}",
                                                "prefect.resource.name": name},
                   payload={**summary.model_dump(), "threshold": threshold, "flow_run_id": str(flow_run.id)})
    elif report.window_images < min_images or not report.compared:
        log.info("%s v%d: %d served images%s; nothing judged", name, version, report.window_images,
                 "" if report.compared else " and no reference to compare with")
    else:
        log.info("%s v%d: no drift over %d served images", name, version, report.window_images)
    update_run(name=f"monitor: {name} v{version} {'drifted' if drifted else 'steady'}")
    return summary


def retrain_on_drift(deployment_id, model_name: str) -> str:
    """An automation (replaced if it exists) that runs the deployment when the model's inputs drift."""
    from prefect.automations import Automation, EventTrigger, RunDeployment

    name = f"digitflow: retrain {model_name} on drift"
    try:
        Automation.read(name=name).delete()
    except ValueError:
        pass
    Automation(name=name, description="Installed by `digitflow deploy --retrain-on-drift`",
               trigger=EventTrigger(expect={DRIFT_EVENT}, match={"prefect.resource.id": f"digitflow.model.{model_name}"},
                                    posture="Reactive", threshold=1),
               actions=[RunDeployment(source="selected", deployment_id=deployment_id, parameters=None)]).create()
    return name


def check_api_url(url: str) -> str:
    """``--api``: an http(s) base URL (one line otherwise, before Prefect starts)."""
    from pydantic import TypeAdapter, ValidationError

    from storage.text import terminal

    try:
        return TypeAdapter(ApiUrl).validate_python(url)
    except ValidationError:
        raise DigitflowError(f"--api {terminal(url[:200])!r} is not an http(s) base URL") from None
