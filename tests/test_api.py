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
        v1 = Registry(published).metadata(1).weights_sha256
        assert body["model"] == {"name": "mnist-mlp", "version": 1, "weights_sha256": v1}
        got = body["predictions"]
        assert [p["label"] for p in got] == [e["digit"] for e in expected]
        assert [max(p["probabilities"]) for p in got] == pytest.approx([e["probability"] for e in expected], abs=1e-5)
        assert all(len(p["probabilities"]) == 10 and sum(p["probabilities"]) == pytest.approx(1, abs=1e-4) for p in got)
        assert sum(p["label"] == t for p, t in zip(got, TEST_LABELS)) >= 18
        card = httpx.get(f"{url}/model/card", timeout=30)  # the served version's card, decisions as they are now
        assert card.status_code == 200 and card.headers["content-type"] == "text/markdown; charset=utf-8"
        assert card.text.startswith("# Model card: mnist-mlp v1\n") and "- **Now:** Promoted to champion by gate" in card.text

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
        assert model["metrics"]["test_accuracy"] == metrics.test_accuracy and len(model["metrics"]["per_class"]) == 10
        assert model["lineage"]["seed"] == 0 and "train_manifest_sha256" in json.dumps(model["lineage"])
        from serving.app import _models

        info = _models()[3].model_validate(model)  # the answer is what the OpenAPI schema says: typed, bounded
        assert info.metrics.test_accuracy == metrics.test_accuracy and info.lineage.seed == 0
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
            while time.monotonic() - promoted_at < 10 and answers[-40:] != [v2] * 40:  # every connection (4, on either worker)
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


# ---- the API's body handling, hardened (README threat table) --------------------------------

def app_client(home: Path, **settings):
    """The app in this process (no subprocess needed): an httpx client over ASGI, lifespan run."""
    from starlette.testclient import TestClient

    from serving.app import ApiSettings, create_app

    return TestClient(create_app(ApiSettings(home=str(home), poll=0.05, **settings)))


def png_of(image: np.ndarray, mode: str = "L", size: int = 112) -> bytes:
    """A digit drawn dark on white at ``size``×``size``, saved in PIL ``mode`` (I;16: 16-bit)."""
    out = io.BytesIO()
    light = Image.fromarray(255 - image).resize((size, size), Image.Resampling.BILINEAR)
    if mode == "I;16":
        light = Image.fromarray(np.asarray(light, np.uint16) * 257)
    else:
        light = light.convert(mode)
    light.save(out, "PNG")
    return out.getvalue()


def test_a_16_bit_png_is_read_at_its_own_depth(published, mnist_dir):
    """A 16-bit PNG of a clear 7 (convert("L") clipped it: predicted 8) answers as the 8-bit one."""
    seven = digits(mnist_dir, 1)[0]  # the first test image is a 7
    with app_client(published) as client:
        labels = [client.post("/predict", files=[("image", ("d.png", png_of(seven, mode), "image/png"))]).json()
                  ["predictions"][0]["label"] for mode in ("L", "I;16", "RGB", "RGBA", "P", "1")]
    assert labels[:2] == [7, 7] and labels[2:5] == [7, 7, 7]


