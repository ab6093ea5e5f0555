"""The HTTP API under fuzzing: Hypothesis properties of its body parsers and image preparation,
and Schemathesis against its own OpenAPI schema (no input yields a 5xx; every response matches
the schema). Fixed example counts keep the suite's time predictable."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from serving.app import ApiError, ApiSettings, image_pixels, json_pixels, multipart_files, raw_pixels
from serving.images import ImageError, load_gray, mnist_style

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=30)


@FUZZ
@given(doc=json_values | st.fixed_dictionaries({"pixels": st.lists(st.lists(
    st.floats(-1, 2) | st.integers(-3, 3) | json_values, min_size=4, max_size=4), max_size=3)}))
def test_json_pixels_raise_only_api_errors(doc):
    try:
        body = json.dumps(doc, allow_nan=True).encode()
    except (ValueError, RecursionError):
        return
    try:
        x = json_pixels(body, max_images=100, pixels=4)
    except ApiError as e:
        assert e.status in (413, 422) and e.field
        return
    assert x.dtype == np.float32 and x.shape == (len(doc["pixels"]), 4) and ((x >= 0) & (x <= 1)).all()


def _reference_pixels(doc, pixels: int):
    """What json_pixels must answer, written the slow, obvious way: (field of the 422) or the array."""
    rows = doc["pixels"]
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != pixels:
            return f"pixels[{i}]"
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            if type(v) not in (int, float):
                return f"pixels[{i}][{j}]"
    x = np.array(rows, dtype=np.float32)
    bad = ~((x >= 0) & (x <= 1))
    return f"pixels[{int(np.argwhere(bad)[0][0])}][{int(np.argwhere(bad)[0][1])}]" if bad.any() else x


pixel_values = st.floats(0, 1) | st.integers(0, 1) | st.booleans() | st.none() | st.text(max_size=3) \
    | st.lists(st.floats(0, 1), min_size=1, max_size=1) | st.dictionaries(st.text(max_size=2), st.integers(), max_size=1)


@FUZZ
@given(rows=st.lists(st.one_of(st.lists(st.floats(0, 1), min_size=4, max_size=4),
                               st.lists(pixel_values, min_size=4, max_size=4),
                               st.just([[0.5]] * 4)), min_size=1, max_size=3))
def test_json_pixels_fast_path_answers_as_the_value_by_value_check(rows):
    """The fast path (NumPy converting a body with no strings, booleans or nulls) gives exactly
    the answer of looking at every value: the same array, or a 422 naming the same field."""
    body = json.dumps({"pixels": rows}).encode()
    want = _reference_pixels({"pixels": rows}, 4)
    try:
        got = json_pixels(body, max_images=10, pixels=4)
    except ApiError as e:
        assert e.status == 422 and e.field == want, (e.field, want)
    else:
        assert isinstance(want, np.ndarray) and np.array_equal(got, want)


@FUZZ
@given(body=st.binary(max_size=2000))
def test_json_and_raw_bodies_of_any_bytes_raise_only_api_errors(body):
    for parse in (json_pixels, raw_pixels):
        try:
            x = parse(body, 10, 784)
        except ApiError as e:
            assert e.status in (413, 422)
            continue
        assert x.shape[1] == 784 and x.dtype == np.float32


part_names = st.text(st.characters(blacklist_characters='"\\%', blacklist_categories=("Cs", "Cc")), max_size=12)


@FUZZ
@given(parts=st.lists(st.tuples(part_names, part_names | st.none(), st.binary(max_size=300)), max_size=6),
       noise=st.binary(max_size=40), cut=st.integers(0, 10_000))
def test_multipart_bodies_parse_as_httpx_builds_them_and_damaged_ones_are_one_api_error(parts, noise, cut):
    """What a real client (httpx) encodes comes back file for file (name, bytes; fields and empty
    files skipped; httpx sends an empty filename as a field); the same body damaged (cut short, or noise spliced in) is parsed or refused
    with one 4xx naming the body, never anything else."""
    import httpx

    files = [(field or "image", (filename, data, "image/png")) for field, filename, data in parts if filename]
    fields = {field or "note": "x" for field, filename, _ in parts if not filename}
    request = httpx.Request("POST", "http://x/", files=files or None, data=fields or None)
    body, content_type = request.read(), request.headers.get("content-type", "")
    expected = [(filename, data) for _, filename, data in parts if filename and data]
    settings_ = ApiSettings(home="/nonexistent")
    if not content_type.startswith("multipart/form-data"):
        return  # nothing to send as multipart
    try:
        got = multipart_files(content_type, body, settings_)
    except ApiError as e:
        assert not expected and e.status == 422 and e.message == "no image file in the multipart body"
    else:
        assert got == expected
    for damaged in (body[:cut], body[:cut] + noise + body[cut:]):
        try:
            out = multipart_files(content_type, damaged, settings_)
        except ApiError as e:
            assert e.status in (413, 422) and e.field == "body"
        else:
            assert all(isinstance(n, str) and n and isinstance(d, bytes) and d for n, d in out)


@FUZZ
@given(data=st.binary(max_size=3000))
def test_image_bytes_of_any_kind_raise_only_api_errors(data):
    try:
        x = image_pixels([("f.png", data)], ApiSettings(home="/nonexistent"))
    except ApiError as e:
        assert e.status in (413, 422) and e.field == "f.png"
        return
    assert x.shape == (1, 784)


@st.composite
def images(draw):
    mode = draw(st.sampled_from(["1", "L", "P", "RGB", "RGBA", "LA", "I;16", "I", "F", "CMYK"]))
    w, h = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    from PIL import Image

    rng = np.random.default_rng(seed)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    elif mode == "I":
        img = Image.fromarray(rng.integers(-2 ** 20, 2 ** 20, (h, w), dtype=np.int32))
    elif mode == "F":
        img = Image.fromarray(rng.normal(0, 100, (h, w)).astype(np.float32))
    else:
        img = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).convert(mode)
    out = io.BytesIO()
    img.save(out, "TIFF" if mode in ("I", "F", "CMYK") else "PNG")
    return out.getvalue()


@FUZZ
@given(data=images())
def test_every_image_mode_prepares_to_784_pixels_in_0_1_or_one_image_error(data):
    gray = load_gray(data, name="x")
    assert gray.dtype == np.float32 and gray.min() >= 0 and gray.max() <= 1
    try:
        x = mnist_style(gray)
    except ImageError as e:
        assert "no ink" in str(e)
        return
    assert x.shape == (784,) and x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1


# ---- Schemathesis: the API against its own OpenAPI schema --------------------------------------

def test_no_input_yields_a_5xx_and_every_response_matches_the_schema(published):
    """Every operation of /openapi.json, fed inputs Schemathesis generates from the schema: no 5xx,
    and every status, content type and body is one the schema declares."""
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                                   status_code_conformance)
    from starlette.testclient import TestClient

    from serving.app import create_app

    app = create_app(ApiSettings(home=str(published), poll=3600.0))
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    with TestClient(app):  # runs the lifespan: the champion is loaded and verified
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in operations} == {"/predict", "/model", "/health", "/ready", "/metrics", "/", "/model/card", "/drift"}
        for op in operations:
            @given(case=op.as_strategy())
            @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
            def check(case):
                case.call_and_validate(checks=checks)

            check()
