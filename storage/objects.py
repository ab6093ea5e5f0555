"""Object storage behind a home URL (``s3://bucket/prefix``, ``az://container/prefix``). No Prefect.

An object store has no rename and no lock, so digitflow relies on three things every store has:

- an object appears whole or not at all (a PUT, or a multipart upload's final commit);
- a create-only put (``If-None-Match: *``) writes an object only if it does not exist yet;
- a put conditional on the ETag we read (``If-Match``) replaces it only if nobody changed it.

Every other guarantee is built from those (``Lease``, ``storage.remote``), once, against the
eight methods of ``ObjectStore`` (``check``, ``head``, ``get``, ``put``, ``upload``,
``download``, ``list``, ``delete``). One class serves every scheme: the client is obstore (one
Rust client for S3, Azure Blob and GCS, conditional puts included); a scheme is one line in
``SCHEMES`` saying how to build its client.

Credentials and endpoints come from each cloud's standard variables, never from flags, so they
never reach a log or a flow parameter: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_REGION``, ``AWS_ENDPOINT_URL`` (or ``AWS_PROFILE``, read through
boto3 when it is installed; instance roles work as they are); ``AZURE_STORAGE_ACCOUNT_NAME``,
``AZURE_STORAGE_ACCOUNT_KEY`` (or ``AZURE_STORAGE_SAS_TOKEN``, or a service principal),
``AZURE_STORAGE_ENDPOINT`` (Azurite, Azure Stack), ``AZURE_STORAGE_USE_EMULATOR``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator

from storage import DigitflowError
from storage.paths import PathError, check_rel, inside

BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3's and Azure's container names fit in this
PART = 8 << 20                  # multipart chunk: what one transfer holds in memory
TRANSFER_THREADS = 4            # parallel parts per upload
SMALL_LIMIT = 16 << 20          # the most ``get`` reads into memory (manifests, records, results)
LEASE_FREE = {"owner": None, "expires": 0}  # a released lease's record


class ObjectStoreError(DigitflowError):
    """The object store refused or could not be reached; the message names the bucket."""


class Conflict(ObjectStoreError):
    """A conditional write lost: the object exists (create-only) or changed (If-Match)."""


class LeaseLost(ObjectStoreError):
    """A lease we held was deleted or taken over before we committed under it."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str           # relative to the store's prefix
    size: int
    etag: str          # always quoted, whatever the store's listing returns
    sha256: str | None  # recorded by digitflow at upload (user metadata ``sha256``), if any


def _endpoint_of(*names: str) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def _s3(bucket: str, options: dict):
    from obstore.store import S3Store

    endpoint = _endpoint_of("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT")
    extra = {}
    if os.environ.get("AWS_PROFILE") and not os.environ.get("AWS_ACCESS_KEY_ID"):
        try:
            from obstore.auth.boto3 import Boto3CredentialProvider
        except ImportError:
            raise ObjectStoreError(f"s3://{bucket}: AWS_PROFILE needs boto3 (pip install boto3), or set "
                                   "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY") from None
        extra["credential_provider"] = Boto3CredentialProvider()
    options["allow_http"] = bool(endpoint and endpoint.startswith("http://"))
    return S3Store(bucket, client_options=options, retry_config=_RETRY, **extra), endpoint or "AWS S3"


def _azure(container: str, options: dict):
    from obstore.store import AzureStore

    endpoint = _endpoint_of("AZURE_STORAGE_ENDPOINT", "AZURE_ENDPOINT")
    emulator = os.environ.get("AZURE_STORAGE_USE_EMULATOR", "").lower() in ("1", "true", "yes")
    options["allow_http"] = emulator or bool(endpoint and endpoint.startswith("http://"))
    where = endpoint or ("Azurite at 127.0.0.1:10000" if emulator else "Azure Blob Storage")
    return AzureStore(container, client_options=options, retry_config=_RETRY), where


