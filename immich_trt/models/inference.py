"""Run a request's entries on one decoded image or text, as immich-ml ``run_inference``.

The one entry used by ``/predict`` and by the sidecar alike: independent entries run
concurrently, then the dependent ones (face recognition after detection, OCR recognition
after detection), each fed the outputs of the models it depends on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from PIL import Image

from .cache import ModelCache
from .entries import InferenceEntry
from .transforms import EncodedImage, ImageInput


class MissingDependency(Exception):
    """An entry depends on the output of a model the request did not ask for (HTTP 400)."""


async def run_inference(
    cache: ModelCache,
    payload: ImageInput | str,
    without_deps: list[InferenceEntry],
    with_deps: list[InferenceEntry],
    outputs: dict[tuple, Any] | None = None,
    observe: Callable[[str, str, float], None] | None = None,
) -> dict[str, Any]:
    """Immich's response for ``payload``: ``{task: output, ...}`` plus ``imageHeight`` and
    ``imageWidth`` (pixels) for an image.

    ``outputs``, when given, receives every model's raw output by ``(type, task)`` (e.g.
    the face detector's landmarks, which the response leaves out); ``observe(task, type,
    seconds)`` is told each model's inference time.

    Raises :class:`MissingDependency`, :class:`immich_trt.models.cache.FailedToLoad` (a
    model that cannot be obtained or loaded), ``RuntimeUnavailableError`` (the inference
    backend cannot be reached), and what a model raises for input it cannot take."""
    outputs = {} if outputs is None else outputs
    response: dict[str, Any] = {}

    async def run_one(entry: InferenceEntry) -> None:
        model = await cache.get(entry.name, entry.type, entry.task, **entry.options)
        inputs = [payload]
        for dep in model.depends:
            if dep not in outputs:
                raise MissingDependency(f"Task {entry.task} of type {entry.type} depends on output of {dep!r}")
            inputs.append(outputs[dep])
        await cache.load(model)
        started = time.perf_counter()
        output = await model.predict(*inputs, **entry.options)
        if observe is not None:
            observe(entry.task, entry.type, time.perf_counter() - started)
        outputs[model.identity] = output
        response[entry.task] = output

    await asyncio.gather(*(run_one(entry) for entry in without_deps))
    if with_deps:
        await asyncio.gather(*(run_one(entry) for entry in with_deps))
    if isinstance(payload, (Image.Image, EncodedImage)):
        response["imageHeight"], response["imageWidth"] = payload.height, payload.width
    return response
