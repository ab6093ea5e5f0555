"""`digitflow api`: the champion behind HTTP (FastAPI + uvicorn), following promotions.

    POST /predict   images (multipart files, or one image body), JSON {"pixels": [[784 in 0..1], …]},
                    or raw uint8 rows (application/octet-stream, n × 784 bytes) → labels + probabilities
    GET  /model     the served version: name, version, weights digest, metrics summary, lineage
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
import dataclasses
import hmac
import json
import logging
import os
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from storage import DigitflowError
from storage.datasets import class_names
from storage.images import ImageError, ImageTooLarge, load_gray, mnist_style
from storage.home import Home
from storage.registry import ALIASES, DEFAULT_NAME, Registry, RegistryError

log = logging.getLogger("digitflow.api")

PAGE = Path(__file__).with_name("api_page.html")
SETTINGS_ENV = "DIGITFLOW_API_SETTINGS"  # how `digitflow api --workers N` hands settings to its workers


@dataclasses.dataclass(frozen=True)
class ApiSettings:
    """Everything a worker needs; defaults and bounds live here (the CLI reads them)."""
    home: str
    model_name: str = DEFAULT_NAME
    model: str = "champion"             # champion | latest | vN
    token: str | None = None            # bearer token required on every endpoint but /health
    max_body: int = 1 << 20             # bytes of one request body (→ 413)
    max_pixels: int = 4_000_000         # pixels of one image, read from its header (→ 413)
    max_images: int = 100_000           # images in one request (→ 413)
    poll: float = 1.0                   # seconds between checks of the served alias

    BOUNDS = {"max_body": (1024, 1 << 30), "max_pixels": (784, 100_000_000), "max_images": (1, 10_000_000),
              "poll": (0.05, 3600.0)}

    def check(self) -> "ApiSettings":
        for name, (low, high) in self.BOUNDS.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise DigitflowError(f"--{name.replace('_', '-')} must be in {low}..{high}, got {value!r}")
        if self.model not in ALIASES and not (self.model.startswith("v") and self.model[1:].isdigit()):
            raise DigitflowError(f"--model {self.model!r}: use champion, latest or vN")
        return self


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

    def identity(self) -> dict:
        return {"name": self.name, "version": self.version, "weights_sha256": self.weights_sha256}


class Follower:
    """Keeps ``served`` on the version the alias points at, verified before every swap."""

    def __init__(self, settings: ApiSettings, metrics: "Metrics"):
        self.settings, self.metrics = settings, metrics
        self.registry = Registry(Home.resolve(settings.home), settings.model_name)
        self.served: Served | None = None
        self.refused: dict[int, str] = {}  # version → why (refused once, not retried every poll)

    def target(self) -> int | None:
        ref = self.settings.model
        if ref in ALIASES:
            self.registry.sync()  # a remote home: a fresh snapshot of the bucket (no-op locally)
            return self.registry.aliases().get(ref)
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
            metrics = self.registry.metrics(version)
            lineage_path = self.registry.path(version) / "lineage.json"
            lineage = json.loads(lineage_path.read_text()) if lineage_path.is_file() else {}
        except (OSError, ValueError, KeyError, DigitflowError) as e:
            self.refused[version] = str(e)
            self.metrics.refused.inc()
            log.error("refused to serve %s v%d: %s; %s", self.settings.model_name, version, e,
                      f"still serving v{self.served.version}" if self.served else "nothing served")
            return
        summary = {k: metrics[k] for k in ("test_accuracy", "test_loss", "macro_f1", "test_images", "train_seconds",
                                           "inference_images_per_second", "per_class") if k in metrics}
        import nn

        # The identity served is the digest of the very weights in memory (verified by load_model).
        new = Served(self.settings.model_name, version, nn.digest(net), net, summary, lineage,
                     class_names(self.registry.classes(version)), net.dense_layers[0].n_in)
        old, self.served = self.served, new  # the swap: one reference assignment
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
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the {limit:,}-byte limit", "body")
        chunks.append(chunk)
    return b"".join(chunks)


def multipart_files(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    """(name, bytes) of every part of a multipart/form-data body that carries content."""
    boundary = None
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary or len(boundary) > 200:
        raise ApiError(422, "multipart body without a valid boundary", "content-type")
    parts = body.split(b"--" + boundary.encode("latin-1"))
    if len(parts) < 3 or not parts[-1].startswith(b"--"):
        raise ApiError(422, "malformed multipart body (no closing boundary)", "body")
    files = []
    for i, part in enumerate(parts[1:-1]):
        head, sep, data = part.partition(b"\r\n\r\n")
        if not sep or not part.startswith(b"\r\n") or not data.endswith(b"\r\n"):
            raise ApiError(422, f"malformed multipart part {i}", "body")
        data = data[:-2]
        name = f"part{i}"
        for line in head.decode("latin-1").split("\r\n"):
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-disposition":
                for item in value.split(";"):
                    k, _, v = item.strip().partition("=")
                    if k in ("filename", "name") and v:
                        name = v.strip('"') if k == "filename" or name.startswith("part") else name
        if data:
            files.append((name, data))
    if not files:
        raise ApiError(422, "no image in the multipart body", "body")
    return files


def json_pixels(body: bytes, max_images: int, pixels: int = 784) -> np.ndarray:
    """{"pixels": [[784 numbers in 0..1], ...]} → (n, 784) float32, or a 422 naming the field
    (784 = MNIST's 28×28; another dataset's model takes its own image size)."""
    import orjson

    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ApiError(422, f"malformed JSON: {e}", "body") from None
    if not isinstance(doc, dict) or "pixels" not in doc:
        raise ApiError(422, f'expected an object {{"pixels": [[{pixels} numbers], ...]}}', "pixels")
    unknown = sorted(set(doc) - {"pixels"})
    if unknown:
        raise ApiError(422, f"unknown field {unknown[0]!r}", unknown[0])
    rows = doc["pixels"]
    if not isinstance(rows, list) or not rows:
        raise ApiError(422, "pixels must be a non-empty list of images", "pixels")
    if len(rows) > max_images:
        raise ApiError(413, f"{len(rows):,} images exceed the {max_images:,} accepted in one request", "pixels")
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != pixels:
            got = f"{len(row)} values" if isinstance(row, list) else type(row).__name__
            raise ApiError(422, f"pixels[{i}] must be a list of {pixels} numbers, got {got}", f"pixels[{i}]")
    try:
        x = np.array(rows, dtype=np.float32)
    except (ValueError, TypeError):
        i, j = next((i, j) for i, row in enumerate(rows) for j, v in enumerate(row)
                    if isinstance(v, bool) or not isinstance(v, (int, float)))
        raise ApiError(422, f"pixels[{i}][{j}] must be a number, got {rows[i][j]!r}", f"pixels[{i}][{j}]") from None
    bad = ~((x >= 0) & (x <= 1))  # NaN fails both
    if bad.any():
        i, j = map(int, np.argwhere(bad)[0])
        raise ApiError(422, f"pixels[{i}][{j}] must be in 0..1, got {rows[i][j]!r}", f"pixels[{i}][{j}]")
    return x


def raw_pixels(body: bytes, max_images: int, pixels: int = 784) -> np.ndarray:
    """n × 784 uint8 bytes (MNIST's own pixel layout) → (n, 784) float32 in 0..1."""
    if not body or len(body) % pixels:
        raise ApiError(422, f"an octet-stream body must be n × {pixels} uint8 pixels, got {len(body):,} bytes", "body")
    if len(body) // pixels > max_images:
        raise ApiError(413, f"{len(body) // pixels:,} images exceed the {max_images:,} accepted in one request",
                       "body")
    return np.frombuffer(body, np.uint8).reshape(-1, pixels).astype(np.float32) * np.float32(1 / 255)


def image_pixels(files: list[tuple[str, bytes]], settings: ApiSettings) -> np.ndarray:
    """Images prepared exactly as `digitflow predict` prepares them (invert, crop, box, center)."""
    if len(files) > settings.max_images:
        raise ApiError(413, f"{len(files):,} images exceed the {settings.max_images:,} accepted in one request",
                       "body")
    x = np.empty((len(files), 784), np.float32)
    for i, (name, data) in enumerate(files):
        try:
            x[i] = mnist_style(load_gray(data, name=name, max_pixels=settings.max_pixels), name=name)
        except ImageTooLarge as e:
            raise ApiError(413, str(e), name) from None
        except ImageError as e:
            raise ApiError(422, str(e), name) from None
    return x


# ---- the app -------------------------------------------------------------------------

def create_app(settings: ApiSettings):
    import orjson
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, Response

    settings.check()
    metrics = Metrics()
    follower = Follower(settings, metrics)
    page = PAGE.read_bytes()
    token = settings.token.encode() if settings.token else None

    async def lifespan(app):
        await asyncio.to_thread(follower.check)
        task = asyncio.create_task(follower.follow())
        yield
        task.cancel()

    app = FastAPI(title="digitflow", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.follower = follower

    def route(path: str, method: str = "GET"):
        """Plain Starlette routes: the handlers read the request themselves (bounded, validated)."""
        def add(handler):
            app.add_route(path, handler, methods=[method])
            return handler
        return add

    def respond(status: int, payload) -> Response:
        return Response(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), status, media_type="application/json")

    def endpoint(name: str, *, public: bool = False):
        """Time, count, log and authorize one endpoint; turn ApiError into its JSON 4xx."""
        def wrap(handler):
            async def run(request) -> Response:
                start = time.perf_counter()
                served = follower.served  # this request's model, whatever swaps meanwhile
                try:
                    if token and not public:
                        given = request.headers.get("authorization", "")
                        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), token)):
                            raise ApiError(401, "missing or wrong bearer token", "authorization")
                    response = await handler(request, served)
                except ApiError as e:
                    response = respond(e.status, {"error": e.message, "field": e.field})
                    if e.status == 401:
                        response.headers["www-authenticate"] = "Bearer"
                seconds = time.perf_counter() - start
                metrics.requests.labels(name, str(response.status_code)).inc()
                metrics.latency.labels(name).observe(seconds)
                log.info("%s %s %d v%s %.1f ms", request.method, request.url.path, response.status_code,
                         served.version if served else "-", seconds * 1e3)
                return response
            run.__name__ = handler.__name__
            return run
        return wrap

    @route("/predict", "POST")
    @endpoint("predict")
    async def predict(request, served: Served | None) -> Response:
        if served is None:
            raise ApiError(503, f"no verified {settings.model} model to serve yet", "model")
        kind = request.headers.get("content-type", "")
        base = kind.split(";")[0].strip().lower()
        if base not in ("multipart/form-data", "application/json", "application/octet-stream") \
                and not base.startswith("image/"):
            raise ApiError(415, f"unsupported content type {base or 'none'!r}: send multipart/form-data images, "
                                "an image/*, application/json pixels or application/octet-stream", "content-type")
        if served.pixels != 784 and (base == "multipart/form-data" or base.startswith("image/")):
            raise ApiError(415, f"this model takes {served.pixels}-pixel images: send application/json pixels or "
                                "application/octet-stream (image files are prepared as MNIST-style 28×28)",
                           "content-type")
        body = await read_body(request, settings.max_body)
        if base == "multipart/form-data":
            x = image_pixels(multipart_files(body, kind), settings)
        elif base.startswith("image/"):
            x = image_pixels([("image", body)], settings)
        elif base == "application/json":
            x = json_pixels(body, settings.max_images, served.pixels)
        else:
            x = raw_pixels(body, settings.max_images, served.pixels)
        proba = served.net.predict_proba(x)  # one batched forward pass for the whole request
        labels = proba.argmax(axis=1)
        metrics.images.inc(len(labels))
        for label, count in zip(*np.unique(labels, return_counts=True)):
            metrics.predictions.labels(str(label)).inc(int(count))
        return respond(200, {"model": served.identity(),
                             "predictions": [{"label": int(label), "probabilities": p,
                                              **({"class": served.names[label]} if served.names else {})}
                                             for label, p in zip(labels, proba)]})

    @route("/model")
    @endpoint("model")
    async def model(request, served: Served | None) -> Response:
        if served is None:
            raise ApiError(503, f"no verified {settings.model} model to serve yet", "model")
        return respond(200, {**served.identity(), "alias": settings.model, "metrics": served.summary,
                             "lineage": served.lineage, "refused": {f"v{v}": why for v, why in follower.refused.items()}})

    @route("/health")
    @endpoint("health", public=True)
    async def health(request, served: Served | None) -> Response:
        return respond(200, {"status": "ok"})

    @route("/ready")
    @endpoint("ready")
    async def ready(request, served: Served | None) -> Response:
        if served is None:
            return respond(503, {"ready": False, "reason": f"no verified {settings.model} model yet"})
        return respond(200, {"ready": True, **served.identity()})

    @route("/metrics")
    @endpoint("metrics")
    async def prometheus(request, served: Served | None) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @route("/")
    @endpoint("page", public=True)
    async def index(request, served: Served | None) -> Response:
        return HTMLResponse(page)

    return app


