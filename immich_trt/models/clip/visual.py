"""CLIP visual encoder: bicubic resize, centre crop, normalisation and the model.

Sources reproduced: immich-ml ``immich_ml/models/clip/visual.py`` and
``models/transforms.py``."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from ...runtime.base import ModelSpec
from ..base import ModelContext
from ..registry import ModelType
from ..transforms import EncodedImage, ImageInput, crop_pil, encoded_bytes, pixels, resize_pil, serialize_np
from .base import _ClipModel


def clip_preprocess(image: Image.Image, size: int, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """PIL RGB image -> ``float32[1, 3, size, size]`` CLIP input (see module docstring)."""
    cropped = crop_pil(resize_pil(image, size), size)
    array = np.asarray(cropped if cropped.mode == "RGB" else cropped.convert("RGB"), dtype=np.float32) / 255.0
    array = (array - mean) / std
    return np.expand_dims(array.transpose(2, 0, 1), 0)


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

    def preprocess(self, image: ImageInput) -> dict[str, np.ndarray]:
        """The CPU preprocessing (decodes an :class:`EncodedImage`: call it in the executor)."""
        return {"image": clip_preprocess(pixels(image), self.size, self.mean, self.std)}

    def _spec(self) -> ModelSpec:
        return ModelSpec(self.triton_name, self.model_file, max_batch_size=0, from_encoded_image=True)

    async def _predict(self, image: ImageInput) -> str:
        if not isinstance(image, (Image.Image, EncodedImage)):
            raise TypeError("clip visual needs an image")
        out = await self.ctx.runtime.infer_image(
            self.triton_name, encoded_bytes(image), lambda: self.ctx.run(self.preprocess, image), image_size=image.size
        )
        return serialize_np(next(iter(out.values()))[0])
