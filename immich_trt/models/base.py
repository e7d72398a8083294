"""The model base class shared by every family (CLIP, faces, OCR).

Shape of immich-ml 3.1.0 ``immich_ml/models/base.py``: a model knows its name, task,
type and dependencies; ``load()`` obtains its files and registers it with the runtime;
``predict()`` applies per-request options (``configure``) and runs ``_predict``.
Here ``_predict`` is ``async``: CPU work goes to the bounded executor and inference
is awaited on the runtime, so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..config import Settings, clean_name
from ..runtime.base import ModelSpec, NoRuntime, Runtime, RuntimeUnavailableError
from .errors import ModelDownloadError, ModelLoadError
from .registry import ModelTask, ModelType, cache_dir

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class ModelContext:
    """What every model needs from the server: settings, the runtime, the CPU executor.
    Without a runtime (:class:`NoRuntime`) a model can prepare its files, not run."""

    settings: Settings
    runtime: Runtime = field(default_factory=NoRuntime)
    executor: Executor | None = None

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run CPU-bound ``fn`` in the executor, or inline when there is none
        (``MACHINE_LEARNING_REQUEST_THREADS <= 0``, as upstream)."""
        if self.executor is None:
            return fn(*args, **kwargs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))


class InferenceModel(ABC):
    """One Immich model: ``(model_name, model_type, model_task)``."""

    task: ModelTask
    type: ModelType
    depends: tuple[tuple[ModelType, ModelTask], ...] = ()

    def __init__(self, model_name: str, ctx: ModelContext, **options: Any) -> None:
        self.model_name = clean_name(model_name)
        self.ctx = ctx
        self.options = dict(options)
        self.loaded = False
        #: The test-pack mark of the loaded file (``"placeholder"``, ``"full-size random
        #: weights"``) or ``None`` for a real model; read by :meth:`load`.
        self.test_pack: str | None = None

    @property
    def identity(self) -> tuple[ModelType, ModelTask]:
        return (self.type, self.task)

    @property
    def cache_dir(self) -> Path:
        return cache_dir(self.ctx.settings.cache_folder, self.task, self.model_name)

    @property
    def model_file(self) -> Path:
        """``<cache>/<task>/<model>/<type>/model.onnx``, Immich's layout."""
        return self.cache_dir / str(self.type) / "model.onnx"

    @property
    def triton_name(self) -> str:
        """The runtime model name, ``<task>__<model>__<type>``."""
        return f"{self.task}__{self.model_name}__{self.type}"

    async def load(self) -> None:
        """Obtain the model files (downloading if needed) and load them into the runtime;
        note whether the file is a test-pack placeholder (:attr:`test_pack`).

        Raises :class:`ModelLoadError` when files cannot be had or the runtime fails.
        """
        if self.loaded:
            return
        await self._load()
        from .onnxfile import marked_test_pack

        self.test_pack = await self.ctx.run(marked_test_pack, self.model_file)
        self.loaded = True

    async def unload(self) -> None:
        """Release the runtime's copy of the model (files stay in the cache)."""
        if not self.loaded:
            return
        for spec in self.specs():
            await self.ctx.runtime.unload(spec.name)
        self.loaded = False

    def configure(self, **options: Any) -> None:
        """Apply per-request options to this shared instance (upstream races the same way)."""

    async def predict(self, *inputs: Any, **options: Any) -> Any:
        if options:
            self.configure(**options)
        return await self._predict(*inputs)

    async def _load(self) -> None:
        """Obtain the files, prepare them, load every runtime model; any failure is a
        :class:`ModelLoadError`."""
        try:
            await self.ctx.run(self._obtain)
            await self.ctx.run(self.prepare_files)
            for spec in self.specs():
                await self.ctx.runtime.load(spec)
        except (ModelLoadError, RuntimeUnavailableError):
            raise  # an unreachable backend is retryable, not a broken model
        except Exception as exc:
            raise ModelLoadError(f"{type(exc).__name__}: {exc}") from exc

    @abstractmethod
    def _obtain(self) -> None:
        """Make sure the model's files are in the cache (download or offline copy)."""

    @abstractmethod
    async def _predict(self, *inputs: Any) -> Any: ...

    def prepare_files(self) -> None:
        """Read the cached files and write any derived file the runtime serves (a copy
        with a dynamic batch axis, a recognizer with its CTC reduction); no runtime needed.
        Called by ``_load`` and by the engine builder."""

    def specs(self) -> list[ModelSpec]:
        """The runtime models this Immich model uses (one per ONNX file)."""
        return [self._spec()]

    def _spec(self) -> ModelSpec:
        raise NotImplementedError

    def download_source(self) -> str:
        """Where this model's missing files are downloaded from: the URL of the Hugging
        Face repository ``immich-app/<model>`` (CLIP and faces, as immich-ml)."""
        return f"{self.ctx.settings.hf_endpoint}/immich-app/{self.model_name}"

    def has_offline_copy(self) -> bool:
        """Whether the files can be had without a download (an installed package ships them)."""
        return False

    def _obtain_from_hub(self, model_file: Path) -> None:
        """Download ``immich-app/<model>`` from Hugging Face into the cache folder unless
        ``model_file`` is there (CLIP and faces, as immich-ml). Raises ModelLoadError."""
        from .download import DownloadError, hf_snapshot

        if model_file.is_file():
            return
        try:
            hf_snapshot(f"immich-app/{self.model_name}", self.cache_dir, endpoint=self.ctx.settings.hf_endpoint)
        except DownloadError as exc:
            source = self.download_source()
            raise ModelDownloadError(
                f"download of {source} failed: {exc.reason}", expected=model_file, source=source, reason=exc.reason
            ) from exc
        if not model_file.is_file():
            raise ModelLoadError(f"immich-app/{self.model_name} has no {self.type}/model.onnx")

    def clear_cache(self) -> None:
        """Delete this model's files so that the next load downloads them again.

        Called after a load failed on a corrupt file, as immich-ml ``clear_cache``."""
        path = self.cache_dir / str(self.type)
        if not path.exists():
            return
        import shutil

        log.warning("Clearing cache for model '%s' at %s", self.model_name, path)
        shutil.rmtree(path, ignore_errors=True)
