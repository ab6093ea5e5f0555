"""Streamed, verified downloads with mirror failover. Pure requests; no Prefect.

``fetch_verified`` tries each mirror in order. For each, the archive is streamed through a
bounded gzip decompressor into a temp file while both the archive and the decompressed
bytes are hashed. Only content whose SHA-256 and size match the pin is moved into place.

Failures are classified so the caller can decide about retries:
  - permanent for a mirror: 404 and other 4xx, wrong bytes, not gzip, a gzip bomb;
  - transient: connection errors and resets, timeouts, truncated bodies, 5xx, 429, a mirror
    too slow to deliver the file within its overall deadline.
Any other failure of one mirror (redirect loops, redirects to other schemes, invalid URLs,
TLS errors, a ``file://`` path that is not a regular file) fails that mirror for good, and
the next one is tried. User info in a mirror URL (``user:secret@``) is never written or
logged: every URL that leaves this module passes through ``redact``.
When every mirror fails and at least one failure was transient, ``TransientDownloadError``
is raised (retry later, with backoff); otherwise ``DownloadError``.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import threading
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence
from urllib.parse import urlparse, urlsplit, urlunsplit
from urllib.request import url2pathname

from storage import DigitflowError
from storage.atomic import CHUNK, atomic_path, file_lock, read_json, remove_leftovers, sha256_file, write_json
from storage.datasets import MAX_IDX_BYTES, DatasetFile

if TYPE_CHECKING:  # (requests is imported where a download happens: a warm run never pays for it)
    import requests

DEFAULT_TIMEOUT = 30.0  # seconds of silence before a mirror counts as failed

Progress = Callable[[str, int, int | None], None]  # (file name, bytes so far, total or None)


class DownloadError(DigitflowError):
    """No mirror served verified bytes, and retrying will not help."""


class TransientDownloadError(DownloadError):
    """No mirror served verified bytes, but at least one failure may pass: retry later."""


class _MirrorFailure(Exception):
    def __init__(self, reason: str, transient: bool):
        super().__init__(reason)
        self.transient = transient


def mirror_url(mirror: str, name: str) -> str:
    return mirror.rstrip("/") + "/" + name


def redact(url: str) -> str:
    """``url`` without its user info: ``http://user:secret@host/`` → ``http://***@host/``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return re.sub(r"//[^/@]*@", "//***@", url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


# A mirror slower than this (bytes/s of archive) is abandoned: the per-file deadline is the
# read timeout plus the canonical archive's size at this rate (≈ 3.5 min for the largest file).
MIN_RATE = 50_000


def default_deadline(spec: DatasetFile, timeout: float) -> float:
    return timeout + spec.expected_archive_bytes / MIN_RATE


def expected_sha256(spec: DatasetFile, path: Path) -> str | None:
    """The SHA-256 the decompressed file must have: the pin, or for a file pinned only by its
    archive checksum (or not at all), the digest recorded when its download was verified."""
    if spec.idx_sha256:
        return spec.idx_sha256
    try:
        recorded = read_json(path.with_name(path.name + ".json"))
    except (OSError, ValueError):
        return None
    if not isinstance(recorded, dict) or recorded.get("pinned_by") != spec.pin or recorded.get("file") != spec.name:
        return None
    return recorded.get("sha256") if isinstance(recorded.get("sha256"), str) else None


def is_verified(spec: DatasetFile, path: Path) -> bool:
    """True if ``path`` holds exactly the pinned (or verified-and-recorded) decompressed content."""
    try:
        if spec.idx_size is not None and path.stat().st_size != spec.idx_size:
            return False
    except FileNotFoundError:
        return False
    expected = expected_sha256(spec, path)
    return expected is not None and sha256_file(path) == expected


