"""A remote home's working copy and its object store, kept in step. No Prefect.

References and cache keys name things by their shared address: a local path in a local home,
an object URL (``s3://bucket/prefix/data/mnist/train``) in a remote one. ``local(address)`` is
this machine's path for it; ``pull_*`` fills that path from the store, ``push_*`` publishes it.
Every function here is a no-op for local addresses, so a local home behaves exactly as before.

What is atomic, and how (an object store has no rename):

- a file is one object: a PUT, or a multipart upload that appears only when COMPLETE is sent;
  its SHA-256 rides along as metadata, and a stamp (``<cache>/.etags/…``) remembers which
  ETag the local copy holds, so an unchanged file costs no request;
- a folder (a split, a trained model) has a *commit file* written last (``manifest.json``,
  ``training.json``). Readers only take a folder whose commit object exists. Re-publishing a
  folder deletes its commit object first, uploads the files, writes the commit object last, then
  deletes strays. A writer killed at any point leaves either the old folder, or no commit object
  (the folder is absent to every reader and rebuilt by the next run, whose push clears strays);
- every pulled file is downloaded to a temp file and renamed into place, and the caller verifies
  its content against the SHA-256 its reference carries before using it;
- registry writes (versions, aliases, decisions) happen under a ``Lease`` and with conditional
  writes (``storage.registry``).
"""

from __future__ import annotations

import functools
from pathlib import Path

from storage import objects
from storage.atomic import sha256_file, write_bytes


def is_url(address) -> bool:
    return isinstance(address, str) and objects.is_remote(address)


def local(address: str | Path) -> Path:
    """This machine's path for ``address`` (its working copy, for an object URL)."""
    return objects.local_path(address) if is_url(address) else Path(address)


@functools.lru_cache(maxsize=None)
def _bucket_store(scheme: str, bucket: str):
    return objects.open_store(f"{scheme}://{bucket}")


def store_of(address: str) -> tuple[objects.ObjectStore, str]:
    """The bucket's store (one client per bucket and process) and the key of ``address``."""
    scheme, _, rest = address.partition("://")
    bucket, _, key = rest.partition("/")
    return _bucket_store(scheme, bucket), key.strip("/")


def join(address: str, name: str) -> str:
    return f"{address.rstrip('/')}/{name}" if is_url(address) else str(Path(address) / name)


def fingerprint(address: str) -> str:
    """What the object is now, for cache keys, without downloading it: its ETag and recorded
    SHA-256 (any rewrite, even same size and time, gives a new ETag). Local files are hashed."""
    if not is_url(address):
        try:
            return sha256_file(address)
        except OSError:
            return "missing"
    store, key = store_of(address)
    info = store.head(key)
    return f"{info.etag}:{info.sha256}" if info else "missing"


def _stamp(path: Path) -> Path:
    """Where the ETag stamp of a working-copy file lives: a tree of its own beside the working
    copies (``<cache>/.etags/...``), so no folder of the home ever holds a file it did not have."""
    root = objects.cache_root().resolve()
    return root / ".etags" / Path(path).resolve().relative_to(root)


def _state(path: Path, etag: str) -> str:
    """The ETag and what the file system says of the file now: any write, rename or ``touch``
    (even one that puts the mtime back) changes the inode's ctime, which nobody can set."""
    st = path.stat()
    return f"{etag} {st.st_size} {st.st_ino} {st.st_mtime_ns} {st.st_ctime_ns}"


def remember(path: Path, etag: str) -> None:
    """Note that the local file now holds the object with ``etag`` (a stamp: the ETag and the
    file's size, inode, mtime and ctime), so the next comparison needs no request. A cache below
    the store: a stale, missing or forged stamp costs one HEAD, or at worst a file that fails the
    SHA-256 check of the reference that asked for it."""
    try:
        stamp = _stamp(path)
        stamp.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(stamp, _state(path, etag).encode())
    except (OSError, ValueError):  # not under the cache (ValueError): nothing to remember
        pass


def _same(path: Path, info: objects.ObjectInfo, store, key: str) -> bool:
    """Does the local file hold what the object holds? Known at once when its stamp says it was
    last fetched or sent as this ETag and it has not changed since; else by size, then by the
    SHA-256 recorded with the object (one HEAD when the listing did not carry it)."""
    try:
        if path.stat().st_size != info.size:
            return False
        if _stamp(path).read_text() == _state(path, info.etag):
            return True
    except (OSError, ValueError):
        if not path.is_file():
            return False
    sha = info.sha256 or (h.sha256 if (h := store.head(key)) else None)
    if sha is None or sha256_file(path) != sha:
        return False
    remember(path, info.etag)
    return True


