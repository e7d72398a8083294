"""Model families and the factory that builds a model for an Immich entry."""

from __future__ import annotations

from typing import Any

from .base import InferenceModel, ModelContext
from .registry import ModelSource, ModelTask, ModelType


def build_model(
    source: ModelSource, name: str, model_type: ModelType, task: ModelTask, ctx: ModelContext, options: dict[str, Any]
) -> InferenceModel:
    """The model instance for a resolved entry; ``options`` go to the constructor as
    upstream (``minScore`` and friends)."""
    if source is ModelSource.PADDLE:
        from .ocr import TextDetector, TextRecognizer

        cls = TextDetector if model_type is ModelType.DETECTION else TextRecognizer
        return cls(name, ctx, **options)
    if source is ModelSource.INSIGHTFACE:
        from .face import FaceDetector, FaceRecognizer

        cls = FaceDetector if model_type is ModelType.DETECTION else FaceRecognizer
        return cls(name, ctx, **options)
    from .clip import build_clip

    return build_clip(source, name, model_type, ctx, options)
