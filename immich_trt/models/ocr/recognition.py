"""PP-OCR SVTR text recognizer: line crops, resize/normalise, batching and the model.

Sources reproduced: immich-ml ``immich_ml/models/ocr/recognition.py`` (crops with PIL's
perspective transform, output format) around RapidOCR 3.8.1 ``ch_ppocr_rec/main.py``
``TextRecognizer`` (``resize_norm_img``, batching by aspect ratio)."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from PIL import Image

from ...runtime.base import ModelSpec
from ...runtime.ensemble import LINE_COEFFICIENTS, LINE_GEOMETRY
from ..base import ModelContext, ModelLoadError
from ..onnxfile import load_onnx
from ..registry import ModelTask, ModelType
from ..transforms import ImageInput, encoded_bytes, pixels
from .base import _PaddleModel
from .buckets import REC_WIDTH_BUCKETS, bucket
from .ctc import CTCLabelDecode, characters_of
from .graphs import CTC_INDEX, CTC_PROB, ctc_reduced_model
from .processing import IMMICH_RECOGNITION, RecognitionProcessing

REC_HEIGHT = 48
REC_MIN_WIDTH = 320


def perspective_coefficients(boxes: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Homographies mapping crop pixels to image pixels, ``float32[N, 8]`` (PIL
    ``PERSPECTIVE`` data), solved by float32 SVD of the 8x9 DLT system per box as
    immich-ml ``TextRecognizer._get_perspective_transform``.

    ``boxes`` ``float32[N, 4, 2]`` (tl, tr, br, bl), ``sizes`` ``int32[N, 2]`` (w, h).
    """
    n = len(boxes)
    w = sizes[:, 0].astype(np.float32)
    h = sizes[:, 1].astype(np.float32)
    zeros = np.zeros(n, dtype=np.float32)
    src = np.stack([np.stack([zeros, zeros], 1), np.stack([w, zeros], 1), np.stack([w, h], 1), np.stack([zeros, h], 1)], 1)
    a = np.zeros((n, 8, 9), dtype=np.float32)
    x, y = src[:, :, 0], src[:, :, 1]
    u, v = boxes[:, :, 0], boxes[:, :, 1]
    a[:, 0::2, 0] = x
    a[:, 0::2, 1] = y
    a[:, 0::2, 2] = 1
    a[:, 0::2, 6] = -u * x
    a[:, 0::2, 7] = -u * y
    a[:, 0::2, 8] = -u
    a[:, 1::2, 3] = x
    a[:, 1::2, 4] = y
    a[:, 1::2, 5] = 1
    a[:, 1::2, 6] = -v * x
    a[:, 1::2, 7] = -v * y
    a[:, 1::2, 8] = -v
    _, _, vt = np.linalg.svd(a)
    hom = vt[:, -1, :].reshape(n, 3, 3)
    hom = hom / hom[:, 2:3, 2:3]
    return hom.reshape(n, 9)[:, :8]


def crop_sizes(boxes: np.ndarray) -> np.ndarray:
    """Crop (width, height) per box: the longer of each pair of opposite sides,
    truncated, ``int32[N, 2]``."""
    widths = np.maximum(np.linalg.norm(boxes[:, 1] - boxes[:, 0], axis=1), np.linalg.norm(boxes[:, 2] - boxes[:, 3], axis=1))
    heights = np.maximum(np.linalg.norm(boxes[:, 0] - boxes[:, 3], axis=1), np.linalg.norm(boxes[:, 1] - boxes[:, 2], axis=1))
    return np.stack([widths, heights], axis=1).astype(np.int32)


@dataclass(frozen=True)
class LineGeometry:
    """Where each text line's crop comes from, computed from the detector's boxes alone
    (no pixels): ``sizes`` ``int32[N, 2]`` (width, height) of the crop before rotation
    (:func:`crop_sizes`), ``coefficients`` ``float32[N, 8]`` its homography
    (:func:`perspective_coefficients`), ``rotated`` ``bool[N]`` (``h / w >= 1.5``: turned
    90 degrees counter-clockwise), ``shapes`` ``int32[N, 2]`` (height, width) of the
    crop as the recognizer sees it (after rotation)."""

    sizes: np.ndarray
    coefficients: np.ndarray
    rotated: np.ndarray
    shapes: np.ndarray

    @classmethod
    def of(cls, boxes: np.ndarray) -> LineGeometry:
        """The geometry of ``boxes`` ``float32[N, 4, 2]`` (tl, tr, br, bl pixels)."""
        sizes = crop_sizes(boxes)
        coefficients = perspective_coefficients(boxes, sizes)
        rotated = np.array([h * 1.0 / w >= 1.5 for w, h in sizes], dtype=bool)
        shapes = np.where(rotated[:, None], sizes, sizes[:, ::-1]).astype(np.int32)
        return cls(sizes, coefficients, rotated, shapes)


