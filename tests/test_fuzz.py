"""Property tests (Hypothesis) for every parser and loader of files: IDX, dataset specs,
model.json/model.npz, checkpoints, bucket URLs and relative paths. Properties: a hostile input
raises only the loader's own one-line error type (never another exception), the work is bounded
(sizes are checked before reading), and a round trip gives back what was written.
Example counts are fixed so the suite's time stays predictable."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import nn
from storage import objects
from storage.datasets import SpecError, from_dict, load_spec
from storage.idx import DTYPES, IDXError, read_header, read_idx, write_idx
from storage.paths import PathError, inside

REPO = Path(__file__).resolve().parents[1]

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---- IDX ----------------------------------------------------------------------------------------

@st.composite
def idx_bytes(draw) -> bytes:
    """Mostly well-formed IDX files, then damaged: truncated, extended, bytes flipped, or raw noise."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=64))
    code = draw(st.sampled_from(sorted(DTYPES)))
    shape = draw(st.lists(st.integers(0, 5), min_size=1, max_size=3))
    data = draw(st.binary(min_size=0, max_size=200))
    out = bytes([0, 0, code, len(shape)]) + b"".join(struct.pack(">I", d) for d in shape) + data
    cut = draw(st.integers(0, len(out)))
    flip = draw(st.integers(0, max(0, len(out) - 1)))
    how = draw(st.sampled_from(["as is", "truncate", "flip", "huge dim"]))
    if how == "truncate":
        out = out[:cut]
    elif how == "flip" and out:
        out = out[:flip] + bytes([out[flip] ^ 0xFF]) + out[flip + 1:]
    elif how == "huge dim" and len(out) >= 8:
        out = out[:4] + struct.pack(">I", 0xFFFFFFFF) + out[8:]
    return out


@FUZZ
@given(content=idx_bytes())
def test_idx_reader_raises_only_idx_errors(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("idx") / "f-ubyte"
    path.write_bytes(content)
    try:
        header = read_header(path)
    except IDXError as e:
        assert str(e).startswith("f-ubyte: ") and "\n" not in str(e)
        return
    assert header.offset + header.nbytes == len(content)  # accepted only when the length is exact
    array = read_idx(path)
    assert array.shape == header.shape and array.dtype == header.dtype.newbyteorder("=")


@FUZZ
@given(array=st.sampled_from([np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]).flatmap(
    lambda t: st.lists(st.integers(0, 4), min_size=1, max_size=3).map(
        lambda shape: np.arange(int(np.prod(shape)), dtype=t).reshape(shape))))
def test_idx_round_trip(tmp_path_factory, array):
    path = tmp_path_factory.mktemp("idx") / "a"
    write_idx(path, array)
    back = read_idx(path)
    assert back.shape == array.shape and np.array_equal(back, array)


# ---- dataset specs --------------------------------------------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
                           lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=20)


@st.composite
def specs(draw) -> dict:
    """A valid spec with some fields replaced by arbitrary JSON values."""
    shape = [draw(st.integers(1, 8)), draw(st.integers(1, 8))]
    n = draw(st.integers(1, 5))
    files = [{"name": f"{split}-{kind}.gz", "split": split, "kind": kind, "sha256": "a" * 64,
              "size": 16 + n * shape[0] * shape[1] if kind == "images" else 8 + n}
             for split in ("train", "test") for kind in ("images", "labels")]
    spec = {"name": "fuzz", "image_shape": shape, "classes": ["a", "b", "c"], "mirrors": [], "files": files}
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.sampled_from(["top", "file"]))
        if where == "top":
            spec[draw(st.sampled_from(sorted(spec) + ["extra", "notes"]))] = draw(json_values)
        elif isinstance(spec.get("files"), list) and spec["files"]:
            entry = draw(st.sampled_from(spec["files"]))
            if isinstance(entry, dict):
                entry[draw(st.sampled_from(["name", "split", "kind", "sha256", "size", "archive_md5", "x"]))] = \
                    draw(json_values)
    return spec


@FUZZ
@given(spec=specs())
def test_spec_validation_raises_only_spec_errors_and_accepts_what_round_trips(spec):
    try:
        dataset = from_dict(spec, "/x/fuzz.json")
    except SpecError as e:
        assert all(line.startswith("fuzz.json: ") for line in str(e).splitlines())
        assert all(len(line) < 600 for line in str(e).splitlines())  # values are quoted short
        return
    again = from_dict({k: v for k, v in dataset.to_dict().items() if k != "source"}
                      | {"files": [{"sha256" if k == "idx_sha256" else "size" if k == "idx_size" else k: v
                                    for k, v in f.items()} for f in dataset.to_dict()["files"]]}, "/y/other.json")
    assert again.identity == dataset.identity and again.key == dataset.key


@FUZZ
@given(content=st.binary(max_size=300) | st.text(max_size=300).map(str.encode),
       suffix=st.sampled_from([".json", ".toml"]))
