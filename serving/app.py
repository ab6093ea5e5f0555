"""`digitflow api`: the champion behind HTTP (FastAPI + uvicorn), following promotions.

    POST /predict   images (multipart files, or one image body), JSON {"pixels": [[784 in 0..1], …]},
                    or raw uint8 rows (application/octet-stream, n × 784 bytes) → labels + probabilities
    GET  /model     the served version: name, version, weights digest, metrics summary, lineage
    GET  /model/card  its model card (Markdown), with the decisions as recorded now
    GET  /drift     what it was asked lately against its test split (PSI, KS per statistic)
    GET  /health    live;  GET /ready: a verified model is loaded (else 503)
    GET  /metrics   Prometheus text
    GET  /          a page to draw a digit on

Each worker process holds one verified model and a follower that re-resolves the alias it
serves (champion, latest or a fixed vN) every ``poll`` seconds. A new version is loaded and its
weights digest verified *before* the swap, which is one reference assignment: a request uses
the model it picked up when it started, so no request is answered by a half-swapped model. A
version that fails verification is refused (log line, ``digitflow_api_swaps_refused_total``) and
the previous one keeps serving.

Nothing a client sends is written to disk; every body is bounded (``max_body``) before it is
read, every image's pixel count before it is decoded. Bad input is a 4xx with a JSON
``{"error", "field"}``, never a 500.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from storage import DigitflowError, drift
from storage.datasets import class_names
from serving.images import ImageError, ImageTooLarge, gray_of, mnist_style, open_image
from storage.home import Home
from storage.registry import ALIASES, DEFAULT_NAME, Registry, RegistryError
from storage.records import classes_of
from storage.settings import env_name, settings as environment

log = logging.getLogger("digitflow.api")

PAGE = Path(__file__).with_name("page.html")


class ApiSettings(BaseModel):
    """Everything a worker needs: every default and bound of the API's settings, written once
    (the ``digitflow api`` flags and their help come from these fields)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    home: str
    model_name: str = DEFAULT_NAME
    model: str = Field("champion", description="What to serve: champion, latest or vN (aliases are followed)")
    token: Optional[str] = Field(None, description="Bearer token required on every endpoint but /health")
    max_body: int = Field(1 << 20, ge=1024, le=1 << 30, description="Largest request body, bytes (→ 413)")
    max_pixels: int = Field(4_000_000, ge=784, le=100_000_000,
                            description="Largest image, pixels, read from its header (→ 413)")
    max_images: int = Field(100_000, ge=1, le=10_000_000, description="Most images in one request (→ 413)")
    max_request_pixels: int = Field(16_000_000, ge=784, le=1_000_000_000,
                                    description="Most pixels decoded for one request, all its images (→ 413)")
    poll: float = Field(1.0, ge=0.05, le=3600.0, description="Seconds between checks of the served alias")

    @field_validator("model")
    @classmethod
    def _model(cls, model: str) -> str:
        if model not in ALIASES and not re.fullmatch(r"v[1-9][0-9]{0,8}", model):
            raise ValueError(f"use champion, latest or vN, not {model!r}")
        return model

    @field_validator("token")
    @classmethod
    def _token(cls, token: Optional[str]) -> Optional[str]:
        if token is not None and not token.strip():
            raise ValueError("is empty (DIGITFLOW_API_TOKEN too?): give a token, or none for an open API")
        return token


class Served(NamedTuple):
    """One verified model and what /model says about it (replaced whole on a swap)."""
    name: str
    version: int
    weights_sha256: str
    net: object
    summary: dict
    lineage: dict
    names: list | None     # class names shown beside labels (None for MNIST's digits)
    pixels: int            # inputs per image (MNIST: 784)
    reference: dict | None = None  # its test split's drift reference (None: recorded before there were any)
    classes: int = 10              # the network's outputs

    def identity(self) -> dict:
        return {"name": self.name, "version": self.version, "weights_sha256": self.weights_sha256}


