"""The whole service: Immich's ``/predict`` server plus, unless ``IMMICH_TRT_SIDECAR`` is
off, the sidecar's ``/v1`` routes."""

from __future__ import annotations

from aiohttp import web

from . import sidecar
from .config import Settings
from .runtime.base import Runtime
from .server.app import create_app as create_server_app


def create_app(settings: Settings, runtime: Runtime | None = None) -> web.Application:
    """The application ``immich-trt serve`` runs: :func:`immich_trt.server.app.create_app`
    with :func:`immich_trt.sidecar.install` when the sidecar is on. ``runtime`` overrides
    the one chosen by ``settings``. Raises ``ValueError`` for settings the runtime cannot
    serve."""
    app = create_server_app(settings, runtime)
    if settings.sidecar:
        sidecar.install(app)
    return app
