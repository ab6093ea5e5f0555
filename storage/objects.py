"""Object storage behind a home URL (``s3://bucket/prefix``). No Prefect in here.

An object store has no rename and no lock, so digitflow relies on three things it does have:

- an object appears whole or not at all (a PUT, or a multipart upload's final COMPLETE);
- ``If-None-Match: *`` creates an object only if it does not exist yet;
- ``If-Match: <etag>`` replaces (or deletes) an object only if nobody changed it since we read it.

Every other guarantee is built from those (``Lease``, ``storage.remote``). Credentials and the
endpoint come from the standard AWS variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_REGION``, ``AWS_ENDPOINT_URL``) or any other source botocore reads (profiles, instance
roles); never from flags, so they never reach a log or a flow parameter.

Another scheme (gs://, az://) is one more class with the same eight methods (``head``, ``get``,
``put``, ``upload``, ``download``, ``list``, ``delete``, ``check``) registered in ``SCHEMES``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from storage import DigitflowError
from storage.paths import PathError, check_rel, inside

SCHEMES: dict[str, type] = {}  # filled below: "s3" -> S3Store
BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3's and Azure's container names fit in this
PART = 8 << 20                  # multipart chunk: what one transfer thread holds in memory
TRANSFER_THREADS = 4            # parallel parts per upload or download
SMALL_LIMIT = 16 << 20          # the most ``get`` reads into memory (manifests, records, results)


class ObjectStoreError(DigitflowError):
    """The object store refused or could not be reached; the message names the bucket."""


class Conflict(ObjectStoreError):
    """A conditional write lost: the object exists (If-None-Match) or changed (If-Match)."""


class LeaseLost(ObjectStoreError):
    """A lease we held was deleted or taken over before we committed under it."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str           # relative to the store's prefix
    size: int
    etag: str
    sha256: str | None  # recorded by digitflow at upload (x-amz-meta-sha256), if any


def is_remote(home: str | os.PathLike | None) -> bool:
    return isinstance(home, str) and "://" in home and home.split("://", 1)[0] in SCHEMES


def open_store(url: str) -> "S3Store":
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
    return SCHEMES[scheme](bucket, prefix)