class Follower:
    """Keeps ``served`` on the version the alias points at, verified before every swap."""

    def __init__(self, settings: ApiSettings, metrics: "Metrics"):
        self.settings, self.metrics = settings, metrics
        self.registry = Registry(Home.resolve(settings.home), settings.model_name)
        self.served: Served | None = None
        self.refused: dict[int, str] = {}  # version → why (refused once, not retried every poll)
        self.window = drift.Window()  # what the served version was asked lately (statistics, no pixels)

    def target(self) -> int | None:
        ref = self.settings.model
        if ref in ALIASES:
            self.registry.sync()  # a remote home: a fresh snapshot of the bucket (no-op locally)
            return self.registry.aliases().of(ref)
        return int(ref[1:])

    def check(self) -> None:
        """Swap to the alias's version if it moved (blocking I/O: run it in a thread)."""
        try:
            version = self.target()
        except (OSError, ValueError, DigitflowError) as e:
            log.warning("cannot read the registry's aliases: %s", e)
            return
        if version is None or (self.served and self.served.version == version) or version in self.refused:
            return
        try:
            net = self.registry.load_model(version)  # verified: weights must hash to the recorded digest
            metrics = self.registry.metrics(version)  # typed: a metrics.json that does not fit is refused
            recorded = self.registry.lineage(version)  # typed; a damaged one refuses the version
            lineage = recorded.record() if recorded else {}
            classes = classes_of(recorded)
            outputs = net.dense_layers[-1].n_out
            if len(classes) != outputs:
                raise DigitflowError(f"its {len(classes)} class names do not match the network's {outputs} outputs")
            summary = metrics.model_dump(mode="json", include=set(SUMMARY))
        except (OSError, ValueError, KeyError, TypeError, RecursionError, DigitflowError) as e:
            self.refused[version] = str(e)
            self.metrics.refused.inc()
            log.error("refused to serve %s v%d: %s; %s", self.settings.model_name, version, e,
                      f"still serving v{self.served.version}" if self.served else "nothing served")
            return
        import nn

        try:  # optional: a version without it is served, its drift just not compared
            doc = _json_object(self.registry.path(version) / drift.REFERENCE, required=False)
            reference = drift.check_reference(doc, outputs) if doc else None
        except (OSError, ValueError, DigitflowError) as e:
            log.warning("%s v%d: drift reference ignored (%s)", self.settings.model_name, version, e)
            reference = None
        # The identity served is the digest of the very weights in memory (verified by load_model).
        new = Served(self.settings.model_name, version, nn.digest(net), net, summary, lineage,
                     class_names(classes), net.dense_layers[0].n_in, reference, outputs)
        old, self.served = self.served, new  # the swap: one reference assignment
        self.window.clear()  # a new version: its inputs are compared from now on
        self.metrics.swapped(old, new)
        log.info("serving %s v%d (weights %s…)%s", new.name, version, new.weights_sha256[:12],
                 f", was v{old.version}" if old else "")

    async def follow(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.check)
            except Exception:  # a bug must not stop the following: say so, keep serving, try again
                log.exception("checking for a new %s version failed", self.settings.model)
            await asyncio.sleep(self.settings.poll)


def _json_object(path: Path, *, required: bool) -> dict:
    """A version file that must be a JSON object (bounded size); {} when optional and absent."""
    if not path.is_file():
        if required:
            raise DigitflowError(f"{path.name} is missing")
        return {}
    raw = path.read_bytes()
    if len(raw) > 16 << 20:
        raise DigitflowError(f"{path.name} is larger than 16 MiB")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise DigitflowError(f"{path.name} is not valid JSON ({type(e).__name__})") from None
    if not isinstance(doc, dict):
        raise DigitflowError(f"{path.name} is not a JSON object")
    return doc


