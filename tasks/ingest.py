"""Ingest tasks: download → verify → parse → shard. Each is a thin wrapper over storage/."""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact

from storage import DigitflowError, checks, remote, shards
from storage.atomic import sha256_file
from storage.download import DEFAULT_TIMEOUT, TransientDownloadError, fetch_verified, is_verified
from storage.idx import IDXError, check_label_range, check_pair, read_header, read_idx
from storage.datasets import Dataset, DatasetFile
from storage.text import md
from tasks import progress
from tasks.common import CACHED, artifact_key, content_key, verified_task
from tasks.refs import DataChecks, ParsedSplit, RawFile, SplitFiles, SplitRef, VerifiedFile


def _retry_if_transient(task, task_run, state) -> bool:
    """Retry only failures that may pass (timeouts, resets, 5xx, 429); not 404 or bad bytes."""
    return isinstance(state.result(raise_on_failure=False), TransientDownloadError)


@verified_task(
    intact=lambda a: download_is_intact(a["file"], a["raw_dir"]),  # else fetched again
    task_run_name="download {file.name}",
    retries=3,
    retry_delay_seconds=[2, 4, 8],
    retry_jitter_factor=0.2,
    retry_condition_fn=_retry_if_transient,
    # Mirrors are not in the key: any honest mirror yields the same pinned content. The cache is
    # refreshed unless the file on disk hashes to the pin (download_is_intact).
    cache_key_fn=content_key(lambda p: (p["file"].name, p["file"].pin, p["file"].idx_sha256, p["file"].idx_size,
                                        p["file"].archive_md5, p["file"].archive_sha256, p["raw_dir"])),
    **CACHED,
)
def download(file: DatasetFile, mirrors: list[str], raw_dir: str, timeout: float = DEFAULT_TIMEOUT,
             deadline: float | None = None) -> RawFile:
    """Fetch one archive from the first mirror that serves verified bytes; return a reference."""
    log = get_run_logger()
    t0 = time.perf_counter()
    name = file.name
    target = remote.join(raw_dir, file.idx_name)  # in a remote home: its object URL
    if remote.is_url(raw_dir) and not is_verified(file, remote.local(target)):
        remote.pull_file(target + ".json")  # the record first: it holds the SHA-256 of archive-pinned files
        remote.pull_file(target, file.idx_sha256, progress.report)  # then checked like any local file
    ref = RawFile(**fetch_verified(file, mirrors, remote.local(raw_dir), timeout=timeout, deadline=deadline,
                                   progress=progress.report))
    if remote.is_url(raw_dir):
        if ref.fetched or remote.remote_file(target + ".json") is None:
            remote.push_file(target, ref.sha256, progress.report)  # the file, then its record (the commit point)
            remote.push_file(target + ".json")
            log.info("%s: published to %s", name, target)
        elif not ref.fetched:
            log.info("%s: taken from %s, verified", name, target)
        ref = ref.model_copy(update={"path": target})
    if ref.fetched:
        log.info("%s: fetched from %s in %.2f s (%s)", name, ref.mirror, time.perf_counter() - t0,
                 {"sha256": f"archive {'is' if ref.archive_canonical else 'is not'} the canonical one",
                  "archive-md5": "verified against the published archive MD5 and size",
                  "archive-sha256": "verified against the published archive SHA-256 and size",
                  "none": f"UNPINNED: accepted as seen, SHA-256 {ref.sha256[:16]}… recorded"}[file.pin])
    else:
        log.info("%s: already present and verified, not fetched", name)
    return ref


def download_is_intact(file: DatasetFile, raw_dir: str) -> bool:
    """The raw file is there with exactly the pinned content (hashed: a byte flipped in place,
    same size and mtime, is caught; 55 MB hash in about 0.1 s). In a remote home: its object and
    record are in the bucket with the pinned SHA-256 (hashed again by ``verify`` when used)."""
    if remote.is_url(raw_dir):
        target = remote.join(raw_dir, file.idx_name)
        info = remote.remote_file(target)
        return (info is not None and info.sha256 is not None and remote.remote_file(target + ".json") is not None
                and (file.idx_sha256 is None or info.sha256 == file.idx_sha256)
                and (file.idx_size is None or info.size == file.idx_size))
    return is_verified(file, Path(raw_dir) / file.idx_name)


