"""Operating digitflow: the models CLI, prediction, ONNX export."""

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nn
from nn.metrics import per_class
from serving.images import ImageError, load_gray, mnist_style
from storage.registry import Registry

REPO = Path(__file__).resolve().parents[1]
TEST_LABELS = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9, 0, 6, 9, 0, 1, 5, 9, 7, 3, 4]


def cli(*args, check=True):
    """``digitflow ARGS``: in this process where a subprocess is not the point (tests/incli.py)."""
    from tests import incli

    if incli.suitable(args):
        r = incli.digitflow(*args)
    else:
        r = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, capture_output=True, text=True,
                           timeout=300, env={**os.environ, "COLUMNS": "200"})
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def second_version(home: Path, accuracy_delta: float = -0.01, shift: float = 0.01) -> int:
    """Publish a copy of v1 with perturbed weights (a genuinely different version)."""
    reg = Registry(home)
    model = nn.load(reg.path(1))
    model.layers[0].params["W"] += shift
    metrics = reg.metrics(1).model_dump()
    metrics = {**metrics, "test_accuracy": metrics["test_accuracy"] + accuracy_delta}
    cm = np.array(metrics["confusion_matrix"])
    cm[3, 3] -= 5
    cm[3, 5] += 5
    metrics["confusion_matrix"] = cm.tolist()
    metrics["per_class"] = per_class(cm)

    def build(folder, version):
        nn.save(model, folder)
        (folder / "metrics.json").write_text(json.dumps(metrics))
        return {"test_accuracy": metrics["test_accuracy"], "created": "2026-01-01T00:00:00+00:00"}

    version, _ = reg.publish(nn.digest(model), build)
    return version


def test_models_list_show_promote_diff(published):
    home = str(published)
    v2 = second_version(published)
    Registry(published).record_decision(v2, promoted=False, reason="below the champion", accuracy=0.5)
    rows = json.loads(cli("models", "list", "--home", home, "--json").stdout)
    assert [(r["version"], r["aliases"], r["status"]) for r in rows] == [
        (1, ["champion"], "champion"), (2, ["latest"], "rejected")]
    assert rows[1]["reason"] == "below the champion"
    table = cli("models", "list", "--home", home).stdout
    assert "v1" in table and "champion" in table and "rejected: below the champion" in table

    shown = json.loads(cli("models", "show", "champion", "--home", home, "--json").stdout)
    assert shown["version"] == 1 and shown["metadata"]["lineage"]["seed"] == 0
    assert shown["metrics"]["test_accuracy"] == Registry(published).metrics(1).test_accuracy
    assert "gate: promoted by gate" in cli("models", "show", "1", "--home", home).stdout

    d = json.loads(cli("models", "diff", "1", "2", "--home", home, "--json").stdout)
    assert d["summary"]["test_accuracy"]["delta"] == pytest.approx(-0.01)
    assert d["confusion_matrix_delta"][3][3] == -5 and d["confusion_matrix_delta"][3][5] == 5
    assert sum(map(sum, d["confusion_matrix_delta"])) == 0
    assert d["per_class"][3]["recall_delta"] < 0
    text = cli("models", "diff", "champion", "latest", "--home", home).stdout
    assert "test_accuracy" in text and "-5" in text and "+5" in text

    r = cli("models", "promote", "2", "--reason", "canary looked good", "--by", "ops", "--home", home)
    assert "v2 is champion (was v1)" in r.stdout
    decision = json.loads((published / "models/mnist-mlp/decisions/v2.json").read_text())
    assert decision["by"] == "ops" and decision["reason"] == "manual override: canary looked good"
    assert decision["history"][0]["status"] == "rejected"
    assert Registry(published).aliases().champion == 2

    r = cli("models", "show", "v9", "--home", home, check=False)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("digitflow: error: ")
    r = cli("models", "promote", "1", "--reason", "", "--home", home, check=False)
    assert r.returncode == 1 and "needs a reason" in r.stderr


def test_predict_png_dark_on_white_upscaled(published, mnist_dir, tmp_path):
    """PNGs of real test digits drawn dark-on-white, upscaled to 112×112: ≥ 18 of 20 right."""
    from PIL import Image

    raw = gzip.decompress((mnist_dir / "t10k-images-idx3-ubyte.gz").read_bytes())
    x = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)
    paths = []
    for i in range(20):
        path = tmp_path / f"digit-{i:02d}.png"
        Image.fromarray(255 - x[i]).resize((112, 112), Image.Resampling.BICUBIC).save(path)
        paths.append(str(path))
    out = json.loads(cli("predict", *paths, "--home", str(published), "--json").stdout)
    assert [o["path"] for o in out] == paths
    assert all(0 < o["probability"] <= 1 for o in out)
    right = sum(o["digit"] == label for o, label in zip(out, TEST_LABELS))
    assert right >= 18, out
    text = cli("predict", paths[0], "--home", str(published), "--model", "v1").stdout
    assert text.startswith(f"{paths[0]}: 7 (")
    # JPEG, RGB, a different size and light-on-dark: the same preparation applies.
    jpegs = []
    for i in range(5):
        path = tmp_path / f"digit-{i}.jpg"
        Image.fromarray(x[i]).convert("RGB").resize((90, 90), Image.Resampling.BICUBIC).save(path, quality=90)
        jpegs.append(str(path))
    out = json.loads(cli("predict", *jpegs, "--home", str(published), "--json").stdout)
    assert sum(o["digit"] == label for o, label in zip(out, TEST_LABELS)) >= 4


