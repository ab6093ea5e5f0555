"""A split as one memory-mapped file of uint8 rows, so training never holds the split in memory.
No Prefect in here.

    <split dir>/.rows-<manifest sha256[:16]>.u8     N × pixels uint8 (image i = row i), then N labels
    <split dir>/.rows-<manifest sha256[:16]>.json   {"rows", "pixels", "sha256"} of that file

Built once per manifest from the verified shards, one shard at a time (memory: one shard), and
hashed again each time it is opened. Pixels are stored as the uint8 values the shards normalized
(shards hold ``pixel/255`` as float32: the build checks the round trip is exact), so a gathered
row is bit-identical to the row ``read_split`` returns, and training gives the same weights.

How training reads it (``take_rows``): every epoch draws one permutation of all N rows —
shuffling is uniform over the whole split, whichever shard a row came from — and gathers the
rows in that order a chunk (8,192 rows) at a time from the memory map. After each chunk the
mapping's pages are released (``madvise(MADV_DONTNEED)``): the file stays in the OS page cache
for the next epoch, but the process's resident memory holds one chunk, not the split.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path

import numpy as np

from storage.atomic import atomic_path, read_json, sha256_file, write_json
from storage.shards import _LUT, MANIFEST, ShardError, check_coverage, image_shape, load_manifest, read_shard


class SplitRows:
    """Rows of a split, read on demand from a memory-mapped uint8 file, as float32 pixel/255."""

    def __init__(self, path: Path, rows: int, pixels: int):
        self.path, self.rows, self.pixels = path, rows, pixels
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._u8 = np.frombuffer(self._map, np.uint8, rows * pixels).reshape(rows, pixels)
        self.labels = np.frombuffer(self._map, np.uint8, rows, offset=rows * pixels).astype(np.int64)
        self._buf = np.empty((0, pixels), np.uint8)

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.pixels

    def __len__(self) -> int:
        return self.rows

    def take_rows(self, idx: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (in that order) into ``out`` (len(idx), pixels) float32; then the pages
        read are released, so resident memory does not grow with the split."""
        if len(self._buf) < len(idx):
            self._buf = np.empty((len(idx), self.pixels), np.uint8)
        u8 = self._buf[:len(idx)]
        np.take(self._u8, idx, axis=0, out=u8, mode="clip")
        np.take(_LUT, u8, out=out)
        self._map.madvise(mmap.MADV_DONTNEED)
        return out

    def __getitem__(self, key) -> "np.ndarray | RowsView":
        """``rows[i:j]``: those rows as float32; ``rows[index array]``: a lazy view of them."""
        if isinstance(key, slice):
            idx = np.arange(self.rows)[key]
            return self.take_rows(idx, np.empty((len(idx), self.pixels), np.float32))
        return RowsView(self, np.asarray(key, np.intp))


class RowsView:
    """Some rows of a SplitRows (e.g. the held-out validation rows), read when sliced."""

    def __init__(self, rows: SplitRows, idx: np.ndarray):
        self.source, self.idx = rows, idx

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.idx), self.source.pixels

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, key: slice) -> np.ndarray:
        idx = self.idx[key]
        return self.source.take_rows(idx, np.empty((len(idx), self.source.pixels), np.float32))


def open_rows(directory, manifest_sha256: str) -> tuple[SplitRows, np.ndarray, dict]:
    """``(rows, labels (N,) int64, manifest)`` of a verified split folder whose manifest hashes to
    ``manifest_sha256``; the row file is built on first use and verified on every open."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    check_coverage(manifest, directory / MANIFEST)
    height, width = image_shape(manifest)
    n, pixels = int(manifest["rows"]), height * width
    path = directory / f".rows-{manifest_sha256[:16]}.u8"
    record_path = path.with_suffix(".json")
    try:
        record = read_json(record_path)
        ok = (record.get("rows"), record.get("pixels")) == (n, pixels) and sha256_file(path) == record.get("sha256")
    except (OSError, ValueError, AttributeError):
        ok = False
    if not ok:
        for stale in directory.glob(".rows-*"):
            stale.unlink(missing_ok=True)  # row files of earlier manifests of this folder
        write_json(record_path, {"rows": n, "pixels": pixels, "sha256": _build(directory, manifest, path, pixels)})
    rows = SplitRows(path, n, pixels)
    return rows, rows.labels, manifest


def _build(directory: Path, manifest: dict, path: Path, pixels: int) -> str:
    """Write the row file from the verified shards, one at a time; return its SHA-256."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    labels = np.empty(int(manifest["rows"]), np.uint8)
    h = hashlib.sha256()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for shard in manifest["shards"]:
            table = pq.read_table(pa.BufferReader(pa.py_buffer(read_shard(directory, shard))))
            if table.num_rows != shard["rows"]:
                raise ShardError(f"{directory / shard['file']}: {table.num_rows} rows, the manifest says {shard['rows']}")
            values = table.column("image").combine_chunks().values.to_numpy().reshape(-1, pixels)
            u8 = np.rint(values * np.float32(255)).clip(0, 255).astype(np.uint8)
            if not np.array_equal(_LUT[u8], values):
                raise ShardError(f"{directory / shard['file']}: pixels are not pixel/255 values")
            data = u8.tobytes()
            f.write(data)
            h.update(data)
            first = int(shard["first_index"])
            labels[first:first + len(u8)] = table.column("label").to_numpy()
        f.write(labels.tobytes())
        h.update(labels.tobytes())
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest()

