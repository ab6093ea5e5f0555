"""Pure I/O for digitflow: no Prefect in here.

- ``atomic``   temp-file-then-``os.replace`` writes and SHA-256 helpers
- ``mnist``    the four MNIST files, their pinned checksums and the default mirrors
- ``download`` streamed, verified, bounded downloads with mirror failover
- ``idx``      a validating IDX reader
- ``shards``   normalized Parquet shards and their manifests
- ``registry`` the versioned model registry (versions, aliases)
- ``rowstore`` a split as one uint8 row file that training reads rows from (memory bounded)
- ``objects``  object storage behind an ``s3://`` or ``az://`` home (obstore): conditional writes, a lease
- ``remote``   a remote home's working copy and its bucket, kept in step at commit points
- ``settings`` every DIGITFLOW_* environment variable, typed and bounded (pydantic-settings)
"""

from pathlib import Path
import hashlib


class DigitflowError(Exception):
    """An expected failure: its message is one line that names the file or value."""


def code_digest(*packages: str) -> str:
    """SHA-256 over the .py sources of the named top-level packages (cache-key material)."""
    import importlib

    h = hashlib.sha256()
    for name in packages:
        root = Path(importlib.import_module(name).__file__).parent
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def within(seconds: float, call, name: str = "digitflow-bounded") -> list:
    """``[call()]`` when it returns within ``seconds``, else ``[]``: for a call whose own timeouts
    do not bound it (a receiver trickling a byte at a time, a client that retries a silent server
    for minutes). It runs on a daemon thread nobody waits for afterwards, with the caller's context
    variables (a Prefect run's context goes with it)."""
    import contextvars
    import threading

    got: list = []
    thread = threading.Thread(target=contextvars.copy_context().run, args=(lambda: got.append(call()),),
                              name=name, daemon=True)
    thread.start()
    thread.join(seconds)
    return got[:1]
