"""The aiohttp application: Immich's ``/predict`` contract plus ``/metrics``.

Routes, fields, status codes and bodies follow immich-ml 3.1.0 ``immich_ml/main.py``
(see ``immich-ml-contract.md`` sections 1.2-1.5): ``GET /``, ``GET /ping``,
``POST /predict`` (multipart ``entries`` + ``image`` or ``text``). The sidecar's ``/v1``
routes plug themselves into this application (``immich_trt.sidecar.install``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web
from PIL import Image

from ..config import Settings
from ..models import build_model
from ..models.base import ModelContext
from ..models.cache import FailedToLoad, ModelCache
from ..models.entries import InvalidEntries, parse_entries
from ..models.transforms import EncodedImage, ImageInput, ImageTooLarge, UndecodableImage, decode_pil, open_encoded
from ..runtime import make_runtime
from ..runtime.base import Runtime
from ..web import METRICS, STATE, AppState, HTTPError, Metrics, error_middleware, json_response, read_form

log = logging.getLogger("immich_trt.server")

#: FastAPI's body for a missing required form field, reproduced byte for byte.
MISSING_ENTRIES = {"detail": [{"type": "missing", "loc": ["body", "entries"], "msg": "Field required", "input": None}]}


async def root(request: web.Request) -> web.Response:
    """``GET /``: ``{"message":"Immich ML"}``, as upstream."""
    return json_response({"message": "Immich ML"})


async def ping(request: web.Request) -> web.Response:
    """``GET /ping`` (and ``HEAD``): ``pong``."""
    return web.Response(text="pong")


#: A ``/metrics`` handler in place of this process's own figures (several processes,
#: :mod:`.workers`); it returns None to keep them.
METRICS_OVERRIDE = web.AppKey("metrics_override", object)


async def metrics_route(request: web.Request) -> web.Response:
    """``GET /metrics``: the Prometheus exposition of :class:`Metrics` (with several
    processes, their sum: :mod:`.workers`)."""
    override = request.app.get(METRICS_OVERRIDE)
    if override is not None:
        answer = await override(request)
        if answer is not None:
            return answer
    body, content_type = request.app[METRICS].render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


async def predict(request: web.Request) -> web.Response:
    """``POST /predict``: Immich's multipart request (``entries`` + ``image`` or ``text``)
    answered with Immich's JSON: 422 for missing or invalid ``entries``, 400 without
    input, 413 for an image over the pixel bound, a plain 500 for an undecodable image,
    503 with ``Retry-After`` while the backend is unavailable.

    With ``IMMICH_TRT_PREPROCESS=gpu`` the image is read from its header only
    (:func:`open_encoded`, on the event loop): models whose preprocessing runs in the
    GPU ensembles never decode it on the CPU, and a step that needs its pixels decodes
    it then, once per request (bytes Pillow cannot decode answer the same 500 then)."""
    state = request.app[STATE]
    metrics = state.metrics
    ctx = state.ctx
    assert ctx is not None
    state.active += 1
    metrics.in_flight.inc()
    started = time.perf_counter()
    try:
        fields = await read_form(request)
        entries_field = fields.get("entries")
        # FastAPI treats an empty form value as absent.
        if not isinstance(entries_field, str) or entries_field == "":
            raise HTTPError(422, MISSING_ENTRIES["detail"], "missing_entries")
        try:
            without_deps, with_deps = parse_entries(entries_field, state.settings.cache_folder)
        except InvalidEntries as exc:
            raise HTTPError(422, str(exc), "invalid_entries") from exc

        image = fields.get("image")
        text = fields.get("text")
        if isinstance(image, str):
            image = image.encode()
        payload: ImageInput | str
        if image is not None:
            try:
                if state.settings.preprocess == "gpu":
                    payload = open_encoded(image, state.settings.max_image_pixels)
                else:
                    payload = await ctx.run(decode_pil, image, state.settings.max_image_pixels)
            except ImageTooLarge as exc:
                raise HTTPError(413, str(exc), "image_too_large") from None
            except UndecodableImage as exc:
                return _undecodable(metrics, image, exc)
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
        try:
            response = await state.run_entries(payload, without_deps, with_deps, outputs)
        except UndecodableImage as exc:  # an EncodedImage whose pixels a CPU step asked for
            assert isinstance(image, bytes)
            return _undecodable(metrics, image, exc)
        body = json_response(response)
        if isinstance(payload, (Image.Image, EncodedImage)) and isinstance(image, bytes):
            for hook in state.prediction_hooks:
                hook(image, payload, response, outputs, without_deps + with_deps)
        return body
    finally:
        state.active -= 1
        metrics.in_flight.dec()
        metrics.request_latency.observe(time.perf_counter() - started)


def _undecodable(metrics: Metrics, data: bytes, exc: UndecodableImage) -> web.Response:
    """Immich's answer to an undecodable image: a plain 500; one log line, no traceback."""
    log.info("Undecodable image (%d bytes): %s: %s", len(data), exc, exc.__cause__)
    metrics.errors.labels("500", "undecodable_image").inc()
    return web.Response(status=500, text="Internal Server Error")


