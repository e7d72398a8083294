"""Per-model pre/post-processing parameters of a PP-OCR detector or recognizer.

Immich serves every PP-OCR model with the same constants (immich-ml 3.1.0
``ocr/detection.py`` and ``ocr/recognition.py`` around RapidOCR 3.8.1): those are the
defaults here, so a model that says nothing is served exactly as Immich serves
PP-OCRv5. A model that needs other values carries them:

* in its ONNX file, metadata key :data:`METADATA_KEY` (a JSON object written by
  ``immich-trt models import-paddle`` from the model's ``inference.yml``), or
* in the model catalogue (:mod:`.catalog`), for the files of a package or download
  that carry none (PP-OCRv6).

The file wins over the catalogue. Request options (``minScore``, ``maxResolution``)
win over both, as in Immich.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

#: ONNX metadata key holding the processing parameters (JSON), next to ``character``.
METADATA_KEY = "immich_trt.ocr_processing"

#: Immich's detector normalisation on 0..255 values: ``(x - 0.5) * float32(1/127.5)``,
#: the same for the three (BGR) channels (its quirk: 0.5, not 127.5, is subtracted).
IMMICH_DET_SUBTRACT = (0.5, 0.5, 0.5)
IMMICH_DET_MULTIPLY = (float(np.float32(1.0) / np.float32(0.5 * 255.0)),) * 3


@dataclass(frozen=True)
class DetectionProcessing:
    """DB detector parameters.

    ``subtract``/``multiply``: per-channel normalisation of the BGR input on 0..255
    values, ``(x - subtract[c]) * multiply[c]`` (PaddleOCR's ``NormalizeImage`` with
    ``scale`` 1/255, ``mean`` and ``std`` is ``subtract = mean / scale``, ``multiply =
    scale / std``). ``thresh``: binarisation threshold of the probability map;
    ``box_thresh``: minimum mean probability of a box when the request gives no
    ``minScore``; ``unclip_ratio``, ``max_candidates``, ``use_dilation`` as RapidOCR's
    ``DBPostProcess``. ``source`` says where the values come from (for logs and docs).
    """

    subtract: tuple[float, float, float] = IMMICH_DET_SUBTRACT
    multiply: tuple[float, float, float] = IMMICH_DET_MULTIPLY
    thresh: float = 0.3
    box_thresh: float = 0.5
    unclip_ratio: float = 1.6
    max_candidates: int = 1000
    use_dilation: bool = True
    source: str = "immich"

    def __post_init__(self) -> None:
        if len(self.subtract) != 3 or len(self.multiply) != 3:
            raise ValueError("detection normalisation needs three channel values")
        if not 0.0 < self.thresh < 1.0 or not 0.0 <= self.box_thresh <= 1.0:
            raise ValueError(f"DB thresholds out of range: thresh {self.thresh}, box_thresh {self.box_thresh}")
        if self.unclip_ratio <= 0 or self.max_candidates <= 0:
            raise ValueError(f"unclip_ratio and max_candidates must be positive: {self.unclip_ratio}, {self.max_candidates}")

    @property
    def normalisation(self) -> tuple[np.ndarray, np.ndarray]:
        """``(subtract, multiply)`` as ``float32[3]`` (BGR order)."""
        return np.array(self.subtract, np.float32), np.array(self.multiply, np.float32)


@dataclass(frozen=True)
class RecognitionProcessing:
    """SVTR/CTC recognizer parameters: the input ``height`` (pixels) every line crop is
    resized to and the smallest padded ``min_width`` (pixels) of a batch (PaddleOCR's
    ``RecResizeImg.image_shape`` ``[3, height, min_width]``)."""

    height: int = 48
    min_width: int = 320
    source: str = "immich"

    def __post_init__(self) -> None:
        if not 8 <= self.height <= 256 or not self.height <= self.min_width <= 4096:
            raise ValueError(f"unusable recognizer input shape: height {self.height}, width {self.min_width}")


IMMICH_DETECTION = DetectionProcessing()
IMMICH_RECOGNITION = RecognitionProcessing()

Processing = DetectionProcessing | RecognitionProcessing


def to_metadata(processing: Processing) -> str:
    """The JSON stored under :data:`METADATA_KEY`."""
    kind = "detection" if isinstance(processing, DetectionProcessing) else "recognition"
    return json.dumps({"type": kind, **dataclasses.asdict(processing)}, sort_keys=True)


def from_metadata(text: str, kind: str) -> Processing:
    """Parse :data:`METADATA_KEY`'s JSON for a ``kind`` ("detection"/"recognition")
    model. Raises ``ValueError`` when it is malformed or for the other kind."""
    try:
        data: dict[str, Any] = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{METADATA_KEY} is not JSON: {exc}") from exc
    if not isinstance(data, dict) or data.pop("type", None) != kind:
        raise ValueError(f"{METADATA_KEY} does not describe a {kind} model")
    cls = DetectionProcessing if kind == "detection" else RecognitionProcessing
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - fields
    if unknown:
        raise ValueError(f"{METADATA_KEY} has unknown fields {sorted(unknown)}")
    for key in ("subtract", "multiply"):
        if key in data:
            data[key] = tuple(float(v) for v in data[key])
    try:
        return cls(**data)
    except TypeError as exc:
        raise ValueError(f"{METADATA_KEY}: {exc}") from exc


def read_processing(model, kind: str, default: Processing) -> Processing:
    """The processing of a loaded ONNX ``model`` (``onnx.ModelProto``): its
    :data:`METADATA_KEY`, else ``default``. Raises ``ValueError`` for a malformed key."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return from_metadata(prop.value, kind)
    return default
