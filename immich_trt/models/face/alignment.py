"""Face alignment: 5-point similarity transform to the ArcFace template and the
112x112 crop.

Sources reproduced: insightface 0.7.3 ``utils/face_align.py`` (``arcface_dst``,
``estimate_norm``, ``norm_crop``), as immich-ml ``facial_recognition/recognition.py``
uses it."""

from __future__ import annotations

import cv2
import numpy as np

#: ArcFace 112x112 alignment template (insightface ``arcface_dst``).
ARCFACE_DST = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)


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
