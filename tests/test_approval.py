"""A person in the loop, against real Prefect: a version the gate would promote waits (its publish
run Paused with an input form); it is approved through the Prefect API exactly as the dashboard's
Resume form does, or from the CLI; a rejection and a timeout leave the champion unchanged; the
answer is recorded with the decision and shown on the card."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import nn
from storage.atomic import read_json, write_json
from storage.registry import Registry
from tests.test_operate import cli

REPO = Path(__file__).resolve().parents[1]


def candidate(home: Path, folder: Path, shift: float) -> Path:
    """A trained folder of v1's network with one weight moved (a genuinely new version that
    scores about the same), as `digitflow train` leaves one."""
    reg = Registry(home)
    model = nn.load(reg.path(1))
    model.layers[0].params["W"][0, 0] += shift
    training = read_json(reg.path(1) / "metadata.json")
    folder.mkdir(parents=True)
    nn.save(model, folder)
    write_json(folder / "training.json", {
        "history": [], "hyperparameters": training["hyperparameters"], "weights_sha256": nn.digest(model),
        "train_manifest_sha256": training["lineage"]["train_manifest_sha256"]})
    return folder


def wait_for_paused(client, version: int, timeout: float = 60.0):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[f"approve:mnist-mlp:v{version}"])))
        paused = [r for r in runs if r.state and r.state.is_paused()]
        if paused:
            return paused[0]
        time.sleep(0.3)
    raise AssertionError(f"no run of v{version} paused within {timeout} s")


def publish_in_thread(folder: Path, home: Path, **options):
    from flows.pipeline import publish_trained
    from tasks.model import trained_ref

    out: dict = {}

    def work():
        try:
            out["outcome"] = publish_trained(trained_ref(folder), home=str(home), tolerance=1.0, floor=0.0,
                                             approval="required", **options)
        except BaseException as e:  # noqa: BLE001 (reported by the test)
            out["error"] = e

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread, out


def test_approved_through_the_dashboards_form_then_rejected_then_timed_out(published, tmp_path, prefect_harness):
    from prefect.client.orchestration import get_client

    registry = Registry(published)
    thread, out = publish_in_thread(candidate(published, tmp_path / "c2", 1e-3), published, approval_timeout=300)
    with get_client(sync_client=True) as client:
        run = wait_for_paused(client, 2)
        # The form the dashboard shows is the schema the run saved for its input.
        schema = client.read_flow_run_input(run.id, f"paused-{run.state.state_details.pause_key}-schema")
        assert set(json.loads(schema)["properties"]) >= {"approve", "reason", "by"}
        assert registry.aliases().champion == 1 and registry.decision(2) is None  # waiting: nothing moved
        # An invalid answer is refused by the server, the run keeps waiting.
        bad = client.resume_flow_run(run.id, run_input={"approve": True, "reason": "", "by": "ana"})
        assert bad.status.value == "REJECT"
        # What the dashboard's Resume form posts: POST /flow_runs/{id}/resume {"run_input": {...}}.
        ok = client.resume_flow_run(run.id, run_input={"approve": True, "reason": "checked the confusions",
                                                       "by": "ana"})
        assert ok.status.value == "ACCEPT"
    thread.join(120)
    assert "error" not in out, out.get("error")
    assert out["outcome"].status == "promoted" and registry.aliases().champion == 2
    decision = registry.decision(2)
    assert decision.by == "ana" and decision.approval.reason == "checked the confusions"
    assert decision.reason.endswith("; approved by ana: checked the confusions")
    assert "- **Now:** Promoted to champion by ana at " in cli("models", "card", "2", "--home", str(published)).stdout

    # Rejected in the form: the champion stays.
    thread, out = publish_in_thread(candidate(published, tmp_path / "c3", 2e-3), published, approval_timeout=300)
    with get_client(sync_client=True) as client:
        run = wait_for_paused(client, 3)
        client.resume_flow_run(run.id, run_input={"approve": False, "reason": "not this week", "by": "bo"})
    thread.join(120)
    assert out["outcome"].status == "rejected" and registry.aliases().champion == 2
    assert registry.decision(3).reason.startswith("rejected by bo: not this week (the gate alone would have")

    # Nobody answers: rejected at the timeout, the champion stays, the run completes.
    t0 = time.monotonic()
    thread, out = publish_in_thread(candidate(published, tmp_path / "c4", 3e-3), published, approval_timeout=3)
    thread.join(120)
    assert "error" not in out, out.get("error")
    assert out["outcome"].status == "rejected" and registry.aliases().champion == 2
    assert registry.decision(4).by == "timeout" and registry.decision(4).reason.startswith(
        "no approval within 3 s")
    assert time.monotonic() - t0 < 60


def test_approved_from_the_cli(published, tmp_path):
    """`digitflow publish --approval required` waits; `digitflow models approve` answers it (both on
    digitflow's local Prefect server, as a user's would be)."""
    folder = candidate(published, tmp_path / "c2", 1e-3)
    log = open(tmp_path / "publish.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "publish", str(folder), "--home", str(published),
                             "--tolerance", "1", "--floor", "0", "--approval", "required", "--json"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    try:
        deadline = time.monotonic() + 120
        while "awaits approval" not in (tmp_path / "publish.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "publish.log").read_text()
            time.sleep(0.5)
        assert Registry(published).aliases().champion == 1
        wrong = cli("models", "approve", "1", "--reason", "x", "--home", str(published), check=False)
        assert wrong.returncode == 1 and wrong.stderr.startswith(
            "digitflow: error: no run is waiting for approval of mnist-mlp v1"), wrong.stderr
        said = cli("models", "approve", "2", "--reason", "fine by me", "--by", "cy", "--home", str(published)).stdout
        assert said.startswith("mnist-mlp v2: approved;")
        stdout, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, (tmp_path / "publish.log").read_text()
    assert json.loads(stdout.strip().splitlines()[-1])["status"] == "promoted"
    assert Registry(published).aliases().champion == 2 and Registry(published).decision(2).by == "cy"
    rows = json.loads(cli("models", "list", "--home", str(published), "--json").stdout)
    assert rows[1]["reason"].endswith("approved by cy: fine by me")


def test_an_answer_is_checked_where_it_enters():
    from pydantic import ValidationError

    from flows.approval import Approval

    for bad in ({"approve": True, "reason": "ok\n# forged", "by": "ana"}, {"approve": True, "reason": "x" * 501,
                                                                          "by": "ana"},
                {"approve": True, "reason": "ok", "by": ""}, {"approve": "yes please", "reason": "ok", "by": "a"}):
        with pytest.raises(ValidationError):
            Approval(**bad)
    assert Approval(approve=True, reason="  fine  ", by="ana").reason == "fine"
