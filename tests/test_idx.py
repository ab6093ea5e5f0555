"""The IDX reader on tiny synthetic files: one file per malformed case."""

import numpy as np
import pytest

from storage.idx import IDXError, check_pair, read_header, read_idx, read_pair, write_idx


def raw(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def header(code, dims):
    return bytes([0, 0, code, len(dims)]) + np.asarray(dims, ">u4").tobytes()


@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
def test_round_trip_every_dtype(tmp_path, dtype):
    a = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4)
    write_idx(tmp_path / "a.idx", a)
    b = read_idx(tmp_path / "a.idx")
    assert b.shape == (2, 3, 4) and b.dtype.isnative
    np.testing.assert_array_equal(a, b)


def test_reads_big_endian_dims_and_values(tmp_path):
    path = raw(tmp_path, "x", header(0x0C, [2]) + np.array([1, 256], ">i4").tobytes())
    assert read_idx(path).tolist() == [1, 256]


@pytest.mark.parametrize("data, message", [
    (b"", "too short for an IDX header"),
    (b"\x00\x00", "too short for an IDX header"),
    (b"\x01\x00\x08\x01" + b"\x00\x00\x00\x01" + b"\x05", "bad magic number"),
    (b"\x00\x07\x08\x01" + b"\x00\x00\x00\x01" + b"\x05", "bad magic number"),
    (b"\x00\x00\x0a\x01" + b"\x00\x00\x00\x01" + b"\x05", "unknown dtype code 0x0a"),
    (b"\x00\x00\x08\x00", "zero dimensions"),
    (b"\x00\x00\x08\x03" + b"\x00\x00\x00\x01", "header truncated"),
    (header(0x08, [2, 2]) + b"\x00" * 3, "truncated: shape (2, 2)"),
    (header(0x08, [2, 2]) + b"\x00" * 5, "has trailing bytes"),
    (header(0x0B, [3]) + b"\x00" * 3, "truncated"),
])
def test_malformed_files_name_file_and_problem(tmp_path, data, message):
    path = raw(tmp_path, "broken-idx1-ubyte", data)
    with pytest.raises(IDXError) as e:
        read_idx(path)
    assert str(e.value).startswith("broken-idx1-ubyte: ")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(IDXError, match="nope: no such file"):
        read_header(tmp_path / "nope")


def images(tmp_path, n, shape=(28, 28), dtype=np.uint8, name="imgs"):
    write_idx(tmp_path / name, np.zeros((n, *shape), dtype))
    return tmp_path / name


def labels(tmp_path, values, dtype=np.uint8, name="lbls"):
    write_idx(tmp_path / name, np.asarray(values, dtype))
    return tmp_path / name


def test_mnist_pair_ok(tmp_path):
    x, y = read_pair(images(tmp_path, 3), labels(tmp_path, [0, 9, 4]))
    assert x.shape == (3, 28, 28) and y.tolist() == [0, 9, 4]


@pytest.mark.parametrize("make, message", [
    (lambda t: (images(t, 3, shape=(28, 27)), labels(t, [1, 2, 3])), "imgs: expected uint8 images of shape (n, 28, 28)"),
    (lambda t: (images(t, 3, dtype=np.float32), labels(t, [1, 2, 3])), "imgs: expected uint8 images"),
    (lambda t: (images(t, 3), labels(t, [1, 2, 3], dtype=np.int32)), "lbls: expected uint8 labels"),
    (lambda t: (images(t, 3), labels(t, [[1], [2], [3]])), "lbls: expected uint8 labels"),
    (lambda t: (images(t, 3), labels(t, [1, 2])), "imgs: 3 images but lbls has 2 labels"),
    (lambda t: (images(t, 3), labels(t, [1, 12, 3])), "lbls: label 12 at index 1 is outside 0..9"),
])
def test_mnist_pair_mismatches(tmp_path, make, message):
    with pytest.raises(IDXError) as e:
        read_pair(*make(tmp_path))
    assert message in str(e.value)


def test_check_pair_uses_headers_only(tmp_path):
    assert check_pair(read_header(images(tmp_path, 5)), read_header(labels(tmp_path, [0] * 5))) == 5


def test_absurd_dimensions_do_not_overflow(tmp_path):
    path = raw(tmp_path, "huge", header(0x0E, [2**32 - 1] * 4) + b"\x00" * 8)
    with pytest.raises(IDXError, match="huge: truncated"):
        read_header(path)
