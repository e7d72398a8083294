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

import json
import logging
import string
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..runtime.base import ModelSpec
from .base import InferenceModel, ModelContext, ModelLoadError
from .flores import WEBLATE_TO_FLORES200
from .onnxfile import load_onnx
from .registry import ModelSource, ModelTask, ModelType, clip_dimension
from .transforms import crop_pil, encoded_bytes, resize_pil, serialize_np

log = logging.getLogger(__name__)


def clip_preprocess(image: Image.Image, size: int, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """PIL RGB image -> ``float32[1, 3, size, size]`` CLIP input (see module docstring)."""
    cropped = crop_pil(resize_pil(image, size), size)
    array = np.asarray(cropped if cropped.mode == "RGB" else cropped.convert("RGB"), dtype=np.float32) / 255.0
    array = (array - mean) / std
    return np.expand_dims(array.transpose(2, 0, 1), 0)


def clean_text(text: str, canonicalize: bool = False) -> str:
    """Collapse whitespace; with ``canonicalize`` (SigLIP) also drop ASCII punctuation
    and lowercase, as immich-ml ``clean_text``."""
    text = " ".join(text.split())
    if canonicalize:
        text = text.translate(str.maketrans("", "", string.punctuation)).lower()
    return text


def flores_code(language: str) -> str:
    """FLORES-200 code for a Weblate language code (``de-CH`` falls back to ``de``);
    an unknown code gives ``eng_Latn`` with a warning, as immich-ml does."""
    code = WEBLATE_TO_FLORES200.get(language) or WEBLATE_TO_FLORES200.get(language.split("-")[0])
    if code is None:
        log.warning("Language '%s' not found, defaulting to 'en'", language)
        return "eng_Latn"
    return code


class _ClipModel(InferenceModel):
    task = ModelTask.SEARCH

    @property
    def model_dir(self) -> Path:
        return self.cache_dir / str(self.type)

    def _spec(self) -> ModelSpec:
        return ModelSpec(self.triton_name, self.model_file, max_batch_size=0)

    def _obtain(self) -> None:
        self._obtain_from_hub(self.model_file)

    def _check_dimension(self) -> None:
        """The embedding size must be the one the Immich server's ``CLIP_MODEL_INFO``
        declares for this name (its pgvector column has that size)."""
        expected = clip_dimension(self.model_name)
        dims = load_onnx(self.model_file).graph.output[0].type.tensor_type.shape.dim
        actual = dims[-1].dim_value if len(dims) and dims[-1].HasField("dim_value") else None
        if expected is not None and actual is not None and actual != expected:
            raise ModelLoadError(
                f"{self.model_file} gives {actual}-d embeddings; Immich expects {expected} for '{self.model_name}'"
            )

    def prepare_files(self) -> None:
        self._check_dimension()
        self._read_config()

    def _read_config(self) -> None:
        raise NotImplementedError

    def _json(self, path: Path) -> dict[str, Any]:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ModelLoadError(f"missing {path}", corrupt=True) from exc
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read {path}: {exc}", corrupt=True) from exc

    async def _embed(self, feed: dict[str, np.ndarray]) -> str:
        out = await self.ctx.runtime.infer(self.triton_name, feed)
        return serialize_np(next(iter(out.values()))[0])


class ClipVisualEncoder(_ClipModel):
    """``image`` float32[1, 3, S, S] -> L2-normalised embedding string (OpenCLIP and M-CLIP)."""

    type = ModelType.VISUAL

    def __init__(self, model_name: str, ctx: ModelContext, **options: Any) -> None:
        super().__init__(model_name, ctx, **options)
        # read from visual/preprocess_cfg.json at load
        self.size = 0
        self.mean = self.std = np.empty(3, dtype=np.float32)

    def _read_config(self) -> None:
        cfg = self._json(self.model_dir / "preprocess_cfg.json")
        size = cfg["size"]
        self.size = size[0] if isinstance(size, list) else size
        self.mean = np.array(cfg["mean"], dtype=np.float32)
        self.std = np.array(cfg["std"], dtype=np.float32)

    def preprocess(self, image: Image.Image) -> dict[str, np.ndarray]:
        return {"image": clip_preprocess(image, self.size, self.mean, self.std)}

    def _spec(self) -> ModelSpec:
        return ModelSpec(self.triton_name, self.model_file, max_batch_size=0, from_encoded_image=True)

    async def _predict(self, image: Image.Image) -> str:
        if not isinstance(image, Image.Image):
            raise TypeError("clip visual needs an image")
        out = await self.ctx.runtime.infer_image(
            self.triton_name, encoded_bytes(image), lambda: self.ctx.run(self.preprocess, image)
        )
        return serialize_np(next(iter(out.values()))[0])


class ClipTextualEncoder(_ClipModel):
    """Text -> L2-normalised embedding string. ``mclip=True`` feeds ``input_ids`` and
    ``attention_mask`` (M-CLIP), else ``text`` (OpenCLIP).

    The request option ``language`` puts the FLORES-200 code in front of the text of
    NLLB models, as upstream intends (immich issue #29751); upstream never passes the
    option on, so ``IMMICH_TRT_CLIP_LANGUAGE_PREFIX=false`` reproduces it byte for byte."""

    type = ModelType.TEXTUAL

    def __init__(self, model_name: str, ctx: ModelContext, mclip: bool = False, **options: Any) -> None:
        super().__init__(model_name, ctx, **options)
        self.mclip = mclip
        self.tokenizer = None
        self.canonicalize = False

    @property
    def is_nllb(self) -> bool:
        return self.model_name.startswith("nllb")

    async def predict(self, *inputs: Any, **options: Any) -> Any:
        # per request, not stored on the shared instance (no race between requests)
        return await self._predict(*inputs, language=options.get("language"))

    def _read_config(self) -> None:
        from tokenizers import Tokenizer

        config = self._json(self.cache_dir / "config.json")
        if "text_cfg" not in config:
            raise ModelLoadError(f"{self.cache_dir / 'config.json'} has no text_cfg", corrupt=True)
        text_cfg = config["text_cfg"]
        context_length = text_cfg.get("context_length", 77)
        self.canonicalize = text_cfg.get("tokenizer_kwargs", {}).get("clean") == "canonicalize"
        tokenizer_cfg = self._json(self.model_dir / "tokenizer_config.json")
        try:
            tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        except Exception as exc:
            raise ModelLoadError(f"cannot read {self.model_dir / 'tokenizer.json'}: {exc}", corrupt=True) from exc
        pad_token = tokenizer_cfg["pad_token"]
        if isinstance(pad_token, dict):
            pad_token = pad_token["content"]
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ModelLoadError(f"pad token {pad_token!r} is not in the vocabulary")
        tokenizer.enable_padding(length=context_length, pad_token=pad_token, pad_id=pad_id)
        tokenizer.enable_truncation(max_length=context_length)
        self.tokenizer = tokenizer

    def tokenize(self, text: str, language: str | None = None) -> dict[str, np.ndarray]:
        """Text -> model feed (int32 ``[1, context_length]`` arrays)."""
        assert self.tokenizer is not None
        text = clean_text(text, canonicalize=self.canonicalize)
        if self.is_nllb and language is not None and self.ctx.settings.clip_language_prefix and not self.mclip:
            text = flores_code(language) + text
        encoding = self.tokenizer.encode(text)
        if self.mclip:
            return {
                "input_ids": np.array([encoding.ids], dtype=np.int32),
                "attention_mask": np.array([encoding.attention_mask], dtype=np.int32),
            }
        return {"text": np.array([encoding.ids], dtype=np.int32)}

    async def _predict(self, text: str, language: str | None = None) -> str:
        if not isinstance(text, str):
            raise TypeError("clip textual needs text")
        return await self._embed(await self.ctx.run(self.tokenize, text, language))


def build_clip(source: ModelSource, name: str, model_type: ModelType, ctx: ModelContext, options: dict) -> _ClipModel:
    """The CLIP model for an entry: visual for both families, textual per family."""
    if model_type is ModelType.VISUAL:
        return ClipVisualEncoder(name, ctx, **options)
    return ClipTextualEncoder(name, ctx, mclip=source is ModelSource.MCLIP, **options)
