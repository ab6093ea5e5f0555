"""Data checks: what a dataset's splits hold, measured and compared with what they should hold.

Run at ingest on the verified IDX files, before any shard is written; the results are kept
beside the splits (``<home>/data/<dataset>/checks.json``), shown as a table in the dashboard and
by ``digitflow data check``. One row per check:

    split  check                  value                 expectation          status
    train  rows                   60000                 = 60000              pass
    train  class counts           5421..6742            as declared          pass
    train  pixel mean             0.1307                0.1307 ± 0.01        pass
    train  duplicate images       0                     0                    pass
    test   shared with train      0                     0                    pass

A ``fail`` stops the pipeline before training (one line naming the check); a ``warn`` is
recorded and shown. Duplicates are found by exact content (every image's bytes), so a split
copied into another is caught whatever its labels say. No Prefect.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from storage import DigitflowError

Status = Literal["pass", "warn", "fail"]
ORDER = {"pass": 0, "warn": 1, "fail": 2}

# Tolerances, written once: a pixel statistic this far from its reference warns / fails.
STAT_WARN, STAT_FAIL = 0.01, 0.05
DUPLICATES_FAIL = 0.05   # a share of a split repeating its own images
SHARED_FAIL = 0.01       # a share of an evaluation split also in train (the test score would lie)
CONSTANT_FAIL = 0.01     # a share of empty or constant images
IMBALANCE_WARN = 10.0    # largest class / smallest class, when the counts are not declared
EXAMPLES = 3             # row numbers quoted per finding


class DataCheckFailed(DigitflowError):
    pass


@dataclass(frozen=True)
class Expectation:
    """What a split should hold (a spec's ``[expect.<split>]`` table; MNIST's and Fashion-MNIST's
    are built in). Every field is optional: what is not declared is measured and recorded."""

    rows: int | None = None
    class_counts: tuple[int, ...] | None = None
    pixel_mean: float | None = None   # of pixel/255 over the whole split
    pixel_std: float | None = None


@dataclass(frozen=True)
class Check:
    split: str
    name: str
    value: str
    expectation: str
    status: Status
    detail: str = ""


@dataclass(frozen=True)
class Report:
    """The checks of one dataset: its splits' sources (file SHA-256s) and every check's row."""

    dataset: str
    sources: dict
    checks: tuple[Check, ...] = field(default_factory=tuple)

    @property
    def status(self) -> Status:
        return max((c.status for c in self.checks), key=ORDER.get, default="pass")

    def with_status(self, status: Status) -> list[Check]:
        return [c for c in self.checks if c.status == status]

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "status": self.status, "sources": self.sources,
                "checks": [asdict(c) for c in self.checks]}

    @classmethod
    def from_dict(cls, data) -> "Report":
        """A report read back from ``checks.json``: every field checked (the file may be edited)."""
        try:
            checks = tuple(Check(**{k: str(c[k]) for k in ("split", "name", "value", "expectation", "status",
                                                              "detail")}) for c in data["checks"])
            if any(c.status not in ORDER for c in checks) or not isinstance(data["sources"], dict):
                raise ValueError
            return cls(dataset=str(data["dataset"]), sources=data["sources"], checks=checks)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ValueError("not a data-check record") from None

    def failure(self) -> str:
        """The one line a failing report stops the pipeline with."""
        failed = self.with_status("fail")
        first = failed[0]
        more = f" (and {len(failed) - 1} more failed check{'s' * (len(failed) > 2)})" if len(failed) > 1 else ""
        return (f"data check failed: {first.split} {first.name}: {first.value}, expected {first.expectation}"
                f"{' — ' + first.detail if first.detail else ''}{more}")


def check_dataset(splits: dict[str, tuple[np.ndarray, np.ndarray]], *, classes: int,
                  expect: dict[str, Expectation], dataset: str, sources: dict) -> Report:
    """Check every split (``{split: (images uint8 [n, rows, cols], labels uint8 [n])}``) and
    every other split against ``train``."""
    checks: list[Check] = []
    digests = {split: _row_digests(images) for split, (images, _) in splits.items()}
    for split, (images, labels) in splits.items():
        checks += check_split(split, images, labels, digests[split], classes, expect.get(split, Expectation()))
    if "train" in splits:
        train = _first_rows(digests["train"])
        for split in splits:
            if split != "train":
                checks.append(_shared(split, digests[split], train))
    return Report(dataset=dataset, sources=sources, checks=tuple(checks))


def check_split(split: str, images: np.ndarray, labels: np.ndarray, digests: np.ndarray, classes: int,
                expect: Expectation) -> list[Check]:
    n = len(labels)
    flat = images.reshape(n, -1)                                   # [n, pixels] uint8
    out = [_rows(split, n, expect.rows)]
    out.append(_label_range(split, labels, classes))
    out.append(_class_counts(split, np.bincount(labels, minlength=classes)[:classes], expect.class_counts))
    mean, std = _pixel_stats(flat)
    out.append(_stat(split, "pixel mean", mean, expect.pixel_mean))
    out.append(_stat(split, "pixel std", std, expect.pixel_std))
    out.append(_duplicates(split, digests))
    out.append(_constant(split, flat))
    return out


# ---- one function a check ----------------------------------------------------------------

def _rows(split: str, n: int, declared: int | None) -> Check:
    if declared is not None:
        return Check(split, "rows", str(n), f"= {declared}", "pass" if n == declared else "fail")
    return Check(split, "rows", str(n), "> 0", "pass" if n > 0 else "fail")


def _label_range(split: str, labels: np.ndarray, classes: int) -> Check:
    low, high = (int(labels.min()), int(labels.max())) if len(labels) else (0, 0)
    ok = len(labels) == 0 or high < classes
    return Check(split, "label range", f"{low}..{high}", f"0..{classes - 1}", "pass" if ok else "fail")


def _class_counts(split: str, counts: np.ndarray, declared: tuple[int, ...] | None) -> Check:
    value = f"{int(counts.min())}..{int(counts.max())}"
    missing = [i for i, c in enumerate(counts) if c == 0]
    if declared is not None:
        off = [(i, int(c), d) for i, (c, d) in enumerate(zip(counts, declared)) if c != d]
        detail = "; ".join(f"class {i}: {c} rows, declared {d}" for i, c, d in off[:EXAMPLES])
        return Check(split, "class counts", value, "as declared", "fail" if off else "pass", detail)
    if missing:
        return Check(split, "class counts", value, "every class present", "fail",
                     f"class{'es' * (len(missing) > 1)} {', '.join(map(str, missing[:10]))} "
                     f"{'have' if len(missing) > 1 else 'has'} no rows")
    ratio = counts.max() / counts.min()
    return Check(split, "class counts", value, f"largest ≤ {IMBALANCE_WARN:g}× smallest",
                 "warn" if ratio > IMBALANCE_WARN else "pass")


def _pixel_stats(flat: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of pixel/255 over the split, from a histogram of the 256
    byte values (exact, and no float copy of the split)."""
    hist = np.bincount(flat.ravel(), minlength=256).astype(np.float64)
    values = np.arange(256) / 255.0
    total = hist.sum() or 1.0
    mean = float(hist @ values / total)
    return mean, float(np.sqrt(max(hist @ (values - mean) ** 2 / total, 0.0)))


