"""One-pass ingestion: decode an image once, run every enabled model, store the results.

The requests are exactly Immich's (:mod:`immich_trt.contract` builds the ``entries``),
run through the same :func:`immich_trt.models.inference.run_inference` as ``/predict``, so
what the sidecar stores is what Immich would have received. Tasks already stored for
the same bytes (imohash) are skipped before decoding, which makes re-ingesting a folder
cheap and an interrupted ingest resumable; an asset stored before asset thumbnails
existed is decoded once more, for its thumbnail only (:mod:`.thumbnails`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from PIL import Image

from .. import contract
from ..config import clean_name
from ..models.transforms import ImageInput, pixels
from .assets import AssetResults, FaceResult, OcrLine, find_asset, tasks_done
from .duplicates import imohash_of
from .errors import BadRequest
from .service import Sidecar
from .thumbnails import asset_thumbnail, face_thumbnail, has_asset_thumbnail

#: ``(payload, entries) -> (response, raw outputs by (type, task))``
Infer = Callable[[Image.Image, dict], Awaitable[tuple[dict[str, Any], dict[tuple, Any]]]]
#: ``bytes -> PIL image`` (runs on the request executor); raises for undecodable bytes.
Decode = Callable[[bytes], Awaitable[Image.Image]]
#: ``(fn, *args) -> fn(*args)`` on the request executor (``ModelContext.run``).
Run = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class IngestOptions:
    """Which models run. ``None`` disables a task. Model names are cleaned as Immich
    does (``ViT-B-32::openai`` -> ``ViT-B-32__openai``); thresholds are Immich's
    server defaults."""

    clip: str | None = contract.CLIP_MODEL
    faces: str | None = contract.FACE_MODEL
    ocr: str | None = contract.OCR_MODEL
    face_min_score: float = contract.FACE_MIN_SCORE
    ocr_min_detection_score: float = contract.OCR_MIN_DETECTION_SCORE
    ocr_min_recognition_score: float = contract.OCR_MIN_RECOGNITION_SCORE
    ocr_max_resolution: int = contract.OCR_MAX_RESOLUTION

    def tasks(self) -> dict[str, str]:
        """``{task: cleaned model name}`` of the enabled tasks."""
        named = {"clip": self.clip, "faces": self.faces, "ocr": self.ocr}
        return {task: clean_name(model) for task, model in named.items() if model}

    def entries(self, tasks: set[str]) -> dict:
        """Immich's ``entries`` for the given subset of :meth:`tasks`."""
        models = self.tasks()
        entries: dict = {}
        if "clip" in tasks:
            entries |= contract.clip_visual_entries(models["clip"])
        if "faces" in tasks:
            entries |= contract.face_entries(models["faces"], self.face_min_score)
        if "ocr" in tasks:
            entries |= contract.ocr_entries(
                models["ocr"], self.ocr_min_detection_score, self.ocr_max_resolution, self.ocr_min_recognition_score
            )
        return entries


def results_from_outputs(
    image: ImageInput,
    data_size: int,
    imohash: str,
    response: dict[str, Any],
    outputs: dict[tuple, Any],
    models: dict[str, str],
) -> AssetResults:
    """Turn a ``/predict``-style response (plus the raw detector output, for landmarks)
    into :class:`AssetResults`, with the asset's thumbnail and its faces' crops.
    ``models`` maps the tasks that ran to model names."""
    results = AssetResults(
        imohash=imohash, size=data_size, width=image.width, height=image.height, thumbnail=asset_thumbnail(image)
    )
    if "clip" in response and isinstance(response["clip"], str):
        results.clip = (models["clip"], np.asarray(orjson.loads(response["clip"]), dtype=np.float32))
    faces = response.get("facial-recognition")
    if isinstance(faces, list):
        detection = outputs.get(("detection", "facial-recognition")) or {}
        landmarks = detection.get("landmarks") if isinstance(detection, dict) else None
        stored = []
        for i, face in enumerate(faces):
            b = face["boundingBox"]
            box = (float(b["x1"]), float(b["y1"]), float(b["x2"]), float(b["y2"]))
            stored.append(
                FaceResult(
                    box=box,
                    score=float(face["score"]),
                    embedding=np.asarray(orjson.loads(face["embedding"]), dtype=np.float32),
                    landmarks=None if landmarks is None else np.asarray(landmarks[i], dtype=np.float32),
                    thumbnail=face_thumbnail(pixels(image), box),
                )
            )
        results.faces = (models["faces"], stored)
    ocr = response.get("ocr")
    if isinstance(ocr, dict) and "text" in ocr:
        boxes = np.asarray(ocr["box"], dtype=np.float64).reshape(-1, 8)
        lines = [
            OcrLine([float(v) for v in boxes[i]], text, float(ocr["boxScore"][i]), float(ocr["textScore"][i]))
            for i, text in enumerate(ocr["text"])
        ]
        results.ocr = (models["ocr"], lines)
    return results


