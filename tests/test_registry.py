"""The model registry: atomic versions, dedup, aliases, the gate, crashes. No Prefect."""

import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from storage.records import Aliases
from storage.registry import Registry, RegistryError, gate
from tests.store_helpers import metrics_json

REPO = Path(__file__).resolve().parents[1]


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def build_with(content: str, accuracy: float = 0.98):
    def build(folder: Path, version: int) -> dict:
        (folder / "model.npz").write_text(content)
        (folder / "model.json").write_text("{}")
        (folder / "metrics.json").write_text(metrics_json(accuracy))
        return {"note": f"built as v{version}"}

    return build


def real_model(seed: int, accuracy: float = 0.98):
    """(weights digest, build) of a tiny real network: for what verifies the weights on use."""
    import nn

    model = nn.Sequential(nn.Dense(4, 3), nn.ReLU(), nn.Dense(3, 2), seed=seed)

    def build(folder: Path, version: int) -> dict:
        nn.save(model, folder)
        (folder / "metrics.json").write_text(metrics_json(accuracy))
        return {}

    return nn.digest(model), build


def test_versions_count_from_one_and_dedup(tmp_path):
    reg = Registry(tmp_path)
    assert reg.versions() == [] and reg.aliases() == Aliases()
    assert reg.publish(sha("aaa"), build_with("a")) == (1, True)
    assert reg.publish(sha("bbb"), build_with("b")) == (2, True)
    assert reg.publish(sha("aaa"), build_with("a again")) == (1, False)  # same weights: same version
    assert reg.versions() == [1, 2]
    assert (reg.path(1) / "model.npz").read_text() == "a"
    meta = reg.metadata(2)
    assert meta.version == 2 and meta.weights_sha256 == sha("bbb") and meta.name == "mnist-mlp"
    assert reg.aliases() == Aliases(latest=2)
    assert not os.access(reg.path(1) / "model.npz", os.W_OK) or os.geteuid() == 0
    assert oct((reg.path(1) / "model.npz").stat().st_mode & 0o777) == "0o444"


def test_resolve(tmp_path):
    reg = Registry(tmp_path)
    reg.publish(sha("aaa"), build_with("a"))
    reg.publish(sha("bbb"), build_with("b"))
    assert [reg.resolve(r) for r in (1, "2", "v1", "latest")] == [1, 2, 1, 2]
    with pytest.raises(RegistryError, match="no 'champion' version yet"):
        reg.resolve("champion")
    with pytest.raises(RegistryError, match=r"has no version 7 \(has \[1, 2\]\)"):
        reg.resolve("v7")
    with pytest.raises(RegistryError, match="'best' is neither a version number nor one of latest, champion"):
        reg.resolve("best")
    with pytest.raises(RegistryError, match="invalid model name"):
        Registry(tmp_path, "../escape")


def test_failed_build_leaves_nothing(tmp_path):
    reg = Registry(tmp_path)

    def broken(folder, version):
        (folder / "model.npz").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        reg.publish(sha("aaa"), broken)
    assert reg.versions() == [] and sorted(p.name for p in reg.root.iterdir()) == [".lock"]
    assert reg.publish(sha("aaa"), build_with("a")) == (1, True)


def _publish_in_process(home, digest, start_at, queue):
    while time.time() < start_at:
        pass
    queue.put(Registry(home).publish(sha(digest), build_with(digest)))


