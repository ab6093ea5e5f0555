"""`digitflow api` in a real uvicorn subprocess on a random port: predictions agree with
`digitflow predict`, the operational endpoints, the token, following a promotion under load
with zero failed requests, refusing a tampered version, and bad input answered with 4xx."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from storage.atomic import write_json
from storage.registry import Registry
from tests.prefect_helpers import free_port
from tests.test_operate import TEST_LABELS, cli, second_version

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def api(home: Path, *args: str, env: dict | None = None):
    """A `digitflow api` process; yields its base URL once /ready answers 200."""
    import tempfile

    port = free_port()
    log = tempfile.TemporaryFile("w+")  # read after the run (a pipe nobody drains would block the server)
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "api", "--home", str(home), "--port", str(port),
                             "--poll", "0.2", *args], cwd=REPO, env={**os.environ, **(env or {})},
                            stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    headers = {"authorization": f"Bearer {env['DIGITFLOW_API_TOKEN']}"} if env and "DIGITFLOW_API_TOKEN" in env else {}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/ready", headers=headers, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise AssertionError(f"digitflow api did not become ready: {log.read()}")
            time.sleep(0.2)
        yield url
    finally:
        t = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(30)
        log.close()
        assert time.monotonic() - t < 5, "Ctrl-C took more than 5 s"


def digits(mnist_dir: Path, n: int = 20) -> np.ndarray:
    with gzip.open(mnist_dir / "t10k-images-idx3-ubyte.gz") as f:
        f.read(16)
        return np.frombuffer(f.read(n * 784), np.uint8).reshape(n, 28, 28)


def png(image: np.ndarray, size: int = 112) -> bytes:
    """A digit drawn dark on white, upscaled, as a user's PNG would be."""
    out = io.BytesIO()
    Image.fromarray(255 - image).resize((size, size), Image.Resampling.BILINEAR).save(out, "PNG")
    return out.getvalue()


