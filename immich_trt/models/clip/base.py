"""What the CLIP visual and textual encoders share: Immich's Hugging Face file layout,
the embedding-size check against the Immich server's ``CLIP_MODEL_INFO``, config
reading and the embedding answer.

Sources reproduced: immich-ml ``immich_ml/models/clip/visual.py`` and ``textual.py``
(their common base)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ...runtime.base import ModelSpec
from ..base import InferenceModel, ModelLoadError
from ..onnxfile import load_onnx
from ..registry import ModelTask, clip_dimension
from ..transforms import serialize_np


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
