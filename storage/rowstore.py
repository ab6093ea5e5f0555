"""A split as one file of uint8 rows, so training never holds the split (as float32) in memory.
No Prefect in here.

    <split dir>/.rows-<manifest sha256[:16]>.u8     N × pixels uint8 (image i = row i), then N labels

Built once per manifest from the verified shards, one shard at a time (memory: one shard), and
hashed again each time it is opened, against the ``rows_sha256`` the verified manifest records
(nothing beside the file vouches for it: a file that does not match is rebuilt; a manifest
written before that field existed gets its row file rebuilt from the shards on every open). Pixels are stored as the uint8 values the shards normalized
(shards hold ``pixel/255`` as float32: the build checks the round trip is exact), so a gathered
row is bit-identical to the row ``read_split`` returns, and training gives the same weights.

How training reads it (``take_rows``): every epoch draws one permutation of all N rows —
shuffling is uniform over the whole split, whichever shard a row came from — and gathers the
rows in that order a chunk (8,192 rows) at a time. A file up to 256 MiB (MNIST's 60,000 rows:
47 MB, a quarter of the float32 split) is held in memory; a larger one is read row by row with
``pread`` into a reused chunk buffer, so the process holds one chunk, not the split, and the OS
page cache keeps the file warm for the next epoch.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from storage.atomic import atomic_path, sha256_file
from storage.idx import pixels01
from storage.shards import MANIFEST, ShardError, check_coverage, image_shape, load_manifest, read_shard


IN_MEMORY_BYTES = 256 << 20  # a row file up to this size is read whole (MNIST's train split: 47 MB)


class SplitRows:
    """Rows of a split as float32 pixel/255, from its uint8 row file: held in memory when the file
    is small (``IN_MEMORY_BYTES``), else read row by row with ``pread`` when asked for."""

    def __init__(self, path: Path, rows: int, pixels: int, data: np.ndarray | None = None):
        """``data``: the whole file's bytes, already read (and verified) by the caller; without
        it the file is opened and read row by row."""
        self.path, self.rows, self.pixels = path, rows, pixels
        self._buf = np.empty((0, pixels), np.uint8)
        self._views: list = []
        size = rows * pixels
        if data is not None:
            self._u8, self._fd = data[:size].reshape(rows, pixels), None
            self.labels = data[size:].astype(np.int64)
        else:
            self._u8, self._fd = None, os.open(path, os.O_RDONLY)
            self.labels = np.frombuffer(os.pread(self._fd, rows, size), np.uint8).astype(np.int64)

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def take_rows(self, idx: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (in that order) into ``out`` (len(idx), pixels) float32. From a large
        file each row is one ``pread`` (about 1 µs) into a reused buffer: memory holds this
        chunk, never the split. (A memory map would not: the kernel maps up to ~100 KB around
        every row touched — 0.9 GB for one 8,192-row chunk of a 1M-row split.)"""
        if len(self._buf) < len(idx):
            self._buf = np.empty((len(idx), self.pixels), np.uint8)
            self._views = [memoryview(row) for row in self._buf] if self._fd is not None else []
        u8 = self._buf[:len(idx)]
        if self._fd is None:
            np.take(self._u8, idx, axis=0, out=u8, mode="clip")
        else:
            if len(idx) and (idx.min() < 0 or idx.max() >= self.rows):
                raise IndexError(f"{self.path}: row index outside 0..{self.rows - 1}")
            fd, pread, width = self._fd, os.preadv, self.pixels
            for view, offset in zip(self._views, (np.asarray(idx, np.int64) * width).tolist()):
                if pread(fd, [view], offset) != width:
                    raise OSError(f"{self.path}: short read (changed while training?)")
        return pixels01(u8, out=out)

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.pixels

    def __len__(self) -> int:
        return self.rows

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
    expected = manifest.get("rows_sha256")
    try:
        rows = _verified(path, n, pixels, expected) if isinstance(expected, str) else None
    except OSError:
        rows = None
    if rows is None:
        for stale in directory.glob(".rows-*"):
            stale.unlink(missing_ok=True)  # row files of earlier manifests of this folder, or a bad one
        sha256 = _build(directory, manifest, path, pixels)
        if isinstance(expected, str) and sha256 != expected:
            raise ShardError(f"{directory / MANIFEST}: the verified shards give rows {sha256[:16]}…, the manifest "
                             f"records {expected[:16]}…")
        rows = _verified(path, n, pixels, sha256)
        if rows is None:
            raise ShardError(f"{path}: changed while it was being built")
    return rows, rows.labels, manifest


def _verified(path: Path, n: int, pixels: int, sha256: str) -> SplitRows | None:
    """The row file opened if it hashes to ``sha256``, else None. A file held in memory is read
    once and the bytes hashed are the bytes used; a larger one is hashed, then read by row."""
    size = n * pixels + n
    if size - n <= IN_MEMORY_BYTES:
        data = np.fromfile(path, np.uint8)
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
            return None
        return SplitRows(path, n, pixels, data)
    if sha256_file(path) != sha256:
        return None
    return SplitRows(path, n, pixels)


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
            if not np.array_equal(pixels01(u8), values):
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

