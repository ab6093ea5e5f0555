"""Serve ../shared/mnist on 127.0.0.1 (random port) for the benchmarks."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import threading
from pathlib import Path

MNIST_DIR = Path(os.environ.get("DIGITFLOW_MNIST_DIR", Path(__file__).resolve().parents[2] / "shared" / "mnist"))


@contextlib.contextmanager
def local_mirror(directory: Path = MNIST_DIR):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
