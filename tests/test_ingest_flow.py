"""The real ingest flow on the real MNIST, served from a local mirror; and its failures."""

import os
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest

from flows.ingest import ingest
from storage.download import DownloadError
from storage.shards import read_split
from tests.prefect_helpers import flow_run_id, newest_run_states, state_names, task_runs

pytestmark = pytest.mark.usefixtures("prefect_harness")

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def run(home, mirrors, **kw):
    state = ingest(home=str(home), mirrors=mirrors, retry_delay=0.05, return_state=True, **kw)
    return state, state_names(flow_run_id(state), expect=13)  # 4 downloads, 4 verifies, 2 parses, 1 data check, 2 shards


def test_real_mnist_end_to_end_then_cached(tmp_path, mnist_server):
    home = tmp_path / "home"
    state, states = run(home, [mnist_server])
    refs = state.result()
    assert state.is_completed() and len(states) == 13, sorted(states)
    # parse is keyed on content alone, so another test's run of the same files may serve it
    assert {n: s for n, s in states.items() if not n.startswith("parse")} == dict.fromkeys(
        [n for n in states if not n.startswith("parse")], "Completed")
    assert refs["train"].rows == 60000 and refs["test"].rows == 10000

    data = home / "data" / "mnist"
    for split, rows, counts, first in [("train", 60000, TRAIN_COUNTS, [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]),
                                       ("test", 10000, TEST_COUNTS, [7, 2, 1, 0, 4, 1, 4, 9, 5, 9])]:
        glob = f"{data / split}/*.parquet"
        assert duckdb.sql(f"SELECT count(*), count(DISTINCT index) FROM '{glob}'").fetchall()[0] == (rows, rows)
        got = duckdb.sql(f"SELECT label, count(*) FROM '{glob}' GROUP BY label ORDER BY label").fetchall()
        assert [c for _, c in got] == counts
        got = duckdb.sql(f"SELECT label FROM '{glob}' ORDER BY index LIMIT 10").fetchall()
        assert [l for (l,) in got] == first
        assert duckdb.sql(f"SELECT min(len(image)), max(len(image)) FROM '{glob}'").fetchall()[0] == (784, 784)
    train, _, _ = read_split(data / "train")
    test, _, _ = read_split(data / "test")
    assert abs(train.mean(dtype=np.float64) - 0.1306605) < 1e-6
    assert abs(train.std(dtype=np.float64) - 0.3081078) < 1e-6
    assert abs(test.mean(dtype=np.float64) - 0.1325146) < 1e-6
    assert abs(test.std(dtype=np.float64) - 0.3104802) < 1e-6
    assert train.min() == 0.0 and train.max() == 1.0

    # Nothing changed: every task is Cached and nothing is rewritten.
    mtimes = {p: p.stat().st_mtime_ns for p in data.rglob("*")}
    state, states = run(home, [mnist_server])
    assert state.result() == refs
    assert set(states.values()) == {"Cached"}, states
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*")} == mtimes

    # A new shard size invalidates the shards only.
    state, states = run(home, [mnist_server], rows_per_shard=25000)
    assert {n: s for n, s in states.items() if s != "Cached"} == {"shard train": "Completed", "shard test": "Completed"}
    assert len(list((data / "train").glob("*.parquet"))) == 3

    # Back to the old size: the cached result would describe files that are gone; it is refreshed.
    state, states = run(home, [mnist_server])
    assert len(list((data / "train").glob("*.parquet"))) == 6
    assert state.result()["train"] == refs["train"]

    # A deleted raw file is fetched again, and only what depends on it reruns.
    (home / "raw" / "mnist" / "t10k-labels-idx1-ubyte").unlink()
    state, states = run(home, [mnist_server])
    assert states["download t10k-labels-idx1-ubyte.gz"] == "Completed"
    assert states["download train-images-idx3-ubyte.gz"] == "Cached"
    assert states["shard train"] == "Cached"


def test_500_then_success_is_retried_by_prefect(tmp_path, faulty):
    faulty.fail("train-labels-idx1-ubyte.gz", "500", "503")
    state, states = run(tmp_path, [faulty.url])
    assert state.is_completed()
    assert {n: s for n, s in states.items() if n.startswith(("download", "shard"))} == dict.fromkeys(
        [n for n in states if n.startswith(("download", "shard"))], "Completed")
    download = task_runs(flow_run_id(state))["download train-labels-idx1-ubyte.gz"]
    assert download.run_count == 3  # two retries, recorded by the server
    assert [b for n, b in faulty.requests if n == "train-labels-idx1-ubyte.gz"] == ["500", "503", "ok"]


def test_bad_mirror_then_good_mirror(tmp_path, faulty, mnist_server):
    faulty.default = "wrong"
    state, _ = run(tmp_path, [faulty.url, mnist_server])
    assert state.is_completed()
    assert {b for _, b in faulty.requests} == {"wrong"} and len(faulty.requests) == 4
    assert read_split(tmp_path / "data" / "mnist" / "test")[0].shape == (10000, 784)


@pytest.mark.parametrize("behaviour", ["wrong", "404", "truncate"])
def test_only_bad_mirrors_fail_and_write_no_shard(tmp_path, faulty, behaviour):
    faulty.default = behaviour
    with pytest.raises(DownloadError, match="no mirror served verified bytes"):
        ingest(home=str(tmp_path), mirrors=[faulty.url], retries=1, retry_delay=0.05)
    assert not (tmp_path / "data").exists()
    assert not list((tmp_path / "raw" / "mnist").glob("*-ubyte"))
    if behaviour == "404":  # permanent: not retried
        assert len(faulty.requests) == 4
    else:
        assert len(faulty.requests) == (4 if behaviour == "wrong" else 8)


# ---- the CLI, as a user runs it ------------------------------------------------------

def cli(*args, api_url=None, home=None):
    env = {**os.environ, "PREFECT_API_URL": api_url} if api_url else dict(os.environ)
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])


def test_cli_ingest_and_cached_rerun(tmp_path, mnist_server, api_url):
    r = cli("ingest", "--mirror", mnist_server, "--home", str(tmp_path), api_url=api_url)
    assert r.returncode == 0, r.stderr
    assert "train: 60000 rows in 6 shards" in r.stdout and "test: 10000 rows in 1 shard," in r.stdout
    r = cli("ingest", "--mirror", mnist_server, "--home", str(tmp_path), api_url=api_url)
    assert r.returncode == 0, r.stderr
    states = newest_run_states(api_url, "ingest")
    assert len(states) == 13 and set(states.values()) == {"Cached"}


def test_cli_bad_mirror_alone_exits_nonzero_with_one_line(tmp_path, faulty, api_url):
    faulty.default = "wrong"
    r = cli("ingest", "--mirror", faulty.url, "--home", str(tmp_path), api_url=api_url)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("digitflow: error: ") and "SHA-256 mismatch" in last and faulty.url in last
    assert not (tmp_path / "data").exists()


def test_cli_unreachable_mirror(tmp_path, api_url):
    r = cli("ingest", "--mirror", "http://127.0.0.1:9/", "--home", str(tmp_path), "--timeout", "1", "--retries", "0",
            api_url=api_url)
    assert r.returncode == 1
    assert "connection failed" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "data").exists()


def test_cli_unwritable_home(tmp_path):
    (tmp_path / "file").write_text("")
    r = cli("ingest", "--home", str(tmp_path / "file" / "home"))
    assert r.returncode == 1
    assert r.stderr.strip() == f"digitflow: error: home directory {tmp_path / 'file' / 'home'} is not writable: Not a directory"