class Metrics:
    """The Prometheus metrics of one worker (aggregated over workers in multiprocess mode)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        r = self.registry
        self.requests = Counter("digitflow_api_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("digitflow_api_request_seconds", "Request latency by endpoint", ["endpoint"],
                                 buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .25, .5, 1, 2.5, 5), registry=r)
        self.images = Counter("digitflow_api_images", "Images predicted", registry=r)
        self.predictions = Counter("digitflow_api_predictions", "Predictions by class", ["label"], registry=r)
        self.served = Gauge("digitflow_api_model_info", "The served model version (value 1)",
                            ["name", "version", "weights_sha256"], registry=r, multiprocess_mode="livemax")
        self.swaps = Counter("digitflow_api_swaps", "Model versions swapped in", registry=r)
        self.refused = Counter("digitflow_api_swaps_refused", "New versions refused (failed verification)",
                               registry=r)
        # Drift of the window of served inputs (set when scraped; per worker process).
        self.window_images = Gauge("digitflow_api_drift_window_images", "Images in the drift window", registry=r,
                                   multiprocess_mode="liveall")
        self.psi = Gauge("digitflow_api_drift_psi", "PSI of the window against the served version's test split",
                         ["statistic"], registry=r, multiprocess_mode="liveall")
        self.share = Gauge("digitflow_api_input_share", "Share of the window's images per bin of a statistic",
                           ["statistic", "bin"], registry=r, multiprocess_mode="liveall")

    def drifted(self, report: dict) -> None:
        self.window_images.set(report["window_images"])
        for name, s in report["statistics"].items():
            if s.get("psi") is not None:
                self.psi.labels(name).set(s["psi"])
            for i, share in enumerate(s["window"]):
                self.share.labels(name, str(i)).set(share)

    def swapped(self, old: Served | None, new: Served) -> None:
        if old is not None:
            self.served.labels(old.name, str(old.version), old.weights_sha256).set(0)
            self.swaps.inc()
        self.served.labels(new.name, str(new.version), new.weights_sha256).set(1)

    def render(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        if not self.multiprocess:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged)
        return generate_latest(merged)


class ApiError(Exception):
    """A client error: HTTP status, message, and the field it is about."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


# ---- reading a request: bounded, validated, never written anywhere ----------------------

