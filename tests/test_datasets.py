"""Any IDX dataset through the same flows: the built-in specs, the real Fashion-MNIST labels
served from a local mirror with synthetic images, a user's 16×16 three-class dataset from a TOML
spec, bad specs refused before any download, unpinned files, and MNIST unchanged."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

import nn
from storage.catalog import resolve
from storage.datasets import SpecError, from_dict, load_spec
from storage.download import DownloadError, fetch_verified
from storage.fashion_mnist import FASHION_MNIST
from storage.registry import Registry
from storage.shards import read_split
from tests.conftest import _Server
from tests.test_operate import cli

FASHION_DIR = Path(os.environ.get("DIGITFLOW_FASHION_DIR", Path(__file__).resolve().parents[2] / "shared" / "fashion-mnist"))
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


def idx_images(images: np.ndarray) -> bytes:
    n, rows, cols = images.shape
    return b"\x00\x00\x08\x03" + struct.pack(">III", n, rows, cols) + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray) -> bytes:
    return b"\x00\x00\x08\x01" + struct.pack(">I", len(labels)) + labels.astype(np.uint8).tobytes()


def synthetic_images(labels: np.ndarray, shape: tuple[int, int], seed: int) -> np.ndarray:
    """Class k: a bright bar in row band k (learnable), plus noise."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    n_classes = int(labels.max()) + 1
    images = (rng.random((len(labels), rows, cols)) * 60).astype(np.uint8)
    band = max(1, rows // n_classes)
    for k in range(n_classes):
        images[labels == k, k * band:(k + 1) * band, 2:cols - 2] = 230
    return images


def file_entry(folder: Path, name: str, split: str, kind: str, content: bytes, **pins) -> dict:
    (folder / name).write_bytes(gzip.compress(content, compresslevel=1))
    entry = {"name": name, "split": split, "kind": kind, "size": len(content)}
    entry.update(pins if pins else {"sha256": hashlib.sha256(content).hexdigest()})
    return entry


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    """A mirror with the real Fashion-MNIST label archives and synthetic image archives of the
    right shapes, and a spec (JSON) pinning them: labels by the published MD5 + size, images by
    the SHA-256 of the synthetic content. Yields (mirror URL, spec path, labels by split, folder)."""
    if not (FASHION_DIR / "train-labels-idx1-ubyte.gz").exists():
        pytest.fail(f"the real Fashion-MNIST labels are not at {FASHION_DIR} (set DIGITFLOW_FASHION_DIR)")
    folder = tmp_path_factory.mktemp("fashion-mirror")
    files, labels = [], {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        name = f"{prefix}-labels-idx1-ubyte.gz"
        shutil.copyfile(FASHION_DIR / name, folder / name)
        with gzip.open(folder / name) as f:
            raw = f.read()
        labels[split] = np.frombuffer(raw[8:], np.uint8)
        builtin = FASHION_MNIST.file(name)
        files.append({"name": name, "split": split, "kind": "labels", "size": builtin.idx_size,
                      "archive_md5": builtin.archive_md5})
        images = synthetic_images(labels[split], (28, 28), seed=len(labels[split]))
        files.append(file_entry(folder, f"{prefix}-images-idx3-ubyte.gz", split, "images", idx_images(images)))
    spec = folder.parent / "fashion-synthetic.json"
    spec.write_text(json.dumps({"name": "fashion-synthetic", "image_shape": [28, 28], "classes": FASHION_CLASSES,
                                "mirrors": [], "files": files}))
    server = _Server(functools.partial(_Quiet, directory=str(folder)))
    yield server.url, spec, labels, folder
    server.close()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


def test_builtin_specs():
    mnist, fashion = resolve("mnist"), resolve("fashion-mnist")
    assert resolve() is mnist and resolve(None) is mnist
    assert [f.pin for f in mnist.files] == ["sha256"] * 4 and mnist.default_model_name == "mnist-mlp"
    assert fashion.classes[9] == "Ankle boot" and fashion.default_model_name == "fashion-mnist-mlp"
    assert {f.name: f.pin for f in fashion.files} == {
        "train-images-idx3-ubyte.gz": "archive-md5", "train-labels-idx1-ubyte.gz": "sha256",
        "t10k-images-idx3-ubyte.gz": "archive-md5", "t10k-labels-idx1-ubyte.gz": "sha256"}
    assert fashion.file("train-images-idx3-ubyte.gz").idx_size == 16 + 60_000 * 784


def test_real_fashion_labels_verify_against_the_published_checksums(tmp_path):
    """The built-in Fashion-MNIST spec pins the real label archives (MD5 + size + content SHA-256)."""
    server = _Server(functools.partial(_Quiet, directory=str(FASHION_DIR)))
    try:
        for name in ("train-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
            record = fetch_verified(FASHION_MNIST.file(name), [server.url], tmp_path)
            assert record["sha256"] == FASHION_MNIST.file(name).idx_sha256 and record["archive_canonical"]
        # An image archive pinned only by its published MD5: our synthetic bytes are refused, nothing kept.
        fake = tmp_path / "mirror"
        fake.mkdir()
        (fake / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(bytes(16 + 10_000 * 784)))
        fake_server = _Server(functools.partial(_Quiet, directory=str(fake)))
        try:
            with pytest.raises(DownloadError, match="archive MD5 mismatch: got .* want the published bef4ecab"):
                fetch_verified(FASHION_MNIST.file("t10k-images-idx3-ubyte.gz"), [fake_server.url], tmp_path / "raw")
        finally:
            fake_server.close()
        assert not (tmp_path / "raw" / "t10k-images-idx3-ubyte").exists()
    finally:
        server.close()


def test_fashion_through_the_pipeline_with_class_names(fashion, tmp_path, prefect_harness):
    from flows.pipeline import retrain

    url, spec, labels, folder = fashion
    home = tmp_path / "home"
    summary = retrain(home=str(home), mirrors=[url], dataset=str(spec), preset="fast", epochs=2)
    key = load_spec(spec).key  # a spec's files and models live under its name + identity
    assert key.startswith("fashion-synthetic-") and len(key) == len("fashion-synthetic-") + 12
    assert summary.dataset == "fashion-synthetic" and summary.name == f"{key}-mlp"
    assert summary.version == 1 and summary.test_accuracy > 0.9  # the synthetic classes are learnable

    # The label facts of the real Fashion-MNIST, read back from the shards.
    for split, per_class in (("train", 6000), ("test", 1000)):
        x, y, manifest = read_split(home / "data" / key / split)
        assert manifest["class_counts"] == [per_class] * 10 and x.shape == (per_class * 10, 784)
    _, y_train, _ = read_split(home / "data" / key / "train")
    _, y_test, _ = read_split(home / "data" / key / "test")
    assert y_train[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert y_test[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]

    # Provenance says how each file was pinned.
    raw = home / "raw" / key
    provenance = json.loads((raw / "train-labels-idx1-ubyte.json").read_text())
    assert provenance["pinned_by"] == "archive-md5" and provenance["archive_canonical"]
    assert "pinned_by" not in json.loads((raw / "train-images-idx3-ubyte.json").read_text())

    registry = Registry(home, f"{key}-mlp")
    assert registry.classes(1) == FASHION_CLASSES
    assert "| 9 Ankle boot |" in (registry.path(1) / "report.md").read_text()

    test_images = tmp_path / "test-images.idx"
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz") as f:
        test_images.write_bytes(f.read())
    out = json.loads(cli("predict", "--home", str(home), "--dataset", str(spec), "--json", str(test_images)).stdout)
    assert len(out) == 10_000
    assert [o["class"] for o in out[:3]] == [FASHION_CLASSES[int(k)] for k in labels["test"][:3]]


def write_toml_spec(path: Path, folder: Path, *, rows=16, cols=16, n_train=600, n_test=150, extra: str = "",
                    pin: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = ['name = "shapes"', f"image_shape = [{rows}, {cols}]", 'classes = ["circle", "square", "triangle"]',
             "mirrors = []", extra]
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        y = np.arange(n) % 3
        x = synthetic_images(y, (rows, cols), seed)
        for kind, content in (("images", idx_images(x)), ("labels", idx_labels(y))):
            name = f"{split}-{kind}.idx.gz"
            entry = file_entry(folder, name, split, kind, content)
            lines += ["", "[[files]]", f'name = "{name}"', f'split = "{split}"', f'kind = "{kind}"',
                      f"size = {entry['size']}"]
            if pin:
                lines.append(f'sha256 = "{entry["sha256"]}"')
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow  # `digitflow` processes running flows
def test_user_spec_16x16_three_classes_runs_the_whole_pipeline(tmp_path):
    folder = tmp_path / "mirror"
    spec = write_toml_spec(tmp_path / "shapes.toml", folder)
    server = _Server(functools.partial(_Quiet, directory=str(folder)))
    try:
        home = tmp_path / "home"
        out = cli("run", "--dataset", str(spec), "--mirror", server.url, "--home", str(home), "--preset", "fast",
                  "--json")
        summary = json.loads(out.stdout.strip().splitlines()[-1])
        name = f"{load_spec(spec).key}-mlp"  # shapes-<12 hex digits of its identity>-mlp
        assert summary["name"] == name and summary["dataset"] == "shapes" and summary["test_accuracy"] > 0.9
        registry = Registry(home, name)
        net = registry.load_model(1)
        assert net.dense_layers[0].n_in == 256 and net.dense_layers[-1].n_out == 3
        assert registry.classes(1) == ["circle", "square", "triangle"]
        assert json.loads((registry.path(1) / "lineage.json").read_text())["dataset"]["name"] == "shapes"
        report = (registry.path(1) / "report.md").read_text()
        assert "| 2 triangle |" in report and "| true \\ predicted | 0 | 1 | 2 |" in report
        # A rerun with nothing changed: same version, nothing new.
        again = json.loads(cli("run", "--dataset", str(spec), "--mirror", server.url, "--home", str(home),
                               "--preset", "fast", "--json").stdout.strip().splitlines()[-1])
        assert again["version"] == 1 and not again["created"]
        idx = tmp_path / "few.idx"
        idx.write_bytes(idx_images(synthetic_images(np.array([0, 1, 2]), (16, 16), seed=9)))
        pred = json.loads(cli("predict", "--dataset", str(spec), "--home", str(home), "--json", str(idx)).stdout)
        assert [p["class"] for p in pred] == ["circle", "square", "triangle"]
        wrong = cli("predict", "--dataset", str(spec), "--home", str(home), str(tmp_path / "shapes.toml"), check=False)
        assert wrong.returncode == 1
    finally:
        server.close()


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("classes"), "classes must be a list of 2..1000 distinct names of 1..100 characters, one line each, got None"),
    (lambda d: d["files"].append(dict(d["files"][0])), "is listed twice"),
    (lambda d: d.update(image_shape=[16]), "image_shape must be [rows, columns]"),
    (lambda d: d["files"][0].update(size=1000), "size 1000 is not an images IDX file of 16×16 per item"),
    (lambda d: d["files"][0].update(sha256="abc"), "sha256 must be 64 lowercase hex digits, got 'abc'"),
    (lambda d: d.update(colour="red"), "unknown key 'colour'"),
    (lambda d: d["files"][1].update(checksum="x"), "files[1] ('train-labels.idx.gz'): unknown key 'checksum'"),
    (lambda d: d.update(files=[f for f in d["files"] if f["split"] != "test"]), "a 'test' split is required"),
])
def test_bad_specs_fail_in_one_line_each_before_any_download(tmp_path, mutate, message):
    spec = write_toml_spec(tmp_path / "shapes.toml", tmp_path / "mirror")
    import tomllib

    data = tomllib.loads(spec.read_text())
    mutate(data)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(SpecError) as e:
        load_spec(bad)
    assert message in str(e.value)
    r = cli("ingest", "--dataset", str(bad), "--home", str(tmp_path / "home"), "--mirror", "http://127.0.0.1:9/",
            check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and any(message in line for line in lines), r.stderr
    assert all(line.startswith("digitflow: error: bad.json:") or line.startswith("bad.json:") for line in lines)
    assert not (tmp_path / "home" / "raw").exists()  # nothing was downloaded


def test_several_mistakes_are_each_one_line():
    with pytest.raises(SpecError) as e:
        from_dict({"name": "Bad Name", "image_shape": [0, 5], "classes": ["a"], "files": [], "extra": 1})
    assert str(e.value).splitlines() == [
        "spec: unknown key 'extra' (known: classes, expect, files, floor, image_shape, mirrors, name, notes)",
        "spec: name must be 1–64 lowercase letters, digits, '.', '_' or '-', got 'Bad Name'",
        "spec: image_shape must be [rows, columns], each an integer in 1..1024, got [0, 5]",
        "spec: classes must be a list of 2..1000 distinct names of 1..100 characters, one line each, got ['a']",
        "spec: files must list the IDX archives (1 to 64 [[files]] tables with name, split, kind and a checksum)"]


def test_field_and_cross_field_mistakes_are_told_together():
    """A spec with a field error still hears what its valid parts get wrong together: a fix
    never uncovers a new list of mistakes the first message could have named."""
    pinned = {"sha256": "0" * 64}
    with pytest.raises(SpecError) as e:
        from_dict({"name": "Bad Name", "image_shape": [4, 4], "classes": ["a", "b"], "files": [
            {"name": "a.gz", "split": "train", "kind": "images", "size": 100, **pinned},
            {"name": "a", "split": "train", "kind": "labels", "size": 18, **pinned},
            {"name": "b", "split": "test", "kind": "labels", "size": "18", **pinned}],
            "expect": {"train": {"class_counts": [1, 2, 3]}}})
    assert str(e.value).splitlines() == [
        "spec: name must be 1–64 lowercase letters, digits, '.', '_' or '-', got 'Bad Name'",
        "spec: files[2] ('b'): size must be a positive number of bytes, got '18'",
        "spec: files[0] ('a.gz'): size 100 is not an images IDX file of 4×4 per item (16 + n × 16 bytes)",
        "spec: files[1] ('a'): 'a' is listed twice",
        "spec: expect.train.class_counts must list one row count per class (2), got [1, 2, 3]"]
    # A field that failed one of its own rules is not taken as valid for the cross-field checks.
    with pytest.raises(SpecError) as e:
        from_dict({"name": "ok", "image_shape": [1024, 1024], "classes": ["a", "a"], "floor": 2, "files": [
            {"name": "a", "split": "train", "kind": "images", "size": 1584, **pinned}],
            "expect": {"train": {"class_counts": [1, 2, 3]}}})
    assert not any("IDX file of" in line or "class_counts" in line for line in str(e.value).splitlines())
    # What depends on every file (a split's kinds, train and test present) waits for the files to
    # be valid: a file that failed may be the missing one.
    with pytest.raises(SpecError) as e:
        from_dict({"name": "ok", "image_shape": [4, 4], "classes": ["a", "b"], "floor": 2, "files": [
            {"name": "a", "split": "train", "kind": "images", "size": 32, **pinned},
            {"name": "b", "split": "train", "kind": "labels", "size": 10, **pinned}]})
    assert str(e.value).splitlines() == [
        "spec: floor must be a test accuracy in 0..1 (the gate never promotes below it), got 2",
        "spec: a 'test' split is required"]


@pytest.mark.slow  # `digitflow` processes running flows
def test_a_checksum_that_does_not_match_is_refused_and_nothing_is_kept(tmp_path):
    folder = tmp_path / "mirror"
    spec = write_toml_spec(tmp_path / "shapes.toml", folder)
    text = spec.read_text()
    first = text.index('sha256 = "') + len('sha256 = "')
    spec.write_text(text[:first] + ("0" if text[first] != "0" else "1") + text[first + 1:])
    server = _Server(functools.partial(_Quiet, directory=str(folder)))
    try:
        r = cli("ingest", "--dataset", str(spec), "--mirror", server.url, "--home", str(tmp_path / "home"),
                "--retries", "0", check=False)
    finally:
        server.close()
    assert r.returncode == 1
    assert "train-images.idx.gz: no mirror served verified bytes" in r.stderr and "SHA-256 mismatch" in r.stderr
    key = load_spec(spec).key
    assert not (tmp_path / "home" / "data" / key).exists()
    assert not (tmp_path / "home" / "raw" / key / "train-images.idx").exists()


@pytest.mark.slow  # `digitflow` processes running flows
def test_unpinned_files_need_allow_unpinned_and_record_what_was_seen(tmp_path):
    folder = tmp_path / "mirror"
    spec = write_toml_spec(tmp_path / "shapes.toml", folder, pin=False)
    server = _Server(functools.partial(_Quiet, directory=str(folder)))
    try:
        home = tmp_path / "home"
        r = cli("ingest", "--dataset", str(spec), "--mirror", server.url, "--home", str(home), check=False)
        assert r.returncode == 1 and "have no checksum" in r.stderr and "--allow-unpinned" in r.stderr
        assert not (home / "raw").exists()
        cli("ingest", "--dataset", str(spec), "--mirror", server.url, "--home", str(home), "--allow-unpinned")
    finally:
        server.close()
    raw = home / "raw" / load_spec(spec).key
    provenance = json.loads((raw / "train-images.idx.json").read_text())
    content = (raw / "train-images.idx").read_bytes()
    assert provenance["pinned_by"] == "none" and provenance["sha256"] == hashlib.sha256(content).hexdigest()


def test_mnist_is_unchanged(first_run):
    """Same shards (their manifest hashes to what the MNIST-only code wrote plus the row-file
    digest ``rows_sha256``) and, on this CI's forced Haswell kernels, the same weights for the
    same seed."""
    home, summary = first_run
    from storage.atomic import sha256_file

    assert sha256_file(home / "data/mnist/train/manifest.json") == \
        "d6434a54565527ed335597647b20a24ddcd19d9c460ff78803b0147ebf0e38a8"
    assert sha256_file(home / "data/mnist/test/manifest.json") == \
        "7e165c7280129290dd7b7f43231ca417ff7d46c49aaab23852e56607a20153e7"
    assert summary.name == "mnist-mlp" and summary.dataset == "mnist"
    assert "dataset" not in json.loads((home / "models/mnist-mlp/v1/lineage.json").read_text())
    if os.environ.get("OPENBLAS_CORETYPE") == "Haswell":
        assert Registry(home).metadata(1).weights_sha256 == \
            "431ffdda6269d118c443072e145156c3546058393e1edab1bf9f520d9c118c33"
    assert nn.load(home / "models/mnist-mlp/v1").dense_layers[0].n_in == 784


def test_the_gates_floor_comes_from_the_dataset():
    """MNIST's gate floor is 0.97, Fashion-MNIST's 0.85 (an MLP reaches ~88–90 % there), a spec's
    is its own `floor` (default 0): a run without --floor gets a champion on any dataset."""
    assert (resolve("mnist").floor, resolve("fashion-mnist").floor) == (0.97, 0.85)
    spec = {"name": "s", "image_shape": [1, 1], "classes": ["a", "b"],
            "files": [{"name": f"{s}-{k}", "split": s, "kind": k, "sha256": "a" * 64, "size": 17 if k == "images" else 9}
                      for s in ("train", "test") for k in ("images", "labels")]}
    assert from_dict(spec, "/x/s.toml").floor == 0.0
    assert from_dict({**spec, "floor": 0.5}, "/x/s.toml").floor == 0.5
    with pytest.raises(SpecError, match="floor must be a test accuracy in 0..1"):
        from_dict({**spec, "floor": 1.5}, "/x/s.toml")
