"""The fault suite: every fault ends fast in verified data or one clear line.

Each case runs the real `digitflow` command as a user would (a subprocess, often in its own
process group) and asserts the exit status, the final stderr line, a bound on the time taken
and the state of the home afterwards: nothing partial visible, nothing damaged used.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from storage.mnist import FILES
from storage.registry import Registry
from tests.prefect_helpers import free_port

REPO = Path(__file__).resolve().parents[1]
TRAIN_IMAGES = FILES["train-images-idx3-ubyte.gz"]


def digitflow(*args, api_url=None, timeout=300, env=None):
    """Run the CLI to completion: (exit status, stdout, stderr, seconds)."""
    from tests import incli

    t0 = time.monotonic()
    if incli.suitable(args):  # no Prefect run: in this process (tests/incli.py)
        r = incli.digitflow(*args, env=env)
        return r.returncode, r.stdout, r.stderr, time.monotonic() - t0
    environment = {**os.environ, **(env or {})}
    if api_url:
        environment["PREFECT_API_URL"] = api_url
    r = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=environment, capture_output=True,
                       text=True, timeout=timeout)
    return r.returncode, r.stdout, r.stderr, time.monotonic() - t0


def run_log(home: Path, since: int = 0) -> str:
    """What the runs on ``home`` logged (Prefect's log lines go to <home>/logs/digitflow.log, not
    the terminal), from byte ``since`` on."""
    path = home / "logs" / "digitflow.log"
    return path.read_bytes()[since:].decode("utf-8", "replace") if path.is_file() else ""


def log_size(home: Path) -> int:
    path = home / "logs" / "digitflow.log"
    return path.stat().st_size if path.is_file() else 0


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def assert_one_line_failure(rc, err, *needles):
    assert rc == 1, err
    assert "Traceback" not in err, err
    line = last_line(err)
    assert line.startswith("digitflow: error: "), err
    for needle in needles:
        assert needle in line, line
    return line


def leftovers(home: Path) -> list[str]:
    """Anything half-written: temp files, staging or old folders."""
    return sorted(str(p.relative_to(home)) for p in home.rglob("*")
                  if p.name.endswith(".tmp") or ".staging-" in p.name or ".old-" in p.name)


def flip_in_place(path: Path, offset: int | None = None) -> None:
    """Change one byte, keeping size, mtime and inode (what a rotting disk does)."""
    st = path.stat()
    mode = st.st_mode
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2 if offset is None else offset)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    path.chmod(mode & 0o777)
    assert path.stat().st_ino == st.st_ino and path.stat().st_size == st.st_size


@pytest.fixture
def home(published):
    """A private copy of a home where the real pipeline published a fast model as v1."""
    return published


# ---- one line, and a hint ------------------------------------------------------------

def test_no_mirror_reachable_ends_in_one_line_with_a_hint(tmp_path, api_url):
    rc, out, err, _ = digitflow("ingest", "--home", str(tmp_path / "h"), "--mirror", "http://127.0.0.1:9/",
                                "--retries", "0", api_url=api_url)
    assert_one_line_failure(rc, err, "no mirror served verified bytes", "127.0.0.1:9", "--mirror", "DIGITFLOW_MIRRORS")
    assert not (tmp_path / "h" / "data").exists() and leftovers(tmp_path / "h") == []


def test_a_404_mirror_ends_in_one_line(tmp_path, faulty, api_url):
    faulty.default = "404"
    rc, _, err, _ = digitflow("run", "--home", str(tmp_path / "h"), "--mirror", faulty.url, "--preset", "fast",
                              "--retries", "0", api_url=api_url)
    assert_one_line_failure(rc, err, "HTTP 404")


def test_a_prefect_server_that_does_not_answer_is_one_line_after_the_first(tmp_path):
    """PREFECT_API_URL naming a dead server: the command's first line says where it runs, then the
    one error line (no httpx traceback), the URL's credentials in neither; nothing written."""
    dead = f"http://alice:s3cret@127.0.0.1:{free_port()}/api"
    rc, out, err, _ = digitflow("evaluate", "--home", str(tmp_path / "h"), env={"PREFECT_API_URL": dead})
    assert_one_line_failure(rc, err, "no Prefect server answers at", "(PREFECT_API_URL)")
    first, last = err.strip().splitlines()[0], last_line(err)
    assert err.strip().splitlines() == [first, last], err
    assert first.startswith(f"digitflow: home {tmp_path / 'h'} · Prefect at http://***@127.0.0.1:"), first
    assert "s3cret" not in out + err and "alice" not in out + err


