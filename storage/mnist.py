"""MNIST, the built-in dataset: the four files, their pinned checksums, default mirrors.

The identity of a file is the SHA-256 and size of its *decompressed* IDX content: it holds
for every honest mirror, whatever gzip settings it used. The canonical archive hashes are
pinned too, so we can record whether a mirror served the original archive bytes.
"""

from __future__ import annotations

from storage.checks import Expectation
from storage.datasets import Dataset, DatasetFile

DEFAULT_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)


FILES: dict[str, DatasetFile] = {
    f.name: f
    for f in (
        DatasetFile(
            "train-images-idx3-ubyte.gz", "train", "images",
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db", 47040016,
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609", 9912422,
        ),
        DatasetFile(
            "train-labels-idx1-ubyte.gz", "train", "labels",
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5", 60008,
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c", 28881,
        ),
        DatasetFile(
            "t10k-images-idx3-ubyte.gz", "test", "images",
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7", 7840016,
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6", 1648877,
        ),
        DatasetFile(
            "t10k-labels-idx1-ubyte.gz", "test", "labels",
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2", 10008,
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6", 4542,
        ),
    )
}

SPLITS = ("train", "test")


MNIST = Dataset(name="mnist", files=tuple(FILES.values()), mirrors=DEFAULT_MIRRORS, image_shape=(28, 28),
                classes=tuple(str(d) for d in range(10)), floor=0.97,
                notes={"presets": "every preset was tuned on MNIST"},
                # The published facts (LeCun et al.), checked at every ingest.
                expect={"train": Expectation(60_000, (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
                                             pixel_mean=0.1306605, pixel_std=0.3081078),
                        "test": Expectation(10_000, (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
                                            pixel_mean=0.1325146, pixel_std=0.3104802)})


def file_for(split: str, kind: str) -> DatasetFile:
    return MNIST.file_for(split, kind)