# scheme -> how to build its client from the environment: (obstore store, endpoint for messages)
SCHEMES: dict[str, Callable] = {"s3": _s3, "az": _azure}
# Service errors, throttling and dropped connections are retried with exponential backoff and
# jitter: 5 attempts in all, never for more than a minute.
_RETRY = {"max_retries": 4, "retry_timeout": timedelta(seconds=60),
          "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=8), "base": 2}}
_HINTS = {"s3": "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE",
          "az": "check AZURE_STORAGE_ACCOUNT_NAME / AZURE_STORAGE_ACCOUNT_KEY / AZURE_STORAGE_SAS_TOKEN"}


def is_remote(home: str | os.PathLike | None) -> bool:
    return isinstance(home, str) and "://" in home and home.split("://", 1)[0] in SCHEMES


def open_store(url: str) -> "ObjectStore":
    """The store for ``scheme://bucket/prefix``, or a one-line error naming what is wrong."""
    scheme, _, rest = url.partition("://")
    if scheme not in SCHEMES:
        raise ObjectStoreError(f"{url}: unsupported home scheme {scheme!r} (supported: "
                               f"{', '.join(s + '://' for s in SCHEMES)} or a local path)")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ObjectStoreError(f"{url}: no bucket name (use {scheme}://bucket/prefix)")
    if not BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ObjectStoreError(f"{url}: {bucket!r} is not a bucket name (3–63 lowercase letters, digits, '.', '-')")
    prefix = prefix.strip("/")
    if prefix:
        try:
            check_rel(prefix, "prefix")
        except PathError as e:
            raise ObjectStoreError(f"{url}: {e}") from None
    return ObjectStore(scheme, bucket, prefix)


def _quoted(etag: str | None) -> str:
    return f'"{(etag or "").strip(chr(34))}"'


_URL_QUERY = re.compile(r"(https?://[^\s?]*)\?\S*")  # a SAS token or signature rides in a query string


def _first_line(e: BaseException) -> str:
    text = _URL_QUERY.sub(r"\1?…", str(e))
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)[:300]


