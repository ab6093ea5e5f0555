"""The files of a new version, written into the folder the registry stages it in. No Prefect."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from publishing import card, report
from storage import drift
from storage.atomic import write_json
from storage.records import Hyperparameters, Lineage, Metrics

WEIGHTS = ("model.npz", "model.json")


def write_version(folder: Path, version: int, *, name: str, net, weights: Path, metrics: Metrics,
                  hyperparameters: Hyperparameters | None, lineage: Lineage, champion: dict | None, checks: dict | None,
                  x_test: np.ndarray) -> dict:
    """Write everything version ``version`` of model ``name`` holds into ``folder``:

    - the weights (``model.npz``, ``model.json``, copied from ``weights``: the verified ones ``net`` was loaded from)
    - ``metrics.json`` and ``lineage.json`` (``lineage.dataset`` names the classes, if not MNIST's digits)
    - ``report.md`` with its figures, compared with ``champion`` (its metrics and ``version``, or None)
    - the data checks it was trained behind (``checks``, when recorded) and the drift reference
      of its test split (``x_test``: what ``/drift`` compares served inputs with)
    - ``model_card.md``, with the decision "not decided yet"

    Returns the version's metadata (``ModelVersion`` fields but the ones the registry adds)."""
    for part in WEIGHTS:
        shutil.copyfile(weights / part, folder / part)
    full, info = metrics.model_dump(), lineage.record()
    write_json(folder / "metrics.json", full)
    write_json(folder / "lineage.json", info)
    classes = lineage.dataset.classes if lineage.dataset else None
    report.plot_learning_curves(metrics.history, folder / "learning_curves.png")
    report.plot_confusion_matrix(metrics.confusion_matrix, folder / "confusion_matrix.png", classes)
    (folder / "report.md").write_text(report.render_markdown(
        name=name, version=version, metrics=full, hyperparameters=hyperparameters, lineage=info,
        champion=champion, classes=classes))
    if checks is not None:
        write_json(folder / card.DATA_CHECKS, checks)
    write_json(folder / drift.REFERENCE, drift.reference(x_test, net.predict_proba(x_test)))
    (folder / card.CARD).write_text(card.render(
        name=name, version=version, metrics=full, lineage=info, hyperparameters=hyperparameters,
        classes=classes or [str(i) for i in range(len(metrics.per_class))], checks=checks, decision=None))
    return {"created": lineage.created, "test_accuracy": metrics.test_accuracy,
            "hyperparameters": hyperparameters and hyperparameters.to_dict(), "lineage": info}
