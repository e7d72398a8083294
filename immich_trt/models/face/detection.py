"""SCRFD face detection: letterbox, blob, anchor decode, NMS and the model.

Sources reproduced: immich-ml ``immich_ml/models/facial_recognition/detection.py``
around insightface 0.7.3 ``model_zoo/retinaface.py`` (``RetinaFace.detect``/``forward``/
``nms``, ``_init_vars``)."""

from __future__ import annotations

import functools
from typing import Any

import cv2
import numpy as np
from PIL import Image

from ...runtime.base import ModelSpec
from ..base import ModelContext, ModelLoadError
from ..onnxfile import load_onnx
from ..registry import ModelType
from ..transforms import EncodedImage, ImageInput, encoded_bytes, pixels, to_bgr
from .base import _FaceModel

DET_INPUT_SIZE = (640, 640)  # (width, height), as Immich prepares RetinaFace
NMS_THRESHOLD = 0.4


def letterbox_geometry(width: int, height: int, input_size: tuple[int, int] = DET_INPUT_SIZE) -> tuple[int, int, float]:
    """``(new_width, new_height, det_scale)`` of :func:`letterbox` for a ``width x height``
    image (pixels), ``det_scale = new_height / height``, as insightface ``RetinaFace.detect``."""
    im_ratio = float(height) / width
    model_ratio = float(input_size[1]) / input_size[0]
    if im_ratio > model_ratio:
        new_height = input_size[1]
        new_width = int(new_height / im_ratio)
    else:
        new_width = input_size[0]
        new_height = int(new_width * im_ratio)
    return new_width, new_height, float(new_height) / height


def letterbox(image_bgr: np.ndarray, input_size: tuple[int, int] = DET_INPUT_SIZE) -> tuple[np.ndarray, float]:
    """Resize keeping the aspect into the top-left of a black ``input_size`` canvas
    (bilinear ``cv2.resize``), as insightface ``RetinaFace.detect``. Returns the canvas
    ``uint8[h, w, 3]`` and ``det_scale = new_height / height``."""
    new_width, new_height, det_scale = letterbox_geometry(image_bgr.shape[1], image_bgr.shape[0], input_size)
    resized = cv2.resize(image_bgr, (new_width, new_height))
    canvas = np.zeros((input_size[1], input_size[0], 3), dtype=np.uint8)
    canvas[:new_height, :new_width, :] = resized
    return canvas, det_scale


def detection_blob(canvas_bgr: np.ndarray) -> np.ndarray:
    """``float32[1, 3, h, w]`` RGB ``(x - 127.5) / 128`` (``cv2.dnn.blobFromImage``)."""
    size = (canvas_bgr.shape[1], canvas_bgr.shape[0])
    return cv2.dnn.blobFromImage(canvas_bgr, 1.0 / 128.0, size, (127.5, 127.5, 127.5), swapRB=True)


def anchor_centers(height: int, width: int, stride: int, num_anchors: int = 2) -> np.ndarray:
    """``float32[height * width * num_anchors, 2]`` (x, y) cell corners times stride,
    each repeated per anchor, row-major. Cached (read-only): the same few grids serve
    every request."""
    return _anchor_centers(int(height), int(width), int(stride), int(num_anchors))


@functools.lru_cache(maxsize=32)
def _anchor_centers(height: int, width: int, stride: int, num_anchors: int) -> np.ndarray:
    centers = np.stack(np.mgrid[:height, :width][::-1], axis=-1).astype(np.float32)
    centers = (centers * stride).reshape((-1, 2))
    if num_anchors > 1:
        centers = np.stack([centers] * num_anchors, axis=1).reshape((-1, 2))
    centers.setflags(write=False)
    return centers