def test_verbose_shows_the_traceback(tmp_path, api_url):
    rc, _, err, _ = digitflow("ingest", "--verbose", "--home", str(tmp_path / "h"), "--mirror", "http://127.0.0.1:9/",
                              "--retries", "0", api_url=api_url)
    assert rc == 1 and "Traceback" in err and last_line(err).startswith("digitflow: error: ")


def test_credentials_in_a_mirror_never_reach_the_logs_or_the_home(tmp_path, mnist_server, api_url):
    secret_mirror = mnist_server.replace("http://", "http://alice:s3cret@")
    home = tmp_path / "h"
    rc, out, err, _ = digitflow("ingest", "--home", str(home), "--mirror", secret_mirror, api_url=api_url)
    assert rc == 0, err
    assert "s3cret" not in out + err
    assert all("s3cret" not in p.read_text() for p in (home / "raw" / "mnist").glob("*.json"))
    from tests.prefect_helpers import client_for, flow_runs

    with client_for(api_url) as client:  # the dashboard's record of the run holds no secret either
        run = flow_runs(client, "ingest")[0]
        assert "s3cret" not in json.dumps(run.parameters)


# ---- bounded inputs: refused before any work -----------------------------------------

@pytest.mark.parametrize("args, text", [
    (["--seed", "-1"], "seed must be an integer in 0..4294967295, got -1"),
    (["--hidden", "100000000"], "hidden must be 1 to 16 integers in 1..16384, got [100000000]"),
    (["--hidden", "16384,16384"], "parameters, more than the 50,000,000 allowed"),
    (["--epochs", "2.5"], "cannot read '2.5' as epochs: it takes an integer in 1..10000"),
    (["--patience", "soon"], "cannot read 'soon' as patience: it takes an integer in 1..10000, or none: off"),
    (["--retries", "2000"], "--retries must be an integer in 0..10, got 2000"),
    (["--timeout", "0"], "--timeout must be a number in 0.1..3600.0, got 0.0"),
    (["--model-name", "../etc"], "invalid model name '../etc'"),
])
def test_bad_values_fail_before_any_work(tmp_path, args, text):
    home = tmp_path / "h"
    rc, out, err, seconds = digitflow("run", "--home", str(home), "--mirror", "http://127.0.0.1:9/", *args)
    assert_one_line_failure(rc, err, text)
    assert not home.exists() and "Starting temporary server" not in err and seconds < 15
    assert "starting the local Prefect server" not in err


def test_predict_refuses_bombs_and_lying_idx_headers(home, tmp_path):
    bomb = tmp_path / "bomb.png"
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
                     + chunk(b"IEND", b""))
    rc, _, err, seconds = digitflow("predict", str(bomb), "--home", str(home))
    assert_one_line_failure(rc, err, "bomb.png", "decompression bomb")
    assert seconds < 15
    liar = tmp_path / "liar-idx3-ubyte"
    liar.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">III", 1_000_000, 28, 28) + bytes(784 * 10))
    rc, _, err, _ = digitflow("predict", str(liar), "--home", str(home))
    assert_one_line_failure(rc, err, "liar-idx3-ubyte", "truncated")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(bomb.read_bytes()[:30])
    rc, _, err, _ = digitflow("predict", str(truncated), "--home", str(home))
    assert_one_line_failure(rc, err, "cut.png")


# ---- rotten or tampered files are never used -----------------------------------------

