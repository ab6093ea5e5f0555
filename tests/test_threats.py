"""Every input checked where it enters (the README's threat table): namespaces tied to a
dataset's identity, paths that stay inside their root, state read back checked against what it
cannot rewrite. Fast tests: no Prefect, no network."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import nn
from storage import objects
from storage.atomic import sha256_file, write_json
from storage.catalog import resolve
from storage.datasets import SpecError, from_dict
from storage.home import Home
from storage.idx import write_idx
from storage.paths import PathError, inside
from storage.registry import Registry, RegistryError
from storage.shards import write_split


def _spec(name="shapes", sha="a" * 64, shape=(2, 2), **extra) -> dict:
    files = [{"name": f"{split}-{kind}.gz", "split": split, "kind": kind,
              "size": 16 + 10 * shape[0] * shape[1] if kind == "images" else 8 + 10, "sha256": sha}
             for split in ("train", "test") for kind in ("images", "labels")]
    return {"name": name, "image_shape": list(shape), "classes": ["a", "b"], "files": files, **extra}


# ---- 1. namespaces: a dataset's folders and models are tied to its identity -------------------

@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_a_spec_may_not_call_itself_a_builtin(name):
    with pytest.raises(SpecError, match=f"name '{name}' is the built-in dataset's"):
        from_dict(_spec(name), source="/tmp/spec.toml")


def test_two_specs_with_one_name_never_share_folders_or_models():
    a, b = from_dict(_spec(sha="a" * 64), "/x/a.toml"), from_dict(_spec(sha="b" * 64), "/y/b.toml")
    assert a.name == b.name == "shapes" and a.key != b.key
    assert a.key == f"shapes-{a.identity[:12]}" and a.default_model_name == f"{a.key}-mlp"
    same = from_dict(_spec(sha="a" * 64), "/elsewhere/copy.json")  # where the spec file lives does not matter
    assert same.key == a.key
    home = Home("/h")
    assert home.split("train", a.key) != home.split("train", b.key) and home.raw_for(a.key) != home.raw_for(b.key)
    mnist = resolve("mnist")  # built-ins keep their names: MNIST's home layout is unchanged
    assert (mnist.key, mnist.default_model_name, resolve("fashion-mnist").key) == ("mnist", "mnist-mlp",
                                                                                  "fashion-mnist")


def _publish(registry: Registry, digest: str, dataset_key: str, lineage: dict | None = None) -> int:
    def build(folder, version):
        write_json(folder / "lineage.json", lineage if lineage is not None else {})
        return {}
    return registry.publish(digest, build, dataset_key)[0]


def test_a_registry_of_another_dataset_is_refused_before_anything_is_written(tmp_path):
    registry = Registry(tmp_path, "mnist-mlp")
    assert _publish(registry, "1" * 64, "mnist") == 1  # MNIST's versions record no dataset in their lineage
    with pytest.raises(RegistryError, match="model 'mnist-mlp' holds versions trained on dataset 'mnist', not "
                                            "'shapes-0123456789ab': publish this one under another --model-name"):
        _publish(registry, "2" * 64, "shapes-0123456789ab", {"dataset": {"name": "shapes", "key": "shapes-0123456789ab"}})
    assert registry.versions() == [1] and not list(tmp_path.glob("models/mnist-mlp/.v*"))
    registry.check_dataset("mnist")  # the owner may publish
    other = Registry(tmp_path, "shapes-mlp")
    _publish(other, "3" * 64, "shapes-0123456789ab", {"dataset": {"name": "shapes", "key": "shapes-0123456789ab"}})
    with pytest.raises(RegistryError, match="holds versions trained on dataset 'shapes-0123456789ab'"):
        other.check_dataset("shapes-ffffffffffff")


# ---- 2. paths built from untrusted text stay inside their root ---------------------------------

@pytest.mark.parametrize("url", ["s3://bucket/../../etc", "s3://bucket/a/../../b", "s3://bucket/a//b",
                                 "s3://bucket/./a", "s3://../x", "s3://Bucket/x", "s3://b/x", "s3://bucket/a\\..\\b"])
def test_a_bucket_home_whose_prefix_climbs_is_refused(url):
    with pytest.raises(objects.ObjectStoreError):
        objects.open_store(url)


def test_a_hostile_models_list_on_a_climbing_home_touches_nothing(tmp_path, monkeypatch):
    """The attack: `models list --home s3://bucket/../../<local home>` used to resolve its working
    copy to a local home and delete that home's versions as 'not in the bucket'."""
    from tests.test_operate import cli

    victim = tmp_path / "victim"
    _publish(Registry(victim, "mnist-mlp"), "1" * 64, "mnist")
    monkeypatch.setenv("DIGITFLOW_CACHE", str(tmp_path / "cache"))
    r = cli("models", "list", "--home", "s3://bucket/../../../victim", check=False)  # <cache>/s3/bucket/../../../
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "'..' segments are not allowed" in r.stderr
    assert (victim / "models/mnist-mlp/v1/metadata.json").is_file()