def test_concurrent_publishers_get_distinct_versions(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    start_at = time.time() + 2.0
    procs = [ctx.Process(target=_publish_in_process, args=(str(tmp_path), f"digest-{i}", start_at, queue))
             for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    results = sorted(queue.get(timeout=5) for _ in procs)
    assert [v for v, _ in results] == [1, 2, 3, 4] and all(created for _, created in results)
    reg = Registry(tmp_path)
    contents = {(reg.path(v) / "model.npz").read_text() for v in reg.versions()}
    assert contents == {f"digest-{i}" for i in range(4)}  # nobody overwrote anybody
    assert {reg.metadata(v).weights_sha256 for v in reg.versions()} == set(map(sha, contents))


def test_kill_9_while_publishing_leaves_registry_intact(tmp_path):
    reg = Registry(tmp_path)
    reg.publish(sha("aaa"), build_with("a"))
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from storage.registry import Registry
        def slow(folder, version):
            (folder / "model.npz").write_text("partial")
            print("building", flush=True)
            time.sleep(60)
        Registry({str(tmp_path)!r}).publish({sha("bbb")!r}, slow)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "building"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert reg.versions() == [1] and reg.aliases() == Aliases(latest=1)  # no partial version visible
    assert reg.publish(sha("bbb"), build_with("b")) == (2, True)  # the lock died with the process
    assert [p.name for p in reg.root.iterdir() if "staging" in p.name] == []  # leftovers cleared


@pytest.mark.parametrize("candidate, champion, tolerance, floor, promote, reason", [
    (0.981, None, 0.0, 0.97, True, "there was no champion"),
    (0.969, None, 0.0, 0.97, False, "below the floor 0.9700"),
    (0.981, 0.980, 0.0, 0.97, True, "≥ champion's 0.9800"),
    (0.980, 0.980, 0.0, 0.97, True, "≥ champion's 0.9800"),
    (0.979, 0.980, 0.0, 0.97, False, "below the champion's 0.9800"),
    (0.979, 0.980, 0.002, 0.97, True, "minus tolerance 0.0020"),
    (0.975, 0.980, 0.002, 0.97, False, "below the champion's 0.9800 minus tolerance 0.0020"),
    (0.960, 0.950, 0.0, 0.97, False, "below the floor"),
])
def test_gate_rule(candidate, champion, tolerance, floor, promote, reason):
    ok, why = gate(candidate, champion, tolerance=tolerance, floor=floor)
    assert ok is promote and reason in why


def test_decisions_move_champion_and_record_overrides(tmp_path):
    reg = Registry(tmp_path)
    reg.publish(*real_model(1, 0.98))
    reg.publish(*real_model(2, 0.97))
    reg.record_decision(1, promoted=True, reason="first", accuracy=0.98)
    reg.record_decision(2, promoted=False, reason="worse", accuracy=0.97, champion_before=1)
    assert reg.aliases() == Aliases(latest=2, champion=1)
    assert reg.status(1) == "champion" and reg.status(2) == "rejected"
    decision = reg.promote("v2", reason="rollout test", by="alice")
    assert reg.aliases().champion == 2 and reg.status(1) == "former champion"
    assert decision.by == "alice" and decision.reason == "manual override: rollout test"
    assert decision.champion_before == 1 and decision.history[0].status == "rejected"
    assert json.loads((reg.root / "decisions" / "v2.json").read_text()) == decision.model_dump(mode="json")
    with pytest.raises(RegistryError, match="needs a reason"):
        reg.promote(1, reason=" ")


def _decide_in_process(home, version, start_at, queue):
    registry = Registry(home)
    while time.time() < start_at:
        pass
    queue.put(registry.decide(version, tolerance=0.0, floor=0.9)[0].status)


def test_concurrent_gates_leave_exactly_one_champion_the_better_one(tmp_path):
    """Two publishers finishing together: the gate reads the champion, decides and records it
    under the registry lock, so the worse one can never be promoted over the better one."""
    for trial in range(3):
        home = tmp_path / f"t{trial}"
        reg = Registry(home)
        reg.publish(*real_model(1, 0.95))
        reg.publish(*real_model(2, 0.99))
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        start_at = time.time() + 1.5
        procs = [ctx.Process(target=_decide_in_process, args=(str(home), v, start_at, queue)) for v in (1, 2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        statuses = sorted(queue.get(timeout=5) for _ in procs)
        assert reg.aliases().champion == 2  # whoever decided first, the better one is champion
        assert statuses in (["promoted", "promoted"], ["promoted", "rejected"])
        assert reg.decision(2).status == "promoted"


def test_decide_refuses_a_tampered_candidate(tmp_path):
    reg = Registry(tmp_path)
    reg.publish(*real_model(1, 0.99))
    npz = reg.path(1) / "model.npz"
    npz.chmod(0o644)
    import numpy as np

    with np.load(npz) as f:
        arrays = {k: np.zeros_like(v) for k, v in f.items()}
    np.savez(npz, **arrays)
    with pytest.raises(RegistryError, match="model.npz: weights SHA-256 .* is not the"):
        reg.decide(1, tolerance=0.0, floor=0.9)
    assert reg.decision(1) is None and reg.aliases().champion is None


def test_a_record_over_the_limit_is_damaged_and_never_read(tmp_path):
    """A registry record is read whole: one larger than RECORD_LIMIT (16 MiB) is refused unread."""
    from storage.registry import RECORD_LIMIT

    reg = Registry(tmp_path)
    reg.publish(*real_model(1))
    for name in ("metrics.json", "lineage.json"):
        path = reg.path(1) / name
        if path.exists():
            path.chmod(0o644)
        path.write_bytes(b"{" + b" " * RECORD_LIMIT + b"}")  # valid JSON, one byte over
    assert reg.problem(1) == "unreadable (ValueError)" and reg.status(1).startswith("damaged")
    assert reg.dataset_of(1) is None
    with pytest.raises(RegistryError, match=r"^v1/lineage.json is not valid JSON \(ValueError\)$"):
        reg.classes(1)
    (reg.path(1) / "lineage.json").write_text('{"dataset": {"classes": "not a list"}}')
    with pytest.raises(RegistryError, match=r"^v1/lineage.json is not a version's lineage$"):
        reg.classes(1)


def test_a_damaged_decision_is_never_taken_for_undecided(tmp_path):
    """A decision record that exists but does not read (a field missing, a bad value) may hold a
    person's rejection: the gate refuses to decide over it, and listings show it as damaged."""
    reg = Registry(tmp_path)
    reg.publish(*real_model(1, 0.98))
    reg.publish(*real_model(2, 0.99))
    reg.decide(1, tolerance=0.0, floor=0.9)
    (reg.root / "decisions" / "v2.json").write_text(json.dumps(
        {"version": 2, "status": "rejected", "reason": "rejected by alice", "at": "x"}))  # no "by"
    with pytest.raises(RegistryError, match=r"v2: decisions/v2.json is damaged; the gate does not decide over it"):
        reg.decide(2, tolerance=0.0, floor=0.9)
    assert reg.aliases().champion == 1 and reg.status(2) == "damaged: decisions/v2.json is damaged"
    assert reg.decision_problem(2) == "decisions/v2.json is damaged" and reg.decision_problem(1) is None
    # A person may decide over it; what the damaged record said is kept in the new decision and its card.
    from publishing.card import decision_lines

    decision = reg.promote(2, reason="checked by hand", by="bob")
    assert decision.promoted and reg.aliases().champion == 2 and reg.decision_problem(2) is None
    assert "rejected by alice" in reg.decision(2).replaced_damaged
    assert decision_lines(reg.decision(2))[1].startswith("- A damaged decision record was replaced; it read: {")
    # A damaged record that is a symbolic link is never read through (it could point at any file).
    secret = tmp_path / "credentials"
    secret.write_text("aws_secret_access_key = hunter2")
    reg.publish(*real_model(3, 0.99))
    (reg.root / "decisions" / "v3.json").symlink_to(secret)
    assert reg.promote(3, reason="by hand", by="bob").replaced_damaged == "(not read: a symbolic link)"
    assert "hunter2" not in (reg.root / "decisions" / "v3.json").read_text()
    # A damaged record of any size: its first 4 KiB are kept, no more.
    reg.publish(*real_model(4, 0.99))
    (reg.root / "decisions" / "v4.json").write_text("{" + "x" * 100_000)
    assert reg.promote(4, reason="by hand", by="bob").replaced_damaged == "{" + "x" * 4095


@pytest.mark.parametrize("change, problem", [
    (lambda m: m.update(test_accuracy=float("nan")), "metrics.json is not a version's metrics"),
    (lambda m: m.update(per_class=[{}, {}]), "metrics.json is not a version's metrics"),
    (lambda m: m.update(confusion_matrix=[[1, 0], [0, 1], [0, 0]]), "metrics.json is not a version's metrics"),
    (lambda m: m["per_class"][0].update(f1="a"), "metrics.json is not a version's metrics"),
    (lambda m: m.update(history=[{"epoch": 1, "train_loss": "low"}]), "metrics.json is not a version's metrics"),
    (lambda m: m.update(history=[{"epoch": -1}]), "metrics.json is not a version's metrics"),
])
def test_metrics_that_do_not_fit_make_a_damaged_version(tmp_path, change, problem):
    """Every figure is finite and in range, the confusion matrix square with a row per class:
    else the version is damaged (a listing shows it; nothing serves, promotes or renders it)."""
    from tests.store_helpers import metrics_record

    reg = Registry(tmp_path)
    reg.publish(*real_model(1))
    metrics = metrics_record(0.9)
    change(metrics)
    path = reg.path(1) / "metrics.json"
    path.chmod(0o644)
    path.write_text(json.dumps(metrics))  # (json writes NaN as NaN, which Python reads back)
    assert reg.problem(1) == problem and reg.intact_versions() == []
    with pytest.raises(RegistryError, match="damaged version"):
        reg.promote(1, reason="try")


def test_a_fifo_or_a_device_under_the_home_is_never_read(tmp_path):
    """A record that is not a regular file would block (a FIFO) or never end (/dev/zero)."""
    reg = Registry(tmp_path)
    reg.publish(*real_model(1))
    (reg.path(1) / "metrics.json").unlink()
    os.mkfifo(reg.path(1) / "metrics.json")
    (reg.root / "decisions").mkdir(exist_ok=True)
    (reg.root / "decisions" / "v1.json").symlink_to("/dev/zero")
    assert reg.problem(1) == "unreadable (ValueError)" and reg.status(1).startswith("damaged")
    assert reg.decision_problem(1) == "decisions/v1.json is damaged"


def test_hyperparameters_are_typed_on_reading_and_none_when_not_recorded(tmp_path):
    """metadata.json's hyperparameters read as nn.presets.Hyperparameters; an older digitflow's
    empty record reads as "not recorded" (never as the defaults); a value of the wrong type makes
    the version damaged."""
    from nn.presets import Hyperparameters

    reg = Registry(tmp_path)
    reg.publish(*real_model(1))
    path = reg.path(1) / "metadata.json"
    record = json.loads(path.read_text())
    path.chmod(0o644)
    for hyperparameters, expected in [({"hidden": [64, 32], "epochs": 3, "from_a_newer_digitflow": 1},
                                       Hyperparameters(hidden=(64, 32), epochs=3)), ({}, None)]:
        path.write_text(json.dumps({**record, "hyperparameters": hyperparameters}))
        assert reg.problem(1) is None and reg.metadata(1).hyperparameters == expected
    path.write_text(json.dumps({**record, "hyperparameters": {"hidden": "wide"}}))
    assert reg.problem(1) == "metadata.json is not a version's record" and reg.intact_versions() == []


def test_a_version_read_once_is_read_again_when_its_files_change(tmp_path):
    """Listings ask each version's status, record and metrics: parsed once while the files stay
    as they were, read again as soon as one is replaced or rewritten."""
    reg = Registry(tmp_path)
    reg.publish(*real_model(1))
    assert reg.problem(1) is None and reg.metrics(1).test_accuracy == 0.98
    path = reg.path(1) / "metrics.json"
    path.chmod(0o644)
    path.write_text(path.read_text().replace('"test_accuracy": 0.98', '"test_accuracy": 0.5'))
    assert reg.problem(1) is None and reg.metrics(1).test_accuracy == 0.5  # rewritten: read again
    path.write_text("{}")
    assert reg.problem(1) == "metrics.json has no test accuracy"
    # Rewritten in place to the same size with its modification time put back: read again too.
    good = metrics_json(0.98)
    path.write_text(good)
    assert reg.metrics(1).test_accuracy == 0.98
    before = path.stat()
    path.write_text(good.replace("0.98", "0.11", 1))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns
    assert reg.metrics(1).test_accuracy == 0.11


def test_a_damaged_lineage_makes_a_damaged_version(tmp_path):
    reg = Registry(tmp_path)
    reg.publish(*real_model(1))
    (reg.path(1) / "lineage.json").write_text('{"dataset": {"classes": []}}')
    assert reg.problem(1) == "lineage.json is not a version's lineage"