def crop_text_line(image: Image.Image, coefficients: np.ndarray, size: np.ndarray) -> np.ndarray:
    """One rectified BGR ``uint8[h, w, 3]`` crop: PIL perspective transform of ``image``
    to ``size`` (width, height) with BICUBIC and ``coefficients`` (PIL ``PERSPECTIVE``
    data), rotated 90 degrees counter-clockwise when ``h / w >= 1.5``, as immich-ml
    ``TextRecognizer.get_crop_img_list``."""
    width, height = int(size[0]), int(size[1])
    crop = image.transform((width, height), Image.Transform.PERSPECTIVE, tuple(coefficients), Image.Resampling.BICUBIC)
    if height * 1.0 / width >= 1.5:
        crop = crop.rotate(90, expand=True)
    return cv2.cvtColor(np.array(crop), cv2.COLOR_RGB2BGR)


def crop_text_lines(image: Image.Image, boxes: np.ndarray) -> list[np.ndarray]:
    """Rectified BGR ``uint8[h, w, 3]`` crops of each quadrilateral: PIL perspective
    transform with BICUBIC, rotated 90 degrees counter-clockwise when ``h / w >= 1.5``,
    as immich-ml ``TextRecognizer.get_crop_img_list`` (:func:`crop_text_line` each)."""
    geometry = LineGeometry.of(boxes)
    return [crop_text_line(image, c, s) for c, s in zip(geometry.coefficients, geometry.sizes)]


def rec_input_width(max_wh_ratio: float, buckets: bool = False, height: int = REC_HEIGHT) -> int:
    """Padded recognizer width ``int(height * max_wh_ratio)``, or its bucket."""
    width = int(height * max_wh_ratio)
    return bucket(width, REC_WIDTH_BUCKETS, 640) if buckets else width


def resized_width(height: int, width: int, max_wh_ratio: float, target_height: int = REC_HEIGHT) -> int:
    """The width a ``height x width`` crop is resized to at ``target_height`` (48) in a
    batch of ``max_wh_ratio``: ``ceil(target_height * w / h)``, at most
    ``int(target_height * max_wh_ratio)``, as RapidOCR ``TextRecognizer.resize_norm_img``."""
    img_width = int(target_height * max_wh_ratio)
    ratio = width / float(height)
    return img_width if math.ceil(target_height * ratio) > img_width else int(math.ceil(target_height * ratio))


def resize_norm_img(
    img: np.ndarray, max_wh_ratio: float, width: int | None = None, height: int = REC_HEIGHT
) -> np.ndarray:
    """BGR ``uint8[h, w, 3]`` -> ``float32[3, height, W]``: bilinear resize to ``height``
    (48) keeping the aspect (capped at ``W``; :func:`resized_width`),
    ``(x/255 - 0.5)/0.5``, zero right padding. As RapidOCR
    ``TextRecognizer.resize_norm_img``; ``W = int(height * max_wh_ratio)`` unless
    ``width`` (a bucket) is given."""
    h, w = img.shape[:2]
    return line_tensor(img, resized_width(h, w, max_wh_ratio, height), width or int(height * max_wh_ratio), height)


def line_tensor(img: np.ndarray, resized_w: int, width: int, height: int = REC_HEIGHT) -> np.ndarray:
    """BGR ``uint8[h, w, 3]`` -> ``float32[3, height, width]``: ``cv2.resize``
    (bilinear) to ``resized_w x height``, ``(x/255 - 0.5)/0.5``, zeros right of
    ``resized_w``."""
    resized = cv2.resize(img, (resized_w, height))
    resized = resized.astype(np.float32).transpose((2, 0, 1)) / 255
    resized -= 0.5
    resized /= 0.5
    out = np.zeros((3, height, width), dtype=np.float32)
    out[:, :, :resized_w] = resized
    return out


@dataclass(frozen=True)
class LineBatch:
    """One recognizer call of RapidOCR's grouping: ``indices`` of its lines (into the
    request's boxes), the batch's ``max_wh_ratio`` (at least ``min_width / height``, 320 / 48)
    and its padded ``width`` in pixels (:func:`rec_input_width`)."""

    indices: np.ndarray
    max_wh_ratio: float
    width: int


