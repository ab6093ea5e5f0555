"""Thin Prefect tasks over ``nn/`` and ``storage/``: cache policy, retries, logging.

Tasks exchange small references (paths + SHA-256), never big arrays. Cache keys are built
from content hashes and settings, plus a digest of the code that does the work: Prefect's
``TASK_SOURCE`` would only hash the task body, not ``storage/`` or ``nn/`` behind it.
"""