async def read_body(request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ApiError(400, "invalid Content-Length", "content-length")
        if int(length) > limit:
            raise ApiError(413, f"request body of {int(length):,} bytes exceeds the {limit:,}-byte limit", "body")
    from starlette.requests import ClientDisconnect

    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body exceeds the {limit:,}-byte limit", "body")
            chunks.append(chunk)
    except ClientDisconnect:  # nobody is left to answer: counted as the client's failure, not ours
        raise ApiError(400, "the client went away before sending the whole body", "body") from None
    return b"".join(chunks)


MAX_FIELDS = 100  # non-file parts of one multipart body


def multipart_files(content_type: str, body: bytes, settings: ApiSettings) -> list[tuple[str, bytes]]:
    """(name, bytes) of every file part of a multipart/form-data body, parsed by python-multipart's
    streaming parser from the body already read and bounded: no form object, no temporary file.
    At most ``max_images`` (and 10,000) files and ``MAX_FIELDS`` other parts; a part's name is its
    filename, else its field name."""
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise ApiError(422, "malformed multipart body: no boundary in the content type", "body")
    max_files = min(settings.max_images, 10_000)
    files: list[tuple[str, bytes]] = []
    fields = parts = 0
    field, value, headers, chunks = bytearray(), bytearray(), {}, []

    def on_header_end() -> None:
        headers[bytes(field).lower()] = bytes(value)
        field.clear()
        value.clear()

    def on_part_end() -> None:
        nonlocal fields, parts
        options = parse_options_header(headers.get(b"content-disposition", b""))[1]
        data = b"".join(chunks)
        headers.clear()
        chunks.clear()
        if b"filename" not in options:
            fields += 1
            if fields > MAX_FIELDS:
                raise ApiError(413, f"more than {MAX_FIELDS} non-file parts in the multipart body", "body")
            return
        parts += 1  # an empty file part counts too: it still cost parsing
        if parts > max_files:
            raise ApiError(413, f"more than {max_files:,} files in the multipart body", "body")
        if data:
            name = (options[b"filename"] or options.get(b"name") or b"").decode("utf-8", "replace")
            files.append((name or f"part{len(files)}", data))

    parser = MultipartParser(boundary, {
        "on_header_field": lambda data, start, end: field.extend(data[start:end]),
        "on_header_value": lambda data, start, end: value.extend(data[start:end]),
        "on_header_end": on_header_end,
        "on_part_data": lambda data, start, end: chunks.append(data[start:end]),
        "on_part_end": on_part_end,
    })
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as e:
        raise ApiError(422, f"malformed multipart body: {e}", "body") from None
    if not files:
        raise ApiError(422, "no image file in the multipart body", "body")
    return files


def json_pixels(body: bytes, max_images: int, pixels: int = 784) -> np.ndarray:
    """{"pixels": [[784 numbers in 0..1], ...]} → (n, 784) float32, or a 422 naming the field
    (784 = MNIST's 28×28; another dataset's model takes its own image size). Every value must be
    a JSON number (not a boolean, a string or a nested list)."""
    import orjson

    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ApiError(422, f"malformed JSON: {e}", "body") from None
    if not isinstance(doc, dict) or "pixels" not in doc:
        raise ApiError(422, f'expected an object {{"pixels": [[{pixels} numbers], ...]}}', "pixels")
    unknown = sorted(set(doc) - {"pixels"})
    if unknown:
        raise ApiError(422, f"unknown field {unknown[0][:100]!r}", unknown[0][:100])
    rows = doc["pixels"]
    if not isinstance(rows, list) or not rows:
        raise ApiError(422, "pixels must be a non-empty list of images", "pixels")
    if len(rows) > max_images:
        raise ApiError(413, f"{len(rows):,} images exceed the {max_images:,} accepted in one request", "pixels")
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != pixels:
            got = f"{len(row)} values" if isinstance(row, list) else type(row).__name__
            raise ApiError(422, f"pixels[{i}] must be a list of {pixels} numbers, got {got}", f"pixels[{i}]")
    x = None
    # The fast path: a body whose only string is the key "pixels" and that holds no true, false or
    # null has only numbers, lists and dicts for values, and NumPy refuses the last two (or gives
    # another shape). Otherwise every value is looked at, to name the first one that is no number.
    if body.count(b'"') == 2 and not any(token in body for token in (b"true", b"false", b"null")):
        try:
            with np.errstate(over="ignore"):
                x = np.array(rows, dtype=np.float32)
        except (ValueError, TypeError, OverflowError):
            x = None
        if x is not None and x.shape != (len(rows), pixels):
            x = None
    if x is None:
        for i, row in enumerate(rows):
            for j, v in enumerate(row):
                if type(v) not in (int, float):  # bool, str, list, dict, None: not a pixel
                    raise ApiError(422, f"pixels[{i}][{j}] must be a number, got {type(v).__name__}",
                                   f"pixels[{i}][{j}]")
        with np.errstate(over="ignore"):
            x = np.array(rows, dtype=np.float32)
    bad = ~((x >= 0) & (x <= 1))  # NaN fails both
    if bad.any():
        i, j = map(int, np.argwhere(bad)[0])
        raise ApiError(422, f"pixels[{i}][{j}] must be in 0..1, got {rows[i][j]!r}"[:200], f"pixels[{i}][{j}]")
    return x


def raw_pixels(body: bytes, max_images: int, pixels: int = 784) -> np.ndarray:
    """n × 784 uint8 bytes (MNIST's own pixel layout) → (n, 784) float32 pixel/255, the one
    conversion training uses (``storage.idx.pixels01``)."""
    from storage.idx import pixels01

    if not body or len(body) % pixels:
        raise ApiError(422, f"an octet-stream body must be n × {pixels} uint8 pixels, got {len(body):,} bytes", "body")
    if len(body) // pixels > max_images:
        raise ApiError(413, f"{len(body) // pixels:,} images exceed the {max_images:,} accepted in one request",
                       "body")
    return pixels01(np.frombuffer(body, np.uint8).reshape(-1, pixels))


# What is small enough to prepare on the event loop (under 2 ms): a body of at most INLINE_BODY
# bytes holding at most INLINE_IMAGES images of at most INLINE_PIXELS pixels in all. Anything
# larger is parsed, opened and decoded in a worker thread, so /health never waits on it.
INLINE_BODY, INLINE_IMAGES, INLINE_PIXELS = 64 << 10, 4, 256 * 256


def open_images(files: list[tuple[str, bytes]], settings: ApiSettings) -> tuple[list, int]:
    """Every image opened lazily (headers read, nothing decoded) and the pixels they declare in
    all: each against ``max_pixels``, their sum against ``max_request_pixels``."""
    if len(files) > settings.max_images:
        raise ApiError(413, f"{len(files):,} images exceed the {settings.max_images:,} accepted in one request",
                       "body")
    opened, total = [], 0
    for name, data in files:
        try:
            img = open_image(data, name=name, max_pixels=settings.max_pixels)
        except ImageTooLarge as e:
            raise ApiError(413, str(e), name) from None
        except ImageError as e:
            raise ApiError(422, str(e), name) from None
        opened.append((name, img))
        total += img.size[0] * img.size[1]
        if total > settings.max_request_pixels:
            raise ApiError(413, f"the images of this request declare more than {settings.max_request_pixels:,} "
                                "pixels in all; send fewer or smaller images", "body")
    return opened, total


def decode_images(opened: list) -> np.ndarray:
    """Images prepared exactly as `digitflow predict` prepares them (invert, crop, box, center)."""
    x = np.empty((len(opened), 784), np.float32)
    for i, (name, img) in enumerate(opened):
        try:
            x[i] = mnist_style(gray_of(img, name=name), name=name)
        except ImageTooLarge as e:
            raise ApiError(413, str(e), name) from None
        except ImageError as e:
            raise ApiError(422, str(e), name) from None
    return x


def request_files(content_type: str, body: bytes, settings: ApiSettings) -> list[tuple[str, bytes]]:
    """The image files of a multipart body, or the one image a body is."""
    if content_type.split(";")[0].strip().lower() == "multipart/form-data":
        return multipart_files(content_type, body, settings)
    return [("image", body)]


def request_images(content_type: str, body: bytes, settings: ApiSettings) -> np.ndarray:
    """A multipart body's or one image body's images, parsed, opened and prepared (blocking)."""
    return image_pixels(request_files(content_type, body, settings), settings)


def image_pixels(files: list[tuple[str, bytes]], settings: ApiSettings) -> np.ndarray:
    """``open_images`` then ``decode_images``: the work bounded before any pixel is decoded."""
    return decode_images(open_images(files, settings)[0])


# ---- what the API says, as types (its OpenAPI schema at /openapi.json) ---------------------

# The served version's figures /model shows: these fields of its metrics.json (storage.records.Metrics).
SUMMARY = ("test_accuracy", "test_loss", "macro_f1", "test_images", "train_seconds", "inference_images_per_second",
           "per_class")


def _models():
    from pydantic import BaseModel, ConfigDict, create_model

    from storage.records import Lineage, Metrics

    class Error(BaseModel):
        error: str
        field: str | None

    class Identity(BaseModel):
        name: str
        version: int
        weights_sha256: str

    class Prediction(BaseModel):
        label: int
        probabilities: list[float]
        model_config = ConfigDict(extra="allow")  # "class": the class name, for datasets that name them

    class Predictions(BaseModel):
        model: Identity
        predictions: list[Prediction]

    MetricsSummary = create_model("MetricsSummary", __doc__="The served version's test figures (its metrics.json).",
                                  **{name: (Metrics.model_fields[name].annotation, Metrics.model_fields[name]) for name in SUMMARY})

    class ModelInfo(Identity):
        alias: str
        metrics: MetricsSummary
        lineage: Lineage  # (as lineage.json holds it)
        refused: dict[str, str]

    class Health(BaseModel):
        status: str

    class Statistic(BaseModel):
        window: list[float]
        reference: list[float] | None = None
        psi: float | None = None
        ks: float | None = None
        drifted: bool | None = None

    class Drift(BaseModel):
        model: Identity
        window_images: int
        window_size: int
        min_images: int
        threshold: float
        compared: bool
        drifted: bool | None
        statistics: dict[str, Statistic]

    class Ready(BaseModel):
        ready: bool
        name: str | None = None
        version: int | None = None
        weights_sha256: str | None = None
        reason: str | None = None

    return Error, Identity, Predictions, ModelInfo, Health, Ready, Drift


def _predict_openapi(settings: ApiSettings) -> dict:
    """/predict reads its body itself (bounded before it is read); this describes what it takes."""
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "image": {"type": "array", "items": {"type": "string", "format": "binary"},
                      "description": "PNG/JPEG/… files of digits, prepared as MNIST was"}}}},
        "application/json": {"schema": {"type": "object", "required": ["pixels"], "additionalProperties": False,
                                        "properties": {"pixels": {"type": "array", "minItems": 1, "items": {
                                            "type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1},
                                            "description": "one image's pixels/255, row by row (MNIST: 784)"}}}}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                                "description": "n × 784 uint8 pixels (MNIST's layout)"}},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    }}}


