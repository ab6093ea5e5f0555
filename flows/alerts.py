"""Alerts: a failed run or a gate rejection is POSTed as JSON to a webhook.

The URL is the flow's ``webhook_url`` parameter, else ``$DIGITFLOW_WEBHOOK_URL``; without
one, nothing is sent. A webhook that cannot be reached is logged, never fatal.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone

import requests

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


def on_flow_failure(flow, flow_run, state) -> None:
    """Prefect flow hook: report a failed run (which flow, which run, why)."""
    notify(webhook_url(flow_run.parameters), "flow_run_failed", flow=flow.name, flow_run=flow_run.name,
           flow_run_id=str(flow_run.id), message=state.message or "")
