"""The HTTP API under fuzzing: Hypothesis properties of its body parsers and image preparation,
and Schemathesis against its own OpenAPI schema (no input yields a 5xx; every response matches
the schema). Fixed example counts keep the suite's time predictable."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from serving.app import ApiError, ApiSettings, image_pixels, json_pixels, raw_pixels
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
