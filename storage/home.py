"""The home: where digitflow keeps its state, as one object.

    <home>/raw/<dataset>/<file>-ubyte          verified IDX files (+ .json provenance); dataset: mnist, …
    <home>/data/<dataset>/<split>/              Parquet shards + manifest.json
    <home>/trained/<id>/                        trained models, content-addressed
    <home>/models/<name>/                       the registry: versions, aliases, decisions
    <home>/sweeps/<flow run id>/                sweep reports

The layout is written here and nowhere else. A ``Home`` is also a path (``os.fspath``), so it
can be handed to anything that takes one.

A home may live in object storage (``s3://bucket/prefix``, ``az://container/prefix``): then the same layout is kept under
that prefix, and ``root`` is this machine's working copy of it (``$DIGITFLOW_CACHE/<scheme>/bucket/
prefix``), filled and published by ``storage.remote``. ``str(home)`` and ``address(path)`` give
the names every machine shares (the URL), which is what cache keys and references hold;
``storage.remote.local`` turns such a name back into this machine's path.
"""

from __future__ import annotations

import os
from pathlib import Path

from storage import DigitflowError
from storage.paths import inside
from storage.settings import settings


class Home:
    def __init__(self, root: "str | os.PathLike | Home", store=None):
        if isinstance(root, Home):
            root, store = root.root, root.store
        self.root = Path(root).expanduser()
        self.store = store  # an object store (storage.objects) when the home is remote, else None

    @classmethod
    def resolve(cls, home: str | os.PathLike | None = None, existing: bool = False) -> "Home":
        """``home``, else ``$DIGITFLOW_HOME``, else ``~/.digitflow``: created and proven writable
        (for ``s3://…``: the bucket proven reachable, and a local working copy made). ``existing``:
        a local home that is not there is an error, never created (commands that only read it)."""
        from storage import objects
        from storage.atomic import ensure_writable_dir

        if isinstance(home, Home):
            return home
        where = os.fspath(home or settings().home or DEFAULT_HOME)
        if "://" in where:
            store = objects.open_store(where)
            store.check()
            return cls(ensure_writable_dir(objects.local_path(store.url())), store)
        if existing and not Path(where).expanduser().is_dir():
            raise DigitflowError(f"no digitflow home at {Path(where).expanduser()} (nothing published there yet: "
                                 "`digitflow run --home` makes one)")
        return cls(ensure_writable_dir(where))

    # A remote home crossing to another process (a Dask worker, maybe another machine) takes
    # that machine's working copy ($DIGITFLOW_CACHE there), not the path it had here.
    def __getstate__(self):
        return {"root": None if self.store is not None else self.root, "store": self.store}

    def __setstate__(self, state):
        from storage import objects

        self.store = state["store"]
        self.root = state["root"] if self.store is None else objects.local_path(self.store.url())
        if self.store is not None:
            self.root.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        """The name every machine knows this home by: the store URL, or the local path."""
        return self.store.url() if self.store is not None else str(self.root)

    def address(self, path: str | os.PathLike) -> str:
        """The shared name of ``path`` (under ``root``): its object URL in a remote home."""
        if self.store is None:
            return str(path)
        return self.store.url(Path(path).relative_to(self.root).as_posix())

    @property
    def raw(self) -> Path:
        return self.raw_for("mnist")

    # Names below come from spec files, flags and URLs: each path is proven to stay in the home.
    def raw_for(self, dataset: str) -> Path:
        return inside(self.root, f"raw/{dataset}", "dataset")

    def split(self, split: str, dataset: str = "mnist") -> Path:
        return inside(self.root, f"data/{dataset}/{split}", "dataset split")

    def checks(self, dataset: str = "mnist") -> Path:
        """The dataset's recorded data checks, beside its splits."""
        return inside(self.root, f"data/{dataset}/checks.json", "dataset")

    @property
    def trained(self) -> Path:
        return self.root / "trained"

    def models(self, name: str) -> Path:
        return inside(self.root, f"models/{name}", "model name")

    def registry(self, name: str | None = None):
        """The model registry of ``name`` (default: mnist-mlp) in this home."""
        from storage.registry import DEFAULT_NAME, Registry

        return Registry(self, name or DEFAULT_NAME)

    def sweep(self, run_id: str) -> Path:
        return inside(self.root, f"sweeps/{run_id}", "sweep")

    def __fspath__(self) -> str:
        return str(self.root)

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Home({self.url!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Home) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)


DEFAULT_HOME = "~/.digitflow"
