"""What the PP-OCR detector and recognizer share: obtaining their files (download from
the catalogue's URL, else an installed package's copy) and reading their processing."""

from __future__ import annotations

import logging

from ..base import InferenceModel, ModelDownloadError, ModelLoadError
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
        (an imported model) must already be in the cache. Raises
        :class:`ModelDownloadError` (where the file was expected, from where, why) or
        :class:`ModelLoadError`."""
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
        url = self.download_source()
        try:
            if source.remote is None:
                raise DownloadError(f"no download location for OCR model '{self.model_name}' ({self.type})")
            download_url(url, self.model_file, source.remote.sha256)
            return
        except DownloadError as exc:
            if packaged is None:
                hint = ", ".join(sorted({p.distribution for p in source.packaged}))
                reason = exc.reason + (f" (offline: pip install {hint})" if hint else "")
                raise ModelDownloadError(
                    f"download of {url} failed: {reason}", expected=self.model_file, source=url, reason=reason
                ) from exc
            package, model, characters = packaged
            log.warning("%s; using the files of the %s package instead", exc, package.distribution)
        if characters is not None:
            copy_atomic(characters, self.model_file.with_name(DICT_FILENAME))
        copy_atomic(model, self.model_file)

    def download_source(self) -> str:
        """The catalogue's URL of this model's file (``IMMICH_TRT_RAPIDOCR_BASE_URL`` or
        ``IMMICH_TRT_RAPIDOCR_V6_BASE_URL``), or ``"(no download location)"``."""
        source = ocr_source(self.model_name, self.type)
        if source is None or source.remote is None:
            return "(no download location)"
        return f"{getattr(self.ctx.settings, source.base_url_setting)}/{source.remote.path}"

    def has_offline_copy(self) -> bool:
        """Whether an installed package ships this model's file and
        ``IMMICH_TRT_OFFLINE_MODELS`` allows taking it."""
        if not self.ctx.settings.offline_models:
            return False
        source = ocr_source(self.model_name, self.type)
        return source is not None and bool(source.packaged) and source.packaged_files() is not None

    def _processing(self, model) -> Processing:
        """The model file's processing (:mod:`.processing`), else the catalogue's.
        Raises :class:`ModelLoadError` for a malformed metadata entry."""
        try:
            return read_processing(model, str(self.type), default_processing(self.model_name, self.type))
        except ValueError as exc:
            raise ModelLoadError(f"{self.model_file}: {exc}") from exc