def _content_now(path: str) -> str:
    """SHA-256 of the file as it is now: computing the key is the verification (for an object:
    its ETag and recorded SHA-256 now; ``verify`` then hashes what it downloads)."""
    return remote.fingerprint(path)


@verified_task(
    task_run_name="verify {ref.file}",
    # Keyed on the file's content hashed now, whatever its size or mtime: a file changed in
    # place can never return the cached verdict on its old content.
    cache_key_fn=content_key(lambda p: (p["ref"].path, p["ref"].sha256, _content_now(p["ref"].path))),
    **CACHED,
)
def verify(ref: RawFile) -> VerifiedFile:
    """Hash the local IDX file and compare with the pin."""
    path = remote.pull_file(ref.path, ref.sha256, progress.report)
    digest = sha256_file(path)
    if digest != ref.sha256:
        raise IDXError(f"{path}: SHA-256 {digest[:16]}… is not the pinned {ref.sha256[:16]}… "
                       "(changed since it was downloaded; rerun `digitflow ingest` to fetch it again)")
    get_run_logger().info("%s: SHA-256 %s… verified", path.name, digest[:16])
    return VerifiedFile(path=ref.path, sha256=digest, file=ref.file)


@verified_task(
    task_run_name="parse {split}",
    cache_key_fn=content_key(lambda p: (p["split"], p["images"].sha256, p["labels"].sha256, p["image_shape"],
                                        p["n_classes"])),
    **CACHED,
)
def parse(split: str, images: VerifiedFile, labels: VerifiedFile, image_shape: tuple[int, int] = (28, 28),
          n_classes: int = 10) -> ParsedSplit:
    """Validate a verified images/labels pair: headers, shapes, counts, label range."""
    images_path, labels_path = remote.pull_file(images.path, images.sha256), remote.pull_file(labels.path, labels.sha256)
    rows = check_pair(read_header(images_path), read_header(labels_path), tuple(image_shape))
    check_label_range(read_idx(labels_path, labels.sha256), labels_path.name, n_classes)
    get_run_logger().info("%s: %d images of %d×%d with labels in 0..%d, valid", split, rows, *image_shape,
                          n_classes - 1)
    return ParsedSplit(split=split, rows=rows)


def _sources(splits: list[SplitFiles]) -> dict:
    return {s.split: {"images": s.images.sha256, "labels": s.labels.sha256} for s in splits}


def checks_are_recorded(record: str, splits: list[SplitFiles]) -> bool:
    """The record at ``record`` is there and is of these very files (else: checked again)."""
    try:
        if remote.is_url(record) and remote.remote_file(record) is None:
            return False
        report = checks.load(remote.pull_file(record))
    except DigitflowError:  # unreadable or edited: checked again and rewritten
        return False
    return report is not None and report.sources == _sources(splits) and report.status != "fail"


@verified_task(
    intact=lambda a: checks_are_recorded(a["record"], a["splits"]),
    task_run_name="check data",
    cache_key_fn=content_key(lambda p: (_sources(p["splits"]), repr(p["spec"].expect), len(p["spec"].classes),
                                        p["spec"].key, p["record"])),
    **CACHED,
)
def check_data(splits: list[SplitFiles], spec: Dataset, record: str) -> DataChecks:
    """Check what the splits hold (rows, classes, pixel statistics, duplicate and empty images,
    images shared between splits); record the results at ``record`` and in a table artifact.
    A failed check raises, naming it: nothing is sharded or trained on."""
    log = get_run_logger()
    report = checks.check_files(spec, {
        s.split: (remote.pull_file(s.images.path, s.images.sha256), s.images.sha256,
                  remote.pull_file(s.labels.path, s.labels.sha256), s.labels.sha256) for s in splits})
    checks.save(report, remote.local(record))
    remote.push_file(record)
    create_table_artifact(checks.rows(report), key=f"{artifact_key(spec.key, 'data-checks')}",
                          description=f"Data checks of {md(spec.name)}: {report.status}")
    for c in report.with_status("warn"):
        log.warning("data check %s %s: %s (expected %s)%s", c.split, c.name, c.value, c.expectation,
                    f" — {c.detail}" if c.detail else "")
    if report.status == "fail":
        raise checks.DataCheckFailed(report.failure())
    passed = len(report.with_status("pass"))
    log.info("data checks: %d of %d passed, %d warned", passed, len(report.checks), len(report.with_status("warn")))
    return DataChecks(path=record, sha256=sha256_file(remote.local(record)), status=report.status,
                      warned=[f"{c.split} {c.name}" for c in report.with_status("warn")])


