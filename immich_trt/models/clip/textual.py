"""CLIP textual encoder (OpenCLIP and M-CLIP): text cleaning, the NLLB language prefix,
tokenisation and the model.

Sources reproduced: immich-ml ``immich_ml/models/clip/textual.py`` and
``models/transforms.py`` (``clean_text``)."""

from __future__ import annotations

import logging
import string
from dataclasses import replace
from typing import Any

import numpy as np

from ...runtime.base import ModelSpec
from ..base import ModelContext, ModelLoadError
from ..flores import WEBLATE_TO_FLORES200
from ..registry import ModelType
from .base import _ClipModel

log = logging.getLogger(__name__)


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


class ClipTextualEncoder(_ClipModel):
    """Text -> L2-normalised embedding string. ``mclip=True`` feeds ``input_ids`` and
    ``attention_mask`` (M-CLIP), else ``text`` (OpenCLIP).

    The request option ``language`` puts the FLORES-200 code in front of the text of
    NLLB models, as upstream intends (immich issue #29751); upstream never passes the
    option on, so ``IMMICH_TRT_CLIP_LANGUAGE_PREFIX=false`` reproduces it byte for byte."""

    def _spec(self) -> ModelSpec:
        # one search query at a time, a user waiting: latency counts (runtime/cpu.py)
        return replace(super()._spec(), latency_bound=True)

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
