"""DB (differentiable binarisation) postprocess: probability map -> text quadrilaterals
in reading order.

Sources reproduced: RapidOCR 3.8.1 ``ch_ppocr_det/utils.py`` ``DBPostProcess`` and
``ch_ppocr_det/main.py`` ``filter_det_res``, immich-ml ``immich_ml/models/ocr/detection.py``
``sorted_boxes`` (its line-id indexing quirk kept)."""

from __future__ import annotations

import cv2
import numpy as np
import pyclipper
from shapely.geometry import Polygon


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
