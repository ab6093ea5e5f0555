"""What an operator sees: the pipeline against a real `prefect server start`, read back
through the Prefect client; schedules (serve), work pools (deploy + worker) and triggers."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.prefect_helpers import client_for, flow_runs

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))
pytestmark = pytest.mark.e2e


def env_for(url, **extra):
    env = {**os.environ, "PREFECT_API_URL": url, **extra}
    return env


def digitflow(*args, url, timeout=300, **kw):
    r = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env_for(url), capture_output=True,
                       text=True, timeout=timeout, **kw)
    assert r.returncode == 0, r.stdout + r.stderr
    return r




def task_runs(client, flow_run_id):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + 20
    while True:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        if runs and all(r.state and r.state.is_final() for r in runs) or time.monotonic() > deadline:
            return {r.name: r for r in runs}
        time.sleep(0.3)


def subflow(client, flow_name, parent):
    """The run of ``flow_name`` that is a subflow of ``parent``."""
    return next(r for r in flow_runs(client, flow_name)
                if r.parent_task_run_id and client.read_task_run(r.parent_task_run_id).flow_run_id == parent.id)


def keyed_artifacts(client, *flow_run_ids):
    """The artifacts with a key that these flow runs created."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    return [a for a in client.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=list(flow_run_ids)))) if a.key]