def fetch_verified(
    spec: DatasetFile,
    mirrors: Sequence[str],
    dest_dir: str | os.PathLike,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    deadline: float | None = None,
    progress: Progress | None = None,
    session: requests.Session | None = None,
) -> dict:
    """Make ``dest_dir/<idx name>`` hold the verified IDX file; return its provenance.

    A file already present and verified is not fetched again. ``timeout`` bounds each wait
    for the mirror; ``deadline`` (default: ``default_deadline``) bounds each mirror's whole
    transfer of this file.
    """
    dest = Path(dest_dir) / spec.idx_name
    sidecar = dest.with_name(dest.name + ".json")
    deadline = default_deadline(spec, timeout) if deadline is None else deadline
    # One downloader per file; temp files a killed downloader left are cleared under the lock.
    with file_lock(dest.with_name(f".{dest.name}.lock")):
        remove_leftovers(dest)
        remove_leftovers(sidecar)
        if is_verified(spec, dest):
            try:
                info = read_json(sidecar)
            except (OSError, ValueError):
                info = {}
            return _record(spec, dest, info.get("mirror"), info.get("archive_sha256"), info.get("archive_md5"),
                           fetched=False, sha256=expected_sha256(spec, dest), size=dest.stat().st_size)
        if not mirrors:
            raise DownloadError(f"{spec.name}: no mirror configured (pass --mirror URL or set DIGITFLOW_MIRRORS)")

        import requests

        session = session or requests.Session()
        failures: list[str] = []
        transient = False
        for mirror in mirrors:
            url = mirror_url(mirror, spec.name)
            try:
                with atomic_path(dest) as tmp:
                    archive_sha, archive_md5, idx_sha, idx_size = _stream_into(spec, url, tmp, timeout, deadline,
                                                                               progress, session)
                record = _record(spec, dest, url, archive_sha, archive_md5, fetched=True, sha256=idx_sha,
                                 size=idx_size)
                write_json(sidecar, record)
                return record
            except _MirrorFailure as e:
                failures.append(f"{redact(url)}: {e}")
                transient |= e.transient
    error = TransientDownloadError if transient else DownloadError
    raise error(f"{spec.name}: no mirror served verified bytes ({'; '.join(failures)}); "
                "try another mirror with --mirror URL or DIGITFLOW_MIRRORS")


def _record(spec: DatasetFile, dest: Path, url, archive_sha, archive_md5, *, fetched: bool, sha256: str,
            size: int) -> dict:
    """The provenance of a verified file; ``pinned_by`` says what its content was checked against:
    "sha256" (the decompressed content's pin), "archive-md5"/"archive-sha256" (the published archive
    checksum and the decompressed size), or "none" (allowed unpinned: ``sha256`` is what was seen)."""
    record = {
        "file": spec.name,
        "path": str(dest),
        "sha256": sha256,
        "size": size,
        "mirror": redact(url) if url else url,
        "archive_sha256": archive_sha,
        "archive_canonical": (archive_sha == spec.archive_sha256 if spec.archive_sha256
                              else archive_md5 == spec.archive_md5 if spec.archive_md5 else False),
        "fetched": fetched,
    }
    if spec.archive_md5:
        record["archive_md5"] = archive_md5
    if spec.pin != "sha256":
        record["pinned_by"] = spec.pin
    return record


class _Deadline:
    """Closes the transfer when the mirror's time for this file is up, even mid-read."""

    def __init__(self, seconds: float, close: Callable[[], None], total: float):
        self.total, self.expired = total, False

        def fire():
            self.expired = True
            close()

        self._timer = threading.Timer(seconds, fire)
        self._timer.daemon = True
        self._timer.start()

    def cancel(self) -> None:
        self._timer.cancel()

    def failure(self) -> "_MirrorFailure":
        return _MirrorFailure(f"too slow: not done within the {self.total:g}s deadline for this file", True)


