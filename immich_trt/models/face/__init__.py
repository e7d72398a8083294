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

from ..transforms import to_bgr
from .alignment import ARCFACE_DST, estimate_norm, norm_crop
from .detection import (
    DET_INPUT_SIZE,
    NMS_THRESHOLD,
    FaceDetector,
    ScrfdLayout,
    anchor_centers,
    decode_scrfd,
    detection_blob,
    distance2bbox,
    distance2kps,
    letterbox,
    letterbox_geometry,
    nms,
    scrfd_postprocess,
)
from .recognition import FaceRecognizer, arcface_normalisation, dynamic_batch_copy, recognition_blob

__all__ = [
    "ARCFACE_DST",
    "DET_INPUT_SIZE",
    "NMS_THRESHOLD",
    "FaceDetector",
    "FaceRecognizer",
    "ScrfdLayout",
    "anchor_centers",
    "arcface_normalisation",
    "decode_scrfd",
    "detection_blob",
    "distance2bbox",
    "distance2kps",
    "dynamic_batch_copy",
    "estimate_norm",
    "letterbox",
    "letterbox_geometry",
    "nms",
    "norm_crop",
    "recognition_blob",
    "scrfd_postprocess",
    "to_bgr",
]