def app_from_env():
    """The app of one `digitflow api --workers N` worker process (uvicorn's factory)."""
    logging.basicConfig(level=os.environ.get("DIGITFLOW_API_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s [%(process)d] %(message)s")
    return create_app(ApiSettings(**json.loads(os.environ[SETTINGS_ENV])))


def serve(settings: ApiSettings, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          log_level: str = "info") -> None:
    """Run the API until interrupted. With more than one worker, each is a process of its own
    (uvicorn's supervisor) and /metrics aggregates them (prometheus_client multiprocess mode)."""
    import shutil
    import tempfile

    import uvicorn

    settings.check()
    registry = Registry(Home.resolve(settings.home), settings.model_name)
    if not registry.versions():
        raise RegistryError(f"no model {settings.model_name!r} under {settings.home} (publish one first)")
    if settings.model not in ALIASES:
        registry.resolve(settings.model)  # a fixed version that does not exist: one line now
    os.environ[SETTINGS_ENV] = json.dumps(dataclasses.asdict(settings))
    os.environ["DIGITFLOW_API_LOG_LEVEL"] = log_level.upper()
    metrics_dir = None
    if workers > 1:
        metrics_dir = tempfile.mkdtemp(prefix="digitflow-api-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        uvicorn.run("flows.api:app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level="warning", access_log=False, timeout_graceful_shutdown=3,
                    server_header=False, date_header=False)
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