def wait_for_run(client, flow_run_id, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.read_flow_run(flow_run_id)
        if run.state and run.state.is_final():
            return run
        time.sleep(1)
    raise AssertionError(f"flow run {flow_run_id} did not finish in {timeout}s")


def test_operator_sees_runs_retries_cache_and_artifacts(server, faulty, tmp_path):
    faulty.fail("train-labels-idx1-ubyte.gz", "500")  # the mirror fails once
    home = str(tmp_path / "home")
    digitflow("run", "--mirror", faulty.url, "--home", home, "--preset", "fast", url=server)
    with client_for(server) as client:
        parent = flow_runs(client, "retrain")[0]
        assert parent.state.is_completed() and parent.name == "retrain-fast: v1 promoted"
        assert {"digitflow", "dataset:mnist", "preset:fast", "model:mnist-mlp"} <= set(parent.tags)
        runs = task_runs(client, parent.id)
        assert "train [128], 3 epochs" in runs
        # The dashboard's Task Runs tab fails ("No task runs") on a task input that is a subflow's
        # result (input_type "flow_run"): the train task gets plain references.
        train_inputs = runs["train [128], 3 epochs"].task_inputs
        assert not [i for inputs in train_inputs.values() for i in inputs if i.input_type == "flow_run"], train_inputs
        assert not any(ch in r.name for r in [parent, *runs.values()] for ch in "×→")  # the run graph drops them
        tail = subflow(client, "publish", parent)  # evaluate → publish → gate, shared with sweep
        assert tail.state.is_completed() and tail.name == "publish: v1 promoted"
        assert {"digitflow", "preset:fast", "model:mnist-mlp"} <= set(tail.tags)
        runs.update(task_runs(client, tail.id))
        assert "gate v1" in runs
        assert any(n.startswith("evaluate ") for n in runs) and any(n.startswith("publish ") for n in runs)
        assert all(r.state.is_completed() for r in runs.values())
        # Runs and subflows carry the tags, task runs none: each tag would cost every task run a
        # concurrency-slot round trip to the server (tasks/common.py).
        assert not [n for n, r in {**runs, **task_runs(client, subflow(client, "ingest", parent).id)}.items()
                    if " " in n and r.tags]  # our task runs' names have spaces; subflow trackers do not
        ingest_run = flow_runs(client, "ingest")[0]
        assert ingest_run.parent_task_run_id is not None and ingest_run.state.is_completed()
        ingest_tasks = task_runs(client, ingest_run.id)
        retried = ingest_tasks["download train-labels-idx1-ubyte.gz"]
        assert retried.run_count == 2 and retried.state.is_completed()  # the retry is on record
        assert ingest_tasks["download t10k-labels-idx1-ubyte.gz"].run_count == 1

        # This run's (the session's server also holds other tests' runs of mnist-mlp).
        artifacts = {a.key: a for a in keyed_artifacts(client, parent.id, tail.id, ingest_run.id)}
        assert artifacts["mnist-mlp-metrics"].type == "table"
        assert json.loads(artifacts["mnist-mlp-metrics"].data)[0]["class"] == "all"  # overall row first
        report = artifacts["mnist-mlp-report"].data
        assert artifacts["mnist-mlp-report"].type == "markdown" and report.startswith("# mnist-mlp v1\n\n> **Promoted")
        assert "floor 0.9700, and there was no champion" in report.split("\n")[2]  # the gate's why, at the top
        # On the run the user opened (not only its publish subflow), as are the metrics and the folder.
        assert {artifacts[k].flow_run_id for k in ("mnist-mlp-report", "mnist-mlp-metrics", "mnist-mlp-version")} \
            == {parent.id}
        assert report.count("](data:image/png;base64,iVBORw0KGgo") == 2 and "](learning_curves.png)" not in report
        version = artifacts["mnist-mlp-version"].data
        from storage.text import md

        assert artifacts["mnist-mlp-version"].type == "markdown" and f"Folder: {md(home)}/models/mnist-mlp/v1" in version
        assert artifacts["mnist-mlp-training"].type == "progress" and float(artifacts["mnist-mlp-training"].data) == 100.0
        assert "preset fast: 784-128-10, 3 epochs" in artifacts["mnist-mlp-training"].description
        assert {"digitflow", "preset:fast", "model:mnist-mlp"} <= set(ingest_run.tags)  # the subflow too

    # Nothing changed: the rerun's tasks show as Cached, it says so, and adds no artifact versions.
    digitflow("run", "--mirror", faulty.url, "--home", home, "--preset", "fast", url=server)
    with client_for(server) as client:
        parent = flow_runs(client, "retrain")[0]
        assert parent.name == "retrain-fast: v1 unchanged"
        assert keyed_artifacts(client, parent.id, subflow(client, "publish", parent).id,
                               subflow(client, "ingest", parent).id) == []
        runs = task_runs(client, parent.id)
        assert runs["train [128], 3 epochs"].state.name == "Cached"
        tail = task_runs(client, subflow(client, "publish", parent).id)
        assert [r.state.name for n, r in tail.items() if n.startswith("evaluate")] == ["Cached"]
        ingest_tasks = task_runs(client, flow_runs(client, "ingest")[0].id)
        assert {r.state.name for r in ingest_tasks.values()} == {"Cached"} and len(ingest_tasks) == 13


def test_serve_schedules_and_prefect_cli_triggers(server, mnist_server, tmp_path):
    home = str(tmp_path / "home")
    log = open(tmp_path / "serve.log", "w")  # a file, not a pipe nobody drains (a full pipe blocks the runner)
    serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--cron", "0 3 * * *", "--home", home,
                              "--mirror", mnist_server, "--preset", "fast", "--name", "nightly"],
                             cwd=REPO, env=env_for(server), stdout=log, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        with client_for(server) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    deployment = client.read_deployment_by_name("retrain/nightly")
                    break
                except Exception:
                    if time.monotonic() > deadline or serve.poll() is not None:
                        raise
                    time.sleep(0.5)
            assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
            assert deployment.parameters["preset"] == "fast" and deployment.parameters["home"] == home
            schema = deployment.parameter_openapi_schema
            lr = schema["properties"]["lr"]  # the Run form's typed input, one per hyperparameter (empty: the preset's)
            assert {k: lr[k] for k in ("type", "exclusiveMinimum", "maximum")} == {"type": "number",
                                                                                  "exclusiveMinimum": 0.0, "maximum": 1e6}
            assert "anyOf" not in lr and "default" not in lr and "Preset 'default': 0.05" in lr["description"]
            assert schema["properties"]["hidden"]["items"] == {"type": "integer", "minimum": 1, "maximum": 16384}
            assert schema["properties"]["standardize"]["default"] is True
            assert schema["properties"]["preset"]["enum"] == ["default", "best", "balanced", "fast"]
            out = subprocess.run([PREFECT, "deployment", "run", "retrain/nightly", "--param", "preset=fast",
                                  "--param", "seed=2", "--param", "epochs=1", "--param", "model_name=nightly-model"],
                                 env=env_for(server), capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stdout + out.stderr
            bad = subprocess.run([PREFECT, "deployment", "run", "retrain/nightly", "--param", "lr=-1"],
                                 env=env_for(server), capture_output=True, text=True, timeout=60)
            assert bad.returncode != 0 and "lr" in bad.stdout + bad.stderr  # refused: no run is created
            # The run this command created (not the schedule's future runs, which have no start time yet).
            import re

            run_id = re.search(r"UUID: ([0-9a-f-]{36})", out.stdout).group(1)
            run = client.read_flow_run(run_id)
            assert run.deployment_id == deployment.id
            run = wait_for_run(client, run.id)
            assert run.state.is_completed(), run.state
            # Tags come from the parameters the run received, however it was started.
            assert {"digitflow", "preset:fast", "model:nightly-model"} <= set(run.tags)
            assert "preset:default" not in run.tags
            for name in ("ingest", "publish"):
                assert {"digitflow", "preset:fast", "model:nightly-model"} <= set(subflow(client, name, run).tags)
        metrics = json.loads((Path(home) / "models/nightly-model/v1/metrics.json").read_text())
        assert len(metrics["history"]) == 1  # epochs=1 from the Run parameters
        assert (Path(home) / "models/nightly-model/v1/model.npz").is_file()
    finally:
        os.killpg(serve.pid, signal.SIGINT)
        serve.wait(30)
        log.close()
    # Ctrl-C on a serve with no run in flight: one line, and no word of half-written work or reruns.
    assert serve.returncode == 130
    assert (tmp_path / "serve.log").read_text().rstrip().splitlines()[-1] == \
        "digitflow: interrupted by Ctrl-C (SIGINT): digitflow serve stopped"


def test_deploy_to_process_pool_and_worker_runs_it(server, mnist_server, tmp_path):
    home = str(tmp_path / "home")
    r = digitflow("deploy", "--pool", "digitflow-test", "--home", home, "--mirror", mnist_server,
                  "--preset", "fast", "--cron", "30 2 * * *", url=server)
    assert "deployment retrain/workers" in r.stdout
    with client_for(server) as client:
        deployment = client.read_deployment_by_name("retrain/workers")
        assert deployment.work_pool_name == "digitflow-test"
        assert [s.schedule.cron for s in deployment.schedules] == ["30 2 * * *"]
        assert client.read_work_pool("digitflow-test").type == "process"
        flow_run = client.create_flow_run_from_deployment(deployment.id)
    worker = subprocess.run([PREFECT, "worker", "start", "--pool", "digitflow-test", "--run-once"],
                            env=env_for(server), capture_output=True, text=True, timeout=300)
    assert worker.returncode == 0, worker.stdout + worker.stderr
    with client_for(server) as client:
        assert wait_for_run(client, flow_run.id).state.is_completed()
    assert (Path(home) / "models/mnist-mlp/v1/metrics.json").is_file()


def test_bad_cron_is_one_line(server):
    r = subprocess.run([sys.executable, "-m", "flows.cli", "serve", "--cron", "61 3 * * *"], cwd=REPO,
                       env=env_for(server), capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip() == "digitflow: error: --cron '61 3 * * *' is not a valid cron expression"


def test_automations_alert_failures_and_rejections(server, mnist_server, tmp_path, receiver):
    """`digitflow alerts install` makes the server itself POST to a receiver on a failed run
    and on a gate rejection (Prefect automations + a webhook notification block)."""
    hook, got = receiver
    r = digitflow("alerts", "install", "--webhook", hook, url=server)
    assert r.stdout.count("automation ") == 2
    home = str(tmp_path / "home")
    failed = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--home", home, "--mirror", mnist_server,
                             "--preset", "fast", "--lr", "10000"], cwd=REPO, env=env_for(server),
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1
    digitflow("run", "--home", home, "--mirror", mnist_server, "--preset", "fast", "--floor", "0.999", url=server)
    deadline = time.monotonic() + 60
    while len(got) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    subjects = sorted(g["subject"] for g in got)
    assert subjects == ["digitflow model rejected", "digitflow run failed"], got
    bodies = {g["subject"]: g["body"] for g in got}
    assert "training diverged" in bodies["digitflow run failed"]
    assert "mnist-mlp v1 was rejected: test accuracy" in bodies["digitflow model rejected"]