async def ingest_bytes(
    sidecar: Sidecar,
    data: bytes,
    decode: Decode,
    infer: Infer,
    run: Run,
    options: IngestOptions,
    ref: str | None = None,
    filename: str | None = None,
) -> dict[str, Any]:
    """Ingest one encoded image (see the module docstring).

    Returns ``{"assetId", "imohash", "created", "ran": [task], "skipped": [task],
    "faces": n new faces, "ocrLines": n, "clip": bool}``. Raises :class:`BadRequest`
    for empty data or no enabled task; decoder errors propagate (the caller answers 400).
    """
    if not data:
        raise BadRequest("image is empty")
    tasks = options.tasks()
    if not tasks:
        raise BadRequest("no task enabled (clip, faces and ocr are all off)")
    imohash = imohash_of(data)

    def pending(store) -> tuple[set[str], bool]:
        """The tasks still to run, and whether the asset lacks its thumbnail (store thread)."""
        asset = find_asset(store, imohash)
        done = tasks_done(store, asset) if asset is not None else {}
        todo = {task for task, model in tasks.items() if model not in done.get(task, set())}
        return todo, asset is None or not has_asset_thumbnail(store, asset)

    todo, needs_thumbnail = await sidecar.call(pending)
    if todo or needs_thumbnail:
        image = await decode(data)
        response, outputs = await infer(image, options.entries(todo)) if todo else ({}, {})
        # thumbnails are scaled and encoded here: off the event loop
        results = await run(results_from_outputs, image, len(data), imohash, response, outputs, tasks)
    else:
        results = AssetResults(imohash=imohash, size=len(data), width=0, height=0)
    results.ref, results.filename = ref, filename
    saved = await sidecar.save(results)  # with nothing to compute, this records the ref only
    return {
        "assetId": saved.asset_id,
        "imohash": imohash,
        "created": saved.created,
        "ran": sorted(todo),
        "skipped": sorted(set(tasks) - todo),
        "faces": len(saved.face_ids),
        "ocrLines": len(results.ocr[1]) if results.ocr and "ocr" in todo else 0,
        "clip": saved.clip_added,
    }


def recorded_tasks(entries: list[tuple[str, str, str]]) -> dict[str, str]:
    """``{task: model}`` of the complete tasks among ``/predict`` entries given as
    ``(task, type, model name)``: CLIP visual, faces with recognition, OCR with recognition."""
    tasks: dict[str, str] = {}
    for task, type_, name in entries:
        if (task, type_) == ("clip", "visual"):
            tasks["clip"] = clean_name(name)
        elif (task, type_) == ("facial-recognition", "recognition"):
            tasks["faces"] = clean_name(name)
        elif (task, type_) == ("ocr", "recognition"):
            tasks["ocr"] = clean_name(name)
    return tasks


async def record_prediction(
    sidecar: Sidecar,
    data: bytes,
    image: ImageInput,
    response: dict[str, Any],
    outputs: dict[tuple, Any],
    entries: list[tuple[str, str, str]],
    run: Run,
) -> dict[str, Any] | None:
    """Store the results of one ``/predict`` call (``IMMICH_TRT_RECORD=1``), keyed by
    the imohash of the image bytes; ``None`` when the call had no complete task."""
    models = recorded_tasks(entries)
    if not models:
        return None
    results = await run(results_from_outputs, image, len(data), imohash_of(data), response, outputs, models)
    saved = await sidecar.save(results)
    return {"assetId": saved.asset_id, "faces": len(saved.face_ids), "clip": saved.clip_added}