@pytest.mark.parametrize("rel", ["../x", "a/../../x", "/etc/passwd", "a//b", "", ".", "a/./b", "a\\b", "a\0b"])
def test_inside_refuses_every_way_out(tmp_path, rel):
    with pytest.raises(PathError):
        inside(tmp_path, rel)
    assert inside(tmp_path, "a/b.c") == tmp_path / "a" / "b.c"


def test_object_keys_from_the_bucket_cannot_climb_out_of_the_working_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("DIGITFLOW_CACHE", str(tmp_path))
    with pytest.raises(PathError):
        objects.local_path("s3://bucket/models/../../../../etc/passwd")
    assert objects.local_path("s3://bucket/models/m/v1/x") == tmp_path.resolve() / "s3/bucket/models/m/v1/x"


# ---- 3. state read back is checked against what it cannot rewrite ------------------------------

def _fit(epochs=3, checkpoint=None, resume=None, seed=0, hidden=(8,)):
    rng = np.random.default_rng(0)
    x, y = rng.random((256, 16), np.float32), rng.integers(0, 3, 256)
    hp = nn.presets.get("fast", hidden=hidden, epochs=epochs, batch_size=32, dropout=0.1, seed=seed)
    return nn.presets.train(hp, x, y, checkpoint=checkpoint, resume=resume, n_classes=3, image_shape=(4, 4))


def _state_after_one_epoch(tmp_path, **kw):
    path = tmp_path / "c.npz"

    def save_first(state):  # (the state holds the live arrays: saved at once, as the train task does)
        if not path.exists():
            nn.save_checkpoint(path, state)
    _fit(checkpoint=save_first, **kw)
    return nn.load_checkpoint(path)


def _scalar(s):
    s.params["0.W"] = np.float32(0.5) * np.ones((), np.float32)


def _missing(s):
    s.optimizer.pop(sorted(s.optimizer)[0])


def _wrong_dtype(s):
    s.params["0.b"] = s.params["0.b"].astype(np.float64)


def _nan(s):
    s.params["0.W"][0, 0] = np.nan


@pytest.mark.parametrize("damage, why", [
    (_scalar, "param.0.W is float32 ()"),
    (_missing, "optim arrays missing"),
    (_wrong_dtype, "param.0.b is float64"),
    (_nan, "NaN"),
    (lambda s: setattr(s, "epoch", 7), "epoch 7 is not in 1..2"),
    (lambda s: setattr(s, "epoch", "1"), "epoch '1'"),
    (lambda s: setattr(s, "history", []), "a history of 0 epochs"),
    (lambda s: setattr(s, "generators", [{}, {}]), "random generators"),
    (lambda s: s.generators.update(shuffle={"bit_generator": "MT19937"}), "generator shuffle is not a PCG64"),
    (lambda s: s.generators["shuffle"].update(state={"state": -1, "inc": "x"}), "generator shuffle"),
])
def test_a_checkpoint_that_does_not_fit_the_run_is_refused_before_anything_is_set(tmp_path, damage, why):
    state = _state_after_one_epoch(tmp_path)
    damage(state)
    with pytest.raises(nn.CheckpointMismatch, match=why):
        _fit(resume=state)


