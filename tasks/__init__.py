"""Thin Prefect tasks over ``nn/`` and ``storage/``: cache policy, retries, logging.

Tasks exchange small references (paths + SHA-256), never big arrays. Cache keys are built
from content hashes and settings, plus a digest of the code that does the work: Prefect's
``TASK_SOURCE`` would only hash the task body, not ``storage/`` or ``nn/`` behind it.
"""

import sys
from pathlib import Path

# Tasks are what a Dask worker imports first (to unpickle a task), and a worker puts its
# local directory first on sys.path; that directory holds Dask's spill folder `storage/`.
# With an editable install (found by a meta-path finder that runs after sys.path), that
# empty folder would be imported as a namespace package in place of our `storage`. Putting
# the folder that holds our packages on sys.path makes the real package win, wherever the
# worker was started.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
_shadow = sys.modules.get("storage")
if _shadow is not None and getattr(_shadow, "__file__", None) is None:  # an empty namespace package
    del sys.modules["storage"]
