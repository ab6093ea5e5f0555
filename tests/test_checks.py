"""Data checks: each check on synthetic splits (clean, then broken one way at a time), the real
MNIST's facts, a spec's ``[expect]`` tables, the record read back as hostile input, and the
real ingest flow stopping on a broken split in one line naming the check."""

from __future__ import annotations

import functools
import gzip
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from storage import DigitflowError, checks
from storage.checks import Expectation, check_dataset, check_files
from storage.datasets import SpecError, from_dict, load_spec
from storage.mnist import MNIST
from tests.conftest import _Server
from tests.test_datasets import _Quiet, idx_images, idx_labels, synthetic_images, write_toml_spec
from tests.test_operate import cli


def synthetic(n: int, classes: int = 3, seed: int = 0):
    labels = (np.arange(n) % classes).astype(np.uint8)
    return synthetic_images(labels, (16, 16), seed), labels


def report_of(train, test, expect=None, classes=3):
    return check_dataset({"train": train, "test": test}, classes=classes, expect=expect or {}, dataset="x",
                         sources={})


def by_name(report, split, name):
    return next(c for c in report.checks if c.split == split and c.name == name)


def test_clean_splits_pass_every_check():
    report = report_of(synthetic(300), synthetic(60, seed=1))
    assert report.status == "pass", checks.rows(report)
    assert {c.name for c in report.checks} >= {"rows", "label range", "class counts", "pixel mean", "pixel std",
                                                "duplicate images", "empty or constant images", "shared with train"}


def test_a_missing_class_fails_naming_it():
    images, labels = synthetic(300)
    keep = labels != 2
    report = report_of((images[keep], labels[keep]), synthetic(60, seed=1))
    c = by_name(report, "train", "class counts")
    assert c.status == "fail" and c.detail == "class 2 has no rows"
    assert report.failure().startswith("data check failed: train class counts: 0..100, expected every class present")


def test_train_rows_copied_into_test_fail():
    train = synthetic(300)
    test = (np.concatenate([synthetic(60, seed=1)[0], train[0][:10]]),
            np.concatenate([synthetic(60, seed=1)[1], train[1][:10]]))
    c = by_name(report_of(train, test), "test", "shared with train")
    assert (c.value, c.status) == ("10", "fail") and c.detail.startswith("test #60 = train #0, test #61 = train #1")


def test_one_shared_image_in_a_big_split_warns():
    train, test = synthetic(300), synthetic(200, seed=1)
    test[0][5] = train[0][7]
    c = by_name(report_of(train, test), "test", "shared with train")
    assert (c.value, c.status, c.detail) == ("1", "warn", "test #5 = train #7")


def test_duplicates_and_constant_images():
    images, labels = synthetic(300)
    images[10] = images[3]
    images[20] = 0
    images[21] = 17
    report = report_of((images, labels), synthetic(60, seed=1))
    dup = by_name(report, "train", "duplicate images")
    const = by_name(report, "train", "empty or constant images")
    assert (dup.value, dup.status, dup.detail) == ("1", "warn", "#10 = #3")
    assert (const.value, const.status, const.detail) == ("2", "warn", "#20, #21")
    assert report.status == "warn"
    images[:100] = images[0]  # a third of the split is one image
    assert by_name(report_of((images, labels), synthetic(60, seed=1)), "train", "duplicate images").status == "fail"


def test_declared_expectations_are_compared():
    train, test = synthetic(300), synthetic(60, seed=1)
    mean = checks._pixel_stats(train[0].reshape(300, -1))[0]
    good = {"train": Expectation(rows=300, class_counts=(100, 100, 100), pixel_mean=mean)}
    assert report_of(train, test, good).status == "pass"
    inverted = (255 - train[0], train[1])  # what an inverted stream of images looks like
    c = by_name(report_of(inverted, test, good), "train", "pixel mean")
    assert c.status == "fail" and "from the reference" in c.detail
    off = {"train": Expectation(rows=301, class_counts=(101, 100, 100))}
    report = report_of(train, test, off)
    assert by_name(report, "train", "rows").status == "fail"
    assert by_name(report, "train", "class counts").detail == "class 0: 100 rows, declared 101"
    slightly = {"train": Expectation(pixel_mean=mean + 0.02)}
    assert by_name(report_of(train, test, slightly), "train", "pixel mean").status == "warn"


