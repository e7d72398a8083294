"""The sidecar: what Immich's ML service forgets, remembered (see ``docs/design.md``).

:func:`install` plugs it into the application of :mod:`immich_trt.server`: the ``/v1``
routes behind their access rule, the store (and the OpenSearch mirror) opened after the
runtime and closed before it, and, with ``IMMICH_TRT_RECORD``, a hook that stores every
``/predict`` result.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from ..models.entries import InferenceEntry
from ..models.transforms import ImageInput
from ..web import STATE
from ..web.access import make_access_middleware
from .ingest import record_prediction
from .routes import MIRROR, PREFIX, SIDECAR, add_routes
from .service import Sidecar

log = logging.getLogger("immich_trt.sidecar")


def install(app: web.Application) -> None:
    """Add the sidecar to ``app`` (made by :func:`immich_trt.server.app.create_app`, not
    yet started): its auth middleware and ``/v1`` routes, its lifespan, and the record
    hook when ``IMMICH_TRT_RECORD`` is on."""
    state = app[STATE]
    app.middlewares.append(make_access_middleware(state.settings.api_key, PREFIX))
    add_routes(app)
    app.cleanup_ctx.append(_lifespan)
    if state.settings.record:
        state.prediction_hooks.append(_recorder(app))


def _recorder(app: web.Application):
    """The ``/predict`` hook of record mode: stores the result in the background; a
    failure is logged and never reaches the Immich request."""

    def record(data: bytes, image: ImageInput, response: dict, outputs: dict, entries: list[InferenceEntry]) -> None:
        state = app[STATE]
        sidecar = app.get(SIDECAR)
        if sidecar is None or state.ctx is None:
            return

        async def run() -> None:
            try:
                await record_prediction(
                    sidecar, data, image, response, outputs, [(e.task, e.type, e.name) for e in entries], state.ctx.run
                )
            except Exception as exc:
                log.error("Recording a /predict result failed: %s: %s", type(exc).__name__, exc)

        state.spawn(run())

    return record


async def _lifespan(app: web.Application):
    """Open the sidecar store (and the OpenSearch mirror when configured) after the
    runtime; close them before it, once the recordings in flight are stored."""
    settings = app[STATE].settings
    sidecar = Sidecar(settings)
    await sidecar.start()
    app[SIDECAR] = sidecar
    mirror = None
    if settings.opensearch_url:
        from .opensearch import Mirror

        mirror = Mirror(sidecar, settings)
        sidecar.listeners.append(mirror.notify)
        await mirror.start()
        app[MIRROR] = mirror
    yield
    if app[STATE].background:
        await asyncio.gather(*app[STATE].background, return_exceptions=True)
    if mirror is not None:
        await mirror.stop()
    await sidecar.stop()


__all__ = ["install"]
