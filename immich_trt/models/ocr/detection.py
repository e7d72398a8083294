"""PP-OCR DB text detector: preprocessing (resize, normalise, optional bucket padding)
and the model.

Sources reproduced: immich-ml ``immich_ml/models/ocr/detection.py`` (``TextDetector``,
its ``_transform``, including the ``- 0.5`` normalisation quirk) around RapidOCR 3.8.1
``ch_ppocr_det/main.py``."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from ...runtime.base import ModelSpec
from ...runtime.ensemble import BUCKET_HW, RESIZE_HW
from ..base import ModelContext
from ..onnxfile import load_onnx
from ..registry import ModelType
from ..transforms import ImageInput, encoded_bytes, pixels
from .base import _PaddleModel
from .buckets import DET_BUCKETS, bucket
from .db_postprocess import DBPostProcess, empty_detection, sorted_boxes
from .graphs import DET_INPUT_U8, DET_MEAN, DET_SCALE, det_uint8_model
from .processing import IMMICH_DETECTION, DetectionProcessing


def det_resize_shape(width: int, height: int, max_resolution: int) -> tuple[int, int]:
    """Detector input (width, height): shorter side bounded by ``max_resolution`` (never
    upscaled), each side then rounded half-to-even to a multiple of 32.

    As immich-ml ``TextDetector._transform``; e.g. 1920x1440 at 736 -> (992, 736)."""
    ratio = float(max_resolution) / height if height < width else float(max_resolution) / width
    ratio = min(ratio, 1.0)
    resize_h = int(height * ratio)
    resize_w = int(width * ratio)
    return int(round(resize_w / 32) * 32), int(round(resize_h / 32) * 32)


def det_resize(image: Image.Image, max_resolution: int) -> np.ndarray:
    """PIL RGB image -> ``uint8[1, H', W', 3]`` RGB, PIL LANCZOS resized to
    :func:`det_resize_shape`. Raises ``ValueError`` if a side rounds to 0 pixels."""
    resize_w, resize_h = det_resize_shape(image.width, image.height, max_resolution)
    if resize_w <= 0 or resize_h <= 0:
        raise ValueError(f"maxResolution {max_resolution} gives an empty detector input")
    resized = image.resize((resize_w, resize_h), resample=Image.Resampling.LANCZOS)
    return np.asarray(resized, dtype=np.uint8)[None]


def det_normalise(pixels: np.ndarray, processing: DetectionProcessing = IMMICH_DETECTION) -> np.ndarray:
    """``uint8[N, H, W, 3]`` RGB -> ``float32[N, 3, H, W]`` BGR normalised per channel,
    ``(x - subtract[c]) * multiply[c]``: by default Immich's ``(x - 0.5) * float32(1/127.5)``
    (not RapidOCR's ``(x/255 - 0.5)/0.5``). The served detector graph does the same
    inside (:func:`det_uint8_model`)."""
    subtract, multiply = processing.normalisation
    array = pixels[..., ::-1].astype(np.float32)
    if processing is IMMICH_DETECTION:  # scalars, as immich-ml computes them
        array -= DET_MEAN
        array *= DET_SCALE
    else:
        array -= subtract
        array *= multiply
    return np.ascontiguousarray(array.transpose(0, 3, 1, 2))


def det_preprocess(
    image: Image.Image, max_resolution: int, processing: DetectionProcessing = IMMICH_DETECTION
) -> np.ndarray:
    """PIL RGB image -> detector input ``float32[1, 3, H', W']`` (BGR), as immich-ml
    ``TextDetector._transform``: :func:`det_resize` then :func:`det_normalise`."""
    return det_normalise(det_resize(image, max_resolution), processing)


def detection_sizes(resize_hw: tuple[int, int], shape_buckets: bool) -> dict[str, np.ndarray]:
    """``resize_hw`` and ``bucket_hw`` INT32 [1, 2] (height, width): the detector input
    size (:func:`det_resize_shape`) and its padded size (the :data:`DET_BUCKETS` ladder
    of :func:`pad_to_bucket` when buckets are on), for a runtime that resizes and pads on
    the device (the GPU target's OCR detection ensemble)."""
    h, w = resize_hw
    padded = (bucket(h, DET_BUCKETS, 512), bucket(w, DET_BUCKETS, 512)) if shape_buckets else (h, w)
    return {RESIZE_HW: np.array([[h, w]], np.int32), BUCKET_HW: np.array([padded], np.int32)}


def pad_to_bucket(pixels: np.ndarray) -> np.ndarray:
    """Zero-pad ``[N, H, W, C]`` at the bottom/right to the :data:`DET_BUCKETS` ladder."""
    n, h, w, c = pixels.shape
    bh, bw = bucket(h, DET_BUCKETS, 512), bucket(w, DET_BUCKETS, 512)
    if (bh, bw) == (h, w):
        return pixels
    padded = np.zeros((n, bh, bw, c), dtype=pixels.dtype)
    padded[:, :h, :w] = pixels
    return padded


class TextDetector(_PaddleModel):
    """PP-OCR DB text detector. Options: ``minScore`` (box threshold, default 0.5 or the
    model's), ``maxResolution`` (shorter-side bound, default 736), ``scoreMode``
    ("fast"/"slow"). Normalisation and the other DB parameters are the model's
    (:mod:`.processing`; Immich's constants unless its file or the catalogue says otherwise).

    Output: ``{"boxes": float32[N, 4, 2]`` pixel quads in reading order,
    ``"scores": float32[N]}`` (scores in DB-postprocess order, as upstream).
    """

    type = ModelType.DETECTION

    def __init__(self, model_name: str, ctx: ModelContext, **options: Any) -> None:
        # All languages share one detector: the language prefix is dropped.
        super().__init__(model_name.split("__")[-1], ctx, **options)
        self.max_resolution = 736
        self.postprocess = DBPostProcess(box_thresh=options.get("minScore", 0.5))
        self.shape_buckets = ctx.settings.ocr_shape_buckets
        self.runtime_file = self.model_file
        self.processing = IMMICH_DETECTION

    def configure(self, **options: Any) -> None:
        if options.get("maxResolution") is not None:
            self.max_resolution = options["maxResolution"]
        if options.get("minScore") is not None:
            self.postprocess.box_thresh = options["minScore"]
        if options.get("scoreMode") is not None:
            self.postprocess.score_mode = options["scoreMode"]

    def _spec(self) -> ModelSpec:
        return ModelSpec(self.triton_name, self.runtime_file, max_batch_size=4, from_encoded_image=True)

    def prepare_files(self) -> None:
        """The model's processing, and the uint8-input copy the runtime serves (its
        normalisation inside the graph)."""
        processing = self._processing(load_onnx(self.model_file))
        assert isinstance(processing, DetectionProcessing)
        self.processing = processing
        post = self.postprocess
        post.thresh, post.unclip_ratio, post.max_candidates = (
            processing.thresh,
            processing.unclip_ratio,
            processing.max_candidates,
        )
        post.dilation_kernel = np.array([[1, 1], [1, 1]]) if processing.use_dilation else None
        if self.options.get("minScore") is None:
            post.box_thresh = processing.box_thresh
        dest = self.ctx.settings.engines_dir / self.triton_name / "1" / "model.onnx"
        self.runtime_file = det_uint8_model(self.model_file, dest, *processing.normalisation)

    def _preprocess(self, image: Image.Image) -> np.ndarray | None:
        """The CPU preprocessing: ``uint8[1, H, W, 3]`` (padded to its bucket when shape
        buckets are on); None for an image under 32 px a side."""
        if image.width < 32 or image.height < 32:
            return None
        pixels = det_resize(image, self.max_resolution)
        return pad_to_bucket(pixels) if self.shape_buckets else pixels

    def _input_tensors(self, image: ImageInput) -> dict[str, np.ndarray]:
        tensor = self._preprocess(pixels(image))
        assert tensor is not None  # tiny images never reach the runtime
        return {DET_INPUT_U8: tensor}

    def _postprocess(self, pred: np.ndarray, input_shape: tuple[int, int], image_size: tuple[int, int]):
        h, w = input_shape
        boxes, scores = self.postprocess(pred[:, :, :h, :w], image_size)
        if len(boxes) == 0:
            return empty_detection()
        return {"boxes": sorted_boxes(boxes), "scores": np.array(scores, dtype=np.float32)}

    async def _predict(self, image: ImageInput) -> dict[str, np.ndarray]:
        w, h = image.size
        if w < 32 or h < 32:
            return empty_detection()
        resize_w, resize_h = det_resize_shape(w, h, self.max_resolution)
        encoded = encoded_bytes(image) if min(resize_w, resize_h) > 0 else None
        out = await self.ctx.runtime.infer_image(
            self.triton_name,
            encoded,
            lambda: self.ctx.run(self._input_tensors, image),
            ensemble_inputs=detection_sizes((resize_h, resize_w), self.shape_buckets),
            image_size=image.size,
        )
        return await self.ctx.run(self._postprocess, next(iter(out.values())), (resize_h, resize_w), (h, w))
