"""The sweep: a grid trained in parallel on a real Dask cluster, best one through the gate."""

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flows.contract import parse_grid
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
    with pytest.raises(DigitflowError, match="cannot read 'fast' as lr"):
        parse_grid(["lr=fast"])


def test_flags_become_typed_overrides_checked_at_once():
    from flows.contract import Overrides, overrides_dict, parse_overrides

    hp = parse_overrides({"hidden": "512x256", "lr": "0.05", "max_norm": "none"})
    assert isinstance(hp, Overrides) and hp.hidden == [512, 256] and hp.lr == 0.05
    assert overrides_dict(hp) == {"hidden": [512, 256], "lr": 0.05, "max_norm": 0}  # none: off (OFF)
    assert overrides_dict(parse_overrides({})) == {}
    with pytest.raises(DigitflowError, match=r"^lr must be a number in \(0, 1e\+06\], got inf$"):
        parse_overrides({"lr": "inf"})
    with pytest.raises(DigitflowError, match="^cannot read 'yes please' as standardize: it takes true or false$"):
        parse_overrides({"standardize": "yes please"})



def test_an_optional_hyperparameter_is_turned_off_across_the_flow_boundary():
    """None already means "the preset's value" in a flow's parameters (an empty Run form field),
    so an optional hyperparameter (None: off in nn/) is turned off by OFF: `--preset best
    --max-norm none` trains without max-norm, as its help says."""
    from flows.contract import OFF, Overrides, _optional, hyperparameters, parse_grid, parse_overrides
    from nn.presets import Hyperparameters

    assert hyperparameters("best").max_norm == 3.5
    assert hyperparameters("best", {"max_norm": None}).max_norm == 3.5  # empty: the preset's
    assert hyperparameters("best", parse_overrides({"max_norm": "none"})).max_norm is None
    assert hyperparameters("best", parse_overrides({"max_norm": "0"})).max_norm is None
    assert hyperparameters("best", Overrides(max_norm=OFF)).max_norm is None  # the Run form, Prefect's CLI
    assert hyperparameters("default", Overrides(patience=OFF, epochs=5)).patience is None
    assert hyperparameters("default", Overrides(patience=4)).patience == 4
    points = parse_grid(["max_norm=none,2"])
    assert [hyperparameters("best", p).max_norm for p in points] == [None, 2.0]
    # The same bits as the preset that has it off: the training id does not change.
    assert hyperparameters("best", {"max_norm": OFF}).to_dict() == {**hyperparameters("best").to_dict(),
                                                                     "max_norm": None}
    for name, (kind, f) in Hyperparameters.fields().items():  # every one says so in its help
        assert ("(none: off)" in f.metadata["help"]) == _optional(kind), name
        if _optional(kind):
            assert "(0 or none: off)" in Overrides.model_fields[name].description
    with pytest.raises(ValueError):
        Overrides(patience=-1)
    with pytest.raises(DigitflowError, match=r"^patience must be an integer in 1..10000, or 0 or none \(off\), got -3$"):
        parse_overrides({"patience": "-3"})
    with pytest.raises(DigitflowError, match=r"unknown hyperparameter\(s\) \['colour'\]"):
        hyperparameters("default", {"colour": OFF})  # one line, as before
    with pytest.raises(DigitflowError, match="^epochs must be an integer in 1..10000, got 0$"):
        parse_overrides({"epochs": "0"})  # OFF is only an optional one's


def test_a_deployment_holds_the_flags_given_and_no_others(tmp_path):
    from flows.cli_schedule import deployment_parameters
    from flows.contract import parse_overrides

    params = deployment_parameters(str(tmp_path), None, "fast", None, parse_overrides({"epochs": "2"}), None)
    assert params == {"home": str(tmp_path), "preset": "fast", "model_name": "mnist-mlp", "epochs": 2}


def sweep_cli(*args, api_url):
    return subprocess.run([sys.executable, "-m", "flows.cli", "sweep", *args, "--json"], cwd=REPO,
                          env={**os.environ, "PREFECT_API_URL": api_url}, capture_output=True, text=True, timeout=600)


def test_sweep_on_a_temporary_local_cluster(ingested, mnist_server, api_url):
    home = ingested
    r = sweep_cli("--grid", "hidden=32,64", "--epochs", "1", "--home", str(home), "--mirror", mnist_server,
                  api_url=api_url)
    assert r.returncode == 0, r.stdout + r.stderr
    logs = (home / "logs" / "digitflow.log").read_text()  # Prefect's log lines: the home's log, not the terminal
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
    assert result["status"] == reg.decision(1).status == "rejected"
    assert reg.metrics(1).test_accuracy == pytest.approx(best["test_accuracy"], abs=1e-4)
    report = Path(result["report"]).read_text()
    assert "| `{\"hidden\": [32]}` |" in report and "the gate rejected it" in report


