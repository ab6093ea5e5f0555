"""The whole retraining pipeline on the real MNIST through the local mirror."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from flows.pipeline import retrain
from storage import DigitflowError
from storage.registry import Registry
from storage.shards import read_split
from tasks.ingest import manifest_ref
from tasks.model import TrainingDiverged, load_split
from tests.prefect_helpers import flow_run_id, newest_run_states, state_names

pytestmark = pytest.mark.usefixtures("prefect_harness")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def home(first_run):
    return first_run[0]


def test_a_finished_flow_run_does_not_wait_for_its_heartbeat_thread(monkeypatch):
    """tasks/prefect_compat.py: a flow run ends without joining its heartbeat thread (Prefect's sync engine
    would wait out the thread's current 1-second sleep, ~2 s of a warm `digitflow run`). The
    thread still starts (it emits the run's first heartbeat) and is left to notice the stop flag.
    Its sleep is held here until the flow run has returned: a join would hold the run 2 s."""
    import threading

    from prefect import flow, flow_engine

    import tasks.prefect_compat

    assert tasks.prefect_compat.HEARTBEAT_JOIN_SKIPPED and flow_engine._send_heartbeats.keywords == {"join_on_exit": False}

    def heartbeat_threads():
        return [t for t in threading.enumerate()
                if any(getattr(a, "__name__", "") == "heartbeat_loop" for a in getattr(t, "_args", ()))]

    earlier = set(heartbeat_threads())  # earlier flow runs' threads may still be winding down
    waiting, release = threading.Event(), threading.Event()

    class HeldSleep:  # flow_engine's ``time``: the new heartbeat thread's sleep waits for ``release``
        def __getattr__(self, name):
            return getattr(time, name)

        def sleep(self, seconds):
            if threading.current_thread() in set(heartbeat_threads()) - earlier:
                waiting.set()
                release.wait(10)
            else:
                time.sleep(seconds)

    monkeypatch.setattr(flow_engine, "time", HeldSleep())

    @flow
    def quick():
        assert waiting.wait(10), "no heartbeat thread reached its sleep"
        return set(heartbeat_threads()) - earlier, time.monotonic()

    try:
        own, body_done = quick()
        tail = time.monotonic() - body_done  # Prefect's join waits up to 2 s for the held thread
        assert len(own) == 1  # its heartbeat thread ran while it did
        assert tail < 1.9 and all(t.is_alive() for t in own), f"the flow run joined its heartbeat thread ({tail:.2f} s)"
    finally:
        release.set()


def test_first_run_publishes_v1(home, first_run):
    summary = first_run[1]
    assert summary.version == 1 and summary.created and summary.status == "promoted"
    assert summary.test_accuracy >= 0.95
    v1 = home / "models" / "mnist-mlp" / "v1"
    assert sorted(p.name for p in v1.iterdir()) == [
        "confusion_matrix.png", "data_checks.json", "drift_reference.json", "learning_curves.png", "lineage.json",
        "metadata.json", "metrics.json", "model.json", "model.npz", "model_card.md", "report.md"]
    metrics = json.loads((v1 / "metrics.json").read_text())
    assert metrics["test_accuracy"] == summary.test_accuracy
    assert len(metrics["confusion_matrix"]) == 10 and all(len(r) == 10 for r in metrics["confusion_matrix"])
    assert sum(map(sum, metrics["confusion_matrix"])) == 10000
    assert [c["support"] for c in metrics["per_class"]] == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert len(metrics["history"]) == 3 and {"train_loss", "val_accuracy"} <= set(metrics["history"][0])
    assert metrics["most_confident_errors"][0]["probability"] >= metrics["most_confident_errors"][-1]["probability"]
    lineage = json.loads((v1 / "lineage.json").read_text())
    manifest = home / "data" / "mnist" / "train" / "manifest.json"
    import hashlib
    assert lineage["train_manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert lineage["seed"] == 0 and lineage["numpy"] == np.__version__
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:  # the run the user started (its link printed), not the publish subflow
        run = client.read_flow_run(lineage["prefect_flow_run_id"])
        assert client.read_flow(run.flow_id).name == "retrain" and run.parent_task_run_id is None
    report = (v1 / "report.md").read_text()
    assert "# mnist-mlp v1" in report and "no champion" in report and "| 9 |" in report
    assert (v1 / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    spec = json.loads((v1 / "model.json").read_text())
    assert spec["layers"] == [{"units": 128, "activation": "relu"}, {"units": 10, "activation": "softmax"}]


def test_numpy_alone_reproduces_test_accuracy(home):
    """Load the version folder with NumPy only (isolated interpreter, no project import)."""
    script = textwrap.dedent("""
        import json, sys
        import numpy as np
        folder, raw = sys.argv[1], sys.argv[2]
        assert not any(m in sys.modules for m in ("nn", "storage", "prefect"))
        spec = json.load(open(folder + "/model.json"))
        w = np.load(folder + "/model.npz", allow_pickle=False)
        x = np.fromfile(raw + "/t10k-images-idx3-ubyte", np.uint8, offset=16).reshape(-1, 784) / 255.0
        y = np.fromfile(raw + "/t10k-labels-idx1-ubyte", np.uint8, offset=8)
        a = (x - spec["preprocessing"]["mean"]) / spec["preprocessing"]["std"]
        for i, layer in enumerate(spec["layers"]):
            a = a @ w[f"W{i}"] + w[f"b{i}"]
            if layer["activation"] == "relu":
                a = np.maximum(a, 0)
        print(json.dumps({"accuracy": float((a.argmax(1) == y).mean())}))
    """)
    out = subprocess.run([sys.executable, "-I", "-c", script, str(home / "models/mnist-mlp/v1"),
                          str(home / "raw/mnist")], capture_output=True, text=True, cwd="/", timeout=120)
    assert out.returncode == 0, out.stderr
    metrics = json.loads((home / "models/mnist-mlp/v1/metrics.json").read_text())
    assert json.loads(out.stdout)["accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-4)


def test_rerun_is_cached_and_creates_nothing(home, mnist_server):
    t = time.perf_counter()
    state = retrain(home=str(home), mirrors=[mnist_server], preset="fast", return_state=True)
    seconds = time.perf_counter() - t
    summary = state.result()
    assert summary.version == 1 and not summary.created
    states = state_names(flow_run_id(state))
    assert {n: s for n, s in states.items() if n.startswith(("train", "evaluate"))} == {
        "train [128], 3 epochs": "Cached", "evaluate " + Registry(home).metadata(1).weights_sha256[:12]: "Cached"}
    assert Registry(home).versions() == [1]
    assert seconds < 30


def test_a_trained_folder_rewritten_with_its_record_is_trained_again_not_a_dead_end(published, mnist_server):
    """model.npz replaced by other weights and training.json rewritten to match: the cache's own
    check passes, but the cached reference's digest does not; the run discards the folder (one
    warning) and trains again, instead of failing on every rerun."""
    import nn

    summary = retrain(home=str(published), mirrors=[mnist_server], preset="fast", seed=11, floor=0.0)
    [folder] = [p for p in (published / "trained").glob("[!.]*") if json.loads((p / "training.json").read_text())
                ["hyperparameters"]["seed"] == 11]
    good = nn.digest(nn.load(folder))
    other = nn.presets.build(nn.presets.get("fast", seed=99), 784, 10)
    nn.save(other, folder)
    record = json.loads((folder / "training.json").read_text())
    (folder / "training.json").write_text(json.dumps({**record, "weights_sha256": nn.digest(other)}))
    again = retrain(home=str(published), mirrors=[mnist_server], preset="fast", seed=11, floor=0.0)
    assert again.version == summary.version and not again.created  # the same weights, trained again
    assert nn.digest(nn.load(folder)) == good


def test_second_model_goes_through_the_gate(published, mnist_server):
    summary = retrain(home=str(published), mirrors=[mnist_server], preset="fast", seed=1)
    reg = Registry(published)
    assert summary.version == 2 and reg.aliases().latest == 2
    v1_acc = reg.metrics(1).test_accuracy
    if summary.test_accuracy >= v1_acc:
        assert summary.status == "promoted" and reg.aliases().champion == 2
    else:
        assert summary.status == "rejected" and reg.aliases().champion == 1
        assert "below the champion's" in summary.reason
    report = (reg.path(2) / "report.md").read_text()
    assert "champion v1" in report


def test_gate_rejects_below_floor_and_keeps_version(published, mnist_server):
    summary = retrain(home=str(published), mirrors=[mnist_server], preset="fast", seed=2, floor=0.999)
    reg = Registry(published)
    assert summary.status == "rejected" and "below the floor 0.9990" in summary.reason
    assert reg.status(summary.version) == "rejected"
    assert reg.aliases().champion != summary.version
    assert reg.path(summary.version).is_dir()


@pytest.mark.parametrize("preset, overrides, message", [
    ("default", {"lr": -0.1}, "lr: Input should be greater than 0"),
    ("default", {"hidden": [0]}, "hidden.0: Input should be greater than or equal to 1"),
    ("nope", {}, "preset: Input should be 'default', 'best', 'balanced' or 'fast'"),
    ("default", {"activation": "swish"}, "activation: Input should be 'relu', 'sigmoid' or 'tanh'"),
    ("default", {"colour": "red"}, "unexpected keyword argument 'colour'"),
    ("default", {"hidden": [16384, 16384]}, "parameters, more than the 50,000,000 allowed"),
])
def test_invalid_hyperparameters_fail_before_any_work(tmp_path, preset, overrides, message):
    """The flow's typed parameters are validated at the boundary (by Prefect, from the
    contract), before the flow body runs; what the types cannot say fails first thing inside."""
    from prefect.exceptions import ParameterBindError, ParameterTypeError

    with pytest.raises((DigitflowError, ParameterTypeError, ParameterBindError)) as e:
        retrain(home=str(tmp_path / "h"), mirrors=["http://127.0.0.1:9/"], preset=preset, **overrides)
    assert message in str(e.value)
    assert not (tmp_path / "h").exists()


def test_divergence_fails_and_publishes_nothing(published, mnist_server):
    before = Registry(published).versions()
    with pytest.raises(TrainingDiverged, match="loss became (nan|inf) at epoch 1"):
        retrain(home=str(published), mirrors=[mnist_server], preset="fast", lr=1e4, seed=3)
    assert Registry(published).versions() == before


def test_corrupt_shard_stops_training(ingested, mnist_server):
    other = ingested
    shard = other / "data/mnist/train/part-00003.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DigitflowError, match="part-00003.parquet: SHA-256 .* does not match the manifest"):
        load_split(manifest_ref(str(other / "data/mnist/train")))  # what training reads: refused
    # The pipeline's ingest step finds the damage and rebuilds the split before training on it.
    summary = retrain(home=str(other), mirrors=[mnist_server], preset="fast", seed=4)
    assert summary.created and read_split(other / "data/mnist/train")[0].shape == (60000, 784)


# ---- the CLI, as a user runs it ----------------------------------------------------

def wait_for_log(home: Path, text: str, proc, timeout: float = 120) -> None:
    """Until ``text`` is in the home's run log (<home>/logs/digitflow.log)."""
    path, deadline = home / "logs" / "digitflow.log", time.monotonic() + timeout
    while not (path.is_file() and text in path.read_text(errors="replace")):
        assert proc.poll() is None and time.monotonic() < deadline, f"never saw {text!r}"
        time.sleep(0.1)