def test_predict_idx_file(published, tmp_path):
    idx = published / "raw/mnist/t10k-images-idx3-ubyte"
    gz = tmp_path / "t10k.gz"
    gz.write_bytes(gzip.compress(idx.read_bytes()[: 16 + 784 * 50], compresslevel=1))
    data = bytearray(gzip.decompress(gz.read_bytes()))
    data[4:8] = (50).to_bytes(4, "big")
    gz.write_bytes(gzip.compress(bytes(data)))
    out = json.loads(cli("predict", str(gz), "--home", str(published), "--json").stdout)
    assert len(out) == 50 and out[0]["path"] == f"{gz}#0"
    labels = np.fromfile(published / "raw/mnist/t10k-labels-idx1-ubyte", np.uint8, offset=8)[:50]
    assert np.mean([o["digit"] for o in out] == labels) >= 0.9


def test_predict_errors(published, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    r = cli("predict", str(tmp_path / "notes.txt"), "--home", str(published), check=False)
    assert r.returncode == 1 and "notes.txt: not a readable image" in r.stderr.strip().splitlines()[-1]
    r = cli("predict", str(tmp_path / "missing.png"), "--home", str(published), check=False)
    assert r.returncode == 1 and "missing.png: no such file" in r.stderr


def test_mnist_style_preparation():
    img = np.ones((200, 100), np.float32)               # white page
    img[50:150, 40:60] = 0.0                             # a dark vertical stroke, off-center
    x = mnist_style(img).reshape(28, 28)
    assert x.max() == pytest.approx(1.0, abs=0.05) and x[0].max() == 0 and x[:, 0].max() == 0
    rows, cols = np.flatnonzero(x.max(1) > 0.3), np.flatnonzero(x.max(0) > 0.3)
    assert rows[-1] - rows[0] + 1 == 20                  # the long side fills the 20-pixel box
    ys, xs = np.indices(x.shape)
    assert abs((ys * x).sum() / x.sum() - 13.5) <= 0.5 and abs((xs * x).sum() / x.sum() - 13.5) <= 0.5
    with pytest.raises(ImageError, match="blank: no ink found"):
        mnist_style(np.ones((30, 30), np.float32), name="blank")


def test_load_gray_composites_alpha(tmp_path):
    from PIL import Image

    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[2:8, 4:6] = [0, 0, 0, 255]                      # opaque black ink on transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    g = load_gray(tmp_path / "a.png")
    assert g[0, 0] == 1.0 and g[4, 4] == 0.0


def test_onnx_export_matches_numpy(published, tmp_path):
    import onnxruntime as ort

    out = tmp_path / "model.onnx"
    r = cli("models", "export", "champion", "--onnx", str(out), "--home", str(published))
    assert "max |onnxruntime − numpy|" in r.stdout
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.fromfile(published / "raw/mnist/t10k-images-idx3-ubyte", np.uint8, offset=16).reshape(-1, 784)[:500]
    x = (x / np.float32(255)).astype(np.float32)
    got = session.run(None, {"pixels": x})[0]
    want = nn.load(Registry(published).path(1)).predict_proba(x)
    np.testing.assert_allclose(got, want, atol=1e-5)
    ops = {n.op_type for n in __import__("onnx").load(str(out)).graph.node}
    assert {"Gemm", "Relu", "Softmax"} <= ops


def test_idx_input_that_is_not_images_is_named(tmp_path):
    import gzip as gz

    from storage.idx import IDXError, write_idx
    from serving.images import read_idx_images

    write_idx(tmp_path / "labels.idx", np.zeros((4, 28), np.uint8))
    with pytest.raises(IDXError, match=r"labels.idx: expected uint8 images of shape \(n, 28, 28\)"):
        read_idx_images(tmp_path / "labels.idx")
    (tmp_path / "labels.idx.gz").write_bytes(gz.compress((tmp_path / "labels.idx").read_bytes()))
    with pytest.raises(IDXError, match=r"labels.idx.gz: expected uint8 images"):
        read_idx_images(tmp_path / "labels.idx.gz")


@pytest.mark.parametrize("command", [["models", "list"], ["models", "show", "champion"], ["api", "--port", "1"],
                                     ["predict", "x.idx"]])
def test_a_reading_command_never_creates_a_home_that_is_not_there(tmp_path, command):
    """`models`, `predict` and `api` only read a home: one that does not exist is one line, and
    nothing is created (no folder, no banner before the error)."""
    missing = tmp_path / "no" / "home"
    r = cli(*command, "--home", str(missing), check=False)
    assert r.returncode == 1 and not (tmp_path / "no").exists(), r.stdout + r.stderr
    assert (r.stdout + r.stderr).strip().splitlines() == [
        f"digitflow: error: no digitflow home at {missing} (nothing published there yet: `digitflow run --home` "
        "makes one)"]
