"""Model instances by ``(name, type, task)``, with TTL, a single load lock, and idle unload.

Reproduces immich-ml 3.1.0 ``ModelCache`` and ``load`` (``immich_ml/models/cache.py``,
``immich_ml/main.py``):

* the key is ``f"{name}{type}{task}"``; options reach the constructor only when the
  instance is created, later requests only ``configure()`` it;
* every hit renews the TTL (``revalidate=True``); ``MODEL_TTL <= 0`` disables it;
* models load one at a time (one lock per process); a load that fails on a corrupt
  or missing file clears the model's cache folder and is retried once, and a second
  failure is :class:`FailedToLoad` (HTTP 500 ``Failed to load model '<name>'``). A
  model whose download failed is then logged in one line saying which file was
  expected where, why the download failed and how to fix it (:mod:`.advice`).

Upstream unloads idle models by sending SIGINT to its gunicorn worker. This server is
one process, so :meth:`ModelCache.evict_idle` unloads the models whose TTL lapsed
instead; preloaded models never expire (upstream's respawned worker preloads them again).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from . import advice
from .base import InferenceModel, ModelContext, ModelDownloadError, ModelLoadError
from .registry import ModelSource, ModelTask, ModelType, resolve

log = logging.getLogger(__name__)


class FailedToLoad(Exception):
    """A model failed to load twice; carries the cleaned model name."""

    def __init__(self, model_name: str) -> None:
        super().__init__(f"Failed to load model '{model_name}'")
        self.model_name = model_name


ModelFactory = Callable[[ModelSource, str, ModelType, ModelTask, ModelContext, dict], InferenceModel]


class ModelCache:
    """Holds the server's model instances.

    ``factory(source, name, type, task, ctx, options)`` builds an instance; it raises
    ``ValueError`` for combinations that have no implementation.
    """

    def __init__(self, ctx: ModelContext, factory: ModelFactory, ttl: float, metrics=None) -> None:
        self.ctx = ctx
        self.factory = factory
        self.ttl = ttl
        self.metrics = metrics
        self._models: dict[str, InferenceModel] = {}
        self._expires: dict[str, float | None] = {}
        self._create_lock = asyncio.Lock()
        self._load_lock = asyncio.Lock()
        self._warned: set = set()  # test-pack files already warned about (once per file)

    @staticmethod
    def key(name: str, model_type: str, model_task: str) -> str:
        return f"{name}{model_type}{model_task}"

    def __len__(self) -> int:
        return len(self._models)

    @property
    def models(self) -> list[InferenceModel]:
        return list(self._models.values())

    def test_pack_models(self) -> list[str]:
        """Names of the loaded models whose files are test-pack placeholders, sorted."""
        return sorted({m.model_name for m in self._models.values() if m.loaded and m.test_pack})

    async def get(
        self, name: str, model_type: str, model_task: str, *, ttl: float | None = None, **options: Any
    ) -> InferenceModel:
        """The instance for this entry, created on first use. ``ttl=None`` means the
        cache's TTL; ``ttl <= 0`` means never expire. Raises ``ValueError`` for an
        unknown model."""
        key = self.key(name, model_type, model_task)
        ttl = self.ttl if ttl is None else ttl
        async with self._create_lock:
            model = self._models.get(key)
            if model is None:
                source, _ = resolve(name, model_type, model_task, self.ctx.settings.cache_folder)
                model = self.factory(source, name, ModelType(model_type), ModelTask(model_task), self.ctx, options)
                self._models[key] = model
            self._expires[key] = time.monotonic() + ttl if ttl > 0 else None
        return model

    async def load(self, model: InferenceModel) -> InferenceModel:
        """Load ``model`` if needed, under the process-wide load lock, with one retry
        after clearing its cache. Raises :class:`FailedToLoad`."""
        if model.loaded:
            return model
        async with self._load_lock:
            for attempt in (1, 2):
                if model.loaded:
                    return model
                started = time.perf_counter()
                try:
                    await model.load()
                except ModelLoadError as exc:
                    self._count_load(model, "error", started)
                    if attempt == 1:
                        log.warning("Failed to load %s model '%s' (attempt 1 of 2): %s",
                                    model.type, model.model_name, exc)
                        if exc.corrupt:
                            await self.ctx.run(model.clear_cache)
                    elif isinstance(exc, ModelDownloadError):
                        log.error("Failed to load %s model '%s'. %s", model.type, model.model_name,
                                  self._download_advice(model, exc))
                    else:
                        log.error("Failed to load %s model '%s' (attempt 2 of 2): %s",
                                  model.type, model.model_name, exc)
                    continue
                self._count_load(model, "ok", started)
                log.info("Loaded %s model '%s'", model.type, model.model_name)
                if model.test_pack and model.model_file not in self._warned:
                    self._warned.add(model.model_file)
                    log.warning("%s", advice.placeholder_loaded(
                        model.model_name, str(model.task), str(model.type), self.ctx.settings.cache_folder,
                        model.model_file, model.test_pack,
                    ))
                return model
        raise FailedToLoad(model.model_name)

    def _download_advice(self, model: InferenceModel, exc: ModelDownloadError) -> str:
        return advice.download_failed(
            model.model_name, str(model.task), str(model.type), self.ctx.settings.cache_folder,
            exc.expected, exc.source, exc.reason,
        )

    def _count_load(self, model: InferenceModel, outcome: str, started: float) -> None:
        if self.metrics is None:
            return
        self.metrics.model_loads.labels(str(model.task), str(model.type), outcome).inc()
        if outcome == "ok":
            self.metrics.model_load_seconds.labels(str(model.task), str(model.type)).observe(
                time.perf_counter() - started
            )
        self.metrics.models_loaded.set(sum(1 for m in self._models.values() if m.loaded))

    async def evict_idle(self, now: float | None = None) -> list[str]:
        """Unload and forget every model whose TTL has lapsed; returns their keys."""
        now = time.monotonic() if now is None else now
        async with self._create_lock:
            expired = [k for k, t in self._expires.items() if t is not None and t <= now]
            models = [self._models.pop(k) for k in expired]
            for k in expired:
                del self._expires[k]
        for model in models:
            async with self._load_lock:
                await model.unload()
            log.info("Unloaded idle %s model '%s'", model.type, model.model_name)
        if self.metrics is not None and models:
            self.metrics.models_loaded.set(sum(1 for m in self._models.values() if m.loaded))
        return expired

    async def clear(self) -> None:
        """Unload everything (shutdown)."""
        async with self._create_lock:
            models = list(self._models.values())
            self._models.clear()
            self._expires.clear()
        for model in models:
            try:
                await model.unload()
            except Exception:  # shutting down: the backend may already be gone
                log.debug("unload of '%s' failed during shutdown", model.model_name, exc_info=True)
