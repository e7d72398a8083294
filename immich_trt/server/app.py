"""The aiohttp application: Immich's ``/predict`` contract plus ``/metrics``.

Routes, fields, status codes and bodies follow immich-ml 3.1.0 ``immich_ml/main.py``
(see ``immich-ml-contract.md`` sections 1.2-1.5): ``GET /``, ``GET /ping``,
``POST /predict`` (multipart ``entries`` + ``image`` or ``text``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from PIL import Image

from ..config import Settings
from ..models import build_model
from ..models.base import ModelContext
from ..models.cache import FailedToLoad, ModelCache
from ..models.transforms import ImageTooLarge, UndecodableImage, decode_pil
from ..runtime import make_runtime
from ..runtime.base import Runtime, RuntimeUnavailableError
from .entries import InferenceEntry, InvalidEntries, parse_entries
from .metrics import Metrics

log = logging.getLogger("immich_trt.server")

SETTINGS = web.AppKey("settings", Settings)
RUNTIME = web.AppKey("runtime", Runtime)
METRICS = web.AppKey("metrics", Metrics)
STATE = web.AppKey("state", dict)

#: FastAPI's body for a missing required form field, reproduced byte for byte.
MISSING_ENTRIES = {"detail": [{"type": "missing", "loc": ["body", "entries"], "msg": "Field required", "input": None}]}


class HTTPError(Exception):
    """An error answered as ``{"detail": ...}`` JSON with ``status``."""

    def __init__(self, status: int, detail: Any, reason: str = "", headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.reason = reason or str(status)
        self.headers = headers or {}


def json_response(content: Any, status: int = 200) -> web.Response:
    """orjson with ``OPT_SERIALIZE_NUMPY``: float32 arrays in shortest round-trip form."""
    return web.Response(
        body=orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status=status, content_type="application/json"
    )


@web.middleware
async def error_middleware(request: web.Request, handler):
    metrics: Metrics = request.app[METRICS]
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    try:
        response = await handler(request)
    except HTTPError as exc:
        metrics.errors.labels(str(exc.status), exc.reason).inc()
        response = json_response({"detail": exc.detail}, status=exc.status)
        response.headers.update(exc.headers)
    except web.HTTPException as exc:
        metrics.errors.labels(str(exc.status), "http").inc()
        metrics.requests.labels(route, str(exc.status)).inc()
        if exc.status >= 400:
            # FastAPI's shape for routing and body-size errors: {"detail": "<reason>"}.
            response = json_response({"detail": exc.reason}, status=exc.status)
            if "Allow" in exc.headers:
                response.headers["Allow"] = exc.headers["Allow"]
            return response
        raise
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.exception("Request to %s failed: %s", request.path, exc)
        metrics.errors.labels("500", type(exc).__name__).inc()
        response = web.Response(status=500, text="Internal Server Error")
    metrics.requests.labels(route, str(response.status)).inc()
    return response


async def root(request: web.Request) -> web.Response:
    return json_response({"message": "Immich ML"})


async def ping(request: web.Request) -> web.Response:
    return web.Response(text="pong")


async def metrics_route(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS].render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


async def read_form(request: web.Request) -> dict[str, str | bytes]:
    """Form fields by name: ``image`` as raw bytes (any filename or content type),
    everything else as text. Multipart and urlencoded bodies; the last value of a
    repeated field wins (Starlette ``FormData.get``). A body that cannot be parsed is a
    400 ``There was an error parsing the body``, as FastAPI answers."""
    try:
        return await _read_form(request)
    except (ValueError, AssertionError, HttpProcessingError) as exc:
        log.info("Unparsable form body on %s: %s", request.path, type(exc).__name__)
        raise HTTPError(400, "There was an error parsing the body", "bad_form") from None


async def _read_form(request: web.Request) -> dict[str, str | bytes]:
    fields: dict[str, str | bytes] = {}
    if request.content_type.startswith("multipart/"):
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if part.name is None:
                await part.release()
                continue
            if part.name == "image" or part.filename is not None:
                fields[part.name] = bytes(await part.read())
            else:
                fields[part.name] = await part.text()
    elif request.content_type == "application/x-www-form-urlencoded":
        for name, value in (await request.post()).items():
            fields[name] = value if isinstance(value, str) else value.file.read()
    return fields


async def predict(request: web.Request) -> web.Response:
    app = request.app
    state = app[STATE]
    metrics: Metrics = app[METRICS]
    ctx: ModelContext = state["ctx"]
    state["active"] += 1
    metrics.in_flight.inc()
    started = time.perf_counter()
    try:
        fields = await read_form(request)
        entries_field = fields.get("entries")
        # FastAPI treats an empty form value as absent.
        if not isinstance(entries_field, str) or entries_field == "":
            raise HTTPError(422, MISSING_ENTRIES["detail"], "missing_entries")
        try:
            without_deps, with_deps = parse_entries(entries_field)
        except InvalidEntries as exc:
            raise HTTPError(422, str(exc), "invalid_entries") from exc

        image = fields.get("image")
        text = fields.get("text")
        if isinstance(image, str):
            image = image.encode()
        payload: Image.Image | str
        if image is not None:
            try:
                payload = await ctx.run(decode_pil, image, app[SETTINGS].max_image_pixels)
            except ImageTooLarge as exc:
                raise HTTPError(413, str(exc), "image_too_large") from None
            except UndecodableImage as exc:
                # Immich's code for an undecodable image is a plain 500; one log line, no traceback
                log.info("Undecodable image (%d bytes): %s: %s", len(image), exc, exc.__cause__)
                metrics.errors.labels("500", "undecodable_image").inc()
                return web.Response(status=500, text="Internal Server Error")
            if payload.width == 0 or payload.height == 0:
                raise HTTPError(400, "Image has zero width or height", "zero_size")
        elif isinstance(text, (str, bytes)) and text != "":
            try:
                payload = text if isinstance(text, str) else text.decode()
            except UnicodeDecodeError:  # a file part that is not UTF-8 text, as a plain field would be
                raise HTTPError(400, "There was an error parsing the body", "bad_form") from None
        else:
            raise HTTPError(400, "Either image or text must be provided", "no_input")

        outputs: dict[tuple, Any] = {}
        response = await run_inference(app, payload, without_deps, with_deps, outputs)
        body = json_response(response)
        if isinstance(payload, Image.Image) and app[SETTINGS].record and app[SETTINGS].sidecar:
            _record(app, image, payload, response, outputs, without_deps + with_deps)
        return body
    finally:
        state["active"] -= 1
        metrics.in_flight.dec()
        metrics.request_latency.observe(time.perf_counter() - started)


def _record(app: web.Application, data: bytes, image: Image.Image, response: dict, outputs: dict, entries) -> None:
    """Store a ``/predict`` result in the sidecar in the background (``IMMICH_TRT_RECORD``);
    a failure is logged and never reaches the Immich request."""
    from ..sidecar.ingest import record_prediction
    from ..sidecar.routes import SIDECAR

    async def run() -> None:
        try:
            await record_prediction(
                app[SIDECAR], data, image, response, outputs, [(e.task, e.type, e.name) for e in entries],
                app[STATE]["ctx"].run,
            )
        except Exception as exc:
            log.error("Recording a /predict result failed: %s: %s", type(exc).__name__, exc)

    task = asyncio.create_task(run())
    pending: set = app[STATE].setdefault("recording", set())
    pending.add(task)
    task.add_done_callback(pending.discard)


async def run_inference(
    app: web.Application,
    payload: Image.Image | str,
    without_deps: list[InferenceEntry],
    with_deps: list[InferenceEntry],
    outputs: dict[tuple, Any] | None = None,
) -> dict[str, Any]:
    """Run the entries as immich-ml ``run_inference``: independent entries concurrently,
    then dependent ones; each output is stored by model identity and by task.

    ``outputs``, when given, receives every model's raw output by ``(type, task)``
    (e.g. the face detector's landmarks, which the response leaves out)."""
    cache: ModelCache = app[STATE]["cache"]
    metrics: Metrics = app[METRICS]
    outputs = {} if outputs is None else outputs
    response: dict[str, Any] = {}

    async def run_one(entry: InferenceEntry) -> None:
        model = await cache.get(entry.name, entry.type, entry.task, **entry.options)
        inputs = [payload]
        for dep in model.depends:
            if dep not in outputs:
                raise HTTPError(
                    400, f"Task {entry.task} of type {entry.type} depends on output of {dep!r}", "missing_dependency"
                )
            inputs.append(outputs[dep])
        try:
            await cache.load(model)
            started = time.perf_counter()
            output = await model.predict(*inputs, **entry.options)
        except FailedToLoad as exc:
            raise HTTPError(500, str(exc), "load_failed") from exc
        except RuntimeUnavailableError as exc:
            # Triton restarting, hung past the per-call timeout or unreachable: fail fast
            # with a status a client may retry (Immich moves on to its next URL).
            log.warning("Inference backend unavailable for %s %s: %s", entry.task, entry.type, exc)
            raise HTTPError(
                503, "Inference backend unavailable, retry later", "runtime_unavailable", {"Retry-After": "1"}
            ) from exc
        metrics.inference_latency.labels(entry.task, entry.type).observe(time.perf_counter() - started)
        outputs[model.identity] = output
        response[entry.task] = output

    await asyncio.gather(*(run_one(entry) for entry in without_deps))
    if with_deps:
        await asyncio.gather(*(run_one(entry) for entry in with_deps))
    if isinstance(payload, Image.Image):
        response["imageHeight"], response["imageWidth"] = payload.height, payload.width
    return response


async def idle_unload_loop(app: web.Application) -> None:
    """Every ``MODEL_TTL_POLL_S``, unload models idle for longer than ``MODEL_TTL``
    while no ``/predict`` is in flight (the single-process form of upstream's
    ``idle_shutdown_task``)."""
    settings = app[SETTINGS]
    state = app[STATE]
    while True:
        await asyncio.sleep(settings.model_ttl_poll_s)
        if state["active"] == 0:
            try:
                await state["cache"].evict_idle()
            except Exception:
                log.exception("Idle unload failed")


async def preload_models(app: web.Application) -> None:
    """Load the ``MACHINE_LEARNING_PRELOAD__*`` models without TTL, as upstream."""
    cache = app[STATE]["cache"]
    for (task, type_), names in app[SETTINGS].preload.items():
        for name in names:
            log.info("Preloading %s %s model '%s'", task, type_, name)
            try:
                model = await cache.get(name, type_, task, ttl=0)
                await cache.load(model)
            except (ValueError, FailedToLoad) as exc:
                log.error("Preload of %s %s model '%s' failed: %s", task, type_, name, exc)


def create_app(settings: Settings, runtime: Runtime | None = None) -> web.Application:
    """Build the application. ``runtime`` overrides the one chosen by ``settings``
    (started and stopped with the app either way)."""
    app = web.Application(
        client_max_size=settings.max_request_mb * 1024 * 1024, middlewares=[error_middleware]
    )
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[RUNTIME] = runtime if runtime is not None else make_runtime(settings)
    app[STATE] = {"active": 0}
    app.router.add_get("/", root)
    app.router.add_get("/ping", ping)
    app.router.add_get("/metrics", metrics_route)
    app.router.add_post("/predict", predict)
    app.cleanup_ctx.append(_lifespan)
    if settings.sidecar:
        from ..sidecar.routes import add_routes, make_auth_middleware

        app.middlewares.append(make_auth_middleware(settings.api_key))
        add_routes(app)
        app.cleanup_ctx.append(_sidecar_lifespan)
    return app


async def _sidecar_lifespan(app: web.Application):
    """Open the sidecar store (and the OpenSearch mirror when configured) after the
    runtime; close them before it."""
    from ..sidecar.routes import MIRROR, SIDECAR
    from ..sidecar.service import Sidecar

    sidecar = Sidecar(app[SETTINGS])
    await sidecar.start()
    app[SIDECAR] = sidecar
    mirror = None
    if app[SETTINGS].opensearch_url:
        from ..sidecar.opensearch import Mirror

        mirror = Mirror(sidecar, app[SETTINGS])
        sidecar.listeners.append(mirror.notify)
        await mirror.start()
        app[MIRROR] = mirror
    yield
    recording = app[STATE].get("recording")
    if recording:
        await asyncio.gather(*recording, return_exceptions=True)
    if mirror is not None:
        await mirror.stop()
    await sidecar.stop()


async def _lifespan(app: web.Application):
    settings = app[SETTINGS]
    executor = ThreadPoolExecutor(settings.request_threads) if settings.request_threads > 0 else None
    ctx = ModelContext(settings=settings, runtime=app[RUNTIME], executor=executor)
    app[STATE]["ctx"] = ctx
    log.info("Created in-memory cache with unloading after %ss of inactivity.", settings.model_ttl)
    await app[RUNTIME].start()
    app[STATE]["cache"] = ModelCache(ctx, build_model, ttl=settings.model_ttl, metrics=app[METRICS])
    idle_task = None
    if settings.model_ttl > 0 and settings.model_ttl_poll_s > 0:
        idle_task = asyncio.create_task(idle_unload_loop(app))
    await preload_models(app)
    yield
    if idle_task is not None:
        idle_task.cancel()
    await app[STATE]["cache"].clear()
    await app[RUNTIME].stop()
    if executor is not None:
        executor.shutdown(wait=False, cancel_futures=True)
