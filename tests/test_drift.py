"""Drift on served inputs: the window and its statistics (units and properties), the API's
`/drift` separating real test digits from inverted and noise images, and — against a real
Prefect server — the monitor flow's event starting the retraining deployment through the
automation `deploy --retrain-on-drift` made."""

from __future__ import annotations

import gzip
import json
import time

import httpx
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from storage import drift
from storage.drift import Window, check_reference, psi
from tests.test_api import api
from tests.test_dashboard import digitflow


def test_the_window_keeps_the_last_images_only():
    w = Window(size=5)
    x = np.zeros((3, 4), np.float32)
    proba = np.eye(3, dtype=np.float32)
    w.add(x, proba)
    w.add(np.ones((4, 4), np.float32), np.tile(np.eye(3, dtype=np.float32)[:1], (4, 1)))
    values = w.current()
    assert values.shape == (4, 5)
    assert sorted(values[0].tolist()) == [0.0, 1.0, 1.0, 1.0, 1.0]  # the oldest two fell out
    w.add(np.full((12, 4), 0.25, np.float32), np.tile(np.eye(3, dtype=np.float32)[1:2], (12, 1)))
    assert w.current()[0].tolist() == [0.25] * 5 and w.current()[3].tolist() == [1.0] * 5


def test_psi_is_zero_for_the_same_distribution_and_large_for_a_shift():
    same = [0.5, 0.5] + [0.0] * 18
    assert psi(same, same) == 0.0
    assert psi(same, [0.0] * 18 + [0.5, 0.5]) > 10


def test_a_report_judges_only_with_a_reference_and_enough_images():
    rng = np.random.default_rng(0)
    x = (rng.random((300, 16)) < 0.13).astype(np.float32)
    proba = rng.dirichlet(np.ones(3), 300).astype(np.float32)
    ref = drift.reference(x, proba)
    w = Window(size=1000)
    w.add(x[:50], proba[:50])
    assert w.report(ref, 3)["drifted"] is None  # 50 < MIN_IMAGES
    assert w.report(None, 3)["drifted"] is None and w.report(None, 3)["compared"] is False
    w.add(x[50:], proba[50:])
    report = w.report(ref, 3)
    assert report["drifted"] is False and report["window_images"] == 300
    w.add(1 - x, proba)  # inverted images
    report = w.report(ref, 3)
    assert report["drifted"] is True and report["statistics"]["intensity"]["drifted"]
    assert report["statistics"]["intensity"]["psi"] > 1 and report["statistics"]["intensity"]["ks"] > 0.4


@settings(max_examples=80, deadline=None)
@given(doc=st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                        lambda inner: st.lists(inner, max_size=25) | st.dictionaries(
                            st.sampled_from(["images", "bins", "intensity", "ink", "confidence", "label", "x"]),
                            inner, max_size=7), max_leaves=60))
def test_a_hostile_reference_is_refused_or_well_formed(doc):
    try:
        checked = check_reference(doc, 10)
    except ValueError:
        return
    assert checked["bins"] == drift.BINS and all(0 <= s <= 1 for s in checked["intensity"])


@settings(max_examples=60, deadline=None)
@given(batches=st.lists(st.integers(1, 40), min_size=1, max_size=8), size=st.integers(1, 50), seed=st.integers(0, 99))
def test_the_window_holds_exactly_the_most_recent_images(batches, size, seed):
    rng = np.random.default_rng(seed)
    w, seen = Window(size=size), []
    for n in batches:
        x = rng.random((n, 4)).astype(np.float32)
        w.add(x, np.full((n, 2), 0.5, np.float32))
        seen += x.mean(axis=1).tolist()
    assert sorted(w.current()[0].tolist()) == pytest.approx(sorted(seen[-size:]), abs=1e-6)


# ---- the API, the monitor flow and the automation ------------------------------------------------

def test_drift_separates_digits_from_inverted_and_noise_and_retrains(published, mnist_dir, server, tmp_path):
    with gzip.open(mnist_dir / "t10k-images-idx3-ubyte.gz") as f:
        f.read(16)
        digits = np.frombuffer(f.read(600 * 784), np.uint8).reshape(600, 784)

    def post(images: np.ndarray):
        for start in range(0, len(images), 1000):  # bodies under the API's 1 MiB limit
            r = httpx.post(f"{url}/predict", content=images[start:start + 1000].astype(np.uint8).tobytes(),
                           headers={"content-type": "application/octet-stream"}, timeout=30)
            assert r.status_code == 200, r.text

    # The retraining deployment and the automation that runs it on drift, on a real server.
    out = digitflow("deploy", "--pool", "drift-pool", "--name", "on-drift", "--home", str(published),
                    "--retrain-on-drift", url=server).stdout
    assert "automation 'digitflow: retrain mnist-mlp on drift'" in out
    with api(published) as url:
        post(digits)
        steady = httpx.get(f"{url}/drift").json()
        assert steady["model"]["version"] == 1 and steady["window_images"] == 600 and steady["compared"]
        assert steady["drifted"] is False, steady
        assert max(s["psi"] for s in steady["statistics"].values()) < 0.1
        calm = json.loads(digitflow("monitor", "--api", url, "--json", url=server).stdout.strip().splitlines()[-1])
        assert calm["drifted"] == []

        post(255 - digits)  # inverted: half the window
        inverted = httpx.get(f"{url}/drift").json()
        assert inverted["drifted"] is True and inverted["statistics"]["intensity"]["psi"] > 1
        metrics = httpx.get(f"{url}/metrics").text
        assert 'digitflow_api_drift_psi{statistic="intensity"}' in metrics

        post(np.random.default_rng(1).integers(0, 256, (2000, 784)))  # noise: the whole window
        noise = httpx.get(f"{url}/drift").json()
        assert noise["drifted"] is True and noise["statistics"]["ink"]["psi"] > 1
        hot = json.loads(digitflow("monitor", "--api", url, "--json", url=server).stdout.strip().splitlines()[-1])
        assert "ink" in hot["drifted"] and "intensity" in hot["drifted"]

    # The event reached the server and the automation started a run of the retraining deployment.
    import requests

    deadline = time.monotonic() + 90
    while True:  # (the server stores events in batches: the run may come first)
        runs = requests.post(f"{server}/flow_runs/filter", json={
            "deployments": {"name": {"any_": ["on-drift"]}}}, timeout=10).json()
        events = requests.post(f"{server}/events/filter", json={
            "filter": {"event": {"name": ["digitflow.drift.detected"]}}}, timeout=10).json()["events"]
        if (runs and events) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert len(runs) == 1, (runs, events)  # one drift event, one retraining run (the steady check started none)
    assert len(events) == 1 and events[0]["payload"]["version"] == 1
    assert set(events[0]["payload"]["drifted"]) >= {"ink", "intensity"}
