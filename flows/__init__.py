"""Prefect flows that read top to bottom as the pipeline, plus the ``digitflow`` CLI."""

import os

# This machine (and many users' CI) is offline: no telemetry, before Prefect is imported.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import nn  # noqa: E402,F401  (first: it sets OpenBLAS's thread timeout before NumPy loads)
