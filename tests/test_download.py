"""storage.download against a scripted faulty mirror and the real archives (no Prefect)."""

import gzip
from pathlib import Path

import pytest

from storage.download import DownloadError, TransientDownloadError, fetch_verified
from storage.mnist import FILES

LABELS = FILES["t10k-labels-idx1-ubyte.gz"]  # the smallest real file: fast
IMAGES = FILES["t10k-images-idx3-ubyte.gz"]


def only_file(dest: Path):
    """What a download left behind (its lock file aside): never a temp file."""
    return sorted(p.name for p in dest.iterdir() if not p.name.endswith(".lock"))


def test_good_mirror_writes_verified_file(tmp_path, faulty):
    ref = fetch_verified(LABELS, [faulty.url], tmp_path)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    assert path.stat().st_size == 10008
    assert ref["sha256"] == LABELS.idx_sha256 and ref["fetched"]
    assert ref["archive_canonical"] is False  # the local mirror re-compressed the archive
    assert only_file(tmp_path) == ["t10k-labels-idx1-ubyte", "t10k-labels-idx1-ubyte.json"]


def test_present_and_verified_is_not_fetched_again(tmp_path, faulty):
    fetch_verified(LABELS, [faulty.url], tmp_path)
    faulty.requests.clear()
    ref = fetch_verified(LABELS, [faulty.url], tmp_path)
    assert faulty.requests == [] and ref["fetched"] is False


def test_corrupt_local_copy_is_fetched_again(tmp_path, faulty):
    fetch_verified(LABELS, [faulty.url], tmp_path)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    faulty.requests.clear()
    assert fetch_verified(LABELS, [faulty.url], tmp_path)["fetched"]
    assert len(faulty.requests) == 1


def test_404_on_first_mirror_moves_to_next(tmp_path, faulty, mnist_server):
    faulty.default = "404"
    ref = fetch_verified(LABELS, [faulty.url, mnist_server], tmp_path)
    assert ref["mirror"].startswith(mnist_server)


def test_wrong_bytes_are_deleted_and_next_mirror_used(tmp_path, faulty, mnist_server):
    faulty.default = "wrong"
    ref = fetch_verified(IMAGES, [faulty.url, mnist_server], tmp_path)
    assert ref["mirror"].startswith(mnist_server)
    assert only_file(tmp_path) == ["t10k-images-idx3-ubyte", "t10k-images-idx3-ubyte.json"]


@pytest.mark.parametrize("behaviour, error, text", [
    ("wrong", DownloadError, "SHA-256 mismatch"),
    ("404", DownloadError, "HTTP 404"),
    ("bomb", DownloadError, "decompresses past the expected 10008 bytes"),
    ("500", TransientDownloadError, "HTTP 500"),
    ("429", TransientDownloadError, "HTTP 429"),
    ("reset", TransientDownloadError, "connection broken"),
    ("truncate", TransientDownloadError, "after"),
    ("slow", TransientDownloadError, "timed out after 0.5s"),
])
def test_each_fault_leaves_nothing_and_says_why(tmp_path, faulty, behaviour, error, text):
    faulty.default = behaviour
    with pytest.raises(error) as e:
        fetch_verified(LABELS, [faulty.url], tmp_path, timeout=0.5)
    message = str(e.value)
    assert message.startswith("t10k-labels-idx1-ubyte.gz: no mirror served verified bytes")
    assert text in message and faulty.url in message and "\n" not in message
    assert type(e.value) is error
    assert only_file(tmp_path) == []  # no partial or unverified file left behind


def test_permanent_and_transient_mix_is_transient(tmp_path, faulty):
    faulty.fail(LABELS.name, "404")
    second = type(faulty)(faulty.dir)
    second.default = "503"
    try:
        with pytest.raises(TransientDownloadError, match="HTTP 404.*HTTP 503"):
            fetch_verified(LABELS, [faulty.url, second.url], tmp_path)
    finally:
        second.close()


def test_bomb_is_stopped_at_the_bound(tmp_path, faulty):
    faulty.default = "bomb"
    with pytest.raises(DownloadError, match="gzip bomb"):
        fetch_verified(IMAGES, [faulty.url], tmp_path)
    assert only_file(tmp_path) == []


def test_not_gzip_is_rejected(tmp_path, mnist_dir):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / LABELS.name).write_bytes(gzip.decompress((mnist_dir / LABELS.name).read_bytes()))
    with pytest.raises(DownloadError, match="not a valid gzip stream"):
        fetch_verified(LABELS, [(tmp_path / "m").as_uri()], tmp_path / "out")


