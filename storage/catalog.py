"""The built-in datasets, listed once, and how a name or a spec file becomes a ``Dataset``. No Prefect.

    storage/datasets.py       what a dataset is (Dataset, DatasetFile) and a spec file's format (DatasetSpec)
    storage/mnist.py          MNIST: its files, checksums, mirrors and facts
    storage/fashion_mnist.py  Fashion-MNIST: the same
    storage/catalog.py        this module: the built-ins by name, ``resolve``, ``dataset_and_model``

Each of the first three imports only what is above it; nothing imports this module but the
code that turns a ``--dataset`` into a dataset (no cycle).
"""

from __future__ import annotations

from pathlib import Path

from storage.datasets import BUILTIN_NAMES, Dataset, SpecError, check_pinned, load_spec
from storage.fashion_mnist import FASHION_MNIST
from storage.mnist import MNIST

BUILTINS = {d.name: d for d in (MNIST, FASHION_MNIST)}
assert tuple(BUILTINS) == BUILTIN_NAMES  # (a spec may not take a built-in's name: storage.datasets)


def resolve(dataset: "str | Dataset | None" = None) -> Dataset:
    """A built-in dataset by name (default mnist), or a spec file by path."""
    if isinstance(dataset, Dataset):
        return dataset
    if dataset in (None, ""):
        return MNIST
    if dataset in BUILTINS:
        return BUILTINS[dataset]
    if dataset.endswith((".toml", ".json")) or "/" in dataset or Path(dataset).is_file():
        return load_spec(dataset)
    raise SpecError(f"unknown dataset {dataset!r}: use {', '.join(BUILTINS)} or a spec file (.toml or .json)")


def dataset_and_model(dataset: "str | Dataset | None", model_name: str | None,
                      allow_unpinned: bool = True) -> tuple[Dataset, str]:
    """The dataset spec (validated: one line per mistake, before any work; pinned unless
    ``allow_unpinned``) and the model name (default: the dataset's, mnist-mlp for MNIST)."""
    from storage.registry import check_name

    spec = resolve(dataset)
    check_pinned(spec, allow_unpinned)
    return spec, check_name(model_name or spec.default_model_name)
