"""Normalized Parquet shards of a dataset's split (MNIST by default), with a manifest.

    <home>/data/<dataset>/<split>/part-00000.parquet ...   columns: index, image, label
    <home>/data/<dataset>/<split>/manifest.json            shards, row counts, SHA-256

``image`` is a fixed-size list of rows × cols float32 values pixel/255 in [0, 1] (MNIST: 784;
another shape is recorded as ``image_shape`` in the manifest and each shard's metadata, so
MNIST's shards are byte for byte what they were before datasets were specs). A split is
written into a staging directory and swapped in whole, so readers see the old split or the
new one, never a mix and never a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage import DigitflowError
from storage.atomic import read_json, sha256_file, staged_dir, write_json
from storage.idx import pixels01, read_pair

FORMAT_VERSION = 1
NORMALIZATION = "pixel / 255 as float32, in [0, 1]"
PIXELS = 784  # MNIST's 28×28; another dataset's shards record their image_shape in the manifest
MANIFEST = "manifest.json"


def schema_for(pixels: int) -> pa.Schema:
    return pa.schema([
        pa.field("index", pa.int64(), nullable=False),
        pa.field("image", pa.list_(pa.field("element", pa.float32(), nullable=False), pixels), nullable=False),
        pa.field("label", pa.uint8(), nullable=False),
    ])


SCHEMA = schema_for(PIXELS)

class ShardError(DigitflowError):
    pass


def split_dir(home: str | os.PathLike, split: str) -> Path:
    from storage.home import Home

    return Home(home).split(split)


def write_split(images_path, labels_path, out_dir, *, split: str, rows_per_shard: int = 10_000,
                source: dict | None = None, image_shape: tuple[int, int] = (28, 28), n_classes: int = 10) -> dict:
    """Parse a validated IDX pair and write it as shards + manifest in ``out_dir``.

    Returns the manifest (also written as ``out_dir/manifest.json``).
    """
    if rows_per_shard < 1:
        raise ShardError(f"rows_per_shard must be a positive integer, got {rows_per_shard}")
    source = source or {}
    images, labels = read_pair(images_path, labels_path,
                                images_sha256=source.get("images", {}).get("sha256"),
                                labels_sha256=source.get("labels", {}).get("sha256"),
                                shape=tuple(image_shape), n_classes=n_classes)
    out_dir = Path(out_dir)
    # One writer per split at a time (two concurrent ingests into one home would otherwise
    # race on the directory swap); a crashed writer's leftovers are cleared under the lock.
    with staged_dir(out_dir) as staging:
        return _write_split(images, labels, staging, split, rows_per_shard, source, tuple(image_shape), n_classes)


def _write_split(images, labels, staging: Path, split: str, rows_per_shard: int, source: dict | None,
                 image_shape: tuple[int, int] = (28, 28), n_classes: int = 10) -> dict:
    n = len(labels)
    flat = images.reshape(n, image_shape[0] * image_shape[1])
    file_meta = {
        "format_version": FORMAT_VERSION,
        "split": split,
        "normalization": NORMALIZATION,
        "source": source or {},
    }
    if image_shape != (28, 28):  # MNIST's shards stay byte for byte as they were
        file_meta["image_shape"] = list(image_shape)
    starts = range(0, n, rows_per_shard)

    def write_one(i_start):
        i, start = i_start
        stop = min(start + rows_per_shard, n)
        name = f"part-{i:05d}.parquet"
        table = _table(flat[start:stop], labels[start:stop], start,
                       {**file_meta, "shard": i, "first_index": start, "rows": stop - start})
        pq.write_table(table, staging / name, compression="zstd", use_dictionary=["label"],
                       write_statistics=["index", "label"])
        return {"file": name, "rows": stop - start, "first_index": start,
                "sha256": sha256_file(staging / name), "bytes": (staging / name).stat().st_size}

    # Parquet encoding and zstd release the GIL: two threads use both cores.
    with ThreadPoolExecutor(max_workers=2) as pool:
        shards = list(pool.map(write_one, enumerate(starts)))
    # The row file training reads (storage.rowstore: every image's uint8 pixels, then the labels)
    # is checked against this digest, which only the verified manifest carries.
    rows = hashlib.sha256(np.ascontiguousarray(flat, np.uint8))
    rows.update(np.ascontiguousarray(labels, np.uint8))
    manifest = {**file_meta, "rows": n, "rows_per_shard": rows_per_shard, "shards": shards,
                "class_counts": np.bincount(labels, minlength=n_classes).tolist(), "rows_sha256": rows.hexdigest()}
    write_json(staging / MANIFEST, manifest)
    return manifest


def _table(pixels: np.ndarray, labels: np.ndarray, start: int, meta: dict) -> pa.Table:
    values = pa.array(pixels01(pixels).ravel())  # (rows*784,) float32, zero-copy into Arrow
    schema = schema_for(pixels.shape[1])
    image = pa.FixedSizeListArray.from_arrays(values, type=schema.field("image").type)
    index = pa.array(np.arange(start, start + len(labels), dtype=np.int64))
    schema = schema.with_metadata({"digitflow": json.dumps(meta, sort_keys=True)})
    return pa.Table.from_arrays([index, image, pa.array(labels, pa.uint8())], schema=schema)


def load_manifest(directory) -> dict:
    path = Path(directory) / MANIFEST
    try:
        manifest = read_json(path)
    except FileNotFoundError:
        raise ShardError(f"{path}: no manifest (run `digitflow ingest` first)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShardError(f"{path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
    return manifest


def check_coverage(manifest: dict, path) -> None:
    """The manifest's shards must cover rows 0…N−1 exactly once, in order."""
    try:
        rows, entries = int(manifest["rows"]), manifest["shards"]
        spans = [(int(s["first_index"]), int(s["rows"])) for s in entries]
        names = [s["file"] for s in entries]
        if not all(isinstance(s["sha256"], str) for s in entries):
            raise TypeError
    except (KeyError, TypeError, ValueError):
        raise ShardError(f"{path}: manifest is missing fields (rows, shards: file, rows, first_index, sha256)") from None
    if rows < 0 or any(r < 1 for _, r in spans) or len(set(names)) != len(names):
        raise ShardError(f"{path}: manifest lists empty or repeated shards")
    if any(not isinstance(n, str) or Path(n).name != n or not n.endswith(".parquet") for n in names):
        raise ShardError(f"{path}: manifest names a shard outside its folder")
    expected = 0
    for first, count in spans:
        if first != expected:
            raise ShardError(f"{path}: shards do not cover rows 0…{rows - 1} exactly once "
                             f"(row {expected} expected next, a shard starts at {first}); rerun `digitflow ingest`")
        expected += count
    if expected != rows:
        raise ShardError(f"{path}: shards hold {expected} rows, the manifest says {rows}; rerun `digitflow ingest`")


