"""Where state lives and where data comes from: flags, then environment, then defaults."""

from __future__ import annotations

import os
from typing import Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field

from storage.home import DEFAULT_HOME, Home  # noqa: F401 (DEFAULT_HOME re-exported)
from storage.download import DEFAULT_TIMEOUT  # noqa: F401 (one source, re-exported)
from storage.mnist import DEFAULT_MIRRORS
from storage.settings import settings

def resolve_home(home: str | os.PathLike | None = None, existing: bool = False) -> Home:
    """``--home``, else ``$DIGITFLOW_HOME``, else ``~/.digitflow``; created and proven writable
    (``existing``: a local home must be there already)."""
    return Home.resolve(home, existing)


def resolve_mirrors(mirrors: Sequence[str] | None = None, default: Sequence[str] = DEFAULT_MIRRORS) -> list[str]:
    """``--mirror`` flags in order, else ``$DIGITFLOW_MIRRORS`` (comma/space separated), else the
    dataset's public ones (``default``; MNIST's unless given)."""
    if mirrors:
        return list(mirrors)
    return settings().mirrors or list(default)


class IngestSettings(BaseModel):
    """How ``ingest`` fetches and shards: every default and bound of these settings, written once.
    The ``ingest``/``run``/``sweep`` flags (help and defaults), the flows' parameters (the Run form
    and Prefect's validation: ``flows.contract``) and the one-line error of a value outside its
    bounds (``storage.settings.checked(IngestSettings, …)``) all come from these fields."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    rows_per_shard: int = Field(10_000, ge=1, le=1_000_000, description="Rows per Parquet shard")
    timeout: float = Field(DEFAULT_TIMEOUT, ge=0.1, le=3600.0,
                           description="Seconds of silence before a mirror counts as failed")
    retries: int = Field(3, ge=0, le=10, description="Retries of a download after transient failures, backoff 2 s, "
                                                      "4 s, 8 s, ...")
    deadline: Optional[float] = Field(None, ge=1.0, le=86_400.0, description="Seconds one mirror may take for one "
                                      "file (default: timeout + archive size at 50 kB/s)")


_DEFAULTS = IngestSettings()
DEFAULT_ROWS_PER_SHARD, DEFAULT_RETRIES = _DEFAULTS.rows_per_shard, _DEFAULTS.retries  # (the flows' signatures)
