"""The sidecar's running state: the store, its thread, and the in-memory vector indices.

Every store call runs on one dedicated thread (:meth:`Sidecar.call`), so SQLite sees a
single writer and the event loop never blocks on disk. The vector indices are rebuilt
from the store on start (:meth:`Sidecar.load_indices`) and kept in step by the writers.
CLIP embeddings and face embeddings of different models are not comparable, so there
is one index per model name.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from ..config import Settings
from .assets import AssetResults, Saved, clip_embeddings, save_results
from .persons import face_embeddings
from .store import Store
from .vectors import VectorIndex

log = logging.getLogger("immich_trt.sidecar")

T = TypeVar("T")


class Sidecar:
    """Owns the :class:`Store` (opened on :meth:`start`), the store thread and the
    per-model ``clip`` and ``faces`` indices (``{model name: VectorIndex}``)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store: Store | None = None
        self.clip: dict[str, VectorIndex] = {}
        self.faces: dict[str, VectorIndex] = {}
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="sidecar-store")
        self.listeners: list[Callable[[], None]] = []  # called by changed() (the mirror's wake-up)

    async def start(self) -> None:
        """Open the store (migrating it; change notices kept only with ``OPENSEARCH_URL``)
        and rebuild the indices."""
        self.store = await self._run(Store, self.settings.data_dir, outbox=bool(self.settings.opensearch_url))
        await self.call(self.load_indices)
        log.info(
            "Sidecar store %s: %d CLIP embeddings, %d faces",
            self.store.path,
            sum(len(i) for i in self.clip.values()),
            sum(len(i) for i in self.faces.values()),
        )

    async def stop(self) -> None:
        if self.store is not None:
            await self._run(self.store.close)
            self.store = None
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(store, *args, **kwargs)`` on the store thread."""
        if self.store is None:
            raise RuntimeError("sidecar store is not open")
        return await self._run(fn, self.store, *args, **kwargs)

    def changed(self) -> None:
        """Tell the listeners that the store was written (call after a write)."""
        for listener in self.listeners:
            listener()

    # ---- indices ----
    def clip_index(self, model: str) -> VectorIndex:
        return self.clip.setdefault(model, VectorIndex())

    def face_index(self, model: str) -> VectorIndex:
        return self.faces.setdefault(model, VectorIndex())

    def load_indices(self, store: Store) -> None:
        """Rebuild every index from the store (runs on the store thread)."""
        clip = clip_embeddings(store)
        faces = face_embeddings(store)
        self.clip, self.faces = {}, {}
        for model, (ids, vecs) in clip.items():
            self.clip_index(model).add(ids, np.stack(vecs))
        for model, (ids, vecs) in faces.items():
            self.face_index(model).add(ids, np.stack(vecs))

    # ---- writes ----
    async def save(self, results: AssetResults) -> Saved:
        """Store one asset's results and add its new vectors to the indices."""
        saved = await self.call(save_results, results)
        self.changed()
        if saved.clip_added and results.clip is not None:
            model, embedding = results.clip
            self.clip_index(model).add([saved.asset_id], embedding[None])
        if saved.face_ids and results.faces is not None:
            model, faces = results.faces
            self.face_index(model).add(saved.face_ids, np.stack([f.embedding for f in faces]))
        return saved