def read_shard(directory: Path, shard: dict) -> bytes:
    """The shard file's bytes, refused unless they hash to the manifest's SHA-256: parse these
    bytes, not the file again."""
    path = directory / shard["file"]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ShardError(f"{path}: shard listed in the manifest is missing; rerun `digitflow ingest`") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != shard["sha256"]:
        raise ShardError(f"{path}: SHA-256 {digest[:16]}… does not match the manifest's "
                         f"{shard['sha256'][:16]}… (corrupt shard; rerun `digitflow ingest` to rebuild it)")
    return data


def verify_split(directory, manifest: dict | None = None) -> dict:
    """Check the manifest's coverage and every shard's SHA-256 (the manifest is loaded unless
    given); return the manifest."""
    directory = Path(directory)
    manifest = load_manifest(directory) if manifest is None else manifest
    check_coverage(manifest, directory / MANIFEST)
    for shard in manifest["shards"]:
        read_shard(directory, shard)
    return manifest


def is_current(directory, *, rows_per_shard: int, source: dict) -> bool:
    """``directory`` holds, verified, the split these settings would write: its manifest has
    this layout and source, covers every row once, and every shard hashes to its record."""
    try:
        manifest = load_manifest(directory)
        if manifest.get("rows_per_shard") != rows_per_shard or manifest.get("source") != source \
                or not isinstance(manifest.get("rows_sha256"), str):
            return False  # other settings, or written before rows_sha256: no need to hash anything
        verify_split(directory, manifest)
        return True
    except (ShardError, OSError):
        return False


def source_of(images: dict, labels: dict) -> dict:
    """The ``source`` block of a manifest, from verified file references (path, sha256)."""
    return {kind: {"file": Path(ref["path"]).name, "sha256": ref["sha256"]}
            for kind, ref in (("images", images), ("labels", labels))}


def image_shape(manifest: dict) -> tuple[int, int]:
    """(rows, cols) of a split's images (MNIST's manifests do not record it: 28×28)."""
    rows, cols = manifest.get("image_shape", (28, 28))
    return int(rows), int(cols)


def read_split(directory) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read a split into ``(images (n, 784) float32, labels (n,) int64, manifest)``.

    The manifest must cover rows 0…N−1 exactly once; each shard's bytes are read once,
    checked against the manifest's SHA-256 and only then parsed (from those same bytes); row
    counts are checked against each verified file's footer before the arrays are allocated.
    """
    directory = Path(directory)
    manifest = load_manifest(directory)
    check_coverage(manifest, directory / MANIFEST)

    def load_one(shard) -> pa.Buffer:
        buffer = pa.py_buffer(read_shard(directory, shard))
        rows = pq.read_metadata(pa.BufferReader(buffer)).num_rows
        if rows != shard["rows"]:
            raise ShardError(f"{directory / shard['file']}: {rows} rows, the manifest says {shard['rows']}")
        return buffer

    with ThreadPoolExecutor(max_workers=2) as pool:
        buffers = list(pool.map(load_one, manifest["shards"]))
    n = manifest["rows"]
    height, width = image_shape(manifest)
    pixels = height * width
    schema = schema_for(pixels)
    images = np.empty((n, pixels), np.float32)
    labels = np.empty(n, np.int64)

    def decode(shard, buffer):
        path = directory / shard["file"]
        table = pq.read_table(pa.BufferReader(buffer))
        rows, start = shard["rows"], shard["first_index"]
        if table.schema.remove_metadata() != schema:
            raise ShardError(f"{path}: schema {table.schema.types} is not digitflow's {schema.types}")
        column = table.column("image").combine_chunks()
        images[start:start + rows] = column.values.to_numpy().reshape(rows, pixels)
        labels[start:start + rows] = table.column("label").to_numpy()

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(decode, manifest["shards"], buffers))
    return images, labels, manifest
