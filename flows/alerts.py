"""Alerts: a failed run or a gate rejection is POSTed as JSON to a webhook.

The URL is the flow's ``webhook_url`` parameter, else ``$DIGITFLOW_WEBHOOK_URL``; without
one, nothing is sent. A webhook that cannot be reached is logged, never fatal.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone

import requests

from tasks.refs import Decision, Published  # noqa: F401 (types)

log = logging.getLogger("digitflow.alerts")


def webhook_url(parameters: dict | None = None) -> str | None:
    return (parameters or {}).get("webhook_url") or os.environ.get("DIGITFLOW_WEBHOOK_URL") or None


def notify(url: str | None, event: str, **details) -> bool:
    """POST {"event", "at", ...details} to ``url``; True when the receiver accepted it."""
    if not url:
        return False
    payload = {"source": "digitflow", "event": event, "at": datetime.now(timezone.utc).isoformat(), **details}
    try:
        r = requests.post(url, json=payload, timeout=10)
        r.raise_for_status()
        return True
    except requests.RequestException as e:
        log.warning("could not deliver %s alert to %s: %s", event, url, e)
        return False


def alert_if_rejected(url: str | None, published: "Published", decision: "Decision") -> None:
    """POST a gate_rejected alert when this run's gate decision was a rejection (once: an
    unchanged rerun that finds the decision already made says nothing new)."""
    if decision.status == "rejected" and decision.decided_now:
        from prefect.runtime import flow_run

        notify(url or webhook_url(), "gate_rejected", model=published.name, version=published.version,
               test_accuracy=published.test_accuracy, reason=decision.reason,
               flow_run_id=str(flow_run.id) if flow_run.id else None)


def on_flow_failure(flow, flow_run, state) -> None:
    """Prefect flow hook: report a failed run (which flow, which run, why); a failed subflow is
    reported by the run it belongs to."""
    if getattr(flow_run, "parent_task_run_id", None):
        return
    notify(webhook_url(flow_run.parameters), "flow_run_failed", flow=flow.name, flow_run=flow_run.name,
           flow_run_id=str(flow_run.id), message=state.message or "")


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
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": ["mnist-retrain", "mnist-sweep"]},
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