class ObjectStore:
    """A bucket (S3: AWS, MinIO, any S3-compatible endpoint) or a container (Azure Blob,
    Azurite) under a key prefix."""

    def __init__(self, scheme: str, bucket: str, prefix: str = ""):
        self.scheme, self.bucket, self.prefix = scheme, bucket, prefix.strip("/")
        self._client = None
        self._where = ""

    # The client is made on first use and not pickled (a Home crosses to Dask workers).
    def __getstate__(self):
        return {"scheme": self.scheme, "bucket": self.bucket, "prefix": self.prefix, "_client": None, "_where": ""}

    @property
    def client(self):
        if self._client is None:
            try:
                import obstore  # noqa: F401
            except ImportError:
                raise ObjectStoreError(f"{self.url()}: an object-store home needs obstore "
                                       "(pip install 'digitflow[cloud]')") from None
            options = {"connect_timeout": timedelta(seconds=5), "read_timeout": timedelta(seconds=30)}
            try:
                self._client, self._where = SCHEMES[self.scheme](self.bucket, options)
            except ObjectStoreError:
                raise
            except Exception as e:  # a malformed variable (region, endpoint, key) in the environment
                raise ObjectStoreError(f"{self.scheme}://{self.bucket}: cannot configure the client: "
                                       f"{_first_line(e)}") from None
        return self._client

    def url(self, rel: str = "") -> str:
        return f"{self.scheme}://{self.bucket}/{self._key(rel)}".rstrip("/")

    def _key(self, rel: str) -> str:
        return "/".join(p for p in (self.prefix, rel.strip("/")) if p)

    @contextlib.contextmanager
    def _errors(self, rel: str = "") -> Iterator[None]:
        """Every failure as one line naming the bucket and key; secrets are never in it."""
        import obstore.exceptions as ox

        where, bucket = self.url(rel), f"{self.scheme}://{self.bucket}"
        try:
            yield
        except (ox.AlreadyExistsError, ox.PreconditionError):
            raise Conflict(f"{where}: changed by someone else (conditional write refused)") from None
        except FileNotFoundError:  # where absence is no answer (e.g. deleted between a listing and a download)
            raise ObjectStoreError(f"{where}: no such object (deleted meanwhile?)") from None
        except (ox.PermissionDeniedError, ox.UnauthenticatedError) as e:
            raise ObjectStoreError(f"{bucket}: access denied ({_first_line(e)[:120]}); {_HINTS[self.scheme]}") from None
        except ox.BaseError as e:
            text = str(e)
            code = re.search(r"<Code>(\w+)</Code>|\bCode: (\w+)", text)
            code = code and (code.group(1) or code.group(2))
            status = re.search(r"\bstatus(?: code)?: (\d{3})\b", text)
            status = status and int(status.group(1))
            if code in ("NoSuchBucket", "ContainerNotFound"):
                raise ObjectStoreError(f"{bucket}: no such bucket (create it first)") from None
            if status == 403 or code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied",
                                         "AuthenticationFailed", "AuthorizationFailure", "ExpiredToken",
                                         "InvalidToken"):
                raise ObjectStoreError(f"{bucket}: access denied ({code or status}); {_HINTS[self.scheme]}") from None
            if status is None and re.search(r"(?i)error sending request|connect|dns error|timed out", text):
                raise ObjectStoreError(f"{where}: object store unreachable at {self._where} "
                                       "(after retries)") from None
            if status is None and re.search(r"(?i)credential", text):
                raise ObjectStoreError(f"{bucket}: no usable credentials; {_HINTS[self.scheme]}") from None
            if code or status:
                raise ObjectStoreError(f"{where}: {code or 'HTTP'} {status or ''}".rstrip()) from None
            raise ObjectStoreError(f"{where}: {_first_line(e)}") from None

    # ---- the eight operations -----------------------------------------------------------

    def check(self) -> None:
        """Prove the bucket is reachable with these credentials (one line otherwise)."""
        import obstore

        client = self.client
        with self._errors():
            next(iter(obstore.list(client, prefix=self._key(".digitflow-check"), chunk_size=1)), None)

    def head(self, rel: str) -> ObjectInfo | None:
        import obstore

        client = self.client
        with self._errors(rel):
            try:
                r = obstore.get(client, self._key(rel), options={"head": True})
            except FileNotFoundError:
                return None
            meta = r.meta
            return ObjectInfo(rel, meta["size"], _quoted(meta["e_tag"]), r.attributes.get("sha256"))

    def get(self, rel: str, limit: int = SMALL_LIMIT) -> tuple[bytes, str] | None:
        """A small object's bytes and ETag (None if absent); larger than ``limit`` is refused
        before its body is read."""
        import obstore

        client = self.client
        with self._errors(rel):
            try:
                r = obstore.get(client, self._key(rel))
            except FileNotFoundError:
                return None
            if r.meta["size"] > limit:
                raise ObjectStoreError(f"{self.url(rel)}: {r.meta['size']} bytes, more than the "
                                       f"{limit} expected of it")
            return bytes(r.bytes()), _quoted(r.meta["e_tag"])

    def put(self, rel: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None,
            sha256: str | None = None) -> str:
        """Write a small object in one request, its SHA-256 recorded beside it; create-only or
        conditional on an ETag when asked. Returns its ETag."""
        import obstore

        mode = "create" if if_none_match else {"e_tag": if_match} if if_match is not None else "overwrite"
        client = self.client
        with self._errors(rel):
            r = obstore.put(client, self._key(rel), data, mode=mode, use_multipart=False,
                            attributes={"sha256": sha256 or hashlib.sha256(data).hexdigest()})
        return _quoted(r["e_tag"])

    def upload(self, rel: str, path: str | os.PathLike, sha256: str, progress: Progress | None = None) -> str:
        """Stream a file up in 8 MiB parts, 4 at a time; the object appears only when complete.
        ``progress(label, bytes done, total)`` is told as parts go. Returns its ETag.

        Two machines uploading one key at once: S3 keeps each multipart upload apart, but Azure
        stages blocks on the blob itself, so one commit can void the other's blocks. The loser
        finds the object already holding this SHA-256 (the same file: done) or tries again."""
        for attempt in range(3):
            try:
                return self._upload(rel, path, sha256, progress)
            except Conflict:
                raise
            except ObjectStoreError:
                if attempt == 2 or os.path.getsize(path) <= PART:
                    raise
                if (info := self.head(rel)) is not None and info.sha256 == sha256:
                    return info.etag
                time.sleep(0.5 + random.random())
        raise AssertionError("unreachable")

    def _upload(self, rel: str, path: str | os.PathLike, sha256: str, progress: Progress | None) -> str:
        import obstore

        size, client = os.path.getsize(path), self.client
        count = _counter(f"upload {Path(rel).name}", size, progress)
        with open(path, "rb") as f, self._errors(rel):
            if size <= PART:  # one request
                data = f.read()
                r = obstore.put(client, self._key(rel), data, use_multipart=False, attributes={"sha256": sha256})
                count and count(len(data))
                return _quoted(r["e_tag"])

            def parts() -> Iterator[bytes]:
                while chunk := f.read(PART):
                    yield chunk
                    count and count(len(chunk))

            r = obstore.put(client, self._key(rel), parts(), attributes={"sha256": sha256}, chunk_size=PART,
                            max_concurrency=TRANSFER_THREADS)
        return _quoted(r["e_tag"])

    def download(self, rel: str, path: str | os.PathLike, progress: Progress | None = None,
                 size: int | None = None) -> str:
        """Stream an object down to a temp file beside ``path``, then rename it into place.
        Returns the ETag of what came down."""
        import obstore
        from storage.atomic import atomic_path

        client = self.client
        count = _counter(f"download {Path(rel).name}", size, progress)
        with atomic_path(path) as tmp, self._errors(rel):
            r = obstore.get(client, self._key(rel))
            with open(tmp, "wb") as f:
                for chunk in r.stream(min_chunk_size=1 << 20):
                    f.write(chunk)
                    count and count(len(chunk))
        return _quoted(r.meta["e_tag"])

    def list(self, rel_prefix: str) -> dict[str, ObjectInfo]:
        """Every object under ``rel_prefix`` (a folder), keyed relative to the store's prefix."""
        import obstore

        base = self._key(rel_prefix).rstrip("/") + "/"
        cut = len(self.prefix) + 1 if self.prefix else 0
        out = {}
        client = self.client
        with self._errors(rel_prefix):
            for page in obstore.list(client, prefix=base):
                for o in page:
                    rel = o["path"][cut:]
                    out[rel] = ObjectInfo(rel, o["size"], _quoted(o["e_tag"]), None)
        return out

    def delete(self, rel: str) -> None:
        """Remove an object; one that is already gone is fine."""
        import obstore

        client = self.client
        with self._errors(rel):
            try:
                obstore.delete(client, self._key(rel))
            except FileNotFoundError:
                pass