def test_the_real_mnist_passes_every_check_with_its_published_facts(mnist_dir, tmp_path):
    files = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        pair = []
        for kind in ("images", "labels"):
            spec_file = MNIST.file_for(split, kind)
            path = tmp_path / spec_file.idx_name
            path.write_bytes(gzip.decompress((mnist_dir / spec_file.name).read_bytes()))
            pair += [path, spec_file.idx_sha256]
        files[split] = tuple(pair)
    report = check_files(MNIST, files)
    assert report.status == "pass", checks.rows(report)
    values = {(c.split, c.name): c.value for c in report.checks}
    assert values[("train", "pixel mean")] == "0.1307" and values[("train", "pixel std")] == "0.3081"
    assert values[("test", "pixel mean")] == "0.1325" and values[("test", "pixel std")] == "0.3105"
    assert values[("train", "class counts")] == "5421..6742" and values[("test", "class counts")] == "892..1135"
    # The facts the README states: no exact duplicate within a split or between them, no blank image.
    assert values[("train", "duplicate images")] == values[("test", "duplicate images")] == "0"
    assert values[("test", "shared with train")] == "0"
    assert values[("train", "empty or constant images")] == "0"


def test_spec_expectations_are_validated(tmp_path):
    spec = write_toml_spec(tmp_path / "shapes.toml", tmp_path / "mirror")
    import tomllib

    data = tomllib.loads(spec.read_text())
    data["expect"] = {"train": {"rows": 90, "class_counts": [30, 30, 30], "pixel_mean": 0.3}}
    assert from_dict(data, "/x/s.toml").expect["train"] == Expectation(90, (30, 30, 30), 0.3)
    for bad, message in (({"valid": {}}, "expect.valid: the spec has no split 'valid'"),
                         ({"train": {"rows": -1}}, "expect.train.rows must be a positive number of rows"),
                         ({"train": {"class_counts": [1, 2]}}, "class_counts must list one row count per class (3)"),
                         ({"train": {"rows": 5, "class_counts": [1, 1, 1]}}, "class_counts add up to 3, not rows = 5"),
                         ({"train": {"pixel_std": 2}}, "pixel_std must be a number in 0..1"),
                         ({"train": {"colour": 1}}, "expect.train: unknown key 'colour'"),
                         ([1], "expect must be a table of splits")):
        with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
            from_dict({**data, "expect": bad}, "/x/s.toml")


# ---- the record under the home is input too -----------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=20)


@settings(max_examples=150, deadline=None)
@given(data=JSON | st.fixed_dictionaries({"dataset": JSON, "sources": JSON, "checks": st.lists(
    st.dictionaries(st.sampled_from(["split", "name", "value", "expectation", "status", "detail"]), JSON), max_size=3)}))