# ---- the app -------------------------------------------------------------------------

def create_app(settings: ApiSettings):
    import orjson
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, Response

    logging.getLogger("python_multipart").setLevel(logging.ERROR)  # a malformed body is the client's 422, not a log line
    metrics = Metrics()
    follower = Follower(settings, metrics)
    page = PAGE.read_bytes()
    token = settings.token.strip().encode() if settings.token else None  # a token file's newline is no part of it
    Error, Identity, Predictions, ModelInfo, Health, Ready, Drift = _models()

    async def lifespan(app):
        await asyncio.to_thread(follower.check)
        task = asyncio.create_task(follower.follow())
        yield
        task.cancel()

    # redirect_slashes off: a redirect built from the request would echo the client's Host header.
    app = FastAPI(title="digitflow", description="The champion model behind HTTP (digitflow api).",
                  lifespan=lifespan, docs_url="/docs", redoc_url=None, openapi_url="/openapi.json",
                  redirect_slashes=False)
    app.router.redirect_slashes = False
    app.state.follower = follower

    def respond(status: int, payload) -> Response:
        return Response(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), status, media_type="application/json")

    errors = {status: {"model": Error, "description": what} for status, what in (
        (401, "missing or wrong bearer token"), (413, "too large: body, images or pixels"),
        (415, "unsupported content type"), (422, "invalid input (the field is named)"),
        (503, "no verified model to serve yet"))}

    def endpoint(name: str, *, public: bool = False):
        """Time, count, log and authorize one endpoint; turn ApiError into its JSON 4xx, and
        anything unexpected into a counted, logged JSON 500 (no traceback to the client)."""
        def wrap(handler):
            async def run(request: Request) -> Response:
                start = time.perf_counter()
                served = follower.served  # this request's model, whatever swaps meanwhile
                try:
                    if token and not public:
                        scheme, _, given = request.headers.get("authorization", "").partition(" ")
                        # RFC 7235: the scheme is case-insensitive
                        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token):
                            raise ApiError(401, "missing or wrong bearer token", "authorization")
                    response = await handler(request, served)
                except ApiError as e:
                    response = respond(e.status, {"error": e.message, "field": e.field})
                    if e.status == 401:
                        response.headers["www-authenticate"] = "Bearer"
                except Exception:  # a bug: logged once, counted, answered without detail
                    log.exception("%s %s failed", request.method, request.url.path)
                    response = respond(500, {"error": "internal error", "field": None})
                seconds = time.perf_counter() - start
                metrics.requests.labels(name, str(response.status_code)).inc()
                metrics.latency.labels(name).observe(seconds)
                log.info("%s %s %d v%s %.1f ms", request.method, request.url.path, response.status_code,
                         served.version if served else "-", seconds * 1e3)
                return response
            run.__name__ = handler.__name__
            run.__doc__ = handler.__doc__
            # FastAPI reads the signature: the one parameter is the request itself (nothing parsed).
            run.__signature__ = inspect.Signature(
                [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request)])
            return run
        return wrap

    @app.post("/predict", response_model=Predictions, responses=errors, openapi_extra=_predict_openapi(settings),
              summary="Predict the digit (class) of each image")
    @endpoint("predict")
    async def predict(request, served: Served | None) -> Response:
        """Multipart image files, one image body, JSON pixels or raw uint8 rows → labels and
        probabilities, from one batched forward pass of the served version."""
        if served is None:
            raise ApiError(503, f"no verified {settings.model} model to serve yet", "model")
        kind = request.headers.get("content-type", "")
        base = kind.split(";")[0].strip().lower()
        if base not in ("multipart/form-data", "application/json", "application/octet-stream") \
                and not base.startswith("image/"):
            raise ApiError(415, f"unsupported content type {base[:100] or 'none'!r}: send multipart/form-data images, "
                                "an image/*, application/json pixels or application/octet-stream", "content-type")
        if served.pixels != 784 and (base == "multipart/form-data" or base.startswith("image/")):
            raise ApiError(415, f"this model takes {served.pixels}-pixel images: send application/json pixels or "
                                "application/octet-stream (image files are prepared as MNIST-style 28×28)",
                           "content-type")
        body = await read_body(request, settings.max_body)
        if base == "multipart/form-data" or base.startswith("image/"):
            if len(body) <= INLINE_BODY:  # a digit or two: cheaper than a thread hop
                opened, pixels = open_images(request_files(kind, body, settings), settings)
                x = decode_images(opened) if len(opened) <= INLINE_IMAGES and pixels <= INLINE_PIXELS \
                    else await asyncio.to_thread(decode_images, opened)
            else:  # larger work: every step off the event loop
                x = await asyncio.to_thread(request_images, kind, body, settings)
        elif base == "application/json":
            x = json_pixels(body, settings.max_images, served.pixels)
        else:
            x = raw_pixels(body, settings.max_images, served.pixels)
        # One batched forward pass; a large batch off the event loop, a small one inline (cheaper than a hop).
        proba = served.net.predict_proba(x) if len(x) <= 64 else await asyncio.to_thread(served.net.predict_proba, x)
        labels = proba.argmax(axis=1)
        follower.window.add(x, proba)  # statistics only: no pixel is kept
        metrics.images.inc(len(labels))
        for label, count in zip(*np.unique(labels, return_counts=True)):
            metrics.predictions.labels(str(label)).inc(int(count))
        return respond(200, {"model": served.identity(),
                             "predictions": [{"label": int(label), "probabilities": p,
                                              **({"class": served.names[label]} if served.names else {})}
                                             for label, p in zip(labels, proba)]})

    @app.get("/model", response_model=ModelInfo, responses=errors, summary="The served version")
    @endpoint("model")
    async def model(request, served: Served | None) -> Response:
        """Name, version, weights digest, metrics summary, lineage, and versions refused."""
        if served is None:
            raise ApiError(503, f"no verified {settings.model} model to serve yet", "model")
        return respond(200, {**served.identity(), "alias": settings.model, "metrics": served.summary,
                             "lineage": served.lineage, "refused": {f"v{v}": why for v, why in follower.refused.items()}})

    @app.get("/model/card", responses={**errors, 200: {"content": {"text/markdown": {}},
                                                        "description": "The model card (Markdown)"}},
             summary="The served version's model card", response_class=Response)
    @endpoint("card")
    async def model_card(request, served: Served | None) -> Response:
        """Intended use, data and its checks, metrics and weaknesses, limitations, lineage and the
        decisions about the served version (the current ones, as the registry records them)."""
        if served is None:
            raise ApiError(503, f"no verified {settings.model} model to serve yet", "model")
        from publishing.card import card_of

        try:
            text = await asyncio.to_thread(card_of, follower.registry, served.version)
        except (OSError, ValueError, KeyError, TypeError, RecursionError, DigitflowError) as e:
            raise ApiError(503, f"the card of v{served.version} cannot be read: {e}", "model") from None
        return Response(text, media_type="text/markdown; charset=utf-8")

    def drift_report(served: Served) -> dict:
        return {"model": served.identity(),
                **follower.window.report(served.reference, served.classes)}

    @app.get("/drift", response_model=Drift, responses=errors, summary="Drift of the served inputs")
    @endpoint("drift")
    async def drift_now(request, served: Served | None) -> Response:
        """The last images' intensity, ink, confidence and predicted-label distributions against
        the served version's test split: PSI per statistic (and KS for the continuous ones),
        judged once the window holds enough images."""
        if served is None:
            raise ApiError(503, f"no verified {settings.model} model to serve yet", "model")
        return respond(200, drift_report(served))

    @app.get("/health", response_model=Health, summary="Liveness")
    @endpoint("health", public=True)
    async def health(request, served: Served | None) -> Response:
        return respond(200, {"status": "ok"})

    @app.get("/ready", response_model=Ready, responses={**errors, 503: {"model": Ready}}, summary="Readiness")
    @endpoint("ready")
    async def ready(request, served: Served | None) -> Response:
        """200 once a verified model is served, else 503."""
        if served is None:
            return respond(503, {"ready": False, "reason": f"no verified {settings.model} model yet"})
        return respond(200, {"ready": True, **served.identity()})

    @app.get("/metrics", responses={**errors, 200: {"content": {"text/plain": {}}, "description": "Prometheus text"}},
             summary="Prometheus metrics", response_class=Response)
    @endpoint("metrics")
    async def prometheus(request, served: Served | None) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        if served is not None:
            try:
                metrics.drifted(drift_report(served))
            except Exception:  # the drift gauges must never cost the other metrics
                log.exception("the drift gauges could not be updated")
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, summary="A page to draw a digit on")
    @endpoint("page", public=True)
    async def index(request, served: Served | None) -> Response:
        return HTMLResponse(page)

    @app.get("/favicon.ico", include_in_schema=False)
    @endpoint("favicon", public=True)
    async def favicon(request, served: Served | None) -> Response:
        return Response(FAVICON, media_type="image/svg+xml")

    # The hot endpoint, lean: POST /predict is answered by a plain Starlette route in front of
    # FastAPI's (which stays, for the OpenAPI schema and the 405 of other methods). FastAPI's
    # per-request layer (dependency solving, response validation) has nothing to do here: the
    # handler reads the request itself and its responses are built and documented above.
    from starlette.routing import Route

    hot = next(r for r in app.router.routes if getattr(r, "path", None) == "/predict")
    app.router.routes.insert(0, Route("/predict", hot.endpoint, methods=["POST"], include_in_schema=False))
    return app


