"""Face detection (SCRFD) and recognition (ArcFace), exactly as immich-ml 3.1.0.

Sources reproduced: immich-ml ``immich_ml/models/facial_recognition/detection.py`` and
``recognition.py`` around insightface 0.7.3 ``model_zoo/retinaface.py``
(``RetinaFace.detect``/``forward``/``nms``), ``model_zoo/arcface_onnx.py``
(``ArcFaceONNX.get_feat``) and ``utils/face_align.py`` (``norm_crop``).

Detection: BGR image letterboxed top-left into 640x640, blob ``(x - 127.5) / 128`` in RGB,
anchor centres on the stride grid (2 anchors per cell, strides 8/16/32), boxes
``centre -/+ distance * stride``, keypoints ``centre + offset * stride``, scores
``>= minScore``, sort by score, divide by ``det_scale``, NMS at IoU 0.4 with the +1 area
convention; boxes rounded half-to-even and not clipped. Recognition: 5-point similarity
transform to the ArcFace template (scikit-image), ``cv2.warpAffine`` to 112x112, blob
``(x - mean) / std`` (127.5/127.5 unless the graph normalises itself), one batch for all
faces (chunked by ``MAX_BATCH_SIZE__FACIAL_RECOGNITION``), 512-d embeddings not normalised.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
from PIL import Image

from ..runtime.base import ModelSpec
from .base import InferenceModel, ModelContext, ModelLoadError
from .onnxfile import is_up_to_date, load_onnx, save_onnx_atomic
from .clip import serialize_np
from .registry import ModelTask, ModelType

log = logging.getLogger(__name__)

DET_INPUT_SIZE = (640, 640)  # (width, height), as Immich prepares RetinaFace
NMS_THRESHOLD = 0.4
#: ArcFace 112x112 alignment template (insightface ``arcface_dst``).
ARCFACE_DST = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)


def to_bgr(image: Image.Image) -> np.ndarray:
    """PIL RGB -> BGR ``uint8[H, W, 3]`` (immich-ml ``decode_cv2``)."""
    return cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR)


def letterbox(image_bgr: np.ndarray, input_size: tuple[int, int] = DET_INPUT_SIZE) -> tuple[np.ndarray, float]:
    """Resize keeping the aspect into the top-left of a black ``input_size`` canvas
    (bilinear ``cv2.resize``), as insightface ``RetinaFace.detect``. Returns the canvas
    ``uint8[h, w, 3]`` and ``det_scale = new_height / height``."""
    im_ratio = float(image_bgr.shape[0]) / image_bgr.shape[1]
    model_ratio = float(input_size[1]) / input_size[0]
    if im_ratio > model_ratio:
        new_height = input_size[1]
        new_width = int(new_height / im_ratio)
    else:
        new_width = input_size[0]
        new_height = int(new_width * im_ratio)
    det_scale = float(new_height) / image_bgr.shape[0]
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
    each repeated per anchor, row-major."""
    centers = np.stack(np.mgrid[:height, :width][::-1], axis=-1).astype(np.float32)
    centers = (centers * stride).reshape((-1, 2))
    if num_anchors > 1:
        centers = np.stack([centers] * num_anchors, axis=1).reshape((-1, 2))
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
        bbox_preds = (outputs[idx + fmc][0] if layout.batched else outputs[idx + fmc]) * stride
        height, width = input_hw[0] // stride, input_hw[1] // stride
        centers = anchor_centers(height, width, stride, layout.num_anchors)
        pos = np.where(scores >= threshold)[0]
        scores_list.append(scores[pos])
        bboxes_list.append(distance2bbox(centers, bbox_preds)[pos])
        if layout.use_kps:
            kps_preds = (outputs[idx + fmc * 2][0] if layout.batched else outputs[idx + fmc * 2]) * stride
            kpss = distance2kps(centers, kps_preds).reshape((len(centers), -1, 2))
            kpss_list.append(kpss[pos])
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


def estimate_norm(landmark: np.ndarray, image_size: int = 112) -> np.ndarray:
    """2x3 similarity transform (Umeyama, scikit-image ``SimilarityTransform``) from the
    5 landmarks to the ArcFace template, as insightface ``estimate_norm``."""
    from skimage.transform import SimilarityTransform

    if image_size % 112 == 0:
        ratio, diff_x = float(image_size) / 112.0, 0.0
    else:
        ratio = float(image_size) / 128.0
        diff_x = 8.0 * ratio
    dst = ARCFACE_DST * ratio
    dst[:, 0] += diff_x
    tform = SimilarityTransform()
    tform.estimate(landmark, dst)
    return tform.params[0:2, :]


def norm_crop(image_bgr: np.ndarray, landmark: np.ndarray, image_size: int = 112) -> np.ndarray:
    """Aligned ``uint8[112, 112, 3]`` face crop (``cv2.warpAffine``, black border),
    as insightface ``norm_crop``."""
    return cv2.warpAffine(image_bgr, estimate_norm(landmark, image_size), (image_size, image_size), borderValue=0.0)


def arcface_normalisation(model: Path | onnx.GraphProto) -> tuple[float, float]:
    """(input_mean, input_std) of an ArcFace file or parsed graph: (0, 1) when the first
    8 graph nodes include names starting with Sub/_minus and Mul/_mul (normalisation
    inside the graph), else (127.5, 127.5), as insightface ``ArcFaceONNX.__init__``."""
    graph = model if isinstance(model, onnx.GraphProto) else load_onnx(model).graph
    find_sub = any(n.name.startswith("Sub") or n.name.startswith("_minus") for n in graph.node[:8])
    find_mul = any(n.name.startswith("Mul") or n.name.startswith("_mul") for n in graph.node[:8])
    return (0.0, 1.0) if find_sub and find_mul else (127.5, 127.5)