def _stat(split: str, name: str, value: float, reference: float | None) -> Check:
    if reference is None:
        return Check(split, name, f"{value:.4f}", "recorded (no reference)", "pass")
    off = abs(value - reference)
    status = "fail" if off > STAT_FAIL else "warn" if off > STAT_WARN else "pass"
    return Check(split, name, f"{value:.4f}", f"{reference:.4f} ± {STAT_WARN:g}", status,
                 f"{off:.4f} from the reference" if status != "pass" else "")


def _row_digests(images: np.ndarray) -> np.ndarray:
    """One 16-byte BLAKE2b digest per image (the exact content: equal digests, equal images)."""
    import hashlib

    flat = np.ascontiguousarray(images.reshape(len(images), -1))
    return np.array([hashlib.blake2b(row, digest_size=16).digest() for row in flat], dtype="S16")


def _first_rows(digests: np.ndarray) -> dict[bytes, int]:
    first: dict[bytes, int] = {}
    for i, d in enumerate(digests.tolist()):
        first.setdefault(d, i)
    return first


def _duplicates(split: str, digests: np.ndarray) -> Check:
    """Rows whose image is exactly an earlier row's."""
    first: dict[bytes, int] = {}
    repeats: list[tuple[int, int]] = []
    for i, d in enumerate(digests.tolist()):
        j = first.setdefault(d, i)
        if j != i:
            repeats.append((i, j))
    n = len(digests)
    status = "fail" if len(repeats) > DUPLICATES_FAIL * n else "warn" if repeats else "pass"
    detail = ", ".join(f"#{i} = #{j}" for i, j in repeats[:EXAMPLES])
    return Check(split, "duplicate images", str(len(repeats)), "0", status, detail)