def _stream_into(spec, url, tmp: Path, timeout, deadline, progress, session) -> tuple[str, str, str, int]:
    """Download ``url`` into ``tmp`` (decompressed), verify it against the file's pin; return
    (archive SHA-256, archive MD5, decompressed SHA-256, decompressed size)."""
    import requests
    import urllib3

    archive_hash, idx_hash, archive_md5 = hashlib.sha256(), hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    limit = spec.idx_size if spec.idx_size is not None else MAX_IDX_BYTES  # unpinned: still bounded
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    archive_bytes = idx_bytes = 0
    started = time.monotonic()
    chunks, total, close = _open(url, timeout, session)
    if total is not None and total > spec.max_archive_bytes:
        close()
        raise _MirrorFailure(f"archive of {total} bytes exceeds the {spec.max_archive_bytes} bound", False)
    watchdog = _Deadline(max(0.0, deadline - (time.monotonic() - started)), close, deadline)
    try:
        with open(tmp, "wb") as out:
            for chunk in chunks:
                if watchdog.expired:
                    raise watchdog.failure()
                archive_bytes += len(chunk)
                if archive_bytes > spec.max_archive_bytes:
                    raise _MirrorFailure(f"archive exceeds the {spec.max_archive_bytes}-byte bound", False)
                archive_hash.update(chunk)
                archive_md5.update(chunk)
                data = chunk
                while data:
                    # Never inflate more than one byte past the pinned size: a gzip bomb
                    # is stopped after at most idx_size + 1 bytes, on disk and in memory.
                    piece = inflate.decompress(data, limit + 1 - idx_bytes)
                    idx_bytes += len(piece)
                    if idx_bytes > limit:
                        raise _MirrorFailure(f"decompresses past the expected {limit} bytes (gzip bomb?)", False)
                    idx_hash.update(piece)
                    out.write(piece)
                    if inflate.eof:  # end of a gzip member; another may follow
                        data = inflate.unused_data
                        if data:
                            inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    else:
                        data = inflate.unconsumed_tail
                if progress:
                    progress(spec.name, archive_bytes, total)
    except zlib.error as e:
        raise _MirrorFailure(f"not a valid gzip stream ({e})", False) from None
    except (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError, TimeoutError):
        raise _MirrorFailure(f"timed out after {timeout:g}s while reading", True) from None
    except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, ConnectionError, ValueError) as e:
        if watchdog.expired:
            raise watchdog.failure() from None
        raise _MirrorFailure(f"connection broken after {archive_bytes} bytes ({type(e).__name__})", True) from None
    except Exception:
        if watchdog.expired:  # the closed response failed in some other way mid-read
            raise watchdog.failure() from None
        raise
    finally:
        watchdog.cancel()
        close()
    if watchdog.expired:
        raise watchdog.failure()
    if total is not None and archive_bytes != total:
        raise _MirrorFailure(f"truncated body: {archive_bytes} of {total} bytes", True)
    if not inflate.eof:
        raise _MirrorFailure(f"truncated gzip stream after {archive_bytes} bytes", True)
    digest, archive_sha = idx_hash.hexdigest(), archive_hash.hexdigest()
    if spec.pin == "sha256" and (idx_bytes != spec.idx_size or digest != spec.idx_sha256):
        raise _MirrorFailure(
            f"SHA-256 mismatch: got {digest[:16]}… ({idx_bytes} bytes), "
            f"want {spec.idx_sha256[:16]}… ({spec.idx_size} bytes)", False)
    if spec.idx_size is not None and idx_bytes != spec.idx_size:
        raise _MirrorFailure(f"decompressed size {idx_bytes} bytes, want {spec.idx_size}", False)
    if spec.pin == "archive-sha256" and archive_sha != spec.archive_sha256:
        raise _MirrorFailure(f"archive SHA-256 mismatch: got {archive_sha[:16]}…, want the published "
                             f"{spec.archive_sha256[:16]}…", False)
    if spec.pin == "archive-md5" and archive_md5.hexdigest() != spec.archive_md5:
        raise _MirrorFailure(f"archive MD5 mismatch: got {archive_md5.hexdigest()}, want the published "
                             f"{spec.archive_md5}", False)
    return archive_sha, archive_md5.hexdigest(), digest, idx_bytes


def _open(url: str, timeout: float, session: requests.Session
          ) -> tuple[Iterator[bytes], int | None, Callable[[], None]]:
    """(chunks, announced length or None, close) for ``url``; any failure is a _MirrorFailure."""
    import requests
    import urllib3

    try:
        parsed = urlparse(url)
    except ValueError as e:
        raise _MirrorFailure(f"invalid URL ({e})", False) from None
    if parsed.scheme == "file":
        return _open_file(Path(url2pathname(parsed.path)))
    if parsed.scheme not in ("http", "https"):
        raise _MirrorFailure(f"unsupported URL scheme {parsed.scheme!r}", False)
    try:
        r = session.get(url, stream=True, timeout=timeout)
    except requests.exceptions.SSLError as e:
        raise _MirrorFailure(f"TLS error ({type(e).__name__})", False) from None
    except requests.exceptions.Timeout:
        raise _MirrorFailure(f"timed out after {timeout:g}s", True) from None
    except requests.exceptions.ConnectionError as e:
        raise _MirrorFailure(f"connection failed ({type(e).__name__})", True) from None
    except requests.exceptions.TooManyRedirects:
        raise _MirrorFailure("too many redirects (a redirect loop?)", False) from None
    except (requests.exceptions.InvalidSchema, requests.exceptions.MissingSchema):
        raise _MirrorFailure("redirected to a URL that is not http(s)", False) from None
    except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, ValueError) as e:
        raise _MirrorFailure(f"request failed ({type(e).__name__})", False) from None
    if r.status_code != 200:
        r.close()
        transient = r.status_code == 429 or r.status_code >= 500
        raise _MirrorFailure(f"HTTP {r.status_code}", transient)
    length = r.headers.get("Content-Length")

    def chunks() -> Iterator[bytes]:
        # Raw bytes (a server that adds Content-Encoding must not make requests inflate our
        # archive behind the bound), and whatever has arrived (read1), so the deadline is
        # checked between reads even when a mirror trickles.
        while chunk := r.raw.read1(CHUNK, decode_content=False):
            yield chunk

    return chunks(), int(length) if length and length.isdigit() else None, r.close


def _open_file(path: Path) -> tuple[Iterator[bytes], int | None, Callable[[], None]]:
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise _MirrorFailure("not found", False) from None
    except OSError as e:
        raise _MirrorFailure(f"cannot read ({e.strerror})", False) from None
    st = os.fstat(f.fileno())
    if not stat.S_ISREG(st.st_mode):
        f.close()
        raise _MirrorFailure("not a regular file", False)

    def chunks() -> Iterator[bytes]:
        while chunk := f.read(CHUNK):
            yield chunk

    return chunks(), st.st_size, f.close