def recognition_blob(crops: list[np.ndarray], mean: float, std: float) -> np.ndarray:
    """``float32[N, 3, 112, 112]`` RGB ``(x - mean) / std`` (``cv2.dnn.blobFromImages``)."""
    return cv2.dnn.blobFromImages(crops, 1.0 / std, (112, 112), (mean, mean, mean), swapRB=True)


def dynamic_batch_copy(src: Path, dest: Path) -> Path:
    """Write a copy of ``src`` whose first input and output have a symbolic batch axis
    (``"batch"``), for recognizers exported with a static batch of 1. The user's file is
    never rewritten (upstream rewrites it in place). Reuses an up-to-date copy."""
    if is_up_to_date(dest, src):
        return dest
    model = load_onnx(src)
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    return save_onnx_atomic(model, dest, source=src)


class _FaceModel(InferenceModel):
    task = ModelTask.FACIAL_RECOGNITION

    def _obtain(self) -> None:
        self._obtain_from_hub(self.model_file)




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
        return ModelSpec(self.triton_name, self.model_file, max_batch_size=0)

    def specs(self) -> list[ModelSpec]:
        if self.ctx.settings.preprocess == "gpu":  # the ensemble (and with it the model)
            from ..gpu.ensemble import gpu_specs

            return gpu_specs(self.ctx.settings, self._spec())
        return [self._spec()]

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
        canvas, det_scale = letterbox(to_bgr(image), self.input_size)
        return detection_blob(canvas), det_scale

    async def _predict(self, image: Image.Image) -> dict[str, np.ndarray]:
        if not isinstance(image, Image.Image):
            raise TypeError("face detection needs an image")
        assert self.layout is not None
        if self.ctx.settings.preprocess == "gpu":  # encoded bytes -> DALI letterbox -> model, in Triton
            from ..gpu.ensemble import DET_SCALE_OUTPUT, exact_det_scale, infer_ensemble

            names = self.layout.output_names
            out = await infer_ensemble(self.ctx.runtime, self.triton_name, image, outputs=[*names, DET_SCALE_OUTPUT])
            if out is not None:
                det_scale = exact_det_scale(out[DET_SCALE_OUTPUT], image.height)
                input_hw = (self.input_size[1], self.input_size[0])
                return await self.ctx.run(
                    scrfd_postprocess, [out[name] for name in names], self.layout, input_hw, det_scale, self.min_score
                )
        blob, det_scale = await self.ctx.run(self._preprocess, image)
        out = await self.ctx.runtime.infer(self.triton_name, {self.input_name: blob}, self.layout.output_names)
        outputs = [out[name] for name in self.layout.output_names]
        return await self.ctx.run(
            scrfd_postprocess, outputs, self.layout, blob.shape[2:], det_scale, self.min_score
        )


class FaceRecognizer(_FaceModel):
    """ArcFace recognizer over the detector's landmarks.

    Output: ``[{"boundingBox": {"x1", "y1", "x2", "y2"}, "embedding": str, "score": f}]``
    in detection order; ``[]`` without faces."""

    type = ModelType.RECOGNITION
    depends = ((ModelType.DETECTION, ModelTask.FACIAL_RECOGNITION),)

    def __init__(self, model_name: str, ctx: ModelContext, **options: Any) -> None:
        super().__init__(model_name, ctx, **options)
        self.batch_size = ctx.settings.max_batch_size_facial_recognition
        self.input_name = "input.1"
        self.output_name: str | None = None
        self.mean, self.std = 127.5, 127.5
        self.runtime_file = self.model_file

    def _spec(self) -> ModelSpec:
        return ModelSpec(self.triton_name, self.runtime_file, max_batch_size=0 if self.batch_size == 1 else 64)

    def prepare_files(self) -> None:
        graph = load_onnx(self.model_file).graph
        initializers = {i.name for i in graph.initializer}
        first = [i for i in graph.input if i.name not in initializers][0]
        self.input_name = first.name
        self.output_name = graph.output[0].name
        self.mean, self.std = arcface_normalisation(graph)
        batch_dim = first.type.tensor_type.shape.dim[0]
        if batch_dim.HasField("dim_value") and batch_dim.dim_value > 0 and self.batch_size != 1:
            dest = self.ctx.settings.engines_dir / self.triton_name / "1" / "model.onnx"
            self.runtime_file = dynamic_batch_copy(self.model_file, dest)

    def _crops(self, image: Image.Image, landmarks: np.ndarray) -> np.ndarray:
        bgr = to_bgr(image)
        return recognition_blob([norm_crop(bgr, lmk) for lmk in landmarks], self.mean, self.std)

    async def _embeddings(self, blob: np.ndarray) -> np.ndarray:
        size = len(blob) if self.batch_size is None else self.batch_size
        chunks = []
        for start in range(0, len(blob), max(1, size)):
            out = await self.ctx.runtime.infer(
                self.triton_name, {self.input_name: blob[start : start + size]}, [self.output_name]
            )
            chunks.append(out[self.output_name])
        return np.concatenate(chunks)

    async def _predict(self, image: Image.Image, faces: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        if faces["boxes"].shape[0] == 0:
            return []
        blob = await self.ctx.run(self._crops, image, faces["landmarks"])
        embeddings = await self._embeddings(blob)
        return [
            {"boundingBox": {"x1": x1, "y1": y1, "x2": x2, "y2": y2}, "embedding": serialize_np(embedding), "score": score}
            for (x1, y1, x2, y2), embedding, score in zip(faces["boxes"], embeddings, faces["scores"])
        ]
