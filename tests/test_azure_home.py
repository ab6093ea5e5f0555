"""A home on Azure Blob Storage (``az://container/prefix``), against Azurite — the Azure Storage
emulator, a real HTTP endpoint speaking the Blob REST API. The same code path as S3: only the
client differs. Two machines (no shared local path) publish at once; then `models`, `predict`
and `api` read the registry back from the container."""

from __future__ import annotations

import json
import re
import subprocess

import httpx
import pytest

from tests.store_helpers import azure_container, azurite_endpoint, machine, unique_prefix
from tests.test_api import api, digits, png
from tests.test_object_store import DIGITFLOW, ok, run
from tests.test_operate import TEST_LABELS


@pytest.fixture(scope="module")
def azure(tmp_path_factory):
    with azurite_endpoint(tmp_path_factory.mktemp("azurite")) as (endpoint, container, env):
        yield endpoint, container, env


@pytest.mark.e2e
def test_an_az_home_runs_the_pipeline_and_two_publishers_get_distinct_versions(azure, server, mnist_server,
                                                                                mnist_dir, tmp_path):
    endpoint, container, env = azure
    home = f"az://{container}/{unique_prefix('team')}"
    env = {**env, "PREFECT_API_URL": server}
    # Two machines run the whole pipeline into the same empty prefix at the same moment.
    procs = []
    for name, seed in (("a", 1), ("b", 2)):
        work, e = machine(tmp_path, name, env)
        log = open(work / "run.txt", "w")
        procs.append((subprocess.Popen([DIGITFLOW, "run", "--home", home, "--mirror", mnist_server, "--preset", "fast",
                                        "--seed", str(seed)], cwd=work, env=e, stdout=log, stderr=subprocess.STDOUT),
                      work / "run.txt", work, e))
    for p, log, _, _ in procs:
        assert p.wait(400) == 0, log.read_text()[-3000:]
    outs = [log.read_text() for _, log, _, _ in procs]
    published = sorted(int(m.group(1)) for o in outs if (m := re.search(r"mnist-mlp v(\d+) \(published now\)", o)))
    assert published == [1, 2], [o[-1500:] for o in outs]

    # What the container holds, seen with Azure's own SDK: both versions committed, one champion.
    prefix = home.split("/", 3)[3]
    names = {b.name[len(prefix) + 1:] for b in azure_container(env, container).list_blobs(name_starts_with=prefix + "/")}
    assert {"models/mnist-mlp/v1/metadata.json", "models/mnist-mlp/v2/metadata.json",
            "models/mnist-mlp/aliases.json", "data/mnist/train/manifest.json"} <= names, sorted(names)
    aliases = json.loads(azure_container(env, container).download_blob(f"{prefix}/models/mnist-mlp/aliases.json").readall())
    accuracy = {v: json.loads(azure_container(env, container).download_blob(
        f"{prefix}/models/mnist-mlp/v{v}/metrics.json").readall())["test_accuracy"] for v in (1, 2)}
    # Whichever publisher's gate decided first, the more accurate version ends as champion.
    assert aliases["latest"] == 2 and accuracy[aliases["champion"]] == max(accuracy.values()), (aliases, accuracy)
    champion = aliases["champion"]

    # A third machine with an empty working copy: models, predict and the API read the container.
    work_c, env_c = machine(tmp_path, "c", env)
    listed = json.loads(ok(run(work_c, env_c, "models", "list", "--home", home, "--json")).stdout)
    assert [v["version"] for v in listed] == [1, 2], listed
    images = digits(mnist_dir, 8)
    paths = []
    for i, image in enumerate(images):
        paths.append(work_c / f"d{i}.png")
        paths[-1].write_bytes(png(image))
    predicted = json.loads(ok(run(work_c, env_c, "predict", "--home", home, "--json", *map(str, paths))).stdout)
    assert len(predicted) == 8 and sum(p["digit"] == t for p, t in zip(predicted, TEST_LABELS)) >= 7, predicted
    with api(home, env={k: v for k, v in env_c.items() if k not in ("PREFECT_API_URL",)}) as url:
        r = httpx.post(f"{url}/predict", files=[("image", (p.name, p.read_bytes(), "image/png")) for p in paths],
                       timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"]["version"] == champion
        assert [p["label"] for p in body["predictions"]] == [p["digit"] for p in predicted]  # the champion's