class S3Store:
    """An S3 bucket (AWS, MinIO, or any S3-compatible endpoint) under a key prefix."""

    scheme = "s3"

    def __init__(self, bucket: str, prefix: str = ""):
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self._client = None

    # The boto3 client is made on first use and not pickled (a Home crosses to Dask workers).
    def __getstate__(self):
        return {"bucket": self.bucket, "prefix": self.prefix, "_client": None}

    @property
    def client(self):
        if self._client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise ObjectStoreError(f"{self.url()}: an s3:// home needs boto3 "
                                       "(pip install 'digitflow[s3]')") from None
            # Standard retry mode: 500, 502, 503, 504, throttling and dropped connections are
            # retried with exponential backoff and jitter, 5 attempts in all.
            self._client = boto3.session.Session().client("s3", config=Config(
                retries={"mode": "standard", "max_attempts": 5}, connect_timeout=5, read_timeout=30,
                max_pool_connections=2 * TRANSFER_THREADS + 2))
        return self._client

    def url(self, rel: str = "") -> str:
        return f"s3://{self.bucket}/{self._key(rel)}".rstrip("/")

    def _key(self, rel: str) -> str:
        return "/".join(p for p in (self.prefix, rel.strip("/")) if p)

    @contextlib.contextmanager
    def _errors(self, rel: str = "") -> Iterator[None]:
        """Every failure as one line naming the bucket and key; secrets are never in it."""
        from botocore import exceptions as bx

        where = self.url(rel)
        try:
            yield
        except bx.ClientError as e:
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412:
                raise Conflict(f"{where}: changed by someone else (conditional write refused)") from None
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken",
                        "InvalidToken", "AllAccessDisabled") or status == 403:
                raise ObjectStoreError(f"s3://{self.bucket}: access denied ({code or status}); check "
                                       "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE") from None
            if code == "NoSuchBucket" or (status == 404 and not rel):
                raise ObjectStoreError(f"s3://{self.bucket}: no such bucket (create it first)") from None
            raise ObjectStoreError(f"{where}: {code or status}: {err.get('Message', '')}".rstrip(": ")) from None
        except bx.NoCredentialsError:
            raise ObjectStoreError(f"s3://{self.bucket}: no AWS credentials (set AWS_ACCESS_KEY_ID and "
                                   "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)") from None
        except (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError,
                bx.ConnectionClosedError, bx.ResponseStreamingError) as e:
            raise ObjectStoreError(f"{where}: object store unreachable at {self._endpoint()} "
                                   f"({type(e).__name__}, after retries)") from None
        except bx.BotoCoreError as e:
            raise ObjectStoreError(f"{where}: {type(e).__name__}: {e}") from None

    def _endpoint(self) -> str:
        return self.client.meta.endpoint_url

    # ---- the eight operations -----------------------------------------------------------

    def check(self) -> None:
        """Prove the bucket is reachable with these credentials (one line otherwise)."""
        with self._errors():
            self.client.head_bucket(Bucket=self.bucket)

    def head(self, rel: str) -> ObjectInfo | None:
        from botocore.exceptions import ClientError

        with self._errors(rel):
            try:
                r = self.client.head_object(Bucket=self.bucket, Key=self._key(rel))
            except ClientError as e:
                if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                    return None
                raise
        return ObjectInfo(rel, r["ContentLength"], r["ETag"], r.get("Metadata", {}).get("sha256"))

    def get(self, rel: str, limit: int = SMALL_LIMIT) -> tuple[bytes, str] | None:
        """A small object's bytes and ETag (None if absent); larger than ``limit`` is refused."""
        from botocore.exceptions import ClientError

        with self._errors(rel):
            try:
                r = self.client.get_object(Bucket=self.bucket, Key=self._key(rel))
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
            if r["ContentLength"] > limit:
                r["Body"].close()
                raise ObjectStoreError(f"{self.url(rel)}: {r['ContentLength']} bytes, more than the "
                                       f"{limit} expected of it")
            return r["Body"].read(), r["ETag"]

    def put(self, rel: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None,
            sha256: str | None = None) -> str:
        """Write a small object in one request; conditional when asked. Returns its ETag."""
        args = {"Bucket": self.bucket, "Key": self._key(rel), "Body": data}
        if if_none_match:
            args["IfNoneMatch"] = "*"
        if if_match is not None:
            args["IfMatch"] = if_match
        if sha256:
            args["Metadata"] = {"sha256": sha256}
        with self._errors(rel):
            return self.client.put_object(**args)["ETag"]

    def upload(self, rel: str, path: str | os.PathLike, sha256: str, progress: Progress | None = None) -> None:
        """Stream a file up in 8 MiB parts, 4 at a time; the object appears only when complete.
        ``progress(label, bytes done, total)`` is told as parts go."""
        from boto3.s3.transfer import TransferConfig

        with self._errors(rel):
            self.client.upload_file(str(path), self.bucket, self._key(rel), ExtraArgs={"Metadata": {"sha256": sha256}},
                                    Config=TransferConfig(multipart_threshold=PART, multipart_chunksize=PART,
                                                          max_concurrency=TRANSFER_THREADS, use_threads=True),
                                    Callback=_counter(f"upload {Path(rel).name}", os.path.getsize(path), progress))

    def download(self, rel: str, path: str | os.PathLike, progress: Progress | None = None,
                 size: int | None = None) -> None:
        """Stream an object down in ranged parts to a temp file beside ``path``, then rename it."""
        from boto3.s3.transfer import TransferConfig
        from storage.atomic import atomic_path

        with atomic_path(path) as tmp, self._errors(rel):
            self.client.download_file(self.bucket, self._key(rel), str(tmp), Config=TransferConfig(
                multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=TRANSFER_THREADS),
                Callback=_counter(f"download {Path(rel).name}", size, progress))

    def list(self, rel_prefix: str) -> dict[str, ObjectInfo]:
        """Every object under ``rel_prefix`` (a folder), keyed relative to the store's prefix."""
        base = self._key(rel_prefix).rstrip("/") + "/"
        cut = len(self.prefix) + 1 if self.prefix else 0
        out = {}
        with self._errors(rel_prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                for o in page.get("Contents", []):
                    rel = o["Key"][cut:]
                    out[rel] = ObjectInfo(rel, o["Size"], o["ETag"], None)
        return out

    def delete(self, rel: str, *, if_match: str | None = None) -> None:
        args = {"Bucket": self.bucket, "Key": self._key(rel)}
        if if_match is not None:
            args["IfMatch"] = if_match
        with self._errors(rel):
            self.client.delete_object(**args)


SCHEMES["s3"] = S3Store

Progress = Callable[[str, int, "int | None"], None]  # (label, bytes done, total bytes or None)


def _counter(label: str, total: int | None, progress: Progress | None):
    """A transfer callback (called from the transfer threads with byte increments) that reports
    running totals to ``progress``; None when nobody listens."""
    if progress is None:
        return None
    done, lock = [0], threading.Lock()

    def add(n: int) -> None:
        with lock:
            done[0] += n
            progress(label, done[0], total)

    return add


class Lease:
    """A lock shared by every machine: an object created with ``If-None-Match: *``.

    The holder's record says who and until when. An expired lease (its holder died) is taken
    over with ``If-Match`` on the ETag seen, so of two machines taking it over only one wins.
    Released by a delete conditional on our own ETag: a lease that expired and was taken over is
    never deleted from under its new holder. ``ttl`` (60 s) bounds how long a dead holder blocks
    the others; a waiter gives up after ``wait`` (180 s, longer than ``ttl``: it always outlives a
    dead holder's lease). Registry writes under it take well under a second.
    """

    def __init__(self, store: S3Store, rel: str, *, ttl: float = 60.0, wait: float = 180.0):
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
            self.store.delete(self.rel, if_match=self.etag)
        except Conflict:
            pass  # it expired and another holder has it now; theirs to release
        except ObjectStoreError:
            if exc[0] is None and self.store.head(self.rel) is not None:
                raise
            # already gone, or the work under the lease failed: that error is the one to see


def cache_root() -> Path:
    """Where this machine keeps its working copy of remote homes (``$DIGITFLOW_CACHE``)."""
    return Path(os.environ.get("DIGITFLOW_CACHE") or "~/.cache/digitflow").expanduser()


def local_path(url: str) -> Path:
    """This machine's working-copy path of an object URL: ``<cache>/<scheme>/<bucket>/<key>``,
    proven to stay inside ``<cache>/<scheme>`` (a key may hold anything, ``..`` included)."""
    scheme, _, rest = url.partition("://")
    if scheme not in SCHEMES:
        raise ObjectStoreError(f"{url}: not an object URL")
    return inside(cache_root().resolve() / scheme, rest.rstrip("/"), "object URL")