def line_batches(
    shapes: np.ndarray,
    batch_size: int,
    buckets: bool = False,
    processing: RecognitionProcessing = IMMICH_RECOGNITION,
) -> list[LineBatch]:
    """Group lines of crop ``shapes`` ``[N, 2]`` (height, width) as RapidOCR
    ``TextRecognizer.__call__``: sorted by aspect ratio, in batches of ``batch_size``,
    each padded to its widest member (at least ``processing.min_width``, 320 px, at
    ``processing.height``, 48 px)."""
    height = processing.height
    ratios = np.array([w / float(h) for h, w in shapes])
    order = np.argsort(ratios)
    batches = []
    for begin in range(0, len(shapes), batch_size):
        idx = order[begin : begin + batch_size]
        max_wh_ratio = processing.min_width / height
        for i in idx:
            h, w = shapes[i]
            max_wh_ratio = max(max_wh_ratio, w * 1.0 / h)
        batches.append(LineBatch(idx, max_wh_ratio, rec_input_width(max_wh_ratio, buckets, height)))
    return batches


def rec_batches(
    crops: list[np.ndarray],
    batch_size: int,
    buckets: bool = False,
    processing: RecognitionProcessing = IMMICH_RECOGNITION,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Group crops as RapidOCR ``TextRecognizer.__call__`` (:func:`line_batches`) and
    make each batch's input. Returns ``(original indices, float32[B, 3, height, W])``
    per batch."""
    shapes = np.array([crop.shape[:2] for crop in crops]).reshape(-1, 2)
    height = processing.height
    return [
        (
            b.indices,
            np.stack([resize_norm_img(crops[i], b.max_wh_ratio, b.width, height) for i in b.indices]).astype(
                np.float32
            ),
        )
        for b in line_batches(shapes, batch_size, buckets, processing)
    ]


def resize_clamps(height: int, width: int, resized_w: int) -> tuple[int, int]:
    """``(column, row)``: the first output column and row of ``cv2.resize`` INTER_LINEAR
    (``height x width`` -> ``48 x resized_w``) that read past the crop's last column or
    row and so repeat it (``resized_w`` and 48 when none does). Reproduces OpenCV's
    ``resize`` coordinate computation (``fx = (float)((dx + 0.5) * scale - 0.5)``,
    clamped where ``floor(fx) >= size - 1``), for a device resize that reads a wider
    canvas."""

    def first(out: int, size: int) -> int:
        scale = 1.0 / (out / size)
        fx = ((np.arange(out, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
        past = np.nonzero(np.floor(fx) >= size - 1)[0]
        return int(past[0]) if len(past) else out

    return first(resized_w, width), first(REC_HEIGHT, height)


def line_inputs(geometry: LineGeometry, batch: LineBatch) -> dict[str, np.ndarray]:
    """The GPU path's inputs for one :class:`LineBatch` (the contract of
    :data:`immich_trt.runtime.ensemble.LINE_GEOMETRY`): ``line_coefficients`` FP32
    [1, n, 8] and ``line_geometry`` INT32 [1, n, 8]. The device pipeline makes lines
    48 px high (:data:`REC_HEIGHT`): ``batch`` must come from :func:`line_batches` at
    that height (a recognizer of another height takes the CPU path, see
    :attr:`TextRecognizer.gpu_lines`)."""
    rows = []
    for frame, i in enumerate(batch.indices):
        (w, h), (ch, cw) = geometry.sizes[i], geometry.shapes[i]
        rw = resized_width(int(ch), int(cw), batch.max_wh_ratio)
        clamp_column, clamp_row = resize_clamps(int(ch), int(cw), rw)
        rows.append((frame, w, h, int(geometry.rotated[i]), rw, batch.width, clamp_column, clamp_row))
    return {
        LINE_COEFFICIENTS: geometry.coefficients[batch.indices].astype(np.float32)[None],
        LINE_GEOMETRY: np.array(rows, dtype=np.int32)[None],
    }


def _static_input_height(model) -> int | None:
    """The height of a ``[N, 3, H, W]`` recognizer input when the graph fixes it."""
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    dims = inputs[0].type.tensor_type.shape.dim if inputs else []
    if len(dims) == 4 and dims[2].HasField("dim_value") and dims[2].dim_value > 0:
        return int(dims[2].dim_value)
    return None


class TextRecognizer(_PaddleModel):
    """PP-OCR SVTR recognizer with CTC decode. Option ``minScore`` (default 0.9; the
    Immich server sends 0.8): lines with ``textScore > minScore`` are kept.

    Output: ``{"box": float32[8N]`` (tl, tr, br, bl as x/width, y/height),
    ``"text": [str] * N, "boxScore": float32[N], "textScore": float64[N]}``.
    """

    type = ModelType.RECOGNITION
    depends = ((ModelType.DETECTION, ModelTask.OCR),)

    def __init__(self, model_name: str, ctx: ModelContext, **options: Any) -> None:
        super().__init__(model_name, ctx, **options)
        self.min_score = options.get("minScore", 0.9)
        self.batch_size = ctx.settings.max_batch_size_ocr
        self.shape_buckets = ctx.settings.ocr_shape_buckets
        self.decode: CTCLabelDecode | None = None
        self.runtime_file = self.model_file
        self.processing = IMMICH_RECOGNITION

    def configure(self, **options: Any) -> None:
        self.min_score = options.get("minScore", self.min_score)

    @property
    def gpu_lines(self) -> bool:
        """Whether the device pipeline can make this recognizer's line inputs: it crops
        and resizes lines to 48 px high (:data:`REC_HEIGHT`) only, so a recognizer of
        another ``processing.height`` keeps its preprocessing on the CPU (no ensemble;
        any ``processing.min_width`` is fine: the batch width is an input)."""
        return self.processing.height == REC_HEIGHT

    def _spec(self) -> ModelSpec:
        return ModelSpec(
            self.triton_name,
            self.runtime_file,
            max_batch_size=max(8, self.batch_size),
            from_encoded_image=self.gpu_lines,
        )

    def prepare_files(self) -> None:
        """Character list, processing (an input height fixed in the graph wins over a
        default), and the CTC-reduced copy the runtime serves."""
        model = load_onnx(self.model_file)
        self.decode = CTCLabelDecode(characters_of(model, self.model_file))
        processing = self._processing(model)
        assert isinstance(processing, RecognitionProcessing)
        height = _static_input_height(model)
        if height is not None and height != processing.height:
            if processing is not IMMICH_RECOGNITION:  # the file or the catalogue said otherwise
                raise ModelLoadError(
                    f"{self.model_file}: the graph takes lines {height} px high, its processing says {processing.height}"
                )
            processing = RecognitionProcessing(height, max(height, processing.min_width), source="graph input")
        self.processing = processing
        dest = self.ctx.settings.engines_dir / self.triton_name / "1" / "model.onnx"
        self.runtime_file = ctc_reduced_model(self.model_file, dest)

    @staticmethod
    def empty() -> dict[str, Any]:
        return {
            "box": np.empty(0, dtype=np.float32),
            "boxScore": np.empty(0, dtype=np.float32),
            "text": [],
            "textScore": np.empty(0, dtype=np.float32),
        }

    def _batch_input(self, image: ImageInput, geometry: LineGeometry, batch: LineBatch) -> dict[str, np.ndarray]:
        """The CPU preprocessing of one batch: its crops, resized and padded,
        ``{"x": float32[B, 3, height, W]}`` (decodes an :class:`EncodedImage`: call it in
        the executor)."""
        rgb = pixels(image)
        crops = [crop_text_line(rgb, geometry.coefficients[i], geometry.sizes[i]) for i in batch.indices]
        height = self.processing.height
        tensor = np.stack([resize_norm_img(crop, batch.max_wh_ratio, batch.width, height) for crop in crops])
        return {"x": tensor.astype(np.float32)}

    def _format(
        self, image: ImageInput, det: dict[str, np.ndarray], results: list[tuple[str, float]]
    ) -> dict[str, Any]:
        boxes = det["boxes"].copy()
        boxes[:, :, 0] /= image.width
        boxes[:, :, 1] /= image.height
        text_scores = np.array([score for _, score in results])
        valid = text_scores > self.min_score
        return {
            "box": boxes.reshape(-1, 8)[valid].reshape(-1),
            "text": [results[i][0] for i in range(len(results)) if valid[i]],
            "boxScore": det["scores"][valid],
            "textScore": text_scores[valid],
        }

    async def _predict(self, image: ImageInput, det: dict[str, np.ndarray]) -> dict[str, Any]:
        boxes = det["boxes"]
        if boxes.shape[0] == 0:
            return self.empty()
        assert self.decode is not None
        geometry = LineGeometry.of(boxes)
        batches = line_batches(geometry.shapes, self.batch_size, self.shape_buckets, self.processing)
        # None: the runtime preprocesses on the CPU (a height the device lines do not make)
        encoded = encoded_bytes(image) if self.gpu_lines else None
        # the batches are independent calls: issued together, the runtime may run them side
        # by side (the in-process runtime's narrow sessions, Triton's instances)
        outs = await asyncio.gather(
            *(
                self.ctx.runtime.infer_image(
                    self.triton_name,
                    encoded,
                    lambda batch=batch: self.ctx.run(self._batch_input, image, geometry, batch),
                    ensemble_inputs=line_inputs(geometry, batch) if self.gpu_lines else None,
                    outputs=[CTC_INDEX, CTC_PROB],
                    image_size=image.size,
                )
                for batch in batches
            )
        )
        results: list[tuple[str, float]] = [("", 0.0)] * len(boxes)
        for batch, out in zip(batches, outs):
            decoded = self.decode.decode(out[CTC_INDEX], out[CTC_PROB])
            for i, result in zip(batch.indices, decoded):
                results[i] = result
        return await self.ctx.run(self._format, image, det, results)
