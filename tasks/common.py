"""What every digitflow task shares: content-addressed cache keys, JSON results, and where
those results live (the home's object store, when the home is remote)."""

from __future__ import annotations

import functools
import inspect
from contextvars import ContextVar
from typing import Any, Callable

from prefect import Task, task
from prefect.filesystems import WritableFileSystem
from prefect.context import TagsContext
from prefect.utilities.hashing import hash_objects

from storage import code_digest
from tasks.prefect_compat import async_dispatch

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


def artifact_key(name: str, what: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    import re

    return re.sub(r"[^a-z0-9-]+", "-", f"{name}-{what}".lower()).strip("-")


def content_key(fields: Callable[[dict], Any], *, code: tuple[str, ...] = ("storage",)):
    """A cache_key_fn: hash of the task name, ``fields(parameters)``, the code digest and the
    references' shape."""

    def key(context, parameters) -> str:
        material = (context.task.name, fields(parameters), code_version(*code), refs_version())
        return hash_objects(material, raise_on_failure=True)

    return key


# A log record attribute (``extra={TOLD_BY_THE_OUTCOME: True}``): the command's outcome line tells
# the same (the gate's rejection, a warning in the dashboard), so the terminal shows it once, there.
TOLD_BY_THE_OUTCOME = "digitflow_told_by_the_outcome"
RESULTS_PREFIX = "prefect-results"  # below a remote home: Prefect's task results and cache records


class ObjectResults(WritableFileSystem):
    """Prefect result storage in a remote home's bucket (``<home>/prefect-results/``): the cache
    records every machine sharing the home reads, so a run on machine B reuses what machine A
    computed. Credentials come from the environment, never from this block."""

    _block_type_name = "Digitflow Object Results"
    url: str

    def _store(self):
        from storage.objects import open_store

        if getattr(self, "_cached_store", None) is None:
            object.__setattr__(self, "_cached_store", open_store(self.url))
        return self._cached_store

    def _read(self, path: str) -> bytes:
        got = self._store().get(path, limit=256 << 20)
        if got is None:
            raise ValueError(f"{self.url}/{path} does not exist")
        return got[0]

    async def aread_path(self, path: str) -> bytes:
        import anyio

        return await anyio.to_thread.run_sync(self._read, path)

    @async_dispatch(aread_path)
    def read_path(self, path: str) -> bytes:
        return self._read(path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        import anyio

        return await anyio.to_thread.run_sync(self.write_path_sync, path, content)

    def write_path_sync(self, path: str, content: bytes) -> str:
        self._store().put(path, content)
        return path

    @async_dispatch(awrite_path)
    def write_path(self, path: str, content: bytes) -> str:
        return self.write_path_sync(path, content)


_RESULTS: ContextVar[ObjectResults | None] = ContextVar("digitflow_results", default=None)


def keep_results_in(home) -> None:
    """Every flow calls this with its resolved home: in a remote home the cached results of the
    tasks it runs (and submits, to threads or Dask) go to the home's bucket; else Prefect's
    local result storage, as before."""
    store = getattr(home, "store", None)
    _RESULTS.set(_results_block(store.url(RESULTS_PREFIX)) if store is not None else None)


@functools.lru_cache(maxsize=None)
def _results_block(url: str) -> ObjectResults:
    """The result storage block of ``url``, saved server-side once per process (Prefect only
    accepts saved blocks; the block holds the URL, never a credential).

    Processes starting at once on a new server each find the block type (or schema) missing and
    create it; all but one are told it exists (``ObjectAlreadyExists``). Saving again then reads
    what the first one created, so the save is tried again a few times."""
    import hashlib

    from prefect.exceptions import ObjectAlreadyExists

    block = ObjectResults(url=url)
    name = f"digitflow-results-{hashlib.sha256(url.encode()).hexdigest()[:16]}"
    for _ in range(3):
        try:
            block.save(name, overwrite=True)
            return block
        except ObjectAlreadyExists:
            pass  # another process created the type or schema in between: read it this time
    block.save(name, overwrite=True)
    return block


class VerifiedTask(Task):
    """A task whose cached result is reused only while what it produced still verifies, and
    whose results are kept where the running flow's home says (``keep_results_in``).

    ``intact(arguments)`` (the call's bound arguments) says whether the file or folder the task
    writes is there and hashes to what it should; when it is not, the cache is refreshed and the
    task runs again (repairing it). Prefect's cache policies can compute a key but cannot ask for
    an overwrite, so the check lives here, with the task, instead of at every call site.

    Its runs carry no tags (flow runs and subflows do, from ``with tags(...)``): Prefect 3.9
    acquires and releases a concurrency slot on the server for every tag of every task run,
    which made a warm ``digitflow run`` up to 2.6 s slower against a server.
    """

    intact: Callable[[dict], bool] | None

    def _fresh(self, args, kwargs) -> Task | None:
        """A copy of this task with the options this call needs (None: it needs none: building a
        Task costs ~5 ms, paid 17 times by a warm run)."""
        options = {}
        if (results := _RESULTS.get()) is not None:
            options["result_storage"] = results
        if self.intact is not None:
            bound = inspect.signature(self.fn).bind(*args, **kwargs)
            bound.apply_defaults()
            if not self.intact(bound.arguments):
                options["refresh_cache"] = True
        return Task.with_options(self, **options) if options else None  # a plain Task: never back into _fresh

    def __call__(self, *args, **kwargs):
        with TagsContext(current_tags=set()):
            fresh = self._fresh(args, kwargs)
            return fresh(*args, **kwargs) if fresh is not None else Task.__call__(self, *args, **kwargs)

    def submit(self, *args, **kwargs):
        with TagsContext(current_tags=set()):
            fresh = self._fresh(args, kwargs)
            return fresh.submit(*args, **kwargs) if fresh is not None else Task.submit(self, *args, **kwargs)

    def with_options(self, **options) -> "VerifiedTask":
        return _verified(Task.with_options(self, **options), self.intact)


def verified_task(*, intact: Callable[[dict], bool] | None = None, **task_options):
    """``@task(**task_options)`` whose cache is refreshed whenever ``intact(arguments)`` is False
    (no ``intact``: a plain task), its results kept where the flow's home says, its runs untagged."""

    def decorate(fn) -> VerifiedTask:
        return _verified(task(**task_options)(fn), intact)

    return decorate


def _verified(plain: Task, intact: Callable[[dict], bool] | None) -> VerifiedTask:
    plain.__class__ = VerifiedTask
    plain.intact = intact
    return plain


def home_for_run(home):
    """The home a flow run works in (``storage.config.resolve_home``), with the results of the
    tasks it runs kept there (``keep_results_in``)."""
    from storage.config import resolve_home

    resolved = resolve_home(home)
    keep_results_in(resolved)
    return resolved
