"""CLIP visual and textual encoders (OpenCLIP and M-CLIP), exactly as immich-ml 3.1.0.

Sources reproduced: immich-ml ``immich_ml/models/clip/visual.py``, ``clip/textual.py``
and ``models/transforms.py``. Files (Immich's Hugging Face layout, shared by both types):
``<cache>/clip/<model>/{config.json, visual/model.onnx, visual/preprocess_cfg.json,
textual/model.onnx, textual/tokenizer.json, textual/tokenizer_config.json}``.

Visual: PIL bicubic resize of the shorter side to ``S`` (the other side truncated),
centre crop ``S x S``, ``float32/255``, ``(x - mean) / std``, CHW, batch of one, fed as
``image``; ``interpolation``/``resize_mode`` of ``preprocess_cfg.json`` are ignored as
upstream. Textual: HF ``tokenizers`` with padding and truncation to the context length,
whitespace collapsed, SigLIP ``canonicalize`` cleaning, OpenCLIP feed ``text`` int32[1, L]
or M-CLIP feed ``input_ids`` + ``attention_mask``. The embedding (L2-normalised in the
graph) is answered as Immich's JSON string.
"""

from __future__ import annotations

from ..base import ModelContext
from ..registry import ModelSource, ModelType
from ..transforms import crop_pil, resize_pil, serialize_np
from .base import _ClipModel
from .textual import ClipTextualEncoder, clean_text, flores_code
from .visual import ClipVisualEncoder, clip_preprocess

__all__ = [
    "ClipTextualEncoder",
    "ClipVisualEncoder",
    "build_clip",
    "clean_text",
    "clip_preprocess",
    "crop_pil",
    "flores_code",
    "resize_pil",
    "serialize_np",
]


def build_clip(source: ModelSource, name: str, model_type: ModelType, ctx: ModelContext, options: dict) -> _ClipModel:
    """The CLIP model for an entry: visual for both families, textual per family."""
    if model_type is ModelType.VISUAL:
        return ClipVisualEncoder(name, ctx, **options)
    return ClipTextualEncoder(name, ctx, mclip=source is ModelSource.MCLIP, **options)