def distance2bbox(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """(x - l, y - t, x + r, y + b) per point."""
    return np.stack(
        [points[:, 0] - distance[:, 0], points[:, 1] - distance[:, 1], points[:, 0] + distance[:, 2], points[:, 1] + distance[:, 3]],
        axis=-1,
    )


def distance2kps(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """Keypoints ``point + offset`` for each (dx, dy) pair of ``distance``."""
    preds = []
    for i in range(0, distance.shape[1], 2):
        preds.append(points[:, i % 2] + distance[:, i])
        preds.append(points[:, i % 2 + 1] + distance[:, i + 1])
    return np.stack(preds, axis=-1)


def nms(dets: np.ndarray, threshold: float = NMS_THRESHOLD) -> list[int]:
    """Greedy NMS over ``float32[N, 5]`` (x1, y1, x2, y2, score) with areas
    ``(x2 - x1 + 1) * (y2 - y1 + 1)``; keeps boxes whose IoU with a kept one is
    ``<= threshold`` (insightface ``RetinaFace.nms``). Returns kept indices."""
    x1, y1, x2, y2, scores = dets[:, 0], dets[:, 1], dets[:, 2], dets[:, 3], dets[:, 4]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(i)
        xx1 = np.maximum(x1[i], x1[order[1:]])
        yy1 = np.maximum(y1[i], y1[order[1:]])
        xx2 = np.minimum(x2[i], x2[order[1:]])
        yy2 = np.minimum(y2[i], y2[order[1:]])
        w = np.maximum(0.0, xx2 - xx1 + 1)
        h = np.maximum(0.0, yy2 - yy1 + 1)
        inter = w * h
        ovr = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[np.where(ovr <= threshold)[0] + 1]
    return keep


class ScrfdLayout:
    """Output layout of an SCRFD/RetinaFace ONNX file, as insightface ``_init_vars``:
    6/9 outputs -> strides 8/16/32 with 2 anchors, 10/15 -> strides 8..128 with 1;
    9/15 carry keypoints; rank-3 outputs are the batched layout."""

    def __init__(self, output_names: list[str], batched: bool) -> None:
        n = len(output_names)
        if n not in (6, 9, 10, 15):
            raise ModelLoadError(f"face detector has {n} outputs; expected 6, 9, 10 or 15")
        self.output_names = output_names
        self.batched = batched
        self.fmc = 3 if n in (6, 9) else 5
        self.strides = [8, 16, 32] if self.fmc == 3 else [8, 16, 32, 64, 128]
        self.num_anchors = 2 if self.fmc == 3 else 1
        self.use_kps = n in (9, 15)


def decode_scrfd(
    outputs: list[np.ndarray], layout: ScrfdLayout, input_hw: tuple[int, int], threshold: float
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Per stride: scores ``>= threshold``, their boxes and keypoints (input pixels),
    as insightface ``RetinaFace.forward``."""
    scores_list, bboxes_list, kpss_list = [], [], []
    fmc = layout.fmc
    for idx, stride in enumerate(layout.strides):
        scores = outputs[idx][0] if layout.batched else outputs[idx]
        height, width = input_hw[0] // stride, input_hw[1] // stride
        pos = np.where(scores >= threshold)[0]
        # insightface decodes every anchor, then keeps those at pos: each row's result is
        # the same taken first (elementwise float32 operations), at a fraction of the cost
        centers = anchor_centers(height, width, stride, layout.num_anchors)[pos]
        bbox_preds = (outputs[idx + fmc][0] if layout.batched else outputs[idx + fmc])[pos] * stride
        scores_list.append(scores[pos])
        bboxes_list.append(distance2bbox(centers, bbox_preds))
        if layout.use_kps:
            kps_preds = (outputs[idx + fmc * 2][0] if layout.batched else outputs[idx + fmc * 2])[pos] * stride
            kpss_list.append(distance2kps(centers, kps_preds).reshape((len(centers), kps_preds.shape[1] // 2, 2)))
    return scores_list, bboxes_list, kpss_list


def scrfd_postprocess(
    outputs: list[np.ndarray], layout: ScrfdLayout, input_hw: tuple[int, int], det_scale: float, threshold: float
) -> dict[str, np.ndarray]:
    """Decoded detections in original-image pixels, NMS'd, as insightface
    ``RetinaFace.detect`` + immich-ml ``FaceDetector._predict``:
    ``{"boxes": float32[N, 4]`` rounded half-to-even, ``"scores": float32[N],
    "landmarks": float32[N, 5, 2]}``."""
    scores_list, bboxes_list, kpss_list = decode_scrfd(outputs, layout, input_hw, threshold)
    scores = np.vstack(scores_list)
    order = scores.ravel().argsort()[::-1]
    bboxes = np.vstack(bboxes_list) / det_scale
    pre_det = np.hstack((bboxes, scores)).astype(np.float32, copy=False)[order, :]
    keep = nms(pre_det)
    det = pre_det[keep, :]
    if layout.use_kps:
        kpss = (np.vstack(kpss_list) / det_scale)[order, :, :][keep, :, :]
    else:
        kpss = np.zeros((len(keep), 5, 2), dtype=np.float32)
    # contiguous copies: upstream hands orjson a strided scores view, which fails (HTTP 500)
    # on detection-only requests with two or more faces; the values are the same
    return {
        "boxes": np.ascontiguousarray(det[:, :4].round()),
        "scores": np.ascontiguousarray(det[:, 4]),
        "landmarks": np.ascontiguousarray(kpss),
    }


class FaceDetector(_FaceModel):
    """SCRFD face detector. Option ``minScore`` (default 0.7; Immich sends its config).

    Output: ``{"boxes": float32[N, 4], "scores": float32[N], "landmarks": float32[N, 5, 2]}``
    in pixels of the received image (not clipped)."""

    type = ModelType.DETECTION

    def __init__(self, model_name: str, ctx: ModelContext, **options: Any) -> None:
        super().__init__(model_name, ctx, **options)
        self.min_score = options.get("minScore", 0.7)
        self.layout: ScrfdLayout | None = None
        self.input_name = "input.1"
        self.input_size = DET_INPUT_SIZE

    def configure(self, **options: Any) -> None:
        self.min_score = options.get("minScore", self.min_score)

    def _spec(self) -> ModelSpec:
        return ModelSpec(self.triton_name, self.model_file, max_batch_size=0, from_encoded_image=True)

    def prepare_files(self) -> None:
        graph = load_onnx(self.model_file).graph
        initializers = {i.name for i in graph.initializer}
        inputs = [i for i in graph.input if i.name not in initializers]
        self.input_name = inputs[0].name
        dims = inputs[0].type.tensor_type.shape.dim
        if len(dims) == 4 and dims[2].HasField("dim_value") and dims[3].HasField("dim_value"):
            # a detector exported for a fixed size keeps it (insightface ignores det_size then)
            self.input_size = (dims[3].dim_value, dims[2].dim_value)
        rank = len(graph.output[0].type.tensor_type.shape.dim)
        self.layout = ScrfdLayout([o.name for o in graph.output], batched=rank == 3)

    def _preprocess(self, image: Image.Image) -> tuple[np.ndarray, float]:
        """The CPU preprocessing: ``float32[1, 3, h, w]`` blob and ``det_scale``."""
        canvas, det_scale = letterbox(to_bgr(image), self.input_size)
        return detection_blob(canvas), det_scale

    def _input_tensors(self, image: ImageInput) -> dict[str, np.ndarray]:
        return {self.input_name: self._preprocess(pixels(image))[0]}

    async def _predict(self, image: ImageInput) -> dict[str, np.ndarray]:
        if not isinstance(image, (Image.Image, EncodedImage)):
            raise TypeError("face detection needs an image")
        assert self.layout is not None
        names = self.layout.output_names
        out = await self.ctx.runtime.infer_image(
            self.triton_name, encoded_bytes(image), lambda: self.ctx.run(self._input_tensors, image), outputs=names,
            image_size=image.size,
        )
        _, _, det_scale = letterbox_geometry(image.width, image.height, self.input_size)
        input_hw = (self.input_size[1], self.input_size[0])
        return await self.ctx.run(
            scrfd_postprocess, [out[name] for name in names], self.layout, input_hw, det_scale, self.min_score
        )
