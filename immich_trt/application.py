"""The whole service: Immich's ``/predict`` server plus, unless ``IMMICH_TRT_SIDECAR`` is
off, the sidecar's ``/v1`` routes and, unless ``IMMICH_TRT_UI`` is off, its web page
(``/ui``)."""

from __future__ import annotations

from aiohttp import web

from . import sidecar, ui
from .config import Settings
from .runtime.base import Runtime
from .server.app import create_app as create_server_app


def create_app(settings: Settings, runtime: Runtime | None = None) -> web.Application:
    """The application ``immich-trt serve`` runs: :func:`immich_trt.server.app.create_app`
    with :func:`immich_trt.sidecar.install` when the sidecar is on, and
    :func:`immich_trt.ui.install` when the page is on too. ``runtime`` overrides
    the one chosen by ``settings``. Raises ``ValueError`` for settings the runtime cannot
    serve."""
    app = create_server_app(settings, runtime)
    if settings.sidecar:
        sidecar.install(app)
        if settings.ui:
            ui.install(app)
    return app
