"""Fashion-MNIST (Zalando Research, MIT licence), the second built-in dataset: MNIST's layout
(28×28 uint8 images, 60,000 train and 10,000 test, 10 classes) with clothing instead of digits.

The dataset publishes MD5 checksums of its archives; those pin the archive bytes, together with
the decompressed size. The label files' decompressed SHA-256 were computed from the original
archives (their MD5 matches the published one), so those two are pinned by content.
"""

from storage.checks import Expectation
from storage.datasets import Dataset, DatasetFile

FASHION_MNIST = Dataset(
    name="fashion-mnist",
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
             "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"),
    image_shape=(28, 28),
    floor=0.85,  # an MLP reaches ~88–90 % on it (the dataset's own benchmark: 256-128-100 at 88.33 %)
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
             "Ankle boot"),
    files=(
        DatasetFile("train-images-idx3-ubyte.gz", "train", "images", idx_size=47_040_016,
                    archive_md5="8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        DatasetFile("train-labels-idx1-ubyte.gz", "train", "labels", idx_size=60_008,
                    idx_sha256="bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                    archive_md5="25c81989df183df01b3e8a0aad5dffbe"),
        DatasetFile("t10k-images-idx3-ubyte.gz", "test", "images", idx_size=7_840_016,
                    archive_md5="bef4ecab320f06d8554ea6380940ec79"),
        DatasetFile("t10k-labels-idx1-ubyte.gz", "test", "labels", idx_size=10_008,
                    idx_sha256="0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
                    archive_md5="bb300cfdad3c16e7a12a480ee83cd310"),
    ),
    # Balanced by construction (6,000 / 1,000 a class); the training pixels' mean and std are the
    # normalization constants the community publishes for it (test: measured and recorded).
    expect={"train": Expectation(60_000, (6000,) * 10, pixel_mean=0.2860, pixel_std=0.3530),
            "test": Expectation(10_000, (1000,) * 10)},
    notes={"presets": "the presets were tuned on MNIST; `default` is the Fashion-MNIST default too (its own "
                      "benchmark lists an MLP 256-128-100 at 88.33 %); not measured here: the images are not "
                      "available offline"},
)
