"""Model families and the factory that builds a model for an Immich entry."""

from __future__ import annotations

from typing import Any

from .base import InferenceModel, ModelContext
from .registry import ModelSource, ModelTask, ModelType, resolve


def build_model(
    source: ModelSource, name: str, model_type: ModelType, task: ModelTask, ctx: ModelContext, options: dict[str, Any]
) -> InferenceModel:
    """The model instance for a resolved entry; ``options`` go to the constructor as
    upstream (``minScore`` and friends)."""
    if source is ModelSource.PADDLE:
        from .ocr import TextDetector, TextRecognizer

        cls = TextDetector if model_type is ModelType.DETECTION else TextRecognizer
        return cls(name, ctx, **options)
    from .pending import HubModel

    model = HubModel(name, ctx, **options)
    model.task, model.type = task, model_type
    model.depends = resolve(name, model_type, task)[1]
    return model
