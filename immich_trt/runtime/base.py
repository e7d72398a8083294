"""The runtime interface: load a model by name, ``await infer(name, inputs)``.

Two implementations: :mod:`.triton` (the default; a Triton Inference Server, launched
locally or given by ``TRITON_URL``) and :mod:`.onnxruntime` (in-process reference).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class RuntimeUnavailableError(Exception):
    """The inference backend cannot be reached or is not ready."""


class InferenceError(Exception):
    """The backend rejected or failed an inference request."""


@dataclass(frozen=True)
class ModelSpec:
    """One ONNX file served under one runtime model name.

    ``name`` is the Triton model name, e.g. ``ocr__PP-OCRv5_mobile__detection``.
    ``max_batch_size`` is the largest batch the runtime accepts per request; callers
    with more items split them (see :meth:`Runtime.infer`). ``from_encoded_image``: the
    model's input is made from the request's image (:meth:`Runtime.infer_image`), so a
    runtime may do that preprocessing itself (the GPU target's ensembles).
    ``latency_bound``: the model's calls mostly come one at a time from a waiting user
    (a smart-search query), so a CPU runtime may spend spinning threads on its latency.
    """

    name: str
    onnx_path: Path
    max_batch_size: int = 0
    from_encoded_image: bool = False
    latency_bound: bool = False


class Runtime(ABC):
    """Loads models by name and runs them. All methods are coroutines.

    ``choice``: which runtime serves and why (a :class:`.select.RuntimeChoice`), set once
    by :func:`immich_trt.runtime.make_runtime`; None for a runtime built directly."""

    choice = None

    async def start(self) -> None:
        """Prepare the backend (e.g. launch or connect to Triton)."""

    async def stop(self) -> None:
        """Release the backend."""

    @abstractmethod
    async def load(self, spec: ModelSpec) -> None:
        """Make ``spec.name`` ready for :meth:`infer`. Raises on failure."""

    @abstractmethod
    async def unload(self, name: str) -> None:
        """Free the model's memory; a later :meth:`load` brings it back."""

    @abstractmethod
    async def infer(
        self, name: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run model ``name`` on ``inputs`` (batch axis first).

        Returns the requested outputs (all when ``outputs`` is None) by name.
        Raises :class:`InferenceError` or :class:`RuntimeUnavailableError`.
        """

    async def infer_image(
        self,
        name: str,
        encoded: bytes | None,
        preprocess: Callable[[], Awaitable[Mapping[str, np.ndarray]]],
        ensemble_inputs: Mapping[str, np.ndarray] | None = None,
        outputs: Sequence[str] | None = None,
        image_size: tuple[int, int] | None = None,
    ) -> dict[str, np.ndarray]:
        """Run model ``name`` on an image: the runtime decides where it is preprocessed.

        ``encoded`` is the file the image was decoded from (or None), ``preprocess`` the
        model's CPU preprocessing (a coroutine factory giving the input tensors),
        ``ensemble_inputs`` what a device-side preprocessing needs besides the bytes (e.g.
        OCR's ``resize_hw``/``bucket_hw``), ``image_size`` the image's (width, height) in
        pixels, for messages. This base runs ``preprocess`` and
        :meth:`infer`; the GPU target's runtime sends ``encoded`` to an ensemble instead
        (:mod:`.ensemble`). Same outputs and errors as :meth:`infer`."""
        return await self.infer(name, await preprocess(), outputs)

    async def ready(self) -> bool:
        """Whether the backend can serve now (used by health checks)."""
        return True


class NoRuntime(Runtime):
    """The runtime of a context that only prepares model files (the repository and engine
    builders): every call raises :class:`RuntimeUnavailableError`."""

    async def load(self, spec: ModelSpec) -> None:
        raise RuntimeUnavailableError("this context prepares model files only; it runs no model")

    async def unload(self, name: str) -> None:
        return None

    async def infer(
        self, name: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        raise RuntimeUnavailableError("this context prepares model files only; it runs no model")