@pytest.fixture
def dask_cluster(tmp_path):
    """A real cluster started the way users start one: `dask scheduler` and `dask worker`
    processes, the worker in a directory that holds a `storage/` folder (and Dask puts its own
    spill folder `storage/` in its local directory, first on its sys.path)."""
    workdir = tmp_path / "worker-dir"
    (workdir / "storage").mkdir(parents=True)
    with dask_processes(tmp_path, workdir, os.environ) as cluster:
        yield cluster


@contextlib.contextmanager
def dask_processes(scheduler_dir: Path, worker_dir: Path, env: dict):
    """`dask scheduler` + `dask worker --nworkers 2` processes (the worker in ``worker_dir``, with
    ``env``: e.g. another "machine"); yields (address, processes)."""
    import socket
    import time

    bin_dir = Path(sys.executable).parent
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    env = {**env, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    procs = [subprocess.Popen([str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], cwd=scheduler_dir, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)]
    procs.append(subprocess.Popen([str(bin_dir / "dask"), "worker", address, "--nworkers", "2", "--nthreads", "1",
                                   "--no-dashboard"], cwd=worker_dir, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True))
    from distributed import Client

    try:
        deadline = time.monotonic() + 60
        with Client(address, timeout=30) as client:
            while len(client.scheduler_info()["workers"]) < 2:
                assert time.monotonic() < deadline, "the dask workers did not start"
                time.sleep(0.5)
        yield address, procs
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


@pytest.mark.e2e
def test_sweep_on_an_existing_dask_cluster(ingested, mnist_server, api_url, dask_cluster):
    address, _ = dask_cluster
    home = ingested
    r = sweep_cli("--grid", "hidden=48", "lr=0.05,0.1", "--epochs", "1", "--home", str(home), "--mirror",
                  mnist_server, "--dask-address", address, "--floor", "0.9", api_url=api_url)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"an existing Dask cluster at {address} with 2 workers" in (home / "logs" / "digitflow.log").read_text()
    result = json.loads([l for l in r.stdout.splitlines() if l.startswith("{")][-1])
    assert len(result["rows"]) == 2 and result["status"] == "promoted"
    assert Registry(home).aliases().champion == result["version"]


@pytest.mark.e2e
def test_sweep_fails_in_one_line_when_the_workers_die(tmp_path, mnist_server, api_url, dask_cluster):
    import time

    address, (scheduler, worker) = dask_cluster
    home = tmp_path / "home"
    env = {**os.environ, "PREFECT_API_URL": api_url, "DIGITFLOW_WORKERLESS_GRACE": "5"}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "sweep", "--grid", "hidden=64,96", "--epochs", "30",
                             "--home", str(home), "--mirror", mnist_server, "--dask-address", address],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((home / "trained").glob("*")) and not any(home.glob("trained/.*")):
        # wait until training has started on the workers (ingest done, tasks submitted)
        assert time.monotonic() < deadline and proc.poll() is None, "the sweep never started training"
        if (home / "data" / "mnist" / "test" / "manifest.json").exists():
            time.sleep(3)
            break
        time.sleep(0.5)
    os.killpg(worker.pid, signal.SIGKILL)  # the worker processes and their nanny: gone for good
    killed = time.monotonic()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, out + err
    assert time.monotonic() - killed < 60
    last = err.strip().splitlines()[-1]
    assert last.startswith("digitflow: error: ") and ("no worker" in last or "worker died" in last), last
    assert "Traceback" not in err


def test_sweep_rejects_bad_values_before_work(tmp_path, api_url):
    r = sweep_cli("--grid", "hidden=0,64", "--home", str(tmp_path / "h"), api_url=api_url)
    assert r.returncode == 1 and "hidden must be 1 to 16 integers in 1..16384, got [0]" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "h").exists()


def test_the_sweeps_terminal_summary_reads_its_typed_rows():
    from flows.cli import sweep_lines
    from tasks.refs import SweepOutcome, SweepRow

    rows = [SweepRow(grid_point='{"hidden": [32]}', val_accuracy=0.91, test_accuracy=0.9, train_seconds=1.0, best=False),
            SweepRow(grid_point='{"hidden": [64]}', val_accuracy=0.95, test_accuracy=0.94, train_seconds=2.0, best=True)]
    result = SweepOutcome(name="mnist-mlp", version=3, created=True, path="/h/models/mnist-mlp/v3", test_accuracy=0.94,
                          status="promoted", reason="test accuracy 0.9400 ≥ floor 0.9000", state="champion", rows=rows,
                          report="/h/sweeps/x/report.md")
    assert sweep_lines(result) == [
        '{"hidden": [32]}                         val 0.9100  test 0.9000',
        '{"hidden": [64]}                         val 0.9500  test 0.9400  ← best',
        "mnist-mlp v3: promoted — test accuracy 0.9400 ≥ floor 0.9000", "report: /h/sweeps/x/report.md"]
    assert json.loads(result.model_dump_json(by_alias=True))["rows"][1]["grid point"] == '{"hidden": [64]}'