def test_spec_files_of_any_bytes_give_one_spec_error(tmp_path_factory, content, suffix):
    path = tmp_path_factory.mktemp("spec") / f"s{suffix}"
    path.write_bytes(content)
    with pytest.raises(SpecError):
        load_spec(path)


# ---- model.json / model.npz -------------------------------------------------------------------------

def _saved(tmp_path):
    model = nn.Sequential(nn.Dense(6, 4), nn.ReLU(), nn.Dense(4, 3), seed=0)
    nn.save(model, tmp_path)
    return model


@FUZZ
@given(data=st.data())
def test_model_files_damaged_anyhow_give_one_model_format_error(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("model")
    model = _saved(folder)
    name = data.draw(st.sampled_from(["model.json", "model.npz"]))
    raw = bytearray((folder / name).read_bytes())
    how = data.draw(st.sampled_from(["flip", "truncate", "replace", "json"]))
    if how == "flip":
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    elif how == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    elif how == "replace":
        raw = bytearray(data.draw(st.binary(max_size=200)))
    else:
        raw = bytearray(json.dumps(data.draw(json_values)).encode())
    (folder / name).write_bytes(bytes(raw))
    try:
        loaded = nn.load(folder, expect_digest=nn.digest(model))
    except nn.ModelFormatError as e:
        assert "\n" not in str(e)
        return
    assert nn.digest(loaded) == nn.digest(model)  # accepted only when the weights are the very same


@FUZZ
@given(shapes=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 10_000)), min_size=1, max_size=3),
       dtype=st.sampled_from(["<f4", "<f8", "<i8", "|u1", "<f2", "|O"]))
def test_npz_headers_are_checked_before_any_array_is_read(tmp_path_factory, shapes, dtype):
    """An .npz whose members announce other shapes or dtypes (even huge ones) is refused from its
    headers: no array of the announced size is ever allocated."""
    folder = tmp_path_factory.mktemp("npz")
    _saved(folder)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for i, shape in enumerate(shapes):
            header = {"descr": dtype, "fortran_order": False, "shape": shape}
            member = io.BytesIO()
            np.lib.format.write_array_header_1_0(member, header)
            z.writestr(f"W{i}.npy", member.getvalue() + b"\0" * 16)
            z.writestr(f"b{i}.npy", member.getvalue())
    (folder / "model.npz").write_bytes(buffer.getvalue())
    with pytest.raises(nn.ModelFormatError):
        nn.load(folder)


# ---- checkpoints ------------------------------------------------------------------------------------

@FUZZ
@given(data=st.data())
def test_checkpoints_of_any_content_are_refused_or_fit_the_run(tmp_path_factory, data):
    """A checkpoint file with arbitrary arrays and metadata: load_checkpoint raises only
    ModelFormatError, and fit either resumes (the state fit its check) or raises CheckpointMismatch."""
    folder = tmp_path_factory.mktemp("ckpt")
    arrays = {}
    for name in data.draw(st.lists(st.sampled_from(["param.0.W", "param.0.b", "param.2.W", "param.2.b", "optim.t",
                                                    "optim.velocity.0", "best.0.W", "junk"]), max_size=6, unique=True)):
        shape = data.draw(st.sampled_from([(), (6, 4), (4,), (4, 3), (3,), (2, 2)]))
        arrays[name] = np.zeros(shape, data.draw(st.sampled_from([np.float32, np.float64, np.int64])))
    meta = data.draw(st.fixed_dictionaries({}, optional={
        "epoch": json_values | st.integers(-2, 5), "best_loss": json_values, "waited": json_values | st.integers(0, 3),
        "history": json_values, "best_epoch": json_values, "generators": json_values}))
    path = folder / "c.npz"
    np.savez(path, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    try:
        state = nn.load_checkpoint(path)
    except nn.ModelFormatError:
        return
    rng = np.random.default_rng(0)
    x, y = rng.random((40, 6), np.float32), rng.integers(0, 3, 40)
    hp = nn.presets.get("fast", hidden=(4,), epochs=3, batch_size=8)
    with pytest.raises(nn.CheckpointMismatch):
        nn.presets.train(hp, x, y, resume=state, n_classes=3, image_shape=(2, 3))


# ---- URLs and paths ----------------------------------------------------------------------------------

segment = st.sampled_from(["a", "b.c", "..", ".", "", "x y", "é", "a\\b", "%2e%2e", "\0"])


@FUZZ
@given(parts=st.lists(segment, max_size=5), bucket=st.sampled_from(["bucket", "b", "Bucket", "..", "my-bucket.x"]),
       scheme=st.sampled_from(["s3", "az"]))
def test_bucket_urls_are_refused_or_stay_inside_the_cache(tmp_path_factory, monkeypatch_session, parts, bucket, scheme):
    cache = tmp_path_factory.getbasetemp() / "cache"
    monkeypatch_session.setenv("DIGITFLOW_CACHE", str(cache))
    url = f"{scheme}://{bucket}/" + "/".join(parts)
    try:
        store = objects.open_store(url)
    except objects.ObjectStoreError:
        return
    local = objects.local_path(store.url())
    assert cache.resolve() in local.parents or local == cache.resolve() / scheme / bucket
    for rel in (store.prefix, "models/x", "/".join(parts)):
        try:
            assert (cache.resolve() / scheme) in objects.local_path(f"{scheme}://{bucket}/{rel}").parents
        except PathError:
            pass


@FUZZ
@given(before=st.text(max_size=200), query=st.text(st.characters(blacklist_categories=("Zs", "Cc")), min_size=1,
                                                    max_size=60), after=st.text(max_size=200))
def test_a_store_error_never_carries_a_query_string(before, query, after):
    """obstore's errors quote request URLs; with a SAS token the secret is in the query string.
    What digitflow prints of them is one line without it."""
    from storage.objects import _first_line

    secret = "SECRET" + query
    text = _first_line(RuntimeError(f"{before} Error performing PUT https://acct.blob.core.windows.net/c/k?sig={secret} "
                                    f"{after}"))
    assert (secret not in text or secret in before + after) and "\n" not in text and len(text) <= 300


@FUZZ
@given(rel=st.text(max_size=30))
def test_inside_never_leaves_its_root(tmp_path_factory, rel):
    root = tmp_path_factory.getbasetemp() / "root"
    try:
        path = inside(root, rel)
    except PathError:
        return
    assert root.resolve() in path.parents


@pytest.fixture(scope="module")
def monkeypatch_session():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


# ---- the environment ---------------------------------------------------------------------------------

@FUZZ
@given(values=st.dictionaries(st.sampled_from(["HOME", "CACHE", "MIRRORS", "WEBHOOK_URL", "API_TOKEN", "DEBUG",
                                                "EPHEMERAL", "SERVER_PORT", "WORKERLESS_GRACE", "API_LOG_LEVEL"]),
                              st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                                      max_size=30), max_size=4))
