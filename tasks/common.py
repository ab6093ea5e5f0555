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


def content_key(fields: Callable[[dict], Any], *, code: tuple[str, ...] = ("storage",)):
    """A cache_key_fn: hash of the task name, ``fields(parameters)`` and the code digest."""

    def key(context, parameters) -> str:
        material = (context.task.name, fields(parameters), code_version(*code))
        return hash_objects(material, raise_on_failure=True)

    return key