def test_file_mirror(tmp_path, mnist_dir):
    missing = (tmp_path / "empty").as_uri()
    ref = fetch_verified(IMAGES, [missing, mnist_dir.as_uri() + "/"], tmp_path)
    assert ref["fetched"] and ref["mirror"].startswith("file://")


def test_multi_member_gzip_is_accepted(tmp_path, mnist_dir):
    raw = gzip.decompress((mnist_dir / LABELS.name).read_bytes())
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / LABELS.name).write_bytes(gzip.compress(raw[:5000]) + gzip.compress(raw[5000:]))
    assert fetch_verified(LABELS, [(tmp_path / "m").as_uri()], tmp_path / "out")["sha256"] == LABELS.idx_sha256


def test_unsupported_scheme(tmp_path):
    with pytest.raises(DownloadError, match="unsupported URL scheme 'ftp'"):
        fetch_verified(LABELS, ["ftp://example.invalid/"], tmp_path)


# ---- hostile mirrors: every failure of one mirror moves on to the next ------------------

@pytest.mark.parametrize("bad", ["loop", "ftp", "trickle", "invalid", "directory", "device"])
def test_any_mirror_failure_moves_on_to_the_next(tmp_path, faulty, mnist_server, bad):
    import time

    if bad in ("loop", "ftp", "trickle"):
        faulty.default = bad
        first = faulty.url
    else:
        first = {"invalid": "http://[::1", "directory": (tmp_path / "dir").as_uri() + "/", "device": None}[bad]
        (tmp_path / "dir" / LABELS.name).mkdir(parents=True)  # a directory where the archive should be
        if bad == "device":  # a mirror folder whose "archive" is a character device
            (tmp_path / "dev").mkdir()
            (tmp_path / "dev" / LABELS.name).symlink_to("/dev/zero")
            first = (tmp_path / "dev").as_uri() + "/"
    t0 = time.monotonic()
    ref = fetch_verified(LABELS, [first, mnist_server], tmp_path / "out", timeout=2, deadline=3)
    assert ref["fetched"] and ref["mirror"] == mnist_server + LABELS.name and ref["sha256"] == LABELS.idx_sha256
    assert time.monotonic() - t0 < 15  # a trickling mirror is abandoned at its deadline


def test_trickling_mirror_alone_fails_at_its_deadline(tmp_path, faulty):
    import time

    faulty.default = "trickle"
    t0 = time.monotonic()
    with pytest.raises(TransientDownloadError, match=r"too slow: not done within the 2s deadline"):
        fetch_verified(LABELS, [faulty.url], tmp_path, timeout=5, deadline=2)
    assert time.monotonic() - t0 < 8
    assert only_file(tmp_path) == []


def test_redirect_loop_and_other_schemes_are_named(tmp_path, faulty):
    second = type(faulty)(faulty.dir)
    faulty.default, second.default = "loop", "ftp"
    try:
        with pytest.raises(DownloadError) as e:
            fetch_verified(LABELS, [faulty.url, second.url], tmp_path)
    finally:
        second.close()
    assert "too many redirects" in str(e.value) and "redirected to a URL that is not http(s)" in str(e.value)
    assert "--mirror" in str(e.value) and "DIGITFLOW_MIRRORS" in str(e.value)  # what to do next


def test_credentials_in_a_mirror_url_are_never_written(tmp_path, faulty):
    import json

    with_secret = faulty.url.replace("http://", "http://alice:s3cret@")
    faulty.fail(LABELS.name, "404")
    with pytest.raises(DownloadError) as e:
        fetch_verified(LABELS, [with_secret], tmp_path)
    assert "s3cret" not in str(e.value) and "http://***@127.0.0.1" in str(e.value)
    ref = fetch_verified(LABELS, [with_secret], tmp_path)
    assert ref["mirror"].startswith("http://***@127.0.0.1") and "s3cret" not in json.dumps(ref)
    assert "s3cret" not in (tmp_path / "t10k-labels-idx1-ubyte.json").read_text()


def test_a_killed_downloads_temp_files_are_cleared(tmp_path, mnist_server):
    stale = tmp_path / ".t10k-labels-idx1-ubyte.abc123.tmp"
    stale.write_bytes(b"half a download")
    fetch_verified(LABELS, [mnist_server], tmp_path)
    assert not stale.exists() and only_file(tmp_path) == ["t10k-labels-idx1-ubyte", "t10k-labels-idx1-ubyte.json"]