def test_every_status_is_counted_and_nested_or_odd_json_is_a_422(published):
    with app_client(published) as client:
        for body in (b'{"pixels": [[[0.1]]]}', b'{"pixels": [[' + b'[0.1], ' * 783 + b'[0.1]]]}',
                     b'{"pixels": [[true' + b', 0' * 783 + b']]}', b'{"pixels": [[null' + b', 0' * 783 + b']]}',
                     b'{"pixels": [[{}' + b', 0' * 783 + b']]}', b'{"pixels": [[1e400' + b', 0' * 783 + b']]}',
                     b'[' * 5000 + b']' * 5000, b'{"pixels": ' + b'[' * 100 + b']' * 100 + b'}'):
            r = client.post("/predict", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 422 and set(r.json()) == {"error", "field"}, (body[:40], r.text)
        # A bug (simulated): answered 500 as JSON without a traceback, and counted.
        client.app.state.follower.served = client.app.state.follower.served._replace(net=None)
        r = client.post("/predict", content=bytes(784), headers={"content-type": "application/octet-stream"})
        assert r.status_code == 500 and r.json() == {"error": "internal error", "field": None}
        text = client.get("/metrics").text
    assert 'digitflow_api_requests_total{endpoint="predict",status="500"} 1.0' in text
    assert 'digitflow_api_requests_total{endpoint="predict",status="422"} 8.0' in text


def test_decoded_pixels_are_bounded_per_request_before_decoding(published):
    """150 tiny PNGs each declaring 2000×2000 pixels (1 MiB in all): refused from their headers."""
    many = [("image", (f"p{i}.png", png_header_only(2000, 2000), "image/png")) for i in range(150)]
    with app_client(published) as client:
        t = time.monotonic()
        r = client.post("/predict", files=many)
        assert r.status_code == 413 and "pixels in all" in r.json()["error"] and time.monotonic() - t < 2
        assert client.get("/health").status_code == 200


def test_decoding_runs_off_the_event_loop(published, mnist_dir, monkeypatch):
    """While a request's large images decode, /health answers: the decode is held in its thread
    until /health has answered (a timer lets it go after 20 s so a broken app cannot hang the test),
    so a decode on the event loop would hold /health until the timer and fail. No wall-clock race."""
    import serving.app as app_module

    entered, released = threading.Event(), threading.Event()
    decode = app_module.decode_images

    def held(opened):
        entered.set()
        released.wait(60)
        return decode(opened)

    monkeypatch.setattr(app_module, "decode_images", held)
    big = png(digits(mnist_dir, 1)[0], size=1900)  # 3.6 M pixels, under max_pixels
    with app_client(published, max_request_pixels=80_000_000) as client:
        answers = []
        post = threading.Thread(target=lambda: answers.append(client.post(
            "/predict", files=[("image", (f"{i}.png", big, "image/png")) for i in range(4)])))
        post.start()
        assert entered.wait(60), "the request never reached decoding"
        timer = threading.Timer(20, released.set)
        timer.start()
        health = client.get("/health")
        answered_while_decoding = not released.is_set()
        released.set()
        timer.cancel()
        post.join(60)
    assert health.status_code == 200 and answered_while_decoding
    assert [a.status_code for a in answers] == [200] and len(answers[0].json()["predictions"]) == 4


def test_a_version_with_damaged_files_is_refused_and_the_last_verified_keeps_serving(published, tmp_path):
    v2 = second_version(published)
    lineage = Registry(published).path(v2) / "lineage.json"
    lineage.write_text("[1, 2")  # damaged
    with app_client(published) as client:  # serving v1; then v2, damaged, is made champion
        assert client.get("/model").json()["version"] == 1
        write_json(Registry(published).root / "aliases.json", {"latest": v2, "champion": v2})
        # The registry itself does not count a damaged version as champion: its aliases are
        # worked out from the intact versions, and the API stays on v1 (polled every 0.05 s).
        assert Registry(published).status(v2) == "damaged: lineage.json is not valid JSON (JSONDecodeError)"
        assert Registry(published).aliases().champion == 1
        time.sleep(0.5)
        model = client.get("/model").json()
        assert model["version"] == 1 and model["refused"] == {}
        assert client.post("/predict", content=bytes(784), headers={"content-type": "application/octet-stream"}
                           ).json()["model"]["version"] == 1
    # A restarted API whose champion is that version does not exit: it answers 503 until a good one.
    with app_client(published, model=f"v{v2}") as client:
        assert client.get("/ready").status_code == 503 and client.get("/health").status_code == 200
        assert "lineage.json is not valid JSON" in client.app.state.follower.refused[v2]
    # A class list that disagrees with the network's outputs is refused too.
    v3 = second_version(published)
    lineage = Registry(published).path(v3) / "lineage.json"
    lineage.write_text(json.dumps({"dataset": {"classes": ["a", "b", "c"]}}))
    with app_client(published, model=f"v{v3}") as client:
        assert client.get("/ready").status_code == 503
        assert "3 class names do not match the network's 10 outputs" in client.app.state.follower.refused[v3]


def test_raw_pixels_are_divided_by_255_as_training_does(published):
    from serving.app import raw_pixels
    from storage.idx import pixels01

    every = np.arange(256, dtype=np.uint8).repeat(4)[:784]
    assert np.array_equal(raw_pixels(every.tobytes(), 10), pixels01(every)[None])


def test_bearer_scheme_is_case_insensitive_and_redirects_never_echo_the_host(published):
    with app_client(published, token="s3cret") as client:
        for scheme in ("Bearer", "bearer", "BEARER"):
            assert client.get("/ready", headers={"authorization": f"{scheme} s3cret"}).status_code == 200
        assert client.get("/ready", headers={"authorization": "Basic s3cret"}).status_code == 401
        for path in ("/predict/", "/model/", "/ready/"):
            r = client.get(path, headers={"host": "evil.example"}, follow_redirects=False)
            assert "evil.example" not in r.headers.get("location", "") and r.status_code in (401, 404, 405)
        assert client.get("/favicon.ico").headers["content-type"] == "image/svg+xml"


def test_a_port_in_use_or_an_address_not_here_is_one_line_before_serving_is_announced(published):
    """Another server on the port (the README's mirror, say): one line, exit 1, and no "serving"
    line before it (was uvicorn's "[Errno 98] ... address already in use" after it, exit 3)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # ::ffff:127.0.0.1 binds as one socket (uvicorn's supervisor, 2 workers) but not v6-only
        # (asyncio's create_server, 1 worker): each is checked as it will be bound.
        for host, workers, why in (("127.0.0.1", 1, "Address already in use"), ("192.0.2.1", 1, "Cannot assign requested address"),
                                   ("no-such-host.invalid", 1, ""), ("::ffff:127.0.0.1", 1, "Invalid argument"),
                                   ("127.0.0.1", 2, "Address already in use"), ("ab\udcff", 1, "")):
            r = subprocess.run([sys.executable, "-m", "flows.cli", "api", "--home", str(published), "--host", host,
                                "--port", str(port), "--workers", str(workers)], cwd=REPO, capture_output=True,
                               timeout=120)
            err = r.stderr.decode("utf-8", "replace")
            assert r.returncode == 1 and r.stdout == b"", err
            shown = host if host.isprintable() and host.isascii() else "ab"
            assert err.startswith(f"digitflow: error: cannot listen on {shown}"), err
            assert f" port {port}: {why}" in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("localhost", True),
                                            ("::ffff:127.0.0.1", True), ("0:0:0:0:0:0:0:1", True), ("0.0.0.0", False),
                                            ("::", False), ("127.evil.example", False), ("10.0.0.1", False), ("", False)])
def test_only_a_loopback_address_counts_as_this_machine_only(host, loopback):
    from serving.app import is_loopback

    assert is_loopback(host) is loopback


def test_listening_beyond_this_machine_without_a_token_warns(published):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "api", "--home", str(published), "--host", "0.0.0.0",
                             "--port", str(port)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert "warning: listening on 0.0.0.0 without a token" in err
    assert "a rerun resumes from the cached work" not in err  # a server's shutdown says nothing of reruns


def test_only_a_digit_or_two_is_prepared_on_the_event_loop(published, mnist_dir, monkeypatch):
    """Many tiny images (2,000 GIFs of 2×2 pixels declare only 8,000 pixels; 10,000 fit in the
    1-MiB body) are parsed, opened and decoded in a worker thread, like any body over 64 KiB or
    more than 4 images; one 112×112 PNG is prepared inline. Asserted on where the work runs, not
    on time."""
    import asyncio

    import serving.app as app_module

    hopped = []
    real = asyncio.to_thread

    async def to_thread(fn, *args, **kwargs):
        if fn.__name__ in ("request_images", "decode_images"):  # (the follower's polls hop too)
            hopped.append(fn.__name__)
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(app_module.asyncio, "to_thread", to_thread)
    tiny = io.BytesIO()
    Image.fromarray(np.eye(2, dtype=np.uint8) * 255).save(tiny, "GIF")
    with app_client(published) as client:
        hopped.clear()
        r = client.post("/predict", files=[("image", ("d.png", png(digits(mnist_dir, 1)[0]), "image/png"))])
        assert r.status_code == 200 and hopped == []
        body = b"".join(b"--B\r\nContent-Disposition: form-data; filename=a\r\n\r\n" + tiny.getvalue()
                        + b"\r\n" for _ in range(2_000)) + b"--B--\r\n"
        assert 64 << 10 < len(body) < 1 << 20
        hopped.clear()
        r = client.post("/predict", content=body, headers={"content-type": "multipart/form-data; boundary=B"})
        assert r.status_code == 200 and len(r.json()["predictions"]) == 2_000 and hopped == ["request_images"]
        hopped.clear()
        five = [("image", (f"d{i}.png", png(digits(mnist_dir, 1)[0], size=28), "image/png")) for i in range(5)]
        r = client.post("/predict", files=five)
        assert r.status_code == 200 and hopped == ["decode_images"]  # small body, but more than 4 images


def test_a_client_gone_mid_body_is_no_500_and_a_padded_token_still_works(published):
    """A body cut short by the client is counted as the client's (400), never as a 500 with a
    traceback in the log; a token read from a file keeps no trailing newline."""
    from starlette.requests import ClientDisconnect

    async def gone(self):
        yield b"abc"
        raise ClientDisconnect()

    with app_client(published, token="s3cret\n") as client:
        assert client.get("/model", headers={"authorization": "Bearer s3cret"}).status_code == 200
        import starlette.requests

        original = starlette.requests.Request.stream
        starlette.requests.Request.stream = gone
        try:
            r = client.post("/predict", content=b"abcdefghij", headers={"authorization": "Bearer s3cret",
                                                                       "content-type": "application/octet-stream"})
        finally:
            starlette.requests.Request.stream = original
        assert r.status_code == 400 and r.json()["field"] == "body"
        metrics = client.get("/metrics", headers={"authorization": "Bearer s3cret"}).text
        assert 'status="500"' not in metrics
    from serving.app import ApiSettings
    from storage import DigitflowError
    from storage.settings import checked

    with pytest.raises(DigitflowError, match=r"^--token: is empty"):
        checked(ApiSettings, home=str(published), token=" \n")
