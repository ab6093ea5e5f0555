"""Parquet shards and manifests on small synthetic splits."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from storage import shards
from storage.atomic import sha256_file
from storage.idx import IDXError, write_idx
from storage.shards import ShardError, is_current, load_manifest, read_split, write_split


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(25, 28, 28), dtype=np.uint8)
    x[0] = 0
    x[1] = 255
    y = rng.integers(0, 10, size=25).astype(np.uint8)
    write_idx(tmp_path / "imgs", x)
    write_idx(tmp_path / "lbls", y)
    return tmp_path / "imgs", tmp_path / "lbls", x, y


def test_layout_schema_and_values(tmp_path, pair):
    ip, lp, x, y = pair
    out = tmp_path / "data" / "train"
    source = {"images": {"sha256": sha256_file(ip)}}
    manifest = write_split(ip, lp, out, split="train", rows_per_shard=10, source=source)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "part-00000.parquet",
                                                     "part-00001.parquet", "part-00002.parquet"]
    assert [s["rows"] for s in manifest["shards"]] == [10, 10, 5]
    assert manifest["rows"] == 25 and manifest["class_counts"] == np.bincount(y, minlength=10).tolist()
    assert json.loads((out / "manifest.json").read_text()) == manifest

    pf = pq.ParquetFile(out / "part-00001.parquet")
    assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
    meta = json.loads(pf.schema_arrow.metadata[b"digitflow"])
    assert meta["format_version"] == 1 and meta["source"] == source
    assert "255" in meta["normalization"] and meta["first_index"] == 10
    with pytest.raises(IDXError, match="imgs: SHA-256 .* is not the verified"):  # nothing unverified is parsed
        write_split(ip, lp, tmp_path / "other", split="train", source={"images": {"sha256": "0" * 64}})
    table = pf.read()
    assert str(table.schema.field("image").type) == "fixed_size_list<element: float not null>[784]"
    assert table.column("index").to_pylist() == list(range(10, 20))
    images = np.stack(table.column("image").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(images, x[10:20].reshape(10, 784).astype(np.float32) / np.float32(255))


def test_read_split_round_trip(tmp_path, pair):
    ip, lp, x, y = pair
    write_split(ip, lp, tmp_path / "s", split="test", rows_per_shard=7)
    images, labels, manifest = read_split(tmp_path / "s")
    assert images.dtype == np.float32 and images.shape == (25, 784)
    assert images[0].max() == 0.0 and images[1].min() == 1.0
    np.testing.assert_array_equal(labels, y)
    np.testing.assert_array_equal(images, x.reshape(25, 784) / np.float32(255))


def test_corrupt_shard_is_refused_by_name(tmp_path, pair):
    ip, lp, *_ = pair
    write_split(ip, lp, tmp_path / "s", split="test", rows_per_shard=10)
    shard = tmp_path / "s" / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"part-00001.parquet: SHA-256 .* does not match the manifest"):
        read_split(tmp_path / "s")


def test_missing_shard_and_manifest(tmp_path, pair):
    ip, lp, *_ = pair
    write_split(ip, lp, tmp_path / "s", split="test", rows_per_shard=10)
    (tmp_path / "s" / "part-00002.parquet").unlink()
    with pytest.raises(ShardError, match="part-00002.parquet: shard listed in the manifest is missing"):
        read_split(tmp_path / "s")
    with pytest.raises(ShardError, match="no manifest"):
        load_manifest(tmp_path / "elsewhere")


def test_rewrite_with_new_layout_leaves_no_stale_shards(tmp_path, pair):
    ip, lp, *_ = pair
    write_split(ip, lp, tmp_path / "s", split="test", rows_per_shard=5)
    write_split(ip, lp, tmp_path / "s", split="test", rows_per_shard=20)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["manifest.json", "part-00000.parquet",
                                                                   "part-00001.parquet"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [".s.lock"]  # no staging left
    assert is_current(tmp_path / "s", rows_per_shard=20, source={})
    assert not is_current(tmp_path / "s", rows_per_shard=5, source={})


def test_crash_mid_write_keeps_the_old_split(tmp_path, pair, monkeypatch):
    ip, lp, *_ = pair
    write_split(ip, lp, tmp_path / "s", split="test", rows_per_shard=10)
    before = {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()}
    calls = []

    def crash(table, where, **kw):
        calls.append(where)
        if len(calls) == 2:
            raise OSError("disk full")
        return original(table, where, **kw)

    original = pq.write_table
    monkeypatch.setattr(shards.pq, "write_table", crash)
    with pytest.raises(OSError, match="disk full"):
        write_split(ip, lp, tmp_path / "s", split="test", rows_per_shard=5)
    assert {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".s.lock", "imgs", "lbls", "s"]  # no staging left


def test_bad_labels_write_nothing(tmp_path):
    write_idx(tmp_path / "imgs", np.zeros((2, 28, 28), np.uint8))
    write_idx(tmp_path / "lbls", np.array([3, 10], np.uint8))
    with pytest.raises(IDXError, match="label 10"):
        write_split(tmp_path / "imgs", tmp_path / "lbls", tmp_path / "s", split="train")
    assert not (tmp_path / "s").exists()


def test_rows_per_shard_must_be_positive(tmp_path, pair):
    with pytest.raises(ShardError, match="rows_per_shard must be a positive integer, got 0"):
        write_split(pair[0], pair[1], tmp_path / "s", split="train", rows_per_shard=0)


def test_a_crashed_writers_leftovers_are_cleared(tmp_path, pair):
    ip, lp, *_ = pair
    (tmp_path / ".s.staging-abc123").mkdir()
    (tmp_path / ".s.staging-abc123" / "part-00000.parquet").write_bytes(b"half")
    (tmp_path / ".s.old-4242").mkdir()
    (tmp_path / ".other.staging-x").mkdir()  # another split's: not ours to touch
    write_split(ip, lp, tmp_path / "s", split="test", rows_per_shard=10)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".other.staging-x", ".s.lock"]


def test_concurrent_writers_of_one_split(tmp_path, pair):
    """Two writers at once (threads here; processes take the same flock) both succeed."""
    from concurrent.futures import ThreadPoolExecutor

    ip, lp, *_ = pair
    with ThreadPoolExecutor(4) as pool:
        manifests = list(pool.map(lambda n: write_split(ip, lp, tmp_path / "s", split="test", rows_per_shard=n),
                                  [5, 10, 5, 10]))
    assert [m["rows_per_shard"] for m in manifests] == [5, 10, 5, 10]
    final = load_manifest(tmp_path / "s")["rows_per_shard"]
    assert len(list((tmp_path / "s").glob("*.parquet"))) == {5: 5, 10: 3}[final]  # one layout, not a mix
    read_split(tmp_path / "s")  # consistent: every shard matches the manifest


# ---- the uint8 row file training reads (storage.rowstore) ----------------------------------

def _rows_split(tmp_path, n=2000, rows_per_shard=300):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    x[0], x[1] = 0, 255  # every uint8 value's pixel/255 round-trips exactly
    y = (np.arange(n) % 10).astype(np.uint8)
    write_idx(tmp_path / "imgs", x)
    write_idx(tmp_path / "lbls", y)
    write_split(tmp_path / "imgs", tmp_path / "lbls", tmp_path / "split", split="train", rows_per_shard=rows_per_shard)
    return tmp_path / "split"


@pytest.mark.parametrize("in_memory", [True, False], ids=["held-in-memory", "read-by-pread"])
def test_row_file_gives_the_rows_read_split_gives_and_the_same_training(tmp_path, monkeypatch, in_memory):
    import nn
    from storage import rowstore
    from storage.rowstore import open_rows

    if not in_memory:
        monkeypatch.setattr(rowstore, "IN_MEMORY_BYTES", 0)  # as a split too large to hold is read

    split = _rows_split(tmp_path)
    x, y, _ = read_split(split)
    rows, labels, manifest = open_rows(split, sha256_file(split / "manifest.json"))
    assert len(manifest["shards"]) == 7 and rows.shape == x.shape and (rows._fd is None) == in_memory
    np.testing.assert_array_equal(labels, y)
    idx = np.random.default_rng(2).permutation(len(y))[:700]
    got = rows.take_rows(idx, np.empty((700, 784), np.float32))
    assert np.array_equal(got, x[idx])  # bit for bit, in the order asked
    assert np.array_equal(rows[100:250], x[100:250]) and np.array_equal(rows[idx][3:9], x[idx][3:9])

    # Training over the multi-shard row file = training on the split in memory, bit for bit
    # (with shifts, dropout and a held-out validation split in play).
    hp = nn.presets.get("fast", hidden=(32,), epochs=2, shift=1, dropout=0.1, batch_size=64)
    a, ha = nn.presets.train(hp, x, y)
    b, hb = nn.presets.train(hp, rows, labels)
    assert nn.digest(a) == nn.digest(b) and ha.epochs[-1]["val_loss"] == hb.epochs[-1]["val_loss"]


def test_row_file_changed_behind_our_back_is_rebuilt_and_a_bad_shard_refused(tmp_path):
    from storage.rowstore import open_rows

    split = _rows_split(tmp_path, n=600)
    digest = sha256_file(split / "manifest.json")
    rows, _, _ = open_rows(split, digest)
    first = rows[0:1].copy()
    del rows
    [row_file] = split.glob(".rows-*.u8")
    data = bytearray(row_file.read_bytes())
    data[5] ^= 0xFF  # same size, same name: only the hash can tell
    row_file.write_bytes(bytes(data))
    rows, _, _ = open_rows(split, digest)
    assert np.array_equal(rows[0:1], first)  # rebuilt from the verified shards, not read as changed

    row_file.unlink()
    shard = split / "part-00000.parquet"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match="part-00000.parquet: SHA-256"):
        open_rows(split, digest)
    assert not list(split.glob(".rows-*.u8"))  # nothing half-built left behind