def test_another_runs_weights_are_refused_and_a_good_checkpoint_still_resumes_bit_for_bit(tmp_path):
    (tmp_path / "other").mkdir()
    other = _state_after_one_epoch(tmp_path / "other", hidden=(12,))  # another architecture's checkpoint
    with pytest.raises(nn.CheckpointMismatch, match="param.0.W is float32 \\(16, 12\\), this run's is float32 "
                                                    "\\(16, 8\\)"):
        _fit(resume=other)
    full, _ = _fit()
    resumed, _ = _fit(resume=_state_after_one_epoch(tmp_path))
    assert nn.digest(full) == nn.digest(resumed)


@pytest.mark.parametrize("content", [b"", b"PK\x05\x06" + bytes(18), b"not a zip"])
def test_an_unreadable_checkpoint_is_one_model_format_error(tmp_path, content):
    (tmp_path / "c.npz").write_bytes(content)
    with pytest.raises(nn.ModelFormatError, match="unreadable checkpoint"):
        nn.load_checkpoint(tmp_path / "c.npz")


def test_a_deeply_nested_checkpoint_meta_is_one_model_format_error(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, meta=np.frombuffer(b"[" * 100_000 + b"]" * 100_000, np.uint8))
    with pytest.raises(nn.ModelFormatError, match="unreadable checkpoint"):
        nn.load_checkpoint(path)


def test_a_row_file_rewritten_with_a_matching_sidecar_is_still_rebuilt(tmp_path):
    """The row file is checked against the manifest's rows_sha256 (the manifest is verified against
    the digest its reference carries), never against anything written beside it."""
    import hashlib

    from storage.rowstore import open_rows

    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 256, (300, 28, 28), dtype=np.uint8), (np.arange(300) % 10).astype(np.uint8)
    write_idx(tmp_path / "i", x)
    write_idx(tmp_path / "l", y)
    split = tmp_path / "split"
    manifest = write_split(tmp_path / "i", tmp_path / "l", split, split="train", rows_per_shard=100)
    assert manifest["rows_sha256"] == hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()
    digest = sha256_file(split / "manifest.json")
    rows, labels, _ = open_rows(split, digest)
    del rows
    [row_file] = split.glob(".rows-*.u8")
    forged = np.zeros(300 * 784 + 300, np.uint8).tobytes()  # all-black images, all labels 0
    row_file.write_bytes(forged)
    row_file.with_suffix(".json").write_text(json.dumps({"rows": 300, "pixels": 784,
                                                         "sha256": hashlib.sha256(forged).hexdigest()}))
    rows, labels, _ = open_rows(split, digest)
    assert np.array_equal(labels, y) and np.array_equal(rows[0:300], x.reshape(300, 784) / np.float32(255))


# ---- 5. text that becomes markup is escaped for where it lands ---------------------------------

HOSTILE = ["<script>alert(1)</script>", "a|b", "line\nbreak", "![x](http://evil.example/p.png)", "# heading",
           "\x1b[31mred\x1b[0m", "[link](javascript:alert(1))", "`code`", "\u202etxt.exe", "$\\frac{1}{0}$"]


def test_markdown_escaping_leaves_no_markup():
    from storage.text import md

    for text in HOSTILE:
        out = md(text)
        assert "\n" not in out and "\x1b" not in out and "\u202e" not in out
        for ch in "<>|[]!#`$":
            assert ch not in out.replace("\\" + ch, ""), (text, out)  # every one escaped
    assert md("mnist-mlp 2026-12-03T17:12") == "mnist-mlp 2026-12-03T17:12"  # readable where harmless
    assert (md("- item"), md("1. item"), md("= x")) == ("\\- item", "1\\. item", "\\= x")


