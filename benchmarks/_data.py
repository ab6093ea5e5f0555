"""Load the real MNIST for benchmarks straight from ../shared/mnist, via storage's IDX reader."""

from __future__ import annotations

import gzip
import shutil
import tempfile
from pathlib import Path

import numpy as np

from _mirror import MNIST_DIR
from storage.idx import pixels01, read_pair
from storage.mnist import file_for


def load_mnist(directory: Path = MNIST_DIR):
    """((x_train, y_train), (x_test, y_test)); x as pixels/255 float32 (n, 784), y as int64."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for split in ("train", "test"):
            paths = []
            for kind in ("images", "labels"):
                spec = file_for(split, kind)
                path = Path(tmp) / spec.idx_name
                with gzip.open(directory / spec.name) as src, open(path, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                paths.append(path)
            images, labels = read_pair(*paths)
            x = pixels01(images.reshape(len(images), 784))  # the pipeline's exact pixel/255
            del images
            out.append((x, labels.astype(np.int64)))
    return out