def test_a_raw_file_flipped_in_place_is_fetched_again(tmp_path, mnist_server, api_url):
    home = tmp_path / "h"
    assert digitflow("ingest", "--home", str(home), "--mirror", mnist_server, api_url=api_url)[0] == 0
    raw = home / "raw" / "mnist" / TRAIN_IMAGES.idx_name
    flip_in_place(raw)
    before = log_size(home)
    rc, out, err, _ = digitflow("ingest", "--home", str(home), "--mirror", mnist_server, api_url=api_url)
    assert rc == 0, err
    assert "train-images-idx3-ubyte.gz: fetched from" in run_log(home, before)  # repaired, not "cached"
    assert hashlib.sha256(raw.read_bytes()).hexdigest() == TRAIN_IMAGES.idx_sha256


def test_a_damaged_shard_is_refused_by_train_and_rebuilt_by_ingest(tmp_path, mnist_server, api_url):
    home = tmp_path / "h"
    assert digitflow("ingest", "--home", str(home), "--mirror", mnist_server, api_url=api_url)[0] == 0
    shard = home / "data/mnist/train/part-00002.parquet"
    good = shard.read_bytes()
    flip_in_place(shard)
    rc, _, err, _ = digitflow("train", "--home", str(home), "--preset", "fast", "--epochs", "1", api_url=api_url)
    assert_one_line_failure(rc, err, "part-00002.parquet", "does not match the manifest", "digitflow ingest")
    rc, _, err, _ = digitflow("ingest", "--home", str(home), "--mirror", mnist_server, api_url=api_url)
    assert rc == 0, err
    assert shard.read_bytes() == good  # rebuilt, byte for byte


def test_a_manifest_missing_a_shard_is_refused_then_repaired(tmp_path, mnist_server, api_url):
    home = tmp_path / "h"
    assert digitflow("ingest", "--home", str(home), "--mirror", mnist_server, api_url=api_url)[0] == 0
    manifest = home / "data/mnist/train/manifest.json"
    data = json.loads(manifest.read_text())
    del data["shards"][3]
    manifest.write_text(json.dumps(data))
    rc, _, err, _ = digitflow("train", "--home", str(home), "--preset", "fast", "--epochs", "1", api_url=api_url)
    assert_one_line_failure(rc, err, "manifest.json", "do not cover rows 0…59999 exactly once")
    assert digitflow("ingest", "--home", str(home), "--mirror", mnist_server, api_url=api_url)[0] == 0
    assert len(json.loads(manifest.read_text())["shards"]) == 6


def rewrite(path: Path, data: bytes) -> None:
    path.chmod(0o644)
    path.write_bytes(data)


def zeroed_npz(path: Path) -> bytes:
    """The same .npz format and shapes, every weight zero."""
    import io

    with np.load(path) as npz:
        arrays = {k: np.zeros_like(v) for k, v in npz.items()}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_tampered_weights_are_refused_everywhere(home, tmp_path, api_url):
    v1 = home / "models/mnist-mlp/v1"
    rewrite(v1 / "model.npz", zeroed_npz(v1 / "model.npz"))
    rc, _, err, _ = digitflow("evaluate", "--model", "v1", "--home", str(home), api_url=api_url)
    assert_one_line_failure(rc, err, "v1/model.npz", "is not the", "recorded")
    png = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.pad(np.full((10, 4), 255, np.uint8), 9)).save(png)
    for args in (["predict", str(png)], ["models", "export", "v1", "--onnx", str(tmp_path / "m.onnx")],
                 ["models", "promote", "1", "--reason", "test"]):
        rc, out, err, _ = digitflow(*args, "--home", str(home))
        assert_one_line_failure(rc, err, "v1/model.npz")
    assert not (tmp_path / "m.onnx").exists()


def test_nan_preprocessing_is_refused(home, tmp_path):
    spec_path = home / "models/mnist-mlp/v1/model.json"
    spec = json.loads(spec_path.read_text())
    spec["preprocessing"]["std"] = float("nan")
    rewrite(spec_path, json.dumps(spec).encode())
    png = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.pad(np.full((10, 4), 255, np.uint8), 9)).save(png)
    rc, out, err, _ = digitflow("predict", str(png), "--home", str(home))
    assert_one_line_failure(rc, err, "model.json", "finite positive std")
    assert "nan" not in out