def test_digitflow_variables_parse_or_are_one_line_naming_the_variable_and_never_the_secret(monkeypatch_session,
                                                                                             values):
    """Any DIGITFLOW_* values: a typed Settings within its bounds, or one DigitflowError line that
    names the variable (a token or webhook URL's value is never echoed)."""
    from storage import DigitflowError
    from storage.settings import PREFIX, settings

    for name in values:
        monkeypatch_session.setenv(PREFIX + name, values[name])
    try:
        s = settings()
    except DigitflowError as e:
        line = str(e)
        name, shown = line.split("=", 1)
        assert "\n" not in line and name.startswith(PREFIX) and name[len(PREFIX):] in values
        if name[len(PREFIX):] in ("WEBHOOK_URL", "API_TOKEN"):
            assert shown.startswith("…:")  # the value itself is never shown
        else:
            assert shown.startswith(repr(values[name[len(PREFIX):]])[:80])
    else:
        assert 1 <= s.server_port <= 65535 and 0 < s.workerless_grace <= 86_400
        assert all(m and "," not in m and not any(c.isspace() for c in m) for m in s.mirrors)
        assert "API_TOKEN" not in values or not values["API_TOKEN"] or s.api_token.get_secret_value() == values["API_TOKEN"]
    finally:
        for name in values:
            monkeypatch_session.delenv(PREFIX + name, raising=False)


def test_a_malformed_variable_in_lower_case_is_named_with_its_value(monkeypatch):
    """pydantic-settings reads names in any case; the line shows the value that was read."""
    from storage import DigitflowError
    from storage.settings import settings

    monkeypatch.setenv("digitflow_server_port", "abc")
    with pytest.raises(DigitflowError, match=r"^DIGITFLOW_SERVER_PORT='abc': "):
        settings()


def test_a_misspelt_variable_is_named_with_the_setting_it_is_near(monkeypatch, tmp_path):
    """A typo in a variable's name would otherwise be ignored in silence (DIGITFLOW_HOMEE: the
    default home used instead); a variable nowhere near a setting's name is left alone."""
    from storage.settings import misspelt

    monkeypatch.setenv("DIGITFLOW_HOMEE", str(tmp_path))
    monkeypatch.setenv("digitflow_api_tokn", "secret")
    monkeypatch.setenv("DIGITFLOW_SOMETHING_ELSE_ENTIRELY", "1")
    assert misspelt() == ["DIGITFLOW_HOMEE is not a digitflow variable (did you mean DIGITFLOW_HOME?); ignored",
                          "digitflow_api_tokn is not a digitflow variable (did you mean DIGITFLOW_API_TOKEN?); ignored"]
    (tmp_path / "h").mkdir()
    r = subprocess.run([sys.executable, "-m", "flows.cli", "models", "list", "--home", str(tmp_path / "h")],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() == "no versions of mnist-mlp yet"
    assert r.stderr.splitlines()[:2] == ["digitflow: warning: " + w for w in misspelt()]