async def idle_unload_loop(app: web.Application) -> None:
    """Every ``MODEL_TTL_POLL_S``, unload models idle for longer than ``MODEL_TTL``
    while no ``/predict`` is in flight (the single-process form of upstream's
    ``idle_shutdown_task``)."""
    state = app[STATE]
    while True:
        await asyncio.sleep(state.settings.model_ttl_poll_s)
        if state.active == 0 and state.cache is not None:
            try:
                await state.cache.evict_idle()
            except Exception:
                log.exception("Idle unload failed")


async def preload_models(app: web.Application) -> None:
    """Load the ``MACHINE_LEARNING_PRELOAD__*`` models without TTL, as upstream."""
    state = app[STATE]
    cache = state.cache
    assert cache is not None
    for (task, type_), names in state.settings.preload.items():
        for name in names:
            log.info("Preloading %s %s model '%s'", task, type_, name)
            try:
                model = await cache.get(name, type_, task, ttl=0)
                await cache.load(model)
            except (ValueError, FailedToLoad) as exc:
                log.error("Preload of %s %s model '%s' failed: %s", task, type_, name, exc)


def create_app(settings: Settings, runtime: Runtime | None = None) -> web.Application:
    """Immich's routes (``/``, ``/ping``, ``/metrics``, ``/predict``) on a new application.
    ``runtime`` overrides the one chosen by ``settings`` (started and stopped with the app
    either way). Raises ``ValueError`` for settings the runtime cannot serve."""
    app = web.Application(
        client_max_size=settings.max_request_mb * 1024 * 1024, middlewares=[error_middleware]
    )
    metrics = Metrics()
    app[METRICS] = metrics
    app[STATE] = AppState(settings, runtime if runtime is not None else make_runtime(settings), metrics)
    app.router.add_get("/", root)
    app.router.add_get("/ping", ping)
    app.router.add_get("/metrics", metrics_route)
    app.router.add_post("/predict", predict)
    app.cleanup_ctx.append(_lifespan)
    return app


async def _lifespan(app: web.Application):
    """Start the runtime and the model cache (with the idle-unload loop and the
    preloads); at shutdown await background work, clear the cache, stop the runtime."""
    state = app[STATE]
    settings = state.settings
    executor = ThreadPoolExecutor(settings.request_threads) if settings.request_threads > 0 else None
    state.ctx = ModelContext(settings=settings, runtime=state.runtime, executor=executor)
    log.info("Created in-memory cache with unloading after %ss of inactivity.", settings.model_ttl)
    await state.runtime.start()
    state.cache = ModelCache(state.ctx, build_model, ttl=settings.model_ttl, metrics=state.metrics)
    idle_task = None
    if settings.model_ttl > 0 and settings.model_ttl_poll_s > 0:
        idle_task = asyncio.create_task(idle_unload_loop(app))
    await preload_models(app)
    yield
    if idle_task is not None:
        idle_task.cancel()
    if state.background:
        await asyncio.gather(*state.background, return_exceptions=True)
    await state.cache.clear()
    await state.runtime.stop()
    if executor is not None:
        executor.shutdown(wait=False, cancel_futures=True)
