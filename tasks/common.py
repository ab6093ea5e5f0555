"""What every digitflow task shares: content-addressed cache keys and JSON results."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

from prefect import Task, task
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


class VerifiedTask(Task):
    """A task whose cached result is reused only while what it produced still verifies.

    ``intact(arguments)`` (the call's bound arguments) says whether the file or folder the task
    writes is there and hashes to what it should; when it is not, the cache is refreshed and the
    task runs again (repairing it). Prefect's cache policies can compute a key but cannot ask for
    an overwrite, so the check lives here, with the task, instead of at every call site.
    """

    intact: Callable[[dict], bool]

    def _fresh(self, args, kwargs) -> Task:
        bound = inspect.signature(self.fn).bind(*args, **kwargs)
        bound.apply_defaults()
        return Task.with_options(self, refresh_cache=not self.intact(bound.arguments))

    def __call__(self, *args, **kwargs):
        return self._fresh(args, kwargs)(*args, **kwargs)

    def submit(self, *args, **kwargs):
        return self._fresh(args, kwargs).submit(*args, **kwargs)

    def with_options(self, **options) -> "VerifiedTask":
        return _verified(Task.with_options(self, **options), self.intact)


def verified_task(*, intact: Callable[[dict], bool], **task_options):
    """``@task(**task_options)`` whose cache is refreshed whenever ``intact(arguments)`` is False."""

    def decorate(fn) -> VerifiedTask:
        return _verified(task(**task_options)(fn), intact)

    return decorate


def _verified(plain: Task, intact: Callable[[dict], bool]) -> VerifiedTask:
    plain.__class__ = VerifiedTask
    plain.intact = intact
    return plain
