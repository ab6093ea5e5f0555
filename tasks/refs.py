"""The references tasks pass to each other: small, typed, validated once where they are made.

Tasks never pass big arrays: a reference names a file or folder and the SHA-256 of what is in
it, so the next task can verify the content before it uses it. Each is a frozen pydantic model:
Prefect stores them as JSON cache results and the flows, the CLI and the alerts read their
fields by name.

    download → RawFile → verify → VerifiedFile → parse (ParsedSplit) → check (DataChecks) → shard → SplitRef
    the ingest flow's result: Ingested (a SplitRef per split)
    train(SplitRef) → TrainedModel → evaluate → Evaluation
    publish(TrainedModel, Evaluation) → Published → gate → Decision
    the flows' results: Outcome (publish), RunOutcome (retrain), SweepOutcome (sweep), DriftOutcome (monitor)
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from nn.presets import Hyperparameters
from storage.records import (Answer, Epoch, Evaluation, RecordedHyperparameters,  # noqa: F401 (re-exported)
                             Verdict)


class Ref(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RawFile(Ref):
    """A downloaded, decompressed IDX file and where it came from (user info redacted)."""

    file: str                      # archive name on the mirrors, e.g. train-images-idx3-ubyte.gz
    path: str
    sha256: str                    # SHA-256 of the decompressed content (pinned, or verified and recorded)
    size: int
    mirror: Optional[str] = None
    archive_sha256: Optional[str] = None
    archive_canonical: bool = False
    fetched: bool = False
    archive_md5: Optional[str] = None  # where the dataset publishes archive MD5s (Fashion-MNIST)
    pinned_by: Optional[str] = None    # how the content was checked when not by its own SHA-256 pin:
                                       # "archive-md5", "archive-sha256", or "none" (allowed unpinned)


class VerifiedFile(Ref):
    """A local IDX file whose content was hashed and matched its pin."""

    file: str
    path: str
    sha256: str


class SplitFiles(Ref):
    """A split's verified images and labels files."""

    split: str
    images: VerifiedFile
    labels: VerifiedFile


class ParsedSplit(Ref):
    """A split whose images and labels files were validated together: headers, shapes, counts
    that agree, labels in range."""

    split: str
    rows: int


class DataChecks(Ref):
    """A dataset's recorded data checks (``checks.json`` beside its splits): the worst status and
    the checks that warned (a failed check stops the run, so a reference never holds one)."""

    path: str
    sha256: str
    status: Literal["pass", "warn"]
    warned: list[str] = []


class SplitRef(Ref):
    """An ingested split: its folder of Parquet shards and the SHA-256 of its manifest."""

    split: str
    dir: str
    manifest: str
    sha256: str
    rows: int
    shards: int


class Ingested(Ref):
    """What the ingest flow made: one reference per split of the dataset, train and test among them."""

    splits: tuple[SplitRef, ...]

    def __getitem__(self, split: str) -> SplitRef:
        for ref in self.splits:
            if ref.split == split:
                return ref
        raise KeyError(split)

    @property
    def train(self) -> SplitRef:
        return self["train"]

    @property
    def test(self) -> SplitRef:
        return self["test"]


class TrainedModel(Ref):
    """A trained model folder (model.npz, model.json, training.json) and its weights digest."""

    dir: str
    weights_sha256: str
    history: list[Epoch] = []
    best_epoch: Optional[int] = None
    stopped_early: bool = False
    train_seconds: float = 0.0
    hyperparameters: RecordedHyperparameters = None
    train_manifest_sha256: Optional[str] = None


class Published(Ref):
    """A version in the registry (``created``: published by this run, not found existing)."""

    name: str
    version: int
    created: bool
    path: str
    test_accuracy: float


class Decision(Verdict):
    """The gate's verdict on a version (as recorded: ``storage.records.Verdict``), and the
    registry's state after it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    champion: Optional[int] = None   # the champion now
    decided_now: bool                # False: decided by an earlier run
    state: str                       # champion, rejected, former champion, …


class Outcome(Published):
    """What a publish did to the registry: ``status`` "promoted" or "rejected" when the gate
    decided now; "unchanged" when these weights were already a decided version (then ``state``
    and ``reason`` describe that version as it stands now, not its old decision)."""

    status: Literal["promoted", "rejected", "unchanged"]
    reason: str
    state: str                       # champion, rejected, former champion, …
    champion: Optional[int] = None   # the champion now


class RunOutcome(Outcome):
    """What ``retrain`` did: the outcome, and what it trained with."""

    preset: str
    hyperparameters: Hyperparameters
    dataset: str


class DriftOutcome(Ref):
    """What ``monitor`` found: the served version, the images in the API's window, whether they
    were compared with the version's reference, the statistics that drifted and each one's PSI
    (None: not compared)."""

    model: str
    version: int
    window_images: int
    compared: bool
    drifted: list[str]
    psi: dict[str, Optional[float]]


class SweepRow(Ref):
    """One grid point of a sweep: what it set (as JSON text), how it scored, whether it won.
    Written as ``"grid point"`` (``by_alias``), as the table, results.json and --json always had it."""

    grid_point: str = Field(serialization_alias="grid point")
    val_accuracy: float
    test_accuracy: float
    train_seconds: float
    best: bool


class SweepOutcome(Outcome):
    """What ``sweep`` did: the outcome of its best grid point, every point's row and its report."""

    rows: list[SweepRow]
    report: str
