"""The sweep: a grid trained in parallel on a real Dask cluster, best one through the gate."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.sweep import parse_grid
from storage import DigitflowError
from storage.registry import Registry

REPO = Path(__file__).resolve().parents[1]


def test_parse_grid():
    assert parse_grid(["hidden=128,256", "lr=0.05,0.1"]) == [
        {"hidden": [128], "lr": 0.05}, {"hidden": [128], "lr": 0.1},
        {"hidden": [256], "lr": 0.05}, {"hidden": [256], "lr": 0.1}]
    assert parse_grid(["hidden=512x256,64", "batch-size=64"]) == [
        {"hidden": [512, 256], "batch_size": 64}, {"hidden": [64], "batch_size": 64}]
    with pytest.raises(DigitflowError, match="unknown hyperparameter 'colour'"):
        parse_grid(["colour=red"])
    with pytest.raises(DigitflowError, match="must look like name=v1,v2"):
        parse_grid(["lr"])
    with pytest.raises(DigitflowError, match="cannot read the values as lr"):
        parse_grid(["lr=fast"])


def sweep_cli(*args, api_url):
    return subprocess.run([sys.executable, "-m", "flows.cli", "sweep", *args, "--json"], cwd=REPO,
                          env={**os.environ, "PREFECT_API_URL": api_url}, capture_output=True, text=True, timeout=600)


def test_sweep_on_a_temporary_local_cluster(tmp_path, mnist_server, api_url):
    home = tmp_path / "home"
    r = sweep_cli("--grid", "hidden=32,64", "--epochs", "1", "--home", str(home), "--mirror", mnist_server,
                  api_url=api_url)
    assert r.returncode == 0, r.stdout + r.stderr
    logs = r.stdout + r.stderr
    assert "task runner: DaskTaskRunner on a temporary LocalCluster at tcp://127.0.0.1:" in logs
    assert "with 2 workers" in logs
    result = json.loads([l for l in r.stdout.splitlines() if l.startswith("{")][-1])
    assert [json.loads(row["grid point"]) for row in result["rows"]] == [{"hidden": [32]}, {"hidden": [64]}]
    assert sum(row["best"] for row in result["rows"]) == 1
    best = next(row for row in result["rows"] if row["best"])
    assert best["val_accuracy"] == max(row["val_accuracy"] for row in result["rows"])
    # The best was published and went through the gate (1 epoch of 32 units is below the 0.97 floor).
    reg = Registry(home)
    assert reg.versions() == [result["version"]] == [1]
    assert result["status"] == reg.decision(1)["status"] == "rejected"
    assert reg.metrics(1)["test_accuracy"] == pytest.approx(best["test_accuracy"], abs=1e-4)
    report = Path(result["report"]).read_text()
    assert "| `{\"hidden\": [32]}` |" in report and "the gate rejected it" in report


def test_sweep_on_an_existing_dask_cluster(tmp_path, mnist_server, api_url):
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        home = tmp_path / "home"
        r = sweep_cli("--grid", "hidden=48", "lr=0.05,0.1", "--epochs", "1", "--home", str(home), "--mirror",
                      mnist_server, "--dask-address", cluster.scheduler_address, "--floor", "0.9", api_url=api_url)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"an existing Dask cluster at {cluster.scheduler_address} with 2 workers" in r.stdout + r.stderr
        assert cluster.scheduler.transition_counter > 0  # the training tasks ran on this cluster
    result = json.loads([l for l in r.stdout.splitlines() if l.startswith("{")][-1])
    assert len(result["rows"]) == 2 and result["status"] == "promoted"
    assert Registry(home).aliases()["champion"] == result["version"]


def test_sweep_rejects_bad_values_before_work(tmp_path, api_url):
    r = sweep_cli("--grid", "hidden=0,64", "--home", str(tmp_path / "h"), api_url=api_url)
    assert r.returncode == 1 and "hidden sizes must be positive integers, got [0]" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "h").exists()