def test_a_report_with_hostile_class_names_and_lineage_stays_one_table():
    from nn.presets import Hyperparameters
    from publishing.report import render_markdown

    names = HOSTILE[:10]
    per_class = [{"class": i, "precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1} for i in range(10)]
    metrics = {"test_accuracy": 0.5, "test_loss": 1.0, "macro_f1": 0.5, "inference_images_per_second": 1.0,
               "per_class": per_class, "history": [], "confusion_matrix": np.eye(10, dtype=int).tolist(),
               "most_confident_errors": []}
    report = render_markdown(name="m", version=1, metrics=metrics, hyperparameters=Hyperparameters(hidden=(8,)),
                             lineage={"dataset": {"classes": names, "source": "/x/`|\n# y.toml"}},
                             champion=None, classes=names)
    lines = report.splitlines()
    assert [line for line in lines if line.startswith("#")] == [
        "# m v1", "## Compared with the champion", "## Hyperparameters", "## Per class (test)",
        "## Learning curves", "## Confusion matrix", "## Most confidently wrong (test)", "## Lineage"]
    import re

    assert "<script>" not in report and "\x1b" not in report
    assert not re.search(r"(?<!\\)\]\(http://evil", report)  # no link or image opened from a class name
    per_class_rows = lines[lines.index("## Per class (test)") + 4: lines.index("## Learning curves") - 1]
    assert len(per_class_rows) == 10 and all(row.count("|") - row.count("\\|") == 6 for row in per_class_rows)


@pytest.mark.parametrize("name", ["two\nlines", "esc\x1b[2J", "bidi\u202e", "x" * 101])
def test_a_spec_refuses_class_names_that_are_not_one_plain_line(name):
    with pytest.raises(SpecError, match="classes must be a list of 2..1000 distinct names of 1..100 characters, one line each"):
        from_dict({**_spec(), "classes": ["ok", name]}, "/x/s.toml")


def test_terminal_output_shows_control_characters_instead_of_obeying_them():
    from storage.text import terminal

    assert terminal("7\n/tmp/forged: 1 (99.9%)") == "7\\n/tmp/forged: 1 (99.9%)"
    assert terminal("\x1b[2Jred") == "\\x1b[2Jred" and terminal("ok é 7") == "ok é 7"


# ---- 6. sizes known before work -----------------------------------------------------------------

def test_a_deep_spec_is_one_line_before_parsing(tmp_path):
    from storage.datasets import load_spec

    for suffix, text in ((".json", "[" * 50_000 + "]" * 50_000), (".toml", "a = " + "[" * 50_000 + "]" * 50_000)):
        path = tmp_path / f"deep{suffix}"
        path.write_text(text)
        with pytest.raises(SpecError, match="nested more than 16 levels deep") as e:
            load_spec(path)
        assert "\n" not in str(e.value)


def test_a_network_that_cannot_be_built_is_refused_before_any_download():
    from flows.contract import hyperparameters
    from storage import DigitflowError

    with pytest.raises(SpecError, match="image_shape 1024×1024 makes 1,048,576 network inputs"):
        from_dict({**_spec(), "image_shape": [1024, 1024]}, "/x/s.toml")
    big = from_dict({**_spec(shape=(256, 256)), "classes": [f"c{i}" for i in range(1000)]}, "/x/s.toml")
    with pytest.raises(DigitflowError, match="a 65536-2048-1000 network has 136,268,776 parameters"):
        hyperparameters("default", {"hidden": [2048]}, big)


def test_huge_values_in_a_spec_are_quoted_short():
    with pytest.raises(SpecError) as e:
        from_dict({**_spec(), "name": "X" * 1_000_000}, "/x/s.toml")
    assert len(str(e.value)) < 400


# ---- 7. where output goes ------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["folder", "/dev/null", "fifo", "symlink"])
def test_an_output_that_is_not_a_regular_file_is_refused_untouched(tmp_path, target):
    import os

    from storage import DigitflowError
    from storage.atomic import output_path

    if target == "folder":
        path = tmp_path / "out"
        path.mkdir()
    elif target == "fifo":
        path = tmp_path / "fifo"
        os.mkfifo(path)
    elif target == "symlink":
        path = tmp_path / "link"
        path.symlink_to(tmp_path / "elsewhere")
    else:
        path = target
    before = os.lstat(path)
    with pytest.raises(DigitflowError, match="give the path of a new or regular file"):
        output_path(path)
    after = os.lstat(path)
    assert (before.st_mode, before.st_ino) == (after.st_mode, after.st_ino)
    assert output_path(tmp_path / "new.onnx") == tmp_path / "new.onnx"


# ---- 8. outbound calls: webhooks -----------------------------------------------------------------

@pytest.fixture
def slow_receivers():
    """A receiver that trickles its answer a byte at a time, one that redirects, and a target."""
    import http.server
    import time as _time

    from tests.conftest import _Server

    got = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            got.append(self.path)
            if self.path.startswith("/trickle"):
                for byte in b"HTTP/1.1 200 OK\r\n\r\n":
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    _time.sleep(0.5)
            elif self.path.startswith("/redirect"):
                self.send_response(307)
                self.send_header("Location", "/target")
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        def log_message(self, *a):
            pass

    server = _Server(Handler)
    yield server.url, got
    server.close()


def test_a_webhook_has_one_deadline_follows_no_redirect_and_logs_no_secret(slow_receivers, monkeypatch, caplog):
    import time as _time

    from flows import alerts

    url, got = slow_receivers
    monkeypatch.setattr(alerts, "DEADLINE", 1.0)
    t = _time.monotonic()
    assert alerts.notify(url + "trickle/T0KEN", "gate_rejected") is False  # ~10 s of trickle: abandoned at 1 s
    assert _time.monotonic() - t < 2.0
    assert alerts.notify(url + "redirect/T0KEN", "gate_rejected") is False
    _time.sleep(0.2)
    assert "/target" not in got and got[:2] == ["/trickle/T0KEN", "/redirect/T0KEN"]
    assert alerts.notify(url + "ok/T0KEN", "gate_rejected") is True
    assert "no answer within 1 s" in caplog.text and "HTTP 307 (a redirect: not followed)" in caplog.text
    assert "T0KEN" not in caplog.text


def test_a_webhook_url_never_becomes_a_flow_parameter(monkeypatch):
    from flows import alerts
    from flows.cli_common import webhook_param as _webhook
    from flows.cli_schedule import deployment_parameters
    from storage import DigitflowError

    with pytest.raises(DigitflowError, match="a URL is not accepted as a flow parameter"):
        alerts.check_reference("https://user:pw@hooks.example/T0KEN")
    monkeypatch.setenv("DIGITFLOW_WEBHOOK_URL", "unset")  # (restored after the test: _webhook writes it)
    assert _webhook("https://hooks.example/T0KEN") is None  # `run`: handed over in this process's environment
    import os

    assert os.environ["DIGITFLOW_WEBHOOK_URL"] == "https://hooks.example/T0KEN"
    monkeypatch.setenv("TEAM_HOOK", "https://hooks.example/T1")
    assert alerts.webhook_url("env:TEAM_HOOK") == "https://hooks.example/T1"
    with pytest.raises(DigitflowError, match="Prefect Secret block"):  # `deploy`: its parameters are public
        deployment_parameters(None, None, "fast", None, {}, "https://hooks.example/T0KEN", here=False)
    with pytest.raises(DigitflowError, match="set DIGITFLOW_MIRRORS on the workers"):
        deployment_parameters(None, ["https://u:pw@mirror.example/"], "fast", None, {}, None, here=False)
    params = deployment_parameters(None, None, "fast", None, {}, "secret:team-hook", here=False)
    assert params["webhook"] == "secret:team-hook" and "T0KEN" not in str(params)


# ---- 10. noise at exit ---------------------------------------------------------------------------

def test_the_temporary_servers_output_goes_to_a_log_file_not_the_terminal(monkeypatch, tmp_path):
    """Prefect's temporary server prints CancelledError tracebacks while it shuts down after a
    failed run; they go to <PREFECT_HOME>/digitflow-temporary-server.log (shown with --verbose)."""
    import subprocess
    import types

    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_HOME, temporary_settings

    from flows import interrupt

    seen = {}

    def fake_popen(*args, **kwargs):
        seen.update(kwargs)
        return types.SimpleNamespace()

    monkeypatch.delenv("DIGITFLOW_DEBUG", raising=False)
    monkeypatch.setattr(subprocess, "Popen", fake_popen)
    with temporary_settings({PREFECT_HOME: tmp_path}):
        monkeypatch.setattr("prefect.settings.get_current_settings", lambda: types.SimpleNamespace(
            api=types.SimpleNamespace(url=None), home=tmp_path, to_environment_variables=lambda **kw: {}))
        interrupt.detach_ephemeral_server()
        SubprocessASGIServer._run_uvicorn_command(types.SimpleNamespace(port=1))
    assert seen["start_new_session"] is True and seen["stderr"] == subprocess.STDOUT
    assert seen["stdout"].name == str(tmp_path / "digitflow-temporary-server.log")
    seen["stdout"].close()


def test_a_spec_that_is_a_fifo_or_a_device_is_one_line_unread(tmp_path):
    from storage.datasets import load_spec

    fifo = tmp_path / "spec.toml"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        with pytest.raises(SpecError, match=r"not a dataset spec \(.* is not a regular file; a spec is a file of"):
            load_spec(path)


def test_a_spec_error_quotes_the_field_not_the_whole_spec():
    with pytest.raises(SpecError) as e:
        from_dict({**_spec(), "expect": [1, 2], "notes": {"secret": "hunter2"}}, "/x/s.json")
    assert str(e.value) == "s.json: expect must be a table of splits, got [1, 2]"


def test_the_api_token_variable_is_read_in_any_case_as_every_variable_is(tmp_path):
    """A lower-case digitflow_api_token is read (as Settings reads every variable): never an open API."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "flows.cli", "api", "--home", str(tmp_path)], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "digitflow_api_token": "abc"},
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 1 and "token required" in r.stderr and "abc" not in r.stderr, r.stderr


@pytest.mark.parametrize("record, why", [
    ({"hyperparameters": {"hidden": "wide"}}, "damaged (ValidationError)"),
    ({"history": [{"epoch": "first"}]}, "damaged (ValidationError)"),
    ({"history": "long"}, "damaged (ValidationError)"),
    ([1, 2], "damaged (TypeError)"),
])
def test_a_trained_folder_whose_record_does_not_fit_is_refused_in_one_line(tmp_path, record, why):
    """``digitflow evaluate/publish PATH``: training.json is typed where it enters (hyperparameters,
    history), before its weights are loaded."""
    from nn.presets import Hyperparameters, build
    from storage import DigitflowError
    from tasks.model import trained_ref

    model = build(Hyperparameters(hidden=(4,)), n_in=4, n_out=2)
    nn.save(model, tmp_path)
    good = {"weights_sha256": nn.digest(model), "history": [{"epoch": 1, "train_loss": 0.5}],
            "hyperparameters": {"hidden": [4]}}
    write_json(tmp_path / "training.json", good)
    ref = trained_ref(tmp_path)
    assert ref.hyperparameters == Hyperparameters(hidden=(4,)) and ref.history[0]["train_loss"] == 0.5
    # What a newer digitflow may add is dropped, not refused; an empty record is "not recorded".
    write_json(tmp_path / "training.json", {**good, "history": [{"epoch": 1, "grad_norm": 0.1}],
                                            "hyperparameters": {"hidden": [4], "a_newer_setting": 1}})
    ref = trained_ref(tmp_path)
    assert ref.history == [{"epoch": 1}] and ref.hyperparameters == Hyperparameters(hidden=(4,))
    write_json(tmp_path / "training.json", {**good, "hyperparameters": {}})
    assert trained_ref(tmp_path).hyperparameters is None
    write_json(tmp_path / "training.json", {**good, **record} if isinstance(record, dict) else record)
    with pytest.raises(DigitflowError) as e:
        trained_ref(tmp_path)
    assert str(e.value) == f"{tmp_path / 'training.json'}: {why}"