def fetch(store, key: str, path: Path, info: objects.ObjectInfo, progress: objects.Progress | None = None) -> None:
    """Make the local file what the object is (downloaded only when it differs)."""
    if not _same(path, info, store, key):
        remember(path, store.download(key, path, progress, info.size))


def send(store, key: str, path: Path, progress: objects.Progress | None = None) -> str:
    """Publish the local file as the object (streamed in parts when large); returns its ETag."""
    etag = store.upload(key, path, sha256_file(path), progress)
    remember(path, etag)
    return etag


# ---- files -----------------------------------------------------------------------------

def remote_file(address: str) -> objects.ObjectInfo | None:
    """The object at ``address`` (None when absent or when the address is local)."""
    if not is_url(address):
        return None
    store, key = store_of(address)
    return store.head(key)


def pull_file(address: str, sha256: str | None = None, progress: objects.Progress | None = None) -> Path:
    """This machine's copy of a file, fetched when missing or different from the object (a
    local copy that already hashes to ``sha256`` is used without asking the store)."""
    path = local(address)
    if not is_url(address):
        return path
    if sha256 is not None and path.is_file() and sha256_file(path) == sha256:
        return path
    store, key = store_of(address)
    info = store.head(key)
    if info is not None:
        fetch(store, key, path, info, progress)
    return path


def push_file(address: str, sha256: str | None = None, progress: objects.Progress | None = None) -> None:
    """Publish this machine's copy of a file as one object (streamed in parts when large)."""
    if not is_url(address):
        return
    store, key = store_of(address)
    path = local(address)
    remember(path, store.upload(key, path, sha256 or sha256_file(path), progress))


# ---- folders ---------------------------------------------------------------------------

def committed(address: str, commit: str) -> bool:
    """Is the folder at ``address`` published (its commit object exists)? Local: always True
    (local folders are swapped into place whole)."""
    if not is_url(address):
        return True
    store, key = store_of(address)
    return store.head(f"{key}/{commit}") is not None


def get_commit(address: str, commit: str) -> bytes | None:
    """The bytes of a published folder's commit object (a manifest, a training record)."""
    store, key = store_of(address)
    got = store.get(f"{key}/{commit}")
    return got[0] if got else None


def pull_dir(address: str, commit: str, progress: objects.Progress | None = None) -> Path:
    """This machine's copy of a published folder: every object that differs is fetched, the
    commit file last; local files the folder no longer has are removed. A folder that is not
    published (no commit object) is left as it is locally (the caller's checks decide)."""
    path = local(address)
    if not is_url(address):
        return path
    store, key = store_of(address)
    listing = store.list(key)
    # Files of this folder only: not its subfolders, nor a "folder marker" (an empty key ending in
    # "/", which consoles make), whose name here would be empty.
    top = {name: info for rel, info in listing.items() if (name := rel[len(key) + 1:]) and "/" not in name}
    if commit not in top:
        return path
    path.mkdir(parents=True, exist_ok=True)
    for name in sorted(top, key=lambda n: n == commit):  # the commit file last
        if name.startswith("."):
            continue
        fetch(store, f"{key}/{name}", path / name, top[name], progress)
    for p in path.iterdir():
        if p.is_file() and not p.name.startswith(".") and p.name not in top:
            p.unlink(missing_ok=True)
    return path


def push_dir(address: str, commit: str, progress: objects.Progress | None = None) -> None:
    """Publish this machine's copy of a folder: un-commit the old one (if different), upload
    what differs, write the commit object last, then delete objects the folder no longer has
    (e.g. what a killed writer left). Hidden files (locks, checkpoints) stay local."""
    if not is_url(address):
        return
    store, key = store_of(address)
    path = local(address)
    names = sorted(p.name for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if commit not in names:
        raise FileNotFoundError(f"{path / commit}: the folder's commit file is missing")
    listing = store.list(key)
    remote = {rel[len(key) + 1:]: info for rel, info in listing.items()}
    if commit in remote and not _same(path / commit, remote[commit], store, f"{key}/{commit}"):
        store.delete(f"{key}/{commit}")  # readers now see no folder rather than a mix
        remote.pop(commit)
    for name in [n for n in names if n != commit] + [commit]:
        if name not in remote or not _same(path / name, remote[name], store, f"{key}/{name}"):
            send(store, f"{key}/{name}", path / name, progress)
    for name in remote:
        if name not in names:
            store.delete(f"{key}/{name}")