def test_a_hostile_record_is_one_error_or_a_report(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("rec") / "checks.json"
    path.write_text(json.dumps(data))
    try:
        report = checks.load(path)
    except DigitflowError as e:
        assert str(e).startswith("checks.json: not a data-check record")
    else:
        assert report.status in checks.ORDER


def test_a_huge_or_deep_record_is_refused_unparsed(tmp_path):
    path = tmp_path / "checks.json"
    path.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(DigitflowError, match="not a data-check record"):
        checks.load(path)
    path.write_bytes(b" " * (checks.MAX_RECORD + 1))
    with pytest.raises(DigitflowError, match="not a data-check record"):
        checks.load(path)
    assert checks.load(tmp_path / "none.json") is None


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), classes=st.integers(2, 5), seed=st.integers(0, 2**16), copies=st.integers(0, 10))
def test_counts_match_a_direct_count(n, classes, seed, copies):
    """On any small split: duplicates = rows − distinct images; shared = test rows seen in train."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 3, (n, 2, 2), dtype=np.uint8)  # few values: duplicates are common
    labels = rng.integers(0, classes, n).astype(np.uint8)
    test = np.concatenate([images[:copies], rng.integers(0, 3, (5, 2, 2), dtype=np.uint8)])
    report = check_dataset({"train": (images, labels), "test": (test, np.zeros(len(test), np.uint8))},
                           classes=classes, expect={}, dataset="x", sources={})
    distinct = {im.tobytes() for im in images}
    assert by_name(report, "train", "duplicate images").value == str(n - len(distinct))
    assert by_name(report, "test", "shared with train").value == str(sum(im.tobytes() in distinct for im in test))
    assert (by_name(report, "train", "class counts").status == "fail") == (len(set(labels.tolist())) < classes)


# ---- the real flow --------------------------------------------------------------------------------

def broken_spec(tmp_path, how: str):
    """The shapes spec with its train split broken ``how``: a class removed, or train rows in test."""
    folder = tmp_path / "mirror"
    spec = write_toml_spec(tmp_path / "shapes.toml", folder)
    import tomllib

    data = tomllib.loads(spec.read_text())
    train_labels = np.arange(90, dtype=np.uint8) % 3
    train = synthetic_images(train_labels, (16, 16), seed=4)
    test_labels = np.arange(30, dtype=np.uint8) % 3
    test = synthetic_images(test_labels, (16, 16), seed=5)
    if how == "class removed":
        keep = train_labels != 1
        train, train_labels = train[keep], train_labels[keep]
    else:
        test[:10], test_labels[:10] = train[:10], train_labels[:10]
    import hashlib

    for f in data["files"]:
        content = {("train", "images"): idx_images(train), ("train", "labels"): idx_labels(train_labels),
                   ("test", "images"): idx_images(test), ("test", "labels"): idx_labels(test_labels)}[f["split"], f["kind"]]
        (folder / f["name"]).write_bytes(gzip.compress(content))
        f.update(size=len(content), sha256=hashlib.sha256(content).hexdigest())
    out = tmp_path / "broken.json"
    out.write_text(json.dumps(data))
    return out, folder


@pytest.mark.parametrize("how, line", [
    ("class removed", "digitflow: error: data check failed: train class counts: 0..30, expected every class "
                      "present — class 1 has no rows"),
    ("copied into test", "digitflow: error: data check failed: test shared with train: 10, expected 0 — "
                         "test #0 = train #0, test #1 = train #1, test #2 = train #2"),
])
def test_a_broken_split_stops_the_run_in_one_line_before_training(tmp_path, api_url, how, line):
    spec, folder = broken_spec(tmp_path, how)
    server = _Server(functools.partial(_Quiet, directory=str(folder)))
    try:
        home = tmp_path / "home"
        r = cli("run", "--dataset", str(spec), "--mirror", server.url, "--home", str(home), "--preset", "fast",
                check=False)
    finally:
        server.close()
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == line, r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("digitflow: error:")] == [line]
    key = load_spec(spec).key
    recorded = json.loads((home / "data" / key / "checks.json").read_text())
    assert recorded["status"] == "fail"
    assert not (home / "data" / key / "train").exists() and not (home / "models").exists()  # nothing sharded or trained
    # `data check` says the same from the verified raw files, without Prefect.
    r = cli("data", "check", "--dataset", str(spec), "--home", str(home), check=False)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == line
    assert any(row.startswith("✗") for row in r.stdout.splitlines())


def test_ingest_records_the_checks_and_data_check_prints_them(first_run):
    home = first_run[0]
    recorded = checks.load(home / "data" / "mnist" / "checks.json")
    assert recorded.status == "pass" and len(recorded.checks) == 15
    assert recorded.sources["train"]["images"] == MNIST.file_for("train", "images").idx_sha256
    out = json.loads(cli("data", "check", "--home", str(home), "--json").stdout)
    assert out["status"] == "pass" and out["checks"] == checks.rows(recorded)
    text = cli("data", "check", "--home", str(home)).stdout.splitlines()
    assert len(text) == 15 and all(row.startswith("✓") for row in text)
    assert cli("data", "check", "--home", str(home / "empty"), check=False).stderr.strip().endswith(
        "run `digitflow ingest --dataset mnist` first")
