"""Alerts: a failed run or a gate rejection is POSTed as JSON to a webhook.

A webhook URL usually *is* a secret (a token in its path or query), and flow-run parameters
are shown to every dashboard user; so the flows' ``webhook`` parameter never holds a URL, only
where to find one: ``env:NAME`` (an environment variable of the process running the flow) or
``secret:NAME`` (a Prefect Secret block). Without it, ``$DIGITFLOW_WEBHOOK_URL`` is used; with
neither, nothing is sent. ``digitflow run --webhook URL`` hands a URL to its own flow run
through its environment. Logs name only the receiver's host.

The POST has one total deadline (``DEADLINE`` seconds, however slowly the receiver answers),
follows no redirect, reads no response body, and is never fatal: a failure is one warning.
"""

from __future__ import annotations

import logging
import os
import re
from datetime import datetime, timezone
from urllib.parse import urlsplit

from storage import DigitflowError, within
from storage.settings import settings
from tasks.refs import Decision, Published  # noqa: F401 (types)

log = logging.getLogger("digitflow.alerts")

ENV = "DIGITFLOW_WEBHOOK_URL"
REFERENCE = re.compile(r"(env|secret):([A-Za-z0-9_][A-Za-z0-9_-]{0,127})")
DEADLINE = 10.0  # seconds for the whole POST: connect, send, the receiver's answer


def check_reference(webhook: str | None) -> str | None:
    """The ``webhook`` parameter: None, ``env:NAME`` or ``secret:NAME``; a URL is refused (it
    would be recorded in the flow run's parameters for every dashboard user to read)."""
    if webhook is None or REFERENCE.fullmatch(webhook):
        return webhook
    what = "a URL" if "://" in str(webhook) else repr(str(webhook)[:40])
    raise DigitflowError(f"webhook: {what} is not accepted as a flow parameter (parameters are shown in the "
                         f"dashboard); store the URL in a Prefect Secret block and pass secret:NAME, or in an "
                         f"environment variable of the workers and pass env:NAME (or set {ENV} there)")


def webhook_url(webhook: str | None = None) -> str | None:
    """The URL a ``webhook`` reference names (else ``$DIGITFLOW_WEBHOOK_URL``), or None."""
    if webhook is None:
        url = settings().webhook_url
        return url.get_secret_value() if url else None
    kind, name = REFERENCE.fullmatch(webhook).groups()
    if kind == "env":
        return os.environ.get(name) or None
    from prefect.blocks.system import Secret

    try:
        return str(Secret.load(name).get()) or None
    except (ValueError, RuntimeError) as e:
        log.warning("webhook: Prefect Secret block %r cannot be read (%s); no alert sent", name, type(e).__name__)
        return None


def where(url: str) -> str:
    """What a log may say about a webhook URL: its scheme and host, never its path or credentials."""
    try:
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.hostname}/…"
    except ValueError:
        return "(an unparsable URL)"


def notify(url: str | None, event: str, **details) -> bool:
    """POST {"event", "at", ...details} to ``url`` within ``DEADLINE`` seconds in all; True when
    the receiver accepted it (2xx)."""
    if not url:
        return False
    if urlsplit(url).scheme not in ("http", "https"):
        log.warning("could not deliver %s alert: the webhook must be an http(s) URL", event)
        return False
    import requests  # (here: a run without a webhook never imports it)

    payload = {"source": "digitflow", "event": event, "at": datetime.now(timezone.utc).isoformat(), **details}

    def post() -> int | str:
        try:
            with requests.post(url, json=payload, timeout=(DEADLINE, DEADLINE), allow_redirects=False,
                               stream=True) as r:  # stream: the body is never read
                return r.status_code
        except requests.RequestException as e:
            return type(e).__name__

    # requests' timeouts are per socket read: a receiver trickling a byte at a time would hold
    # the run for as long as it likes. The POST runs on a daemon thread we stop waiting for.
    outcome = within(DEADLINE, post, "digitflow-webhook")
    status = outcome[0] if outcome else f"no answer within {DEADLINE:g} s"
    if isinstance(status, int) and 200 <= status < 300:
        return True
    why = (f"answered HTTP {status}" + (" (a redirect: not followed)" if 300 <= status < 400 else "")
           if isinstance(status, int) else status)
    log.warning("could not deliver %s alert to %s: %s", event, where(url), why)
    return False


def alert_if_rejected(webhook: str | None, published: "Published", decision: "Decision") -> None:
    """POST a gate_rejected alert when this run's gate decision was a rejection (once: an
    unchanged rerun that finds the decision already made says nothing new)."""
    if decision.status == "rejected" and decision.decided_now:
        from prefect.runtime import flow_run

        notify(webhook_url(webhook), "gate_rejected", model=published.name, version=published.version,
               test_accuracy=published.test_accuracy, reason=decision.reason,
               flow_run_id=str(flow_run.id) if flow_run.id else None)


def on_flow_failure(flow, flow_run, state) -> None:
    """Prefect flow hook: report a failed run (which flow, which run, why); a failed subflow is
    reported by the run it belongs to."""
    if getattr(flow_run, "parent_task_run_id", None):
        return
    webhook = (flow_run.parameters or {}).get("webhook")
    notify(webhook_url(webhook if isinstance(webhook, str) and REFERENCE.fullmatch(webhook) else None),
           "flow_run_failed", flow=flow.name, flow_run=flow_run.name, flow_run_id=str(flow_run.id),
           message=state.message or "")


# ---- the same alerts as Prefect automations (server side) ------------------------------

def install_automations(url: str, block_name: str = "digitflow-alerts") -> list[str]:
    """Create (or replace) a webhook notification block and two automations on the server:
    a failed retrain/sweep flow run, and a gate rejection, each POST to ``url``."""
    from prefect.automations import Automation, EventTrigger, SendNotification
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    from tasks.model import REJECTED_EVENT

    block = CustomWebhookNotificationBlock(
        name="digitflow", url=url, method="POST", allow_private_urls=True,
        json_data={"source": "prefect-automation", "subject": "{{subject}}", "body": "{{body}}"})
    block_id = block.save(block_name, overwrite=True)
    specs = [
        ("digitflow: run failed", EventTrigger(
            expect={"prefect.flow-run.Failed"}, match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": ["retrain", "sweep"]},
            posture="Reactive", threshold=1),
         "digitflow run failed", "Flow run {{ flow_run.name }} failed: {{ flow_run.state.message }}"),
        ("digitflow: model rejected", EventTrigger(
            expect={REJECTED_EVENT}, match={"prefect.resource.id": "digitflow.model.*"}, posture="Reactive",
            threshold=1),
         "digitflow model rejected", "{{ event.resource.name }} was rejected: {{ event.payload.reason }}"),
    ]
    names = []
    for name, trigger, subject, body in specs:
        try:
            Automation.read(name=name).delete()
        except ValueError:
            pass
        Automation(name=name, description="Installed by `digitflow alerts install`", trigger=trigger,
                   actions=[SendNotification(block_document_id=block_id, subject=subject, body=body)]).create()
        names.append(name)
    return names