# A digit on a square, as the browser's tab icon (served at /favicon.ico).
FAVICON = (b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect width="32" height="32" rx="6" '
           b'fill="#3a7bd5"/><text x="16" y="24" font-size="22" font-family="sans-serif" font-weight="700" '
           b'text-anchor="middle" fill="#fff">7</text></svg>')


def app_from_env():
    """The app of one `digitflow api --workers N` worker process (uvicorn's factory)."""
    env = environment()
    logging.basicConfig(level=env.api_log_level, format="%(asctime)s %(levelname)s [%(process)d] %(message)s")
    return create_app(ApiSettings.model_validate_json(env.api_settings or "{}"))


def check_listen(host: str, port: int, workers: int = 1) -> None:
    """One line, before anything says the API is up, when ``host:port`` cannot be listened on (a
    port in use, an address that is not this machine's, a name that does not resolve): bound here
    as uvicorn will bind it, then let go (else uvicorn's own error comes after "serving ...").
    One worker: asyncio's ``create_server`` binds every address the name resolves to (IPv6 ones
    v6-only); more: uvicorn's supervisor binds one socket (``Config.bind_socket``)."""
    import socket

    from storage.text import terminal

    sockets = []
    try:
        if workers > 1:
            targets = [(socket.AF_INET6 if ":" in host else socket.AF_INET, (host, port))]
        else:
            targets = [(info[0], info[4]) for info in set(socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE))]
        for family, address in targets:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and workers == 1:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except (OSError, UnicodeError, TypeError, ValueError) as e:  # (a name that cannot be encoded: the last three)
        why = getattr(e, "strerror", None) or type(e).__name__
        raise DigitflowError(f"cannot listen on {terminal(host[:200])} port {port}: {why}") from None
    finally:
        for sock in sockets:
            sock.close()


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine only: ``localhost`` or a loopback address (any spelling)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # another name: whatever it resolves to, treated as reachable from elsewhere
    return address.is_loopback or getattr(address, "ipv4_mapped", None) is not None and address.ipv4_mapped.is_loopback


def serve(settings: ApiSettings, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          log_level: str = "info") -> None:
    """Run the API until interrupted. With more than one worker, each is a process of its own
    (uvicorn's supervisor) and /metrics aggregates them (prometheus_client multiprocess mode)."""
    import shutil
    import tempfile

    import uvicorn

    registry = Registry(Home.resolve(settings.home), settings.model_name)
    if not registry.versions():
        raise RegistryError(f"no model {settings.model_name!r} under {settings.home} (publish one first)")
    if settings.model not in ALIASES:
        registry.resolve(settings.model)  # a fixed version that does not exist: one line now
    os.environ[env_name("api_settings")] = settings.model_dump_json()  # for the worker processes
    os.environ[env_name("api_log_level")] = log_level.upper()
    metrics_dir = None
    if workers > 1:
        metrics_dir = tempfile.mkdtemp(prefix="digitflow-api-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        uvicorn.run("serving.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level="warning", access_log=False, timeout_graceful_shutdown=3,
                    server_header=False, date_header=False)
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
