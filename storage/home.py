"""The home: where digitflow keeps its state, as one object.

    <home>/raw/<dataset>/<file>-ubyte          verified IDX files (+ .json provenance); dataset: mnist, …
    <home>/data/<dataset>/<split>/              Parquet shards + manifest.json
    <home>/trained/<id>/                        trained models, content-addressed
    <home>/models/<name>/                       the registry: versions, aliases, decisions
    <home>/sweeps/<flow run id>/                sweep reports

The layout is written here and nowhere else. A ``Home`` is also a path (``os.fspath``,
``str``), so it can be handed to anything that takes one.
"""

from __future__ import annotations

import os
from pathlib import Path


class Home:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()

    @classmethod
    def resolve(cls, home: str | os.PathLike | None = None) -> "Home":
        """``home``, else ``$DIGITFLOW_HOME``, else ``~/.digitflow``: created and proven writable."""
        from storage.atomic import ensure_writable_dir

        return cls(ensure_writable_dir(home or os.environ.get("DIGITFLOW_HOME") or DEFAULT_HOME))

    @property
    def raw(self) -> Path:
        return self.raw_for("mnist")

    def raw_for(self, dataset: str) -> Path:
        return self.root / "raw" / dataset

    def split(self, split: str, dataset: str = "mnist") -> Path:
        return self.root / "data" / dataset / split

    @property
    def trained(self) -> Path:
        return self.root / "trained"

    def models(self, name: str) -> Path:
        return self.root / "models" / name

    def registry(self, name: str | None = None):
        """The model registry of ``name`` (default: mnist-mlp) in this home."""
        from storage.registry import DEFAULT_NAME, Registry

        return Registry(self, name or DEFAULT_NAME)

    def sweep(self, run_id: str) -> Path:
        return self.root / "sweeps" / run_id

    def __fspath__(self) -> str:
        return str(self.root)

    def __str__(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"Home({str(self.root)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Home) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)


DEFAULT_HOME = "~/.digitflow"