@pytest.mark.parametrize("damage", ["truncated", "pickled", "huge header", "inflates"])
def test_damaged_model_files_end_in_one_line_fast(home, damage, api_url):
    npz = home / "models/mnist-mlp/v1/model.npz"
    data = npz.read_bytes()
    if damage == "truncated":
        rewrite(npz, data[: len(data) // 3])
    elif damage == "pickled":
        import io

        with np.load(npz) as f:
            arrays = dict(f)
        arrays["W1"] = np.array([{"evil": 1}], dtype=object)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        rewrite(npz, buffer.getvalue())
    elif damage == "huge header":  # W0's header claims a (200000, 200000) float32 array: 160 GB
        import io
        import zipfile

        header = "{'descr': '<f4', 'fortran_order': False, 'shape': (200000, 200000), }"
        header = header + " " * (63 - (10 + len(header)) % 64) + "\n"
        liar = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + bytes(1024)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as z, np.load(npz) as f:
            for k, v in f.items():
                z.writestr(k + ".npy", liar if k == "W0" else _npy(v))
        rewrite(npz, buffer.getvalue())
    else:  # a small compressed file that would inflate far past what model.json declares
        import io
        import zipfile

        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
            with np.load(npz) as f:
                for k, v in f.items():
                    z.writestr(k + ".npy", _npy(np.zeros((3000, 10000), np.float32)) if k == "W0" else _npy(v))
        rewrite(npz, buffer.getvalue())
    t0 = time.monotonic()
    rc, _, err, _ = digitflow("models", "export", "v1", "--onnx", "/dev/null", "--home", str(home))
    assert_one_line_failure(rc, err, "model.npz")
    assert time.monotonic() - t0 < 20


def _npy(a: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, a)
    return buffer.getvalue()


# ---- the registry: damage never breaks a listing; the next publish repairs ------------

def test_stray_version_and_damaged_aliases_are_shown_and_repaired(home, mnist_server, api_url):
    models = home / "models/mnist-mlp"
    (models / "v9").mkdir()
    (models / "aliases.json").chmod(0o644)
    (models / "aliases.json").write_text('{"latest": 1, "champ')
    rc, out, err, _ = digitflow("models", "list", "--json", "--home", str(home))
    assert rc == 0, err
    rows = {r["version"]: r for r in json.loads(out)}
    assert rows[9]["status"].startswith("damaged: metadata.json is missing")
    assert rows[1]["status"] == "champion" and rows[1]["aliases"] == ["champion", "latest"]
    rc, out, err, _ = digitflow("models", "list", "--home", str(home))
    assert rc == 0 and "damaged" in out and "aliases.json is damaged" in out
    # The next publish (a different seed: new weights) repairs aliases.json; v9 is never reused.
    rc, out, err, _ = digitflow("run", "--home", str(home), "--mirror", mnist_server, "--preset", "fast",
                                "--seed", "11", api_url=api_url)
    assert rc == 0, err
    aliases = json.loads((models / "aliases.json").read_text())
    reg = Registry(home)  # the gate (tolerance 0): v10 is champion exactly when it is at least as accurate as v1
    better = reg.metrics(10).test_accuracy >= reg.metrics(1).test_accuracy
    assert aliases["latest"] == 10 and aliases["champion"] == (10 if better else 1)


def test_a_missing_latest_alias_is_restored_by_an_unchanged_rerun(home, mnist_server, api_url):
    aliases = home / "models/mnist-mlp/aliases.json"
    aliases.chmod(0o644)
    aliases.write_text(json.dumps({"champion": 1}))
    rc, out, err, _ = digitflow("run", "--home", str(home), "--mirror", mnist_server, "--preset", "fast",
                                api_url=api_url)
    assert rc == 0, err
    assert "unchanged" in out and "now champion" in out  # not the old decision replayed as news
    assert json.loads(aliases.read_text()) == {"champion": 1, "latest": 1}


# ---- a full disk ----------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True)
    if r.returncode != 0:
        if os.geteuid() == 0:
            pytest.fail(f"cannot mount a tmpfs as root: {r.stderr.decode().strip()}")
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_ends_in_one_line_and_leaves_nothing_partial(small_disk, mnist_server, api_url):
    home = small_disk / "home"
    rc, _, err, _ = digitflow("ingest", "--home", str(home), "--mirror", mnist_server, "--retries", "0",
                              api_url=api_url)
    line = assert_one_line_failure(rc, err, str(home), "No space left on device")
    assert "nothing partial" in line
    assert leftovers(home) == []
    raw = home / "raw" / "mnist"
    for path in raw.glob("*-ubyte"):  # whatever made it is complete and verified
        spec = FILES[path.name + ".gz"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == spec.idx_sha256


# ---- interrupts: Ctrl-C and SIGTERM ---------------------------------------------------

class Running:
    """A `digitflow` command in its own process group, its output collected in files."""

    def __init__(self, tmp_path: Path, *args, api_url=None, shell_pipe: bool = False, ephemeral: bool = False):
        self.out, self.err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
        self.home = Path(args[args.index("--home") + 1])
        env = {**os.environ}
        if api_url:
            env["PREFECT_API_URL"] = api_url
        if ephemeral:  # Prefect's temporary per-process server instead of the local one
            env["DIGITFLOW_EPHEMERAL"] = "1"
        command = [str(Path(sys.executable).with_name("digitflow")), *args]
        if shell_pipe:  # as a user would: `digitflow run ... | tee log`, Ctrl-C to the whole pipeline
            command = ["bash", "-c", " ".join(map(_quote, command)) + f" | tee {_quote(str(tmp_path / 'tee.txt'))}"]
        self.proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=open(self.out, "w"),
                                     stderr=open(self.err, "w"), start_new_session=True)

    def wait_for(self, text: str, timeout: float = 120) -> None:
        """Until ``text`` shows on stderr or in the home's run log."""
        deadline = time.monotonic() + timeout
        while text not in self.err.read_text() + run_log(self.home):
            assert self.proc.poll() is None, self.err.read_text()
            assert time.monotonic() < deadline, f"never saw {text!r}:\n" + self.err.read_text()
            time.sleep(0.1)

    def signal_group(self, sig) -> tuple[int, float]:
        t0 = time.monotonic()
        os.killpg(self.proc.pid, sig)
        try:
            rc = self.proc.wait(timeout=30)
        finally:
            _kill_group(self.proc.pid)
        return rc, time.monotonic() - t0


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def assert_interrupted(rc, seconds, run: Running, code=130):
    err = run.err.read_text()
    assert rc == code, err
    assert seconds < 5, f"took {seconds:.1f} s"
    line = last_line(err)
    assert line.startswith("digitflow: interrupted by ") and "nothing half-written is visible" in line, line
    assert "Traceback" not in err


def test_ctrl_c_during_download_in_ephemeral_mode(tmp_path, faulty):
    faulty.default = "trickle"
    home = tmp_path / "h"
    run = Running(tmp_path, "ingest", "--home", str(home), "--mirror", faulty.url, ephemeral=True)
    run.wait_for("Beginning flow run")
    time.sleep(1.5)
    rc, seconds = run.signal_group(signal.SIGINT)
    assert_interrupted(rc, seconds, run)
    assert leftovers(home) == [] or all(p.endswith(".tmp") for p in leftovers(home))
    assert not list((home / "raw" / "mnist").glob("*-ubyte"))  # nothing unverified in place


def test_ctrl_c_during_training_then_rerun_resumes_from_cache(tmp_path, ingested, mnist_server):
    home = ingested
    run = Running(tmp_path, "run", "--home", str(home), "--mirror", mnist_server, "--preset", "fast", "--epochs", "30")
    run.wait_for("epoch 1/30")
    rc, seconds = run.signal_group(signal.SIGINT)
    assert_interrupted(rc, seconds, run)
    assert "train [128], 30 epochs" in last_line(run.err.read_text())  # what was interrupted, marked Crashed
    assert not (home / "models").exists() and not list((home / "trained").glob("[!.]*"))
    # The rerun finds the ingested data cached (nothing downloaded again) and finishes.
    before = log_size(home)
    rc, out, err, _ = digitflow("run", "--home", str(home), "--mirror", mnist_server, "--preset", "fast",
                                "--epochs", "1")
    assert rc == 0, err
    log = run_log(home, before)
    assert "fetched from" not in log and "Finished in state Cached" in log
    assert "✓ ingest-mnist (10000 rows/shard) 13 steps, 13 cached" in err  # the terminal's summary of it


def test_ctrl_c_through_a_pipe_during_shard_writing(tmp_path, mnist_server):
    home = tmp_path / "h"
    run = Running(tmp_path, "ingest", "--home", str(home), "--mirror", mnist_server, "--rows-per-shard", "200",
                  shell_pipe=True)
    run.wait_for("Task run 'parse test'")  # the shards are being written now (300 of them)
    rc, seconds = run.signal_group(signal.SIGINT)
    err = run.err.read_text()
    assert rc in (130, 0), err  # bash reports the pipeline's last command (tee)
    assert seconds < 5
    assert "digitflow: interrupted by Ctrl-C (SIGINT)" in err and "Traceback" not in err
    manifest = home / "data/mnist/train/manifest.json"
    assert leftovers(home) == [] or not manifest.exists() or json.loads(manifest.read_text())["rows"] == 60000


@pytest.mark.e2e
def test_sigterm_against_a_real_server_marks_the_run_crashed(tmp_path, mnist_server, server):
    from tests.prefect_helpers import client_for, flow_runs

    home = tmp_path / "h"
    run = Running(tmp_path, "run", "--home", str(home), "--mirror", mnist_server, "--preset", "fast", "--epochs", "30",
                  "--model-name", "sigterm-test", api_url=server)
    run.wait_for("epoch 1/30")
    t0 = time.monotonic()
    os.kill(run.proc.pid, signal.SIGTERM)  # to the command alone
    rc = run.proc.wait(timeout=30)
    seconds = time.monotonic() - t0
    _kill_group(run.proc.pid)
    assert_interrupted(rc, seconds, run, code=143)
    with client_for(server) as client:
        parent = next(r for r in flow_runs(client, "retrain") if r.parameters.get("model_name") == "sigterm-test")
        assert parent.state.name == "Crashed"
        from tests.prefect_helpers import task_runs

        states = {name: r.state.name for name, r in task_runs(parent.id, settle=0).items()}
        assert states["train [128], 30 epochs"] == "Crashed" and "Running" not in states.values()


def test_ctrl_c_at_publish(tmp_path, ingested, mnist_server, api_url):
    """Interrupted after evaluation, while the version is assembled or gated: no half version
    is visible, and the rerun publishes it whole."""
    home = ingested
    run = Running(tmp_path, "run", "--home", str(home), "--mirror", mnist_server, "--preset", "fast", api_url=api_url)
    run.wait_for("test accuracy")  # the evaluate task's line: publish comes next
    rc, seconds = run.signal_group(signal.SIGINT)
    assert rc == 130 and seconds < 5, run.err.read_text()
    reg = Registry(home)
    assert all(reg.problem(v) is None for v in reg.versions())  # no half version visible
    assert all(Path(p).name.startswith(".") for p in leftovers(home / "models"))  # at most a hidden staging folder
    rc, out, err, _ = digitflow("run", "--home", str(home), "--mirror", mnist_server, "--preset", "fast",
                                api_url=api_url)
    assert rc == 0 and Registry(home).versions() == [1], err
    assert leftovers(home / "models") == []  # the rerun cleared what the interrupted one left
