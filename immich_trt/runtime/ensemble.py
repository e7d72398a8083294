"""The serving side of the GPU target's Triton ensembles: where preprocessing runs.

With ``IMMICH_TRT_PREPROCESS=gpu`` the repository built by ``build-engines --target
tensorrt`` holds, next to each model ``<base>`` whose input is made from the encoded
image (CLIP visual, face detection and recognition, OCR detection and recognition;
:attr:`ModelSpec.from_encoded_image`):

* ``<base>__preprocess``: a DALI pipeline (``encoded`` bytes, plus the detector's
  landmarks or text boxes for the recognizers, -> the model's input);
* ``<base>__ensemble``: ``<base>__preprocess`` then ``<base>``, or, for the recognizers,
  ``<base>__unbatched``: the same engine served without a batch axis, since one request
  carries all its faces (or text lines) as one DALI sample (see
  ``immich_trt.tools.gpu.ensemble``).

:class:`EnsembleRuntime` wraps the Triton runtime and makes that choice, so that a model
never knows where its preprocessing runs: it loads ``<base>__ensemble`` for such models
(its composing models load with it) and answers :meth:`Runtime.infer_image` by sending
the request's encoded bytes to it. An image without usable bytes (not JPEG, PNG or WebP,
a non-RGB source, a resized copy) or one the ensemble refuses goes through the model's
CPU preprocessing and ``<base>`` directly: the CPU path's result.

The tensor names below are the contract between this client and the DALI pipelines and
ensembles written by the GPU build tooling.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from ..config import Settings
from .base import InferenceError, ModelSpec, Runtime

log = logging.getLogger(__name__)

#: The ensembles' image input: the encoded file, UINT8 [1, n].
ENCODED_INPUT = "encoded"
#: OCR detection: the detector's input size and its padded size, INT32 [1, 2] (height, width).
RESIZE_HW = "resize_hw"
BUCKET_HW = "bucket_hw"
#: Face detection: the letterbox scale ``new_height / height``, FP32 [1, 1].
DET_SCALE_OUTPUT = "det_scale"
#: The CLIP ensemble's output, whatever the model calls its own (FP32 [1, D]).
CLIP_EMBEDDING = "embedding"
#: Face recognition: the detector's landmarks of the request's faces, FP32 [1, N, 5, 2]
#: (pixels of the image; the similarity transform to the ArcFace template is computed on
#: the device).
FACE_LANDMARKS = "face_landmarks"
#: OCR recognition, one request per batch of lines of the CPU path: each line's crop
#: homography as PIL ``PERSPECTIVE`` data, FP32 [1, N, 8], and INT32 [1, N, 8] (the
#: columns of :data:`LINE_GEOMETRY_COLUMNS`).
LINE_COEFFICIENTS = "line_coefficients"
LINE_GEOMETRY = "line_geometry"
#: ``line_geometry`` columns: the line's index in the request; the crop's width and
#: height before rotation; 1 when the crop is rotated 90 degrees (``h / w >= 1.5``); the
#: resized width at height 48; the batch's padded width; the first output column and
#: row where ``cv2.resize`` clamps to the crop's last column and row (the output width and
#: 48 when it never does).
LINE_GEOMETRY_COLUMNS = (
    "index", "width", "height", "rotated", "resized_width", "batch_width", "clamp_column", "clamp_row",
)


class GpuPathNames(NamedTuple):
    """Triton model names of one GPU-preprocessed model."""

    base: str  # the TensorRT (or CPU-target) model, e.g. ``clip__ViT-B-32__openai__visual``
    preprocess: str  # ``<base>__preprocess``
    ensemble: str  # ``<base>__ensemble``
    unbatched: str  # ``<base>__unbatched``: the recognizers' engine without a batch axis


def gpu_path_names(base: str) -> GpuPathNames:
    """The names of the preprocessing model, the ensemble and the unbatched copy served
    for model ``base``."""
    return GpuPathNames(base, f"{base}__preprocess", f"{base}__ensemble", f"{base}__unbatched")


def image_format(encoded: bytes) -> str | None:
    """``"jpeg"``, ``"png"`` or ``"webp"`` when the bytes start with that format's
    signature: the formats whose DALI decode was checked bit-exact against Pillow.
    None otherwise (HEIC, AVIF, TIFF...): those stay on the CPU path, since one file
    DALI cannot decode fails its whole batch."""
    head = bytes(encoded[:12])
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def check_gpu_settings(settings: Settings) -> None:
    """Raise ``ValueError`` when ``IMMICH_TRT_PREPROCESS=gpu`` cannot work: the GPU path
    needs a Triton server with the DALI and TensorRT backends serving the prebuilt
    repository, either launched by us from a full installation
    (``IMMICH_TRT_TRITON_SERVER``, e.g. ``/opt/tritonserver`` in NVIDIA's image) or given
    by ``TRITON_URL`` (the Triton of the nvidia-pytriton wheel and the in-process
    onnxruntime runtime have neither backend)."""
    if settings.preprocess != "gpu":
        return
    if settings.runtime not in {"triton", "auto"}:  # auto chooses Triton for the GPU path (runtime.select)
        raise ValueError(
            f"IMMICH_TRT_PREPROCESS=gpu needs IMMICH_TRT_RUNTIME=triton (not {settings.runtime!r}): "
            "GPU preprocessing runs in Triton ensembles"
        )
    if not settings.triton_url and settings.triton_server is None:
        raise ValueError(
            "IMMICH_TRT_PREPROCESS=gpu needs a Triton with the DALI and TensorRT backends serving the repository "
            "of `immich-trt build-engines --target tensorrt`: IMMICH_TRT_TRITON_SERVER=/opt/tritonserver "
            "(launched by us) or TRITON_URL"
        )


def ensemble_spec(spec: ModelSpec) -> ModelSpec:
    """What the GPU path loads for ``spec``: ``<base>__ensemble``, by name (its composing
    models load with it; nothing is written on demand, the repository is prebuilt)."""
    return ModelSpec(gpu_path_names(spec.name).ensemble, spec.onnx_path, max_batch_size=0)


async def infer_ensemble(
    runtime: Runtime,
    base: str,
    encoded: bytes | None,
    inputs: Mapping[str, np.ndarray] | None = None,
    outputs: Sequence[str] | None = None,
    image_size: tuple[int, int] | None = None,
) -> dict[str, np.ndarray] | None:
    """Run ``<base>__ensemble`` on ``encoded`` (sent as ``encoded`` UINT8 [1, n]) plus
    ``inputs``; returns the requested outputs (all when ``outputs`` is None), or ``None``
    when the caller is to take the CPU path: no bytes, bytes of a format the pipelines do
    not decode (:func:`image_format`), or the ensemble refused them (an
    :class:`InferenceError`, logged as a warning: e.g. a file Pillow decodes and nvJPEG
    does not, which fails its whole DALI batch). ``image_size`` (width, height) is for
    that warning. Raises :class:`RuntimeUnavailableError` when Triton cannot be reached."""
    if encoded is None or image_format(encoded) is None:
        log.debug("No encoded bytes the GPU decodes; '%s' preprocesses on the CPU", base)
        return None
    name = gpu_path_names(base).ensemble
    feed = {ENCODED_INPUT: np.frombuffer(encoded, dtype=np.uint8)[None], **(inputs or {})}
    try:
        return await runtime.infer(name, feed, outputs)
    except InferenceError as exc:
        size = f"{image_size[0]}x{image_size[1]} " if image_size else ""
        log.warning("%s; preprocessing this %simage on the CPU instead", exc, size)
        return None


class EnsembleRuntime(Runtime):
    """A Triton runtime whose image models take encoded images through the GPU target's
    ensembles (``IMMICH_TRT_PREPROCESS=gpu``); everything else is the wrapped runtime's.

    Loading an image model raises ``ValueError`` when the settings cannot serve the GPU
    path (:func:`check_gpu_settings`: e.g. the in-process runtime, or the wheel's Triton
    without ``TRITON_URL``); ``immich-trt serve`` refuses such settings at start."""

    def __init__(self, inner: Runtime, settings: Settings) -> None:
        self.settings = settings
        self.inner = inner
        self._ensembles: dict[str, ModelSpec] = {}  # base name -> its spec, served through its ensemble
        self._bases: set[str] = set()  # bases loaded for the CPU fallback
        # one load per base when a request's batches fall back together (OCR lines)
        self._base_loads: dict[str, asyncio.Lock] = {}

    def __getattr__(self, name: str):  # the wrapped runtime's own attributes (launcher, url...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    async def start(self) -> None:
        await self.inner.start()

    async def stop(self) -> None:
        await self.inner.stop()

    async def ready(self) -> bool:
        return await self.inner.ready()

    async def load(self, spec: ModelSpec) -> None:
        """Load ``<base>__ensemble`` for a model made from the encoded image, ``spec``
        itself otherwise."""
        if spec.from_encoded_image:
            check_gpu_settings(self.settings)
            await self.inner.load(ensemble_spec(spec))
            self._ensembles[spec.name] = spec
        else:
            await self.inner.load(spec)

    async def unload(self, name: str) -> None:
        if name in self._ensembles:
            del self._ensembles[name]
            await self.inner.unload(gpu_path_names(name).ensemble)
            if name in self._bases:
                self._bases.discard(name)
                await self.inner.unload(name)
        else:
            await self.inner.unload(name)

    async def infer(
        self, name: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        return await self.inner.infer(name, inputs, outputs)

    async def infer_image(
        self,
        name: str,
        encoded: bytes | None,
        preprocess: Callable[[], Awaitable[Mapping[str, np.ndarray]]],
        ensemble_inputs: Mapping[str, np.ndarray] | None = None,
        outputs: Sequence[str] | None = None,
        image_size: tuple[int, int] | None = None,
    ) -> dict[str, np.ndarray]:
        """``<name>__ensemble`` on ``encoded`` when the bytes suit it, else the model's CPU
        ``preprocess`` and ``name`` directly (see :meth:`Runtime.infer_image`). The
        detectors' ensembles hold ``name``; a recognizer's holds its unbatched copy, so
        ``name`` is loaded on its first fallback."""
        out = await infer_ensemble(self.inner, name, encoded, ensemble_inputs, outputs, image_size)
        if out is not None:
            return out
        inputs = await preprocess()
        spec = self._ensembles.get(name)
        if spec is not None and name not in self._bases:
            async with self._base_loads.setdefault(name, asyncio.Lock()):
                if name not in self._bases:
                    await self.inner.load(dataclasses.replace(spec, from_encoded_image=False))
                    self._bases.add(name)
        return await self.inner.infer(name, inputs, outputs)


def with_ensembles(runtime: Runtime, settings: Settings) -> Runtime:
    """``runtime`` wrapped in :class:`EnsembleRuntime` when ``IMMICH_TRT_PREPROCESS=gpu``,
    else ``runtime`` itself."""
    if settings.preprocess != "gpu":
        return runtime
    return EnsembleRuntime(runtime, settings)


__all__ = [
    "BUCKET_HW", "CLIP_EMBEDDING", "DET_SCALE_OUTPUT", "ENCODED_INPUT", "FACE_LANDMARKS", "LINE_COEFFICIENTS",
    "LINE_GEOMETRY", "LINE_GEOMETRY_COLUMNS", "RESIZE_HW", "EnsembleRuntime",
    "GpuPathNames", "check_gpu_settings", "ensemble_spec", "gpu_path_names", "image_format", "infer_ensemble",
    "with_ensembles",
]