def test_predictions_agree_with_digitflow_predict(published, mnist_dir, tmp_path):
    images = digits(mnist_dir)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"digit{i:02d}.png")
        paths[-1].write_bytes(png(image))
    expected = json.loads(cli("predict", "--home", str(published), "--json", *map(str, paths)).stdout)
    idx = tmp_path / "digits.idx"
    idx.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">III", len(images), 28, 28) + images.tobytes())
    expected_idx = json.loads(cli("predict", "--home", str(published), "--json", str(idx)).stdout)
    with api(published) as url:
        files = [("image", (p.name, p.read_bytes(), "image/png")) for p in paths]
        r = httpx.post(f"{url}/predict", files=files, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        v1 = Registry(published).metadata(1)["weights_sha256"]
        assert body["model"] == {"name": "mnist-mlp", "version": 1, "weights_sha256": v1}
        got = body["predictions"]
        assert [p["label"] for p in got] == [e["digit"] for e in expected]
        assert [max(p["probabilities"]) for p in got] == pytest.approx([e["probability"] for e in expected], abs=1e-5)
        assert all(len(p["probabilities"]) == 10 and sum(p["probabilities"]) == pytest.approx(1, abs=1e-4) for p in got)
        assert sum(p["label"] == t for p, t in zip(got, TEST_LABELS)) >= 18

        # JSON batch of raw MNIST pixels, and one image posted as its own body: the same answers.
        r = httpx.post(f"{url}/predict", json={"pixels": (images.reshape(-1, 784) / 255).tolist()}, timeout=30)
        assert r.status_code == 200, r.text
        assert [p["label"] for p in r.json()["predictions"]] == [e["digit"] for e in expected_idx]
        r = httpx.post(f"{url}/predict", content=paths[0].read_bytes(), headers={"content-type": "image/png"})
        assert r.json()["predictions"][0]["label"] == expected[0]["digit"]
        r = httpx.post(f"{url}/predict", content=images.tobytes(), headers={"content-type": "application/octet-stream"})
        assert [p["label"] for p in r.json()["predictions"]] == [e["digit"] for e in expected_idx]


def test_model_health_ready_metrics(published):
    from prometheus_client.parser import text_string_to_metric_families

    with api(published) as url:
        model = httpx.get(f"{url}/model").json()
        metrics = Registry(published).metrics(1)
        assert model["version"] == 1 and model["alias"] == "champion"
        assert model["metrics"]["test_accuracy"] == metrics["test_accuracy"] and len(model["metrics"]["per_class"]) == 10
        assert model["lineage"]["seed"] == 0 and "train_manifest_sha256" in json.dumps(model["lineage"])
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        assert httpx.get(f"{url}/ready").json()["version"] == 1
        for _ in range(3):
            httpx.post(f"{url}/predict", content=bytes(784 * 2), headers={"content-type": "application/octet-stream"})
        httpx.post(f"{url}/predict", content=b"x", headers={"content-type": "text/plain"})
        text = httpx.get(f"{url}/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("digitflow_api_requests_total", (("endpoint", "predict"), ("status", "200")))] == 3
    assert samples[("digitflow_api_requests_total", (("endpoint", "predict"), ("status", "415")))] == 1
    assert samples[("digitflow_api_images_total", ())] == 6
    assert sum(v for (name, labels), v in samples.items() if name == "digitflow_api_predictions_total") == 6
    assert samples[("digitflow_api_request_seconds_count", (("endpoint", "predict"),))] == 4
    info = {dict(labels)["version"]: v for (name, labels), v in samples.items() if name == "digitflow_api_model_info"}
    assert info == {"1": 1.0}


def test_token_is_required_when_set(published):
    with api(published, env={"DIGITFLOW_API_TOKEN": "s3cret-token"}) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        for path in ("/model", "/ready", "/metrics"):
            r = httpx.get(url + path)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        pixels = {"content": bytes(784), "headers": {"content-type": "application/octet-stream"}}
        assert httpx.post(f"{url}/predict", **pixels).status_code == 401
        pixels["headers"]["authorization"] = "Bearer wrong"
        assert httpx.post(f"{url}/predict", **pixels).status_code == 401
        pixels["headers"]["authorization"] = "Bearer s3cret-token"
        assert httpx.post(f"{url}/predict", **pixels).status_code == 200


def test_follows_a_promotion_under_load_and_refuses_a_tampered_version(published):
    home = str(published)
    v2 = second_version(published)
    answers, failures, stop = [], [], threading.Event()

    with api(published, "--workers", "2") as url:
        def hammer():
            with httpx.Client(timeout=10) as client:
                while not stop.is_set():
                    try:
                        r = client.post(f"{url}/predict", json={"pixels": [[0.0] * 300 + [1.0] * 184 + [0.0] * 300]})
                        if r.status_code != 200:
                            failures.append(r.status_code)
                        else:
                            answers.append(r.json()["model"]["version"])
                    except httpx.HTTPError as e:
                        failures.append(repr(e))
        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)
            cli("models", "promote", str(v2), "--reason", "test", "--home", home)
            promoted_at = time.monotonic()
            while time.monotonic() - promoted_at < 10 and answers[-8:] != [v2] * 8:
                time.sleep(0.1)
            switched = time.monotonic() - promoted_at

            # A third version, changed on disk after publishing, made champion behind the gate's back.
            v3 = second_version(published, accuracy_delta=-0.02, shift=0.02)
            npz = Registry(published).path(v3) / "model.npz"
            npz.chmod(0o644)
            data = bytearray(npz.read_bytes())
            data[len(data) // 2] ^= 0xFF
            npz.write_bytes(bytes(data))
            write_json(Registry(published).root / "aliases.json", {"latest": v3, "champion": v3})
            time.sleep(2.0)
            after = len(answers)
            time.sleep(1.0)
            model = httpx.get(f"{url}/model").json()
            metrics = httpx.get(f"{url}/metrics").text
        finally:
            stop.set()
            for t in threads:
                t.join()
    assert failures == []
    assert switched < 5, f"v{v2} served {switched:.1f} s after the promotion"
    assert answers[0] == 1 and 1 in answers and v2 in answers
    assert set(answers[after:]) == {v2}  # the tampered v3 never answered
    assert v3 not in answers
    assert model["version"] == v2 and f"v{v3}" in model["refused"]
    refused = [line for line in metrics.splitlines() if line.startswith("digitflow_api_swaps_refused_total")]
    assert refused and float(refused[0].split()[-1]) >= 1


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header announces width×height (a decompression bomb's shape), with one tiny IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_bad_input_is_a_clean_4xx_and_the_server_stays_up(published, mnist_dir, tmp_path):
    good = png(digits(mnist_dir, 1)[0])
    with api(published) as url:
        def post(**kw):
            return httpx.post(f"{url}/predict", timeout=30, **kw)

        r = post(content=b"\x00" * (2 << 20), headers={"content-type": "application/octet-stream"})
        assert r.status_code == 413 and r.json()["field"] == "body"
        r = post(files=[("image", ("bomb.png", png_header_only(20000, 20000), "image/png"))])
        assert r.status_code == 413 and "decompression bomb" in r.json()["error"] and r.json()["field"] == "bomb.png"
        r = post(files=[("image", ("big.png", png_header_only(3000, 3000), "image/png"))])  # over --max-pixels
        assert r.status_code == 413 and "3000×3000 pixels exceed the 4,000,000-pixel limit" in r.json()["error"]
        r = post(files=[("image", ("cut.png", good[: len(good) // 2], "image/png"))])
        assert r.status_code == 422 and r.json()["field"] == "cut.png"
        r = post(files=[("image", ("notes.txt", b"this is text, not an image", "image/png"))])
        assert r.status_code == 422 and "not a readable image" in r.json()["error"]
        assert post(content=b"hello", headers={"content-type": "text/plain"}).status_code == 415
        assert post(content=b"").status_code == 415  # no content type at all
        r = post(content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data; boundary=x"})
        assert r.status_code == 422
        cases = [
            (b'{"pixels": [[0.5, 0.5]]}', "pixels[0]"),
            (b'{"pixels": []}', "pixels"),
            (b'{"pixels": [7]}', "pixels[0]"),
            (b'{"images": []}', "pixels"),
            (b'{"pixels": [[0.1]], "extra": 1}', "extra"),
            (b'[1, 2]', "pixels"),
            (b'{"pixels": [[NaN' + b', 0' * 783 + b']]}', "body"),
            (b'{"pixels": [[0' + b', 0' * 4 + b', 2.5' + b', 0' * 778 + b']]}', "pixels[0][5]"),
            (b'{"pixels": [[0' + b', "a"' + b', 0' * 782 + b']]}', "pixels[0][1]"),
            (b'{"pixels": [[0.1, ', "body"),
        ]
        for body, field in cases:
            r = post(content=body, headers={"content-type": "application/json"})
            assert r.status_code == 422 and r.json()["field"] == field, (body[:40], r.text)
        r = post(content=b"\x00" * 785, headers={"content-type": "application/octet-stream"})
        assert r.status_code == 422
        assert httpx.get(f"{url}/health").status_code == 200
        assert post(files=[("image", ("ok.png", good, "image/png"))]).status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
    assert 'status="500"' not in metrics and 'status="422"' in metrics
