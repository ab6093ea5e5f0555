"""The references tasks pass to each other: small, typed, validated once where they are made.

Tasks never pass big arrays: a reference names a file or folder and the SHA-256 of what is in
it, so the next task can verify the content before it uses it. Each is a frozen pydantic model:
Prefect stores them as JSON cache results and the flows, the CLI and the alerts read their
fields by name.

    download → RawFile → verify → VerifiedFile → parse → check (DataChecks) → shard → SplitRef
    train(SplitRef) → TrainedModel → evaluate → Evaluation
    publish(TrainedModel, Evaluation) → Published → gate → Decision
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict


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


class TrainedModel(Ref):
    """A trained model folder (model.npz, model.json, training.json) and its weights digest."""

    dir: str
    weights_sha256: str
    history: list[dict] = []
    best_epoch: Optional[int] = None
    stopped_early: bool = False
    train_seconds: float = 0.0
    hyperparameters: dict = {}
    train_manifest_sha256: Optional[str] = None


class Evaluation(Ref):
    """A model's metrics on the test split."""

    test_accuracy: float
    test_loss: float
    macro_f1: float
    per_class: list[dict]
    confusion_matrix: list[list[int]]
    most_confident_errors: list[dict]
    test_images: int
    inference_images_per_second: float
    test_manifest_sha256: str


class Published(Ref):
    """A version in the registry (``created``: published by this run, not found existing)."""

    name: str
    version: int
    created: bool
    path: str
    test_accuracy: float


class Answer(Ref):
    """A person's answer to a version waiting for approval (``by`` "timeout": nobody answered)."""

    approve: bool
    by: str
    reason: str
    at: str


class Decision(Ref):
    """The gate's verdict on a version, and the registry's state after it."""

    version: int
    status: Literal["promoted", "rejected"]
    reason: str
    by: str
    at: str
    test_accuracy: Optional[float] = None
    champion_before: Optional[int] = None
    history: list[dict] = []
    champion: Optional[int] = None   # the champion now
    decided_now: bool                # False: decided by an earlier run
    state: str                       # champion, rejected, former champion, …
    approval: Optional[Answer] = None  # the answer it waited for, if approval was required
