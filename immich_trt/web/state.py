"""The application's typed state, and running a request's entries with HTTP errors.

One :class:`AppState` per application (``app[STATE]``), shared by Immich's routes and
the sidecar's: settings, runtime, metrics, the model cache once started, the count of
requests in flight, and hooks told of every ``/predict`` result (record mode)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ..config import Settings
from ..models.base import ModelContext
from ..models.cache import FailedToLoad, ModelCache
from ..models.entries import InferenceEntry
from ..models.inference import MissingDependency, run_inference
from ..models.transforms import ImageInput
from ..runtime.base import Runtime, RuntimeUnavailableError
from .http import HTTPError
from .metrics import Metrics

log = logging.getLogger("immich_trt.server")

#: ``hook(data, image, response, outputs, entries)``: told of each answered ``/predict``
#: on an image (the encoded bytes, the image as the models got it: decoded, or an
#: ``EncodedImage`` whose pixels ``pixels()`` decodes, the response, every model's raw
#: output by ``(type, task)``, the entries); must not block (schedule work instead).
PredictionHook = Callable[[bytes, ImageInput, dict, dict, list[InferenceEntry]], None]


@dataclass
class AppState:
    """What the routes of one application share."""

    settings: Settings
    runtime: Runtime
    metrics: Metrics
    ctx: ModelContext | None = None  # set when the application starts
    cache: ModelCache | None = None  # set when the application starts
    active: int = 0  # /predict requests in flight
    prediction_hooks: list[PredictionHook] = field(default_factory=list)
    background: set[asyncio.Task] = field(default_factory=set)  # tasks awaited before shutdown

    def spawn(self, coro) -> asyncio.Task:
        """Run ``coro`` in the background; it is awaited before the application stops."""
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    async def run_entries(
        self,
        payload: ImageInput | str,
        without_deps: list[InferenceEntry],
        with_deps: list[InferenceEntry],
        outputs: dict[tuple, Any] | None = None,
    ) -> dict[str, Any]:
        """:func:`immich_trt.models.inference.run_inference` with its errors as HTTP
        errors: a missing dependency 400, a model that fails to load 500 (reason
        ``load_failed``), an unreachable backend 503 with ``Retry-After: 1``."""
        assert self.cache is not None, "the application is not started"
        observe = self.metrics.inference_latency

        try:
            return await run_inference(
                self.cache, payload, without_deps, with_deps, outputs,
                lambda task, type_, seconds: observe.labels(task, type_).observe(seconds),
            )
        except MissingDependency as exc:
            raise HTTPError(400, str(exc), "missing_dependency") from exc
        except FailedToLoad as exc:
            raise HTTPError(500, str(exc), "load_failed") from exc
        except RuntimeUnavailableError as exc:
            # Triton restarting, hung past the per-call timeout or unreachable: fail fast
            # with a status a client may retry (Immich moves on to its next URL).
            log.info("Inference backend unavailable, answered 503: %s", exc)  # the runtime warned once
            raise HTTPError(
                503, "Inference backend unavailable, retry later", "runtime_unavailable", {"Retry-After": "1"}
            ) from exc


#: The :class:`AppState` of an application.
STATE = web.AppKey("state", AppState)
