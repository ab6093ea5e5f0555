"""The ingest flow: download → verify → parse → check → shard, for every split of a dataset (MNIST by default)."""
# (No `from __future__ import annotations` here: Prefect validates flow parameters against real annotations.)

from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from flows.server import announce_run
import tasks.prefect_compat  # noqa: F401  (flow runs end without waiting for their heartbeat thread)
from flows.contract import DatasetName, Deadline, Retries, RowsPerShard, Timeout
from storage.config import (DEFAULT_RETRIES, DEFAULT_ROWS_PER_SHARD, DEFAULT_TIMEOUT, IngestSettings,
                            resolve_mirrors)
from storage.catalog import resolve as resolve_dataset
from storage.datasets import check_pinned
from storage.settings import checked as checked_settings
from tasks.common import home_for_run
from tasks.ingest import check_data, download, parse, verify, write_shards
from tasks.refs import Ingested, SplitFiles


def ingest_run_name() -> str:
    params = flow_run.parameters
    dataset = str(params.get("dataset") or "mnist")
    return f"ingest-{Path(dataset).stem if dataset.endswith(('.toml', '.json')) else dataset} " \
           f"({params.get('rows_per_shard', DEFAULT_ROWS_PER_SHARD)} rows/shard)"


@flow(name="ingest", flow_run_name=ingest_run_name, on_running=[announce_run])
def ingest(
    home: str | None = None,
    mirrors: list[str] | None = None,
    rows_per_shard: RowsPerShard = DEFAULT_ROWS_PER_SHARD,
    timeout: Timeout = DEFAULT_TIMEOUT,
    retries: Retries = DEFAULT_RETRIES,
    retry_delay: float = 2.0,
    deadline: Deadline = None,
    dataset: DatasetName = "mnist",
    allow_unpinned: bool = False,
) -> Ingested:
    """Make ``<home>/data/<dataset>/<split>`` hold verified, normalized Parquet shards, for every
    split of the dataset (MNIST: train and test).

    Returns a manifest reference (path, SHA-256, row count) per split.

    Args:
        dataset: A built-in dataset (mnist, fashion-mnist) or the path of a spec file (.toml/.json).
        allow_unpinned: Accept files the spec gives no checksum for (the provenance records the hash seen).
    """
    spec = resolve_dataset(dataset)
    check_pinned(spec, allow_unpinned)
    checked_settings(IngestSettings, rows_per_shard=rows_per_shard, timeout=timeout, retries=retries, deadline=deadline)
    home = home_for_run(home)
    mirrors = resolve_mirrors(mirrors, default=spec.mirrors)
    raw_dir = home.address(home.raw_for(spec.key))
    files = {f.name: f for f in spec.files}
    shape, n_classes = spec.image_shape, len(spec.classes)

    # 1. Download the archives (MNIST: four) concurrently; a cached download whose file is missing or
    #    no longer hashes to its pin is refreshed (fetched again). Transient failures retry
    #    with exponential backoff; each mirror gets ``deadline`` seconds per file.
    fetches = {
        name: download.with_options(
            retries=retries,
            retry_delay_seconds=[retry_delay * 2**i for i in range(retries)],
        ).submit(file, mirrors, raw_dir, timeout, deadline)
        for name, file in files.items()
    }
    refs = {name: future.result() for name, future in fetches.items()}  # any failure stops here

    # 2. Verify each local file against its pinned SHA-256, every run: nothing unverified is
    #    parsed (the parser checks the bytes it reads against this hash once more).
    checked = {name: verify.submit(ref) for name, ref in refs.items()}
    checked = {name: future.result() for name, future in checked.items()}

    def pair(split):
        return checked[spec.file_for(split, "images").name], checked[spec.file_for(split, "labels").name]

    # 3. Parse and validate every split before anything is written.
    for split in spec.splits:
        parse(split, *pair(split), image_shape=shape, n_classes=n_classes)

    # 4. Check what the splits hold: rows, classes, pixel statistics against the dataset's
    #    reference, duplicate and empty images, images shared between test and train. Recorded
    #    beside the splits and in the dashboard; a failed check stops here, naming it.
    check_data([SplitFiles(split=split, images=pair(split)[0], labels=pair(split)[1]) for split in spec.splits],
               spec, record=home.address(home.checks(spec.key)))

    # 5. Write each split's shards + manifest (swapped in whole, never half-written). A cached
    #    result whose directory no longer verifies (manifest, coverage, every shard's SHA-256)
    #    is refreshed: the split is rebuilt.
    manifests = {split: write_shards.submit(split, *pair(split), out_dir=home.address(home.split(split, spec.key)),
                                           rows_per_shard=rows_per_shard, image_shape=shape, n_classes=n_classes)
                 for split in spec.splits}
    return Ingested(splits=tuple(future.result() for future in manifests.values()))
