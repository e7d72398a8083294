"""Optional shape buckets (``IMMICH_TRT_OCR_SHAPE_BUCKETS``): the detector input and the
recognizer width are padded up to a fixed ladder so runtimes see few distinct shapes.

No upstream counterpart: immich-ml and RapidOCR feed the exact sizes."""

from __future__ import annotations

import math
from collections.abc import Sequence

#: Detector input side ladder (pixels) used when shape buckets are on: each side is
#: padded up to the first value >= it; beyond the last, to a multiple of 512.
DET_BUCKETS: tuple[int, ...] = (256, 512, 768, 1024, 1280, 1536, 2048)
#: Recognizer input width ladder (pixels; height is 48) used when shape buckets are on.
REC_WIDTH_BUCKETS: tuple[int, ...] = (320, 480, 640, 960, 1280, 1920, 2560)


def bucket(value: int, ladder: Sequence[int], step: int) -> int:
    """Smallest ladder value >= ``value``; past the ladder, ``value`` rounded up to ``step``."""
    for size in ladder:
        if value <= size:
            return size
    return int(math.ceil(value / step) * step)
