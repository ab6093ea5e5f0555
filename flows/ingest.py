"""The ingest flow: download → verify → parse → shard, for both MNIST splits."""
# (No `from __future__ import annotations` here: Prefect validates flow parameters against real annotations.)

from prefect import flow

from flows.contract import Deadline, Retries, RowsPerShard, Timeout
from storage.config import (DEFAULT_RETRIES, DEFAULT_ROWS_PER_SHARD, DEFAULT_TIMEOUT, check_ingest_settings,
                            resolve_home, resolve_mirrors)
from storage.mnist import SPLITS, file_for
from tasks.ingest import download, parse, verify, write_shards
from tasks.refs import SplitRef


@flow(name="ingest-mnist", flow_run_name="ingest-mnist ({rows_per_shard} rows/shard)")
def ingest(
    home: str | None = None,
    mirrors: list[str] | None = None,
    rows_per_shard: RowsPerShard = DEFAULT_ROWS_PER_SHARD,
    timeout: Timeout = DEFAULT_TIMEOUT,
    retries: Retries = DEFAULT_RETRIES,
    retry_delay: float = 2.0,
    deadline: Deadline = None,
) -> dict[str, SplitRef]:
    """Make ``<home>/data/mnist/{train,test}`` hold verified, normalized Parquet shards.

    Returns ``{split: manifest reference}`` (path, SHA-256, row count).
    """
    check_ingest_settings(rows_per_shard=rows_per_shard, timeout=timeout, retries=retries, deadline=deadline)
    home = resolve_home(home)
    mirrors = resolve_mirrors(mirrors)
    raw_dir = str(home.raw)
    names = [file_for(split, kind).name for split in SPLITS for kind in ("images", "labels")]

    # 1. Download the four archives concurrently; a cached download whose file is missing or
    #    no longer hashes to its pin is refreshed (fetched again). Transient failures retry
    #    with exponential backoff; each mirror gets ``deadline`` seconds per file.
    fetches = {
        name: download.with_options(
            retries=retries,
            retry_delay_seconds=[retry_delay * 2**i for i in range(retries)],
        ).submit(name, mirrors, raw_dir, timeout, deadline)
        for name in names
    }
    refs = {name: future.result() for name, future in fetches.items()}  # any failure stops here

    # 2. Verify each local file against its pinned SHA-256, every run: nothing unverified is
    #    parsed (the parser checks the bytes it reads against this hash once more).
    checked = {name: verify.submit(ref) for name, ref in refs.items()}
    checked = {name: future.result() for name, future in checked.items()}

    def pair(split):
        return checked[file_for(split, "images").name], checked[file_for(split, "labels").name]

    # 3. Parse and validate both splits before anything is written.
    for split in SPLITS:
        parse(split, *pair(split))

    # 4. Write each split's shards + manifest (swapped in whole, never half-written). A cached
    #    result whose directory no longer verifies (manifest, coverage, every shard's SHA-256)
    #    is refreshed: the split is rebuilt.
    manifests = {split: write_shards.submit(split, *pair(split), out_dir=str(home.split(split)),
                                           rows_per_shard=rows_per_shard)
                 for split in SPLITS}
    return {split: future.result() for split, future in manifests.items()}
