"""What the registry records, typed: every registry read returns one of these, never a dict.

    models/<name>/vN/metadata.json   → ModelVersion   (who, when, which weights, how trained)
    models/<name>/vN/metrics.json    → Metrics        (the test split's figures and the training curve)
    models/<name>/vN/lineage.json    → Lineage        (the data, code and dataset it came from)
    models/<name>/decisions/vN.json  → Verdict        (the gate's decision, or a person's override)
    models/<name>/aliases.json       → Aliases        (latest, champion)

A record is validated when it is read (a file that does not fit is a damaged version, never a
KeyError three calls later) and written from the same type, so the files and the code cannot
drift apart. Unknown keys are ignored on reading: a file written by a newer digitflow still
reads. Pydantic only; no Prefect.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator, with_config
from typing_extensions import TypedDict

from nn.presets import Hyperparameters

ALIASES = ("latest", "champion")


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class Answer(Record):
    """A person's answer to a version waiting for approval (``by`` "timeout": nobody answered)."""

    approve: bool
    by: str
    reason: str
    at: str


class Verdict(Record):
    """How a version fared at the gate (``decisions/vN.json``); ``history`` holds the decisions it
    replaced (a manual promotion after a rejection), oldest first."""

    version: int = Field(ge=1)
    status: Literal["promoted", "rejected"]
    reason: str
    by: str
    at: str
    test_accuracy: Optional[float] = None
    champion_before: Optional[int] = None
    approval: Optional[Answer] = None
    history: list["Verdict"] = []
    replaced_damaged: Optional[str] = None  # the text of a damaged record this decision replaced (its start)

    @property
    def promoted(self) -> bool:
        return self.status == "promoted"


class Aliases(Record):
    """The versions the names point at (None: no such version yet)."""

    latest: Optional[int] = Field(None, ge=1)
    champion: Optional[int] = Field(None, ge=1)

    def of(self, name: str) -> Optional[int]:
        """The version ``name`` ("latest" or "champion") points at."""
        if name not in ALIASES:
            raise KeyError(name)
        return getattr(self, name)

    def names_of(self, version: int) -> list[str]:
        """The aliases pointing at ``version``, sorted."""
        return sorted(name for name in ALIASES if getattr(self, name) == version)


Share = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0)]
Finite = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]


# One row of ``per_class``, a dict as metrics.json has always held it ("class" is a keyword,
# hence the functional form).
ClassMetrics = TypedDict("ClassMetrics", {"class": Count, "precision": Share, "recall": Share, "f1": Share,
                                          "support": Count})


class Mistake(TypedDict):
    """One of ``most_confident_errors``: a test image, its label, what was predicted, how surely."""

    index: Count
    label: Count
    predicted: Count
    probability: Share
    probability_of_label: Share


class Evaluation(Record):
    """A model's metrics on the test split (also the ``evaluate`` task's cached result): every
    figure finite and in its range, the confusion matrix square with one row per class."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    test_accuracy: Share
    test_loss: Finite
    macro_f1: Share
    per_class: list[ClassMetrics] = Field(min_length=1, max_length=100_000)
    confusion_matrix: list[list[Count]]
    most_confident_errors: list[Mistake] = Field(max_length=1000)
    test_images: Count
    inference_images_per_second: Finite
    test_manifest_sha256: str

    @model_validator(mode="after")
    def _square(self) -> "Evaluation":
        n = len(self.per_class)
        if len(self.confusion_matrix) != n or any(len(row) != n for row in self.confusion_matrix):
            raise ValueError(f"the confusion matrix is not {n}×{n}, one row and column per class")
        if [row["class"] for row in self.per_class] != list(range(n)):
            raise ValueError("per_class does not list the classes 0, 1, 2, … in order")
        return self


@with_config(ConfigDict(extra="ignore"))  # (a key a newer digitflow records is dropped, not refused)
class Epoch(TypedDict, total=False):
    """One epoch of training, as ``nn.train.train_epochs`` records it (``val_*``: only when part of
    the train split was held out for validation)."""

    epoch: Count
    lr: Optional[float]
    train_loss: Optional[float]
    train_accuracy: Optional[float]
    val_loss: Optional[float]
    val_accuracy: Optional[float]
    seconds: Optional[float]


class Metrics(Evaluation):
    """A published version's ``metrics.json``: its evaluation and how its training went."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    history: list[Epoch] = Field([], max_length=100_000)
    best_epoch: Optional[int] = None
    train_seconds: Finite = 0.0

    def evaluation(self) -> Evaluation:
        return Evaluation(**{k: getattr(self, k) for k in Evaluation.model_fields})


class DatasetLineage(Record):
    """The dataset a version was trained on (``storage.datasets.Dataset.lineage``): its classes name
    the predictions; its key keeps another dataset's models out of the registry. MNIST's versions
    record none (their classes are the digits)."""

    name: Optional[str] = None
    key: Optional[str] = None        # (None: recorded before datasets had keys; the name stands for it)
    identity: Optional[str] = None
    classes: Optional[list[str]] = Field(None, min_length=1)
    source: Optional[str] = None


class Lineage(Record):
    """A version's ``lineage.json``: what it was trained from and with. Every field may be missing
    from a version published by an older digitflow."""

    train_manifest_sha256: Optional[str] = None
    test_manifest_sha256: Optional[str] = None
    git_commit: Optional[str] = None
    package_version: Optional[str] = None
    nn_source_sha256: Optional[str] = None
    python: Optional[str] = None
    numpy: Optional[str] = None
    seed: Optional[int] = None
    prefect_flow_run_id: Optional[str] = None
    created: Optional[str] = None
    dataset: Optional[DatasetLineage] = None

    def record(self) -> dict:
        """As written to lineage.json (MNIST's without a ``dataset`` key, as it always was)."""
        return self.model_dump(mode="json", exclude={"dataset"} if self.dataset is None else None)


def classes_of(lineage: Optional[Lineage]) -> list[str]:
    """The names of a version's classes: its dataset's, else (MNIST's versions record none) the digits."""
    if lineage is not None and lineage.dataset is not None and lineage.dataset.classes:
        return list(lineage.dataset.classes)
    return [str(d) for d in range(10)]


def _as_recorded(value):
    """Hyperparameters as a record holds them: an older digitflow's ``{}`` is "not recorded"
    (never the defaults); a key a newer digitflow added is dropped, not refused."""
    if isinstance(value, dict):
        known = {f.name for f in dataclasses.fields(Hyperparameters)}
        return {k: v for k, v in value.items() if k in known} or None
    return value


# The hyperparameters a version or a trained folder records (None: not recorded, said so).
RecordedHyperparameters = Annotated[Optional[Hyperparameters], BeforeValidator(_as_recorded)]
NOT_RECORDED = "Not recorded by the digitflow that trained it."


class ModelVersion(Record):
    """A published version's ``metadata.json``: name, number, weights digest (what ``load_model``
    checks), creation time, test accuracy, hyperparameters and lineage (data digests, code
    version, dataset, flow run)."""

    name: str
    version: int = Field(ge=1)
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    created: Optional[str] = None
    test_accuracy: Optional[float] = None
    hyperparameters: RecordedHyperparameters = None
    lineage: Lineage = Lineage()
