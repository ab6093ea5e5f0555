"""What every digitflow task shares: content-addressed cache keys and JSON results."""

from __future__ import annotations

import functools
from typing import Any, Callable

from prefect.utilities.hashing import hash_objects

from storage import code_digest

# Results are small dicts of paths, hashes and numbers: store them as JSON, not pickle.
CACHED = dict(persist_result=True, result_serializer="json")


@functools.cache
def code_version(*packages: str) -> str:
    return code_digest(*packages)


@functools.cache
def refs_version() -> str:
    """Digest of tasks/refs.py: a cached result is only reused in the shape it was stored in."""
    import hashlib
    from pathlib import Path

    return hashlib.sha256(Path(__file__).with_name("refs.py").read_bytes()).hexdigest()


def content_key(fields: Callable[[dict], Any], *, code: tuple[str, ...] = ("storage",)):
    """A cache_key_fn: hash of the task name, ``fields(parameters)``, the code digest and the
    references' shape."""

    def key(context, parameters) -> str:
        material = (context.task.name, fields(parameters), code_version(*code), refs_version())
        return hash_objects(material, raise_on_failure=True)

    return key
