"""Prefect flows that read top to bottom as the pipeline, plus the ``digitflow`` CLI."""

import os

# This machine (and many users' CI) is offline: no telemetry, before Prefect is imported.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Idle OpenBLAS workers spin for ~2^28 cycles by default; on 2 cores that spinning slows the
# training loop's element-wise work by up to a third. Only effective before NumPy loads.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