Progress = Callable[[str, int, "int | None"], None]  # (label, bytes done, total bytes or None)


def _counter(label: str, total: int | None, progress: Progress | None):
    """A transfer callback (told byte increments, from any thread) that reports running totals
    to ``progress``; None when nobody listens."""
    if progress is None:
        return None
    done, lock = [0], threading.Lock()

    def add(n: int) -> None:
        with lock:
            done[0] += n
            progress(label, done[0], total)

    return add


class Lease:
    """A lock shared by every machine: an object created with a create-only put.

    The holder's record says who and until when. An expired lease (its holder died) or a
    released one is taken over with a put conditional on the ETag seen, so of two machines
    taking it over only one wins. Released by writing the free record (``LEASE_FREE``),
    conditional on our own ETag: a lease that expired and was taken over is never freed from
    under its new holder (and no store needs a conditional delete). ``ttl`` (60 s) bounds how
    long a dead holder blocks the others; a waiter gives up after ``wait`` (180 s, longer than
    ``ttl``: it always outlives a dead holder's lease). Registry writes under it take well under
    a second.
    """

    def __init__(self, store: ObjectStore, rel: str, *, ttl: float = 60.0, wait: float = 180.0):
        self.store, self.rel, self.ttl, self.wait = store, rel, ttl, wait
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.etag: str | None = None

    def _record(self) -> bytes:
        return json.dumps({"owner": self.owner, "expires": time.time() + self.ttl}).encode()

    def __enter__(self) -> "Lease":
        deadline = time.monotonic() + self.wait
        delay = 0.05
        while True:
            try:
                self.etag = self.store.put(self.rel, self._record(), if_none_match=True)
                return self
            except Conflict:
                pass
            held = self.store.get(self.rel, limit=4096)
            if held is not None:
                try:
                    expires = float(json.loads(held[0])["expires"])
                except (ValueError, KeyError, TypeError):
                    expires = 0.0  # a damaged lease record is as good as expired
                if not math.isfinite(expires) or expires > time.time() + self.ttl + 300:
                    expires = 0.0  # NaN, or further ahead than any holder's ttl (a clock hours ahead): damaged
                if expires < time.time():
                    try:
                        self.etag = self.store.put(self.rel, self._record(), if_match=held[1])
                        return self
                    except Conflict:
                        pass  # someone else took it over first
            if time.monotonic() > deadline:
                who = json.loads(held[0]).get("owner", "?") if held else "?"
                raise ObjectStoreError(f"{self.store.url(self.rel)}: held by {who} for more than {self.wait:.0f} s")
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def confirm(self) -> None:
        """Prove the lease is still ours right before a commit, and renew it: the object must
        hold our record (its ETag unchanged since we wrote it), and it is rewritten with a new
        expiry only if it still does. Otherwise LeaseLost says what happened; nothing is committed."""
        held = self.store.get(self.rel, limit=4096)
        if held is None or held[1] != self.etag:
            try:
                who = json.loads(held[0]).get("owner", "?") if held else None
            except (ValueError, AttributeError):
                who = "?"
            raise LeaseLost(f"{self.store.url(self.rel)}: the lease was {'deleted' if who is None else 'taken by ' + str(who)} "
                            f"while {self.owner} held it (someone removed the lock, or this process stalled past "
                            f"its {self.ttl:.0f}-s lease); nothing was committed, run it again")
        try:
            self.etag = self.store.put(self.rel, self._record(), if_match=self.etag)
        except Conflict:
            raise LeaseLost(f"{self.store.url(self.rel)}: the lease changed hands while being renewed; "
                            "nothing was committed, run it again") from None

    def __exit__(self, *exc) -> None:
        try:
            self.store.put(self.rel, json.dumps(LEASE_FREE).encode(), if_match=self.etag)
        except Conflict:
            pass  # it expired and another holder has it now (or it was removed); theirs to release
        except ObjectStoreError:
            if exc[0] is None:
                raise
            # the work under the lease failed: that error is the one to see


def cache_root() -> Path:
    """Where this machine keeps its working copy of remote homes (``$DIGITFLOW_CACHE``)."""
    from storage.settings import settings

    return Path(settings().cache).expanduser()


def local_path(url: str) -> Path:
    """This machine's working-copy path of an object URL: ``<cache>/<scheme>/<bucket>/<key>``,
    proven to stay inside ``<cache>/<scheme>`` (a key may hold anything, ``..`` included)."""
    scheme, _, rest = url.partition("://")
    if scheme not in SCHEMES:
        raise ObjectStoreError(f"{url}: not an object URL")
    return inside(cache_root().resolve() / scheme, rest.rstrip("/"), "object URL")
