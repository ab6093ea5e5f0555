"""The home in object storage: a real S3 endpoint over HTTP (moto_server, or the endpoint in
DIGITFLOW_TEST_S3_ENDPOINT), "machines" that share no local path, and faults. The store's
primitives are also proven on Azure Blob (Azurite); test_azure_home.py runs the pipeline there."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.store_helpers import (FaultProxy, azurite_endpoint, boto3_client, free_port, machine, metrics_record,
                                 moto_server, s3_endpoint, unique_prefix)

DIGITFLOW = str(Path(sys.executable).with_name("digitflow"))
PREFECT = str(Path(sys.executable).with_name("prefect"))
DEAD_MIRROR = "http://127.0.0.1:9/"  # nothing listens: a download attempt would fail the run


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with s3_endpoint(tmp_path_factory.mktemp("s3")) as (endpoint, bucket, env):
        yield endpoint, bucket, env


@pytest.fixture(scope="module", params=["s3", "az"])
def backend(request, tmp_path_factory):
    """(scheme, bucket, env) of each real backend: S3 on moto, Azure Blob on Azurite."""
    if request.param == "s3":
        endpoint, bucket, env = request.getfixturevalue("s3")
        yield "s3", bucket, env
    else:
        with azurite_endpoint(tmp_path_factory.mktemp("az")) as (endpoint, container, env):
            yield "az", container, env


def run(work: Path, env: dict, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    out, err = work / f"out-{time.monotonic_ns()}.txt", work / f"err-{time.monotonic_ns()}.txt"
    with open(out, "w") as o, open(err, "w") as e:
        rc = subprocess.run([DIGITFLOW, *args], cwd=work, env=env, stdout=o, stderr=e, timeout=timeout).returncode
    return subprocess.CompletedProcess(args, rc, out.read_text(), err.read_text())


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def listing(env: dict, bucket: str, prefix: str) -> dict[str, int]:
    client = boto3_client(env)
    keys = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        keys.update({o["Key"][len(prefix) + 1:]: o["Size"] for o in page.get("Contents", [])})
    return keys


# ---- the store's primitives ----------------------------------------------------------------

def test_conditional_writes_transfers_and_lease(backend, monkeypatch, tmp_path):
    from storage.objects import LEASE_FREE, Conflict, Lease, open_store

    scheme, bucket, env = backend
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    store = open_store(f"{scheme}://{bucket}/{unique_prefix('prim')}")
    store.check()
    etag = store.put("x", b"1", if_none_match=True)
    with pytest.raises(Conflict):
        store.put("x", b"2", if_none_match=True)  # exists
    store.put("x", b"3", if_match=etag)
    with pytest.raises(Conflict):
        store.put("x", b"4", if_match=etag)  # changed since
    assert store.get("x")[0] == b"3"
    assert store.head("x").sha256 == hashlib.sha256(b"3").hexdigest()  # recorded with every put
    assert store.head("absent") is None and store.get("absent") is None
    store.delete("absent")  # already gone is fine

    # Transfers stream in 8 MiB parts, reporting bytes as they go; what comes down is what went up.
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(20 << 20))
    seen = []
    put_etag = store.upload("blob", blob, "sha", progress=lambda label, done, total: seen.append((label, done, total)))
    assert seen[-1] == ("upload blob", 20 << 20, 20 << 20) and len(seen) == 3  # one report a part
    info = store.head("blob")
    assert (info.size, info.sha256, info.etag) == (20 << 20, "sha", put_etag)
    if scheme == "s3":
        assert info.etag.endswith('-3"')  # a multipart object: 3 parts
    seen.clear()
    got_etag = store.download("blob", tmp_path / "back", progress=lambda *a: seen.append(a), size=20 << 20)
    assert seen[-1][1:] == (20 << 20, 20 << 20) and (tmp_path / "back").read_bytes() == blob.read_bytes()
    assert got_etag == put_etag and set(store.list("")) >= {"x", "blob"}

    # A read-modify-write under the lease, from 4 threads with separate clients: no lost update.
    store.put("counter", b"0")

    def bump():
        s = open_store(store.url())
        for _ in range(5):
            with Lease(s, "lock", wait=60):
                value = int(s.get("counter")[0])
                time.sleep(0.01)
                s.put("counter", str(value + 1).encode())

    threads = [threading.Thread(target=bump) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert store.get("counter")[0] == b"20"
    assert json.loads(store.get("lock")[0]) == LEASE_FREE  # released

    # A holder that died: its lease expires and exactly one waiter takes it over.
    store.put("lock", json.dumps({"owner": "dead:1", "expires": time.time() - 1}).encode())
    with Lease(store, "lock", wait=5) as lease:
        assert json.loads(store.get("lock")[0])["owner"] == lease.owner
    store.put("lock", json.dumps({"owner": "alive:2", "expires": time.time() + 60}).encode())
    with pytest.raises(Exception, match="held by alive:2"):
        with Lease(store, "lock", wait=1):
            pass


def test_a_working_copy_changed_in_place_is_fetched_again_and_an_unchanged_one_costs_no_request(
        backend, monkeypatch, tmp_path):
    from storage import remote
    from storage.atomic import sha256_file

    scheme, bucket, env = backend
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DIGITFLOW_CACHE", str(tmp_path / "cache"))
    address = f"{scheme}://{bucket}/{unique_prefix('wc')}/file"
    path = remote.local(address)
    path.parent.mkdir(parents=True)
    path.write_bytes(os.urandom(3 << 20))
    sha = sha256_file(path)
    remote.push_file(address)
    store, key = remote.store_of(address)
    info = store.head(key)
    calls = []
    monkeypatch.setattr(store, "head", lambda k: calls.append(k) or info)
    assert remote._same(path, info, store, key) and calls == []  # its stamp says so: no request

    # Bytes flipped in place, size and mtime put back: the stamp no longer matches (ctime moved),
    # the SHA-256 recorded on the object does not either, and the object is fetched again.
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(1000)
        f.write(bytes([f.read(1)[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert not remote._same(path, info, store, key)
    monkeypatch.undo()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DIGITFLOW_CACHE", str(tmp_path / "cache"))
    assert sha256_file(remote.pull_file(address)) == sha


def test_folder_markers_and_damaged_lease_records_are_no_obstacle(backend, monkeypatch, tmp_path):
    """A console's "folder marker" (an empty object named like a folder) is not a file of the
    folder; a lease record whose expiry is NaN or far beyond any holder's ttl (a clock hours
    ahead) is damaged, hence taken over; an object gone between listing and download is one line."""
    from storage import remote
    from storage.objects import Lease, ObjectStoreError, open_store

    scheme, bucket, env = backend
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DIGITFLOW_CACHE", str(tmp_path / "cache"))
    prefix = unique_prefix("marker")
    store = open_store(f"{scheme}://{bucket}/{prefix}")
    store.put("split/a.bin", b"a")
    store.put("split/", b"")
    store.put("split/manifest.json", b"{}")
    path = remote.pull_dir(f"{scheme}://{bucket}/{prefix}/split", "manifest.json")
    assert sorted(p.name for p in path.iterdir()) == ["a.bin", "manifest.json"]
    for record in (b'{"owner": "x", "expires": NaN}', b'{"owner": "x", "expires": 1e300}'):
        store.put("lock", record)
        with Lease(store, "lock", ttl=5, wait=2) as lease:
            assert json.loads(store.get("lock")[0])["owner"] == lease.owner
    with pytest.raises(ObjectStoreError, match="no such object"):
        store.download("gone", tmp_path / "gone")


def test_two_machines_uploading_one_key_at_once_both_succeed_and_the_object_is_whole(backend, monkeypatch, tmp_path):
    """On Azure one writer's block-list commit voids the other's staged blocks (InvalidBlockList);
    the loser finds its own bytes there or uploads again. On S3 the uploads are apart anyway."""
    from storage.atomic import sha256_file
    from storage.objects import open_store

    scheme, bucket, env = backend
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    url = f"{scheme}://{bucket}/{unique_prefix('race')}"
    files = [tmp_path / "a", tmp_path / "b"]
    for f in files:
        f.write_bytes(os.urandom(40 << 20))
    for same in (True, False):
        errors, etags = [], []

        def up(path):
            try:
                etags.append(open_store(url).upload("k", path, sha256_file(path)))
            except Exception as e:  # the assertion below names it
                errors.append(e)

        threads = [threading.Thread(target=up, args=(files[0] if same else f,)) for f in files]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert errors == [] and len(etags) == 2
        info = open_store(url).head("k")
        open_store(url).download("k", tmp_path / "back")
        assert sha256_file(tmp_path / "back") == info.sha256 in {sha256_file(f) for f in files}


def test_a_lease_removed_under_a_publisher_is_noticed_before_the_commit(s3, monkeypatch, tmp_path):
    """Someone deletes (or takes) models/<name>/.lock while a publisher holds it: the publisher
    says so in one line and commits nothing (it used to commit, then fail with NoSuchKey)."""
    from storage.home import Home
    from storage.objects import LEASE_FREE, LeaseLost

    endpoint, bucket, env = s3
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DIGITFLOW_CACHE", str(tmp_path / "cache"))
    prefix = unique_prefix("lease")
    home = Home.resolve(f"s3://{bucket}/{prefix}")

    def build(steal: bool):
        def write(folder, version):
            if steal:
                home.store.put("models/m/.lock", json.dumps({"owner": "thief:9", "expires": time.time() + 60}).encode())
            else:
                home.store.delete("models/m/.lock")
            (folder / "metrics.json").write_text("{}")
            return {}
        return write

    with pytest.raises(LeaseLost, match=r"models/m/.lock: the lease was deleted while .* held it .*nothing was "
                                        r"committed"):
        home.registry("m").publish("1" * 64, build(steal=False))
    with pytest.raises(LeaseLost, match="the lease was taken by thief:9"):
        home.registry("m").publish("2" * 64, build(steal=True))
    assert not [k for k in listing(env, bucket, prefix) if k.endswith("metadata.json") or k.endswith("aliases.json")]
    home.store.delete("models/m/.lock")  # the thief's record (it never expires by itself in this test)
    assert home.registry("m").publish("3" * 64, lambda folder, version: {}) == (1, True)  # then all is well
    assert json.loads(home.store.get("models/m/.lock")[0]) == LEASE_FREE  # released
    assert home.store.head("models/m/v1/metadata.json") is not None


def _publish_one(args):
    """One "machine" publishing one model into the shared registry, then asking the gate."""
    home_url, cache, env, seed, accuracy = args
    os.environ.update(env, DIGITFLOW_CACHE=cache)
    import nn
    from storage.atomic import write_json
    from storage.home import Home

    home = Home.resolve(home_url)
    registry = home.registry("shared")
    model = nn.presets.build(nn.presets.Hyperparameters(hidden=(8,), seed=seed), 16, 3)

    def build(folder, version):
        nn.save(model, folder)
        write_json(folder / "metrics.json", metrics_record(accuracy))
        return {}

    version, created = registry.publish(nn.digest(model), build)
    decision, _ = registry.decide(version, tolerance=0.0, floor=0.0)
    return version, created, nn.digest(model), decision.status


def test_publishers_on_four_machines_get_distinct_versions_and_one_champion(backend, tmp_path):
    scheme, bucket, env = backend
    home = f"{scheme}://{bucket}/{unique_prefix('registry')}"
    jobs = [(home, str(tmp_path / f"m{i}"), env, i, 0.9 + i / 100) for i in range(4)]
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        results = pool.map(_publish_one, jobs)
    versions = sorted(v for v, created, _, _ in results)
    assert versions == [1, 2, 3, 4] and all(created for _, created, _, _ in results)
    assert len({d for _, _, d, _ in results}) == 4

    os.environ.update(env)
    os.environ["DIGITFLOW_CACHE"] = str(tmp_path / "reader")
    from storage.home import Home

    registry = Home.resolve(home).registry("shared")
    aliases = registry.aliases()
    assert aliases.latest == 4 and registry.aliases_problem() is None
    # Each gate decision saw the champion of its moment: the champion is the best one promoted,
    # and every version promoted after another was at least as good as the one it replaced.
    promoted = sorted((registry.decision(v) for v in versions if registry.decision(v).status == "promoted"),
                      key=lambda d: d.at)
    assert aliases.champion == max(promoted, key=lambda d: d.test_accuracy).version
    for d in promoted:
        before = d.champion_before
        assert before is None or registry.metrics(before).test_accuracy <= d.test_accuracy
    # A publisher that re-publishes the same weights finds them (no new version).
    again = _publish_one((home, str(tmp_path / "m0"), env, 0, 0.9))
    assert again[:2] == (next(v for v, _, dg, _ in results if dg == again[2]), False)


# ---- two machines, one bucket, one Prefect server ----------------------------------------

@pytest.fixture(scope="module")
def team(s3, server, mnist_server, tmp_path_factory):
    """Machine A ran the pipeline into a fresh prefix of the bucket."""
    endpoint, bucket, env = s3
    root = tmp_path_factory.mktemp("machines")
    home = f"s3://{bucket}/{unique_prefix('team')}"
    env = {**env, "PREFECT_API_URL": server}
    work_a, env_a = machine(root, "a", env)
    r = ok(run(work_a, env_a, "run", "--home", home, "--mirror", mnist_server, "--preset", "fast"))
    assert "v1 (published now)" in r.stdout
    return {"home": home, "bucket": bucket, "env": env, "root": root, "a": (work_a, env_a), "endpoint": endpoint}


@pytest.mark.e2e
def test_machine_b_reuses_everything_machine_a_did(team, server):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.prefect_helpers import client_for, flow_runs, state_names

    work_b, env_b = machine(team["root"], "b", team["env"])
    r = ok(run(work_b, env_b, "run", "--home", team["home"], "--mirror", DEAD_MIRROR, "--preset", "fast"))
    assert "v1 (published before)" in r.stdout and "unchanged" in r.stdout
    with client_for(server) as client:  # B's run: the newer of the two runs on this home
        runs = [r for r in flow_runs(client, "retrain") if r.parameters.get("home") == team["home"]
                and r.start_time is not None]
    assert len(runs) == 2
    with temporary_settings(updates={PREFECT_API_URL: server}):
        states = state_names(max(runs, key=lambda r: r.start_time).id)
    cached = {name for name, state in states.items() if state == "Cached"}
    assert {n for n in states if n.startswith(("download", "verify", "parse", "shard", "train", "evaluate"))} <= cached
    assert len([n for n in cached if n.startswith("download")]) == 4 and any(n.startswith("train") for n in cached)
    cache = Path(env_b["DIGITFLOW_CACHE"])
    assert not list(cache.rglob("*-ubyte")), "machine B fetched raw files it did not need"
    assert not list(cache.rglob("*.parquet")), "machine B fetched shards it did not need"

    listed = json.loads(ok(run(work_b, env_b, "models", "list", "--home", team["home"], "--json")).stdout)
    assert [(v["version"], v["status"]) for v in listed] == [(1, "champion")]
    keys = listing(team["env"], team["bucket"], team["home"].split("/", 3)[3])
    assert "models/mnist-mlp/v2/metadata.json" not in keys and any(k.startswith("prefect-results/") for k in keys)

    shown = json.loads(ok(run(work_b, env_b, "models", "show", "champion", "--home", team["home"], "--json")).stdout)
    assert shown["version"] == 1 and shown["path"].startswith(str(cache))  # fetched to B's working copy


@pytest.mark.e2e
def test_shards_and_model_read_back_without_digitflow(team):
    """pyarrow, polars, pandas and DuckDB read the shards straight from the bucket with the same
    credentials; the published model.npz, downloaded with boto3, gives the recorded accuracy with
    a plain NumPy forward pass."""
    import io

    import polars as pl
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs

    env, bucket = team["env"], team["bucket"]
    prefix = team["home"].split("/", 3)[3]
    client = boto3_client(env)
    manifest = json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}/data/mnist/test/manifest.json")["Body"].read())
    fs = pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key=env.get("AWS_ACCESS_KEY_ID"),
                           secret_key=env.get("AWS_SECRET_ACCESS_KEY"), region=env.get("AWS_REGION", "us-east-1"))
    files = [f"{bucket}/{prefix}/data/mnist/test/{s['file']}" for s in manifest["shards"]]
    table = ds.dataset(files, format="parquet", filesystem=fs).to_table()
    assert table.num_rows == 10_000
    labels = table.column("label").to_numpy()
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]

    options = {"aws_endpoint_url": env["AWS_ENDPOINT_URL"], "aws_access_key_id": env.get("AWS_ACCESS_KEY_ID", ""),
               "aws_secret_access_key": env.get("AWS_SECRET_ACCESS_KEY", ""), "aws_region": env.get("AWS_REGION", "us-east-1"),
               "aws_allow_http": "true"}
    frame = pl.read_parquet(f"s3://{bucket}/{prefix}/data/mnist/train/*.parquet", storage_options=options)
    assert frame.height == 60_000 and frame["label"].head(5).to_list() == [5, 0, 4, 1, 9]

    # pandas, through pyarrow's S3 filesystem; DuckDB through its httpfs extension (the signed
    # official binary from PyPI's duckdb-extension-httpfs: DuckDB checks the signature on LOAD).
    import duckdb
    import duckdb_extension_httpfs
    import pandas as pd

    df = pd.concat(pd.read_parquet(f, filesystem=fs) for f in files)  # the manifest's shards
    assert len(df) == 10_000 and df["label"].value_counts().sort_index().tolist()[:3] == [980, 1135, 1032]
    extension = (Path(duckdb_extension_httpfs.__file__).parent / "extensions" / f"v{duckdb.__version__}"
                 / "httpfs.duckdb_extension")
    con = duckdb.connect()
    con.execute(f"LOAD '{extension}'")
    host = env["AWS_ENDPOINT_URL"].split("://", 1)[1]
    con.execute(f"CREATE SECRET (TYPE s3, KEY_ID '{env.get('AWS_ACCESS_KEY_ID', '')}', "
                f"SECRET '{env.get('AWS_SECRET_ACCESS_KEY', '')}', REGION '{env.get('AWS_REGION', 'us-east-1')}', "
                f"ENDPOINT '{host}', URL_STYLE 'path', USE_SSL {str(env['AWS_ENDPOINT_URL'].startswith('https')).lower()})")
    rows, first = con.execute(f"SELECT count(*), min(label) FILTER (WHERE \"index\" = 0) FROM "
                              f"read_parquet('s3://{bucket}/{prefix}/data/mnist/train/*.parquet')").fetchone()
    assert (rows, first) == (60_000, 5)

    metrics = json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}/models/mnist-mlp/v1/metrics.json")["Body"].read())
    weights = np.load(io.BytesIO(client.get_object(Bucket=bucket, Key=f"{prefix}/models/mnist-mlp/v1/model.npz")["Body"].read()),
                      allow_pickle=False)
    layers = json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}/models/mnist-mlp/v1/model.json")["Body"].read())
    x = np.stack(table.column("image").to_numpy(zero_copy_only=False)).astype(np.float32)  # stored as pixel/255
    h = (x - layers["preprocessing"]["mean"]) / layers["preprocessing"]["std"]  # as model.json says
    n_dense = len([n for n in weights.files if n.startswith("W")])
    for i in range(n_dense):  # Dense i: h @ W{i} + b{i}, ReLU between (the layout model.json describes)
        h = h @ weights[f"W{i}"] + weights[f"b{i}"]
        if i < n_dense - 1:
            h = np.maximum(h, 0)
    accuracy = float((h.argmax(1) == labels).mean())
    assert abs(accuracy - metrics["test_accuracy"]) < 1e-4, (accuracy, metrics["test_accuracy"], layers)


@pytest.mark.e2e
def test_two_machines_publishing_at_once_get_two_versions_and_one_champion(s3, server, mnist_server, tmp_path):
    endpoint, bucket, env = s3
    env = {**env, "PREFECT_API_URL": server}
    home = f"s3://{bucket}/{unique_prefix('race')}"
    work_a, env_a = machine(tmp_path, "a", env)
    ok(run(work_a, env_a, "ingest", "--home", home, "--mirror", mnist_server))
    work_b, env_b = machine(tmp_path, "b", env)
    procs = []
    for (work, e), seed in (((work_a, env_a), 1), ((work_b, env_b), 2)):
        out = open(work / "race.txt", "w")
        procs.append((subprocess.Popen([DIGITFLOW, "run", "--home", home, "--mirror", DEAD_MIRROR, "--preset", "fast",
                                        "--seed", str(seed)], cwd=work, env=e, stdout=out, stderr=subprocess.STDOUT),
                      work / "race.txt"))
    for p, log in procs:
        assert p.wait(300) == 0, log.read_text()[-3000:]
    outs = [log.read_text() for _, log in procs]
    import re

    assert sorted(int(m.group(1)) for o in outs if (m := re.search(r"mnist-mlp v(\d+) \(published now\)", o))) \
        == [1, 2], [o[-1500:] for o in outs]

    listed = json.loads(ok(run(work_b, env_b, "models", "list", "--home", home, "--json")).stdout)
    statuses = {v["version"]: v["status"] for v in listed}
    assert sorted(statuses) == [1, 2] and list(statuses.values()).count("champion") == 1, statuses
    shown = [json.loads(ok(run(work_a, env_a, "models", "show", str(v), "--home", home, "--json")).stdout)
             for v in (1, 2)]
    assert shown[0]["metadata"]["weights_sha256"] != shown[1]["metadata"]["weights_sha256"]


@pytest.mark.e2e
def test_worker_on_another_machine_runs_a_deployment_made_on_a(s3, server, mnist_server, tmp_path):
    endpoint, bucket, env = s3
    env = {**env, "PREFECT_API_URL": server}
    home = f"s3://{bucket}/{unique_prefix('pool')}"
    work_a, env_a = machine(tmp_path, "a", env)
    r = ok(run(work_a, env_a, "deploy", "--pool", "s3-pool", "--name", "s3-workers", "--mirror", mnist_server,
               "--preset", "fast", "--epochs", "1"))
    assert "retrain/s3-workers" in r.stdout
    from tests.prefect_helpers import client_for

    with client_for(server) as client:
        deployment = client.read_deployment_by_name("retrain/s3-workers")
        assert "home" not in deployment.parameters and deployment.entrypoint == "flows.pipeline.retrain"
        flow_run = client.create_flow_run_from_deployment(deployment.id)
    work_b, env_b = machine(tmp_path, "b", env, DIGITFLOW_HOME=home)  # the worker's machine names the home
    with open(work_b / "worker.txt", "w") as out:
        worker = subprocess.run([PREFECT, "worker", "start", "--pool", "s3-pool", "--run-once"], cwd=work_b, env=env_b,
                                stdout=out, stderr=subprocess.STDOUT, timeout=300)
    assert worker.returncode == 0, (work_b / "worker.txt").read_text()[-3000:]
    with client_for(server) as client:
        deadline = time.monotonic() + 120
        while not (state := client.read_flow_run(flow_run.id).state).is_final() and time.monotonic() < deadline:
            time.sleep(1)
        assert state.is_completed(), (work_b / "worker.txt").read_text()[-3000:]
    keys = listing(env, bucket, home.split("/", 3)[3])
    assert "models/mnist-mlp/v1/metadata.json" in keys and "data/mnist/train/manifest.json" in keys


@pytest.mark.e2e
def test_sweep_with_dask_workers_on_another_machine_writes_to_the_bucket(s3, server, mnist_server, tmp_path):
    """Machine A runs the sweep; the Dask scheduler and workers run as machine B (own HOME,
    working copy, cwd): B's workers read the shards from the bucket and write the trained models
    there; A publishes the best; the report lands in the bucket."""
    from tests.test_sweep import dask_processes

    endpoint, bucket, env = s3
    env = {**env, "PREFECT_API_URL": server}
    home = f"s3://{bucket}/{unique_prefix('sweep')}"
    work_a, env_a = machine(tmp_path, "a", env)
    work_b, env_b = machine(tmp_path, "b", env)
    with dask_processes(work_b, work_b, env_b) as (address, _):
        r = ok(run(work_a, env_a, "sweep", "--grid", "hidden=24,40", "--epochs", "1", "--home", home, "--mirror",
                   mnist_server, "--dask-address", address, "--floor", "0.5", "--json", timeout=600))
    result = json.loads([line for line in r.stdout.splitlines() if line.startswith("{")][-1])
    assert len(result["rows"]) == 2 and result["status"] == "promoted" and result["report"].startswith(home)
    keys = listing(env, bucket, home.split("/", 3)[3])
    trained = {k.split("/")[1] for k in keys if k.startswith("trained/") and k.endswith("/training.json")}
    assert len(trained) == 2  # both grid points, committed by the workers on B
    assert any(k.startswith("sweeps/") and k.endswith("/results.json") for k in keys)
    assert "models/mnist-mlp/v1/metadata.json" in keys
    b_cache = Path(env_b["DIGITFLOW_CACHE"])
    assert len({p.parent.name for p in b_cache.rglob("trained/*/model.npz")}) == 2  # trained on B
    assert not list(Path(env_a["DIGITFLOW_CACHE"]).rglob("trained/*/.*.checkpoint.npz"))


# ---- faults ----------------------------------------------------------------------------

def test_store_down_at_start_is_one_line(s3, tmp_path):
    endpoint, bucket, env = s3
    work, e = machine(tmp_path, "a", {**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"})
    t0 = time.monotonic()
    r = run(work, e, "models", "list", "--home", f"s3://{bucket}/x")
    assert r.returncode == 1 and time.monotonic() - t0 < 60
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"digitflow: error: s3://{bucket}") and "unreachable" in lines[0], r.stderr


def test_wrong_credentials_are_one_line_without_the_secret(tmp_path):
    """moto with authentication on (INITIAL_NO_AUTH_ACTION_COUNT): a key it does not know is
    refused with 403; the line names the bucket and never the secret."""
    with moto_server(tmp_path, INITIAL_NO_AUTH_ACTION_COUNT="0") as url:
        secret = "wrong-secret-never-printed"
        work, e = machine(tmp_path, "a", {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "AKIAWRONG",
                                          "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": "us-east-1"})
        r = run(work, e, "models", "list", "--home", "s3://private-bucket/team")
        assert r.returncode == 1
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("digitflow: error: s3://private-bucket: access denied"), r.stderr
        assert secret not in r.stdout + r.stderr and "AKIAWRONG" not in r.stdout + r.stderr
        # The same keys from a profile (AWS_PROFILE, read through boto3): refused the same way,
        # which proves the profile was read (without it the request would carry no key at all).
        (tmp_path / "credentials").write_text(f"[team]\naws_access_key_id = AKIAWRONG\naws_secret_access_key = {secret}\n")
        e = {k: v for k, v in e.items() if not k.startswith("AWS_ACCESS") and not k.startswith("AWS_SECRET")}
        r = run(work, {**e, "AWS_PROFILE": "team", "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials")},
                "models", "list", "--home", "s3://private-bucket/team")
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1, r.stderr
        assert lines[0].startswith("digitflow: error: s3://private-bucket: access denied"), r.stderr
        assert secret not in r.stdout + r.stderr and "AKIAWRONG" not in r.stdout + r.stderr


def test_a_wrong_azure_key_is_one_line_without_the_secret(tmp_path):
    """Azurite checks Shared Key signatures as Azure does: a wrong account key is refused."""
    import base64

    with azurite_endpoint(tmp_path) as (url, container, env):
        secret = base64.b64encode(b"wrong-key-never-printed").decode()
        work, e = machine(tmp_path, "a", {**env, "AZURE_STORAGE_ACCOUNT_KEY": secret})
        r = run(work, e, "models", "list", "--home", f"az://{container}/team")
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1, r.stderr
        assert lines[0].startswith(f"digitflow: error: az://{container}: access denied"), r.stderr
        assert secret not in r.stdout + r.stderr
        r = run(work, {**e, "AZURE_STORAGE_ACCOUNT_KEY": env["AZURE_STORAGE_ACCOUNT_KEY"]},  # the right key: fine
                "models", "list", "--home", f"az://{container}/team")
        assert r.returncode == 0 and "no versions" in r.stdout + r.stderr, r.stdout + r.stderr


@pytest.mark.e2e
def test_503s_are_retried_and_a_store_gone_mid_upload_leaves_nothing_visible(s3, server, mnist_server, tmp_path):
    endpoint, bucket, env = s3
    proxy = FaultProxy(endpoint)
    try:
        env = {**env, "AWS_ENDPOINT_URL": proxy.url, "PREFECT_API_URL": server}
        home = f"s3://{bucket}/{unique_prefix('faults')}"
        prefix = home.split("/", 3)[3]
        work, e = machine(tmp_path, "a", env)

        # The store goes away after 30 MB of uploads: ingest fails with one line; no split is visible.
        proxy.down_after_bytes = 30 << 20
        r = run(work, e, "ingest", "--home", home, "--mirror", mnist_server, "--retries", "0")
        assert r.returncode == 1 and "object store unreachable" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
        proxy.down, proxy.down_after_bytes = False, None
        keys = listing(env, bucket, prefix)
        assert "data/mnist/train/manifest.json" not in keys, "a half-uploaded split is visible"

        # 503 SlowDown on the next 4 requests (one request's first 4 attempts): retried with backoff,
        # the run completes, and it found and removed what the failed one left.
        proxy.fail_next = 4
        ok(run(work, e, "ingest", "--home", home, "--mirror", mnist_server))
        assert proxy.fail_next == 0
        keys = listing(env, bucket, prefix)
        manifest = json.loads(boto3_client(env, endpoint).get_object(
            Bucket=bucket, Key=f"{prefix}/data/mnist/train/manifest.json")["Body"].read())
        assert {k.split("/")[-1] for k in keys if k.startswith("data/mnist/train/")} == \
            {s["file"] for s in manifest["shards"]} | {"manifest.json"}
    finally:
        proxy.close()


@pytest.mark.e2e
def test_a_killed_writers_half_split_is_invisible_and_cleaned(team, tmp_path):
    """What a writer killed mid-push leaves (commit object deleted, one shard replaced by a
    partial upload, a stray part) is not a split to readers; the next run rebuilds and cleans."""
    env, bucket, home = team["env"], team["bucket"], team["home"]
    prefix = home.split("/", 3)[3]
    client = boto3_client(env)
    split = f"{prefix}/data/mnist/test"
    manifest = client.get_object(Bucket=bucket, Key=f"{split}/manifest.json")["Body"].read()
    first = json.loads(manifest)["shards"][0]["file"]
    client.delete_object(Bucket=bucket, Key=f"{split}/manifest.json")
    client.put_object(Bucket=bucket, Key=f"{split}/{first}", Body=b"PAR1 partial")
    client.put_object(Bucket=bucket, Key=f"{split}/part-99999.parquet", Body=b"stray")

    work, e = machine(tmp_path, "c", env)
    r = run(work, e, "evaluate", "--home", home)
    assert r.returncode == 1 and "no manifest" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
    ok(run(work, e, "ingest", "--home", home, "--mirror", DEAD_MIRROR))  # raw files come from the bucket
    keys = listing(env, bucket, prefix)
    assert "data/mnist/test/part-99999.parquet" not in keys
    assert client.get_object(Bucket=bucket, Key=f"{split}/manifest.json")["Body"].read() == manifest
    ok(run(work, e, "evaluate", "--home", home))


def test_a_results_block_is_saved_when_another_process_created_its_type_meanwhile(prefect_harness, monkeypatch):
    """Two processes' first run on a new server (two publishers at once) both find the results
    block type missing and create it; the one told it already exists saves again (was an
    ObjectAlreadyExists traceback). The race is replayed in order: this process reads "missing"
    once, then creates against a server where the type exists."""
    from prefect.client.orchestration import PrefectClient, SyncPrefectClient
    from prefect.exceptions import ObjectNotFound

    from tasks.common import ObjectResults, _results_block

    _results_block("s3://bucket/created-by-the-other-process")  # the type and schema now exist
    missed = []

    def seen_missing_once(slug):  # what this process saw just before the other one created the type
        if not missed:
            missed.append(slug)
            raise ObjectNotFound(http_exc=Exception("404"))

    read_sync, read_async = SyncPrefectClient.read_block_type_by_slug, PrefectClient.read_block_type_by_slug

    def sync_read(self, slug):
        seen_missing_once(slug)
        return read_sync(self, slug)

    async def async_read(self, slug):
        seen_missing_once(slug)
        return await read_async(self, slug)

    # Prefect saves a block through its sync or async client depending on the caller: both see it.
    monkeypatch.setattr(SyncPrefectClient, "read_block_type_by_slug", sync_read)
    monkeypatch.setattr(PrefectClient, "read_block_type_by_slug", async_read)
    url = f"s3://bucket/{unique_prefix('results')}"
    _results_block(url)
    assert missed == [ObjectResults.get_block_type_slug()]
    name = "digitflow-results-" + hashlib.sha256(url.encode()).hexdigest()[:16]
    assert ObjectResults.load(name).url == url