def cli(*args, api_url, **popen):
    env = {**os.environ, "PREFECT_API_URL": api_url}
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def test_cli_kill_9_during_training_then_rerun(ingested, mnist_server, api_url):
    home = ingested
    args = ["run", "--mirror", mnist_server, "--home", str(home), "--preset", "fast", "--epochs", "30"]
    proc = cli(*args, api_url=api_url)
    wait_for_log(home, "epoch 2/30", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert not (home / "models").exists() or Registry(home).versions() == []
    assert not list((home / "trained").glob("*/model.npz"))  # no half-trained model kept
    proc = cli(*args[:-2], "--epochs", "2", "--json", api_url=api_url)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    ingest_states = newest_run_states(api_url, "ingest")  # the whole ingest came from cache
    assert len(ingest_states) == 13 and set(ingest_states.values()) == {"Cached"}
    summary = json.loads(out.strip().splitlines()[-1]) if out.strip().startswith("{") else json.loads(
        [l for l in out.splitlines() if l.startswith("{")][-1])
    assert summary["version"] == 1 and summary["created"]


def test_kill_9_mid_epoch_resumes_at_that_epoch_bit_identical(tmp_path, ingested, api_url):
    """A training killed (kill -9) during epoch k resumes at epoch k on the next run, and its
    final weights equal an uninterrupted run's bit for bit; the checkpoint is then removed."""
    import nn

    import shutil

    args = ["train", "--preset", "fast", "--epochs", "8", "--dropout", "0.2", "--shift", "1", "--seed", "9"]
    straight, killed = tmp_path / "straight", ingested
    shutil.copytree(ingested, straight, symlinks=True)
    proc = cli(*args, "--home", str(straight), api_url=api_url)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    proc = cli(*args, "--home", str(killed), api_url=api_url)
    wait_for_log(killed, "epoch 4/8", proc)  # epoch 3 checkpointed well before epoch 4 ends (a slow host too)
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    checkpoints = list((killed / "trained").glob(".*.checkpoint.npz"))
    assert len(checkpoints) == 1 and not list((killed / "trained").glob("[!.]*"))
    log = killed / "logs" / "digitflow.log"
    before = log.stat().st_size
    proc = cli(*args, "--home", str(killed), api_url=api_url)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    out = log.read_bytes()[before:].decode()
    resumed_at = int(out.split("resumed at epoch ")[1].split()[0])
    assert 4 <= resumed_at <= 8 and "epoch 1/8" not in out
    [a] = list((straight / "trained").glob("[!.]*"))
    [b] = list((killed / "trained").glob("[!.]*"))
    assert nn.digest(nn.load(a)) == nn.digest(nn.load(b))
    assert (a / "model.npz").read_bytes() == (b / "model.npz").read_bytes()
    assert not list((killed / "trained").glob(".*.checkpoint.npz"))  # cleaned once complete


def test_cli_require_promotion_and_one_line_errors(published, mnist_server, api_url):
    proc = cli("run", "--mirror", mnist_server, "--home", str(published), "--preset", "fast", "--seed", "2",
               "--floor", "0.999", "--require-promotion", api_url=api_url)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert out.strip().splitlines()[-1].startswith("digitflow: error: v") and "was not promoted" in out
    assert "gate v" not in out  # the rejection is told once, by the outcome line (a warning in the dashboard)
    assert out.count("is below the floor 0.9990") == 2  # the outcome line, and the error's reason
    proc = cli("run", "--home", str(published), "--lr", "-1", api_url=api_url)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1 and out.strip() == "digitflow: error: lr must be a number in (0, 1e+06], got -1.0"


def test_cli_evaluate_and_train(home, api_url):
    proc = cli("evaluate", "--model", "v1", "--home", str(home), "--json", api_url=api_url)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    metrics = json.loads([l for l in out.splitlines() if l.startswith("{")][-1])
    assert metrics["version"] == 1
    assert metrics["test_accuracy"] == Registry(home).metrics(1).test_accuracy
    proc = cli("evaluate", "--model", "v99", "--home", str(home), api_url=api_url)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "has no version 99" in out.strip().splitlines()[-1]
    proc = cli("train", "--home", str(home), "--preset", "fast", api_url=api_url)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "trained " in out
    assert newest_run_states(api_url, "train") == {"train [128], 3 epochs": "Cached"}  # same as v1's


def test_cli_train_output_can_be_evaluated_and_published(published, api_url):
    """What `digitflow train` prints is a folder the other commands accept."""
    home = str(published)
    proc = cli("train", "--home", home, "--preset", "fast", "--seed", "8", "--epochs", "1", api_url=api_url)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    folder = [l for l in out.splitlines() if l.startswith("trained ")][-1].split()[1]
    assert Path(folder).parent == published / "trained"
    proc = cli("evaluate", "--model", folder, "--home", home, "--json", api_url=api_url)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    metrics = json.loads([l for l in out.splitlines() if l.startswith("{")][-1])
    assert metrics["model"] == folder and 0.9 < metrics["test_accuracy"] < 1
    proc = cli("publish", folder, "--home", home, "--floor", "0.5", "--json", api_url=api_url)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    outcome = json.loads([l for l in out.splitlines() if l.startswith("{")][-1])
    reg = Registry(published)
    # The gate's rule (tolerance 0): promoted exactly when it is at least as accurate as v1, the champion.
    at_least_as_good = metrics["test_accuracy"] >= reg.metrics(1).test_accuracy
    assert outcome["version"] == 2 and outcome["created"]
    assert outcome["status"] == ("promoted" if at_least_as_good else "rejected")
    assert reg.decision(2).status == outcome["status"]
    assert reg.metrics(2).test_accuracy == pytest.approx(metrics["test_accuracy"])
    # A tampered trained folder is refused before any work.
    npz = Path(folder) / "model.npz"
    npz.write_bytes(npz.read_bytes()[:-10])
    proc = cli("publish", folder, "--home", home, api_url=api_url)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "model.npz" in out.strip().splitlines()[-1]


# ---- alerts ------------------------------------------------------------------------

def test_gate_rejection_is_alerted_once(published, mnist_server, receiver, monkeypatch):
    url, got = receiver
    monkeypatch.setenv("TEAM_HOOK", url)  # the parameter names where the URL is, never the URL
    summary = retrain(home=str(published), mirrors=[mnist_server], preset="fast", seed=5,
                      floor=0.999, webhook="env:TEAM_HOOK")
    assert summary.status == "rejected"
    assert len(got) == 1 and got[0]["event"] == "gate_rejected" and got[0]["source"] == "digitflow"
    assert got[0]["version"] == summary.version and "below the floor 0.9990" in got[0]["reason"]
    retrain(home=str(published), mirrors=[mnist_server], preset="fast", seed=5, floor=0.999,
            webhook="env:TEAM_HOOK")
    assert len(got) == 1  # an unchanged rerun decides nothing new, so says nothing new


def test_failed_run_is_alerted_via_env(published, mnist_server, receiver, monkeypatch):
    url, got = receiver
    monkeypatch.setenv("DIGITFLOW_WEBHOOK_URL", url)
    with pytest.raises(TrainingDiverged):
        retrain(home=str(published), mirrors=[mnist_server], preset="fast", lr=1e4, seed=6)
    assert [g["event"] for g in got] == ["flow_run_failed"]
    assert got[0]["flow"] == "retrain" and "loss became" in got[0]["message"]


def test_unreachable_webhook_is_not_fatal(published, mnist_server, monkeypatch):
    monkeypatch.setenv("DIGITFLOW_WEBHOOK_URL", "http://127.0.0.1:9/nowhere")
    summary = retrain(home=str(published), mirrors=[mnist_server], preset="fast", seed=7, floor=0.999)
    assert summary.status == "rejected"


def test_cli_train_and_evaluate_without_data(tmp_path):
    def run(*args):
        r = subprocess.run([sys.executable, "-m", "flows.cli", *args, "--home", str(tmp_path)], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1
        return r.stderr.strip().splitlines()[-1]

    manifest = tmp_path / "data" / "mnist" / "train" / "manifest.json"
    assert run("train") == f"digitflow: error: {manifest}: no manifest (run `digitflow ingest` first)"
    assert run("evaluate", "--model", "1") == "digitflow: error: model 'mnist-mlp' has no version 1 (has none)"


def test_the_prefect_clients_first_retries_of_a_503_are_quick():
    """tasks/prefect_compat.py: a SQLite Prefect server answers 503 when two writers meet; the
    client's first two waits are ~0.25 and ~0.5 s (Prefect's own: ~2 and ~4 s)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import tasks.prefect_compat
    from prefect.client.base import PrefectHttpxSyncClient

    hits = []

    class Busy(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(time.monotonic())
            self.send_response(503 if len(hits) <= 2 else 200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    stub = ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    try:
        with PrefectHttpxSyncClient(base_url=f"http://127.0.0.1:{stub.server_port}/api") as client:
            response = client.get("/hello")
    finally:
        stub.shutdown()
    assert tasks.prefect_compat.QUICK_FIRST_RETRIES
    assert response.status_code == 200 and len(hits) == 3
    first, second = hits[1] - hits[0], hits[2] - hits[1]
    assert 0.15 < first < 1.0 and 0.35 < second < 1.5, (first, second)


def test_the_lineage_waits_for_the_root_run_a_bounded_time_and_falls_back_to_its_own(monkeypatch):
    """The root run is looked up under the registry lock: an API that does not answer (Prefect's
    client would retry it for minutes) or fails costs at most ROOT_RUN_WAIT, and the lineage then
    names the publishing run itself."""
    import threading

    from tasks import model

    monkeypatch.setattr(model, "ROOT_RUN_WAIT", 0.3)
    never = threading.Event()

    class Run:
        id = "own-id"

        def __init__(self, root):
            self._root = root

        @property
        def root_flow_run_id(self):
            return self._root()

    def silent():
        never.wait(30)
        return "too-late"

    def gone():
        raise ConnectionError("the API is gone")

    t = time.monotonic()
    assert model._root_run_id(Run(silent)) == "own-id" and time.monotonic() - t < 2
    assert model._root_run_id(Run(gone)) == "own-id"
    assert model._root_run_id(Run(lambda: "root-id")) == "root-id"
    never.set()
