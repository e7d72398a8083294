"""CLIP and InsightFace models: files obtained as Immich does; pipelines not yet served.

Their names resolve (so requests parse exactly as upstream), their files are fetched
from Hugging Face ``immich-app/<model>`` into the Immich cache layout, and loading then
fails with :class:`ModelLoadError` and a log line saying why, which the server answers
as HTTP 500 ``Failed to load model '<name>'``.
"""

from __future__ import annotations

from ..runtime.base import ModelSpec
from .base import InferenceModel, ModelLoadError
from .download import DownloadError, hf_snapshot


class HubModel(InferenceModel):
    """A model whose files come from a Hugging Face snapshot of ``immich-app/<name>``."""

    @property
    def model_file(self):
        return self.cache_dir / str(self.type) / "model.onnx"

    def _obtain(self) -> None:
        if self.model_file.is_file():
            return
        settings = self.ctx.settings
        try:
            hf_snapshot(f"immich-app/{self.model_name}", self.cache_dir, endpoint=settings.hf_endpoint)
        except DownloadError as exc:
            raise ModelLoadError(str(exc)) from exc
        if not self.model_file.is_file():
            raise ModelLoadError(f"repository immich-app/{self.model_name} has no {self.type}/model.onnx")

    async def _load(self) -> None:
        await self.ctx.run(self._obtain)
        raise ModelLoadError(
            f"{self.task} {self.type} model '{self.model_name}' is in the cache, but this version of "
            "immich-trt serves only OCR pipelines"
        )

    async def _predict(self, *inputs):
        raise RuntimeError("unreachable: the model never loads")

    def specs(self) -> list[ModelSpec]:
        return []