@verified_task(
    # The split is rebuilt unless its folder verifies: manifest, coverage, every shard's SHA-256.
    intact=lambda a: split_is_current(a["out_dir"], a["rows_per_shard"], source_of(a["images"], a["labels"])),
    task_run_name="shard {split}",
    cache_key_fn=content_key(lambda p: (p["split"], p["images"].sha256, p["labels"].sha256,
                                        p["rows_per_shard"], p["out_dir"], p["image_shape"], p["n_classes"])),
    **CACHED,
)
def write_shards(split: str, images: VerifiedFile, labels: VerifiedFile, out_dir: str, rows_per_shard: int,
                 image_shape: tuple[int, int] = (28, 28), n_classes: int = 10) -> SplitRef:
    """Write the split as normalized Parquet shards + manifest; return a reference to it."""
    t0 = time.perf_counter()
    manifest = shards.write_split(remote.pull_file(images.path, images.sha256),
                                  remote.pull_file(labels.path, labels.sha256), remote.local(out_dir), split=split,
                                  rows_per_shard=rows_per_shard, source=source_of(images, labels),
                                  image_shape=tuple(image_shape), n_classes=n_classes)
    remote.push_dir(out_dir, shards.MANIFEST, progress.report)  # shards first, the manifest last: the commit point
    get_run_logger().info("%s: %d rows in %d shards written to %s in %.2f s", split, manifest["rows"],
                          len(manifest["shards"]), out_dir, time.perf_counter() - t0)
    return manifest_ref(out_dir)


def split_is_current(out_dir: str, rows_per_shard: int, source: dict) -> bool:
    """The split these settings would write is there and verifies (every shard hashed). In a
    remote home: its manifest is committed in the bucket with these settings, and every shard
    it lists is there with the SHA-256 it records (hashed again when training reads them)."""
    if not remote.is_url(out_dir):
        return shards.is_current(out_dir, rows_per_shard=rows_per_shard, source=source)
    try:
        manifest = json.loads(remote.get_commit(out_dir, shards.MANIFEST) or b"null")
        if (not isinstance(manifest, dict) or manifest.get("rows_per_shard") != rows_per_shard
                or manifest.get("source") != source):
            return False
        shards.check_coverage(manifest, remote.join(out_dir, shards.MANIFEST))
        return all((info := remote.remote_file(remote.join(out_dir, s["file"]))) is not None
                   and info.sha256 == s["sha256"] for s in manifest["shards"])
    except (ValueError, shards.ShardError):
        return False


def source_of(images: VerifiedFile, labels: VerifiedFile) -> dict:
    """The ``source`` block of a split's manifest, from verified file references."""
    return shards.source_of(images.model_dump(), labels.model_dump())


def manifest_ref(out_dir: str) -> SplitRef:
    """The reference of a split folder (by address: in a remote home, its manifest is fetched)."""
    address = remote.join(str(out_dir), shards.MANIFEST)
    path = remote.pull_file(address)
    manifest = shards.load_manifest(path.parent)
    return SplitRef(split=manifest["split"], dir=str(out_dir), manifest=address, sha256=sha256_file(path),
                    rows=manifest["rows"], shards=len(manifest["shards"]))