def _shared(split: str, digests: np.ndarray, train: dict[bytes, int]) -> Check:
    """Rows of an evaluation split whose image is also in train: its score would be inflated."""
    shared = [(i, train[d]) for i, d in enumerate(digests.tolist()) if d in train]
    n = len(digests)
    status = "fail" if len(shared) > SHARED_FAIL * n else "warn" if shared else "pass"
    detail = ", ".join(f"{split} #{i} = train #{j}" for i, j in shared[:EXAMPLES])
    return Check(split, "shared with train", str(len(shared)), "0", status, detail)


def _constant(split: str, flat: np.ndarray) -> Check:
    """Empty (all zero) or constant images: nothing to learn from."""
    rows = np.flatnonzero(flat.min(axis=1) == flat.max(axis=1)) if flat.shape[1] else np.arange(len(flat))
    status = "fail" if len(rows) > CONSTANT_FAIL * len(flat) else "warn" if len(rows) else "pass"
    return Check(split, "empty or constant images", str(len(rows)), "0", status,
                 ", ".join(f"#{i}" for i in rows[:EXAMPLES]))


# ---- on files, and kept with the splits ---------------------------------------------------

def check_files(spec, files: dict[str, tuple]) -> Report:
    """Check a dataset's verified IDX files: ``{split: (images path, SHA-256, labels path,
    SHA-256)}`` (each file's bytes are verified against its SHA-256 as they are read)."""
    from storage.idx import read_pair

    arrays = {split: read_pair(ip, lp, images_sha256=isha, labels_sha256=lsha, shape=tuple(spec.image_shape),
                                n_classes=len(spec.classes))
              for split, (ip, isha, lp, lsha) in files.items()}
    return check_dataset(arrays, classes=len(spec.classes), expect=spec.expect, dataset=spec.key,
                         sources={split: {"images": isha, "labels": lsha}
                                  for split, (_, isha, _, lsha) in files.items()})


def save(report: Report, path) -> None:
    from storage.atomic import write_json

    write_json(path, report.to_dict())


MAX_RECORD = 4 << 20  # bytes: a record of a few hundred checks is a few KiB


def load(path) -> Report | None:
    """The recorded report at ``path`` (None if there is none); size-bounded and checked field
    by field (a file under the home may have been edited)."""
    import json
    from pathlib import Path

    try:
        with open(path, "rb") as f:
            text = f.read(MAX_RECORD + 1)
        if len(text) > MAX_RECORD:
            raise ValueError
        return Report.from_dict(json.loads(text))
    except FileNotFoundError:
        return None
    except (ValueError, RecursionError, UnicodeDecodeError):
        raise DigitflowError(f"{Path(path).name}: not a data-check record "
                             "(rerun `digitflow ingest` to check the data again)") from None


def rows(report: Report) -> list[dict]:
    """The report as table rows (the dashboard's table artifact, ``data check --json``)."""
    return [{"split": c.split, "check": c.name, "value": c.value, "expectation": c.expectation,
             "status": c.status, "detail": c.detail} for c in report.checks]
