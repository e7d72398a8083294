"""In-process ONNX Runtime: the reference runtime and the fallback without Triton.

:func:`make_session` is also what the Triton python-backend models run (see
:mod:`immich_trt.runtime.repository`), so both runtimes execute the same session setup.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .base import InferenceError, ModelSpec, Runtime


def make_session(path: str | Path, inter_op: int = 1, intra_op: int = 2, arena: bool = True, spinning: bool = True):
    """A CPU ``onnxruntime.InferenceSession`` set up as immich-ml ``OrtSession`` on CPU.

    ``inter_op``/``intra_op`` threads (upstream defaults 1 and 2), ``ORT_PARALLEL`` when
    ``inter_op > 1``, ``enable_cpu_mem_arena=arena`` and ``arena_extend_strategy=
    kSameAsRequested``. ``spinning=False`` stops idle intra-op threads from busy-waiting
    (``session.intra_op.allow_spinning``), which frees CPU when several models or
    instances share the cores; results are the same. Raises onnxruntime's errors
    (``NoSuchFile``, ``InvalidProtobuf``...).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.inter_op_num_threads = inter_op
    options.intra_op_num_threads = intra_op
    if inter_op > 1:
        options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    options.enable_cpu_mem_arena = arena
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(
        str(path),
        sess_options=options,
        providers=["CPUExecutionProvider"],
        provider_options=[{"arena_extend_strategy": "kSameAsRequested"}],
    )


class OnnxRuntime(Runtime):
    """Runs each model in an in-process ``InferenceSession``.

    Inference runs in a dedicated thread pool (onnxruntime releases the GIL), so the
    event loop stays free.
    """

    def __init__(
        self, inter_op: int = 1, intra_op: int = 2, arena: bool = True, threads: int = 4, spinning: bool = True
    ) -> None:
        self._opts = (inter_op, intra_op, arena, spinning)
        self._sessions: dict[str, object] = {}
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="ort")

    async def load(self, spec: ModelSpec) -> None:
        if spec.name in self._sessions:
            return
        loop = asyncio.get_running_loop()
        session = await loop.run_in_executor(self._pool, lambda: make_session(spec.onnx_path, *self._opts))
        self._sessions[spec.name] = session

    async def unload(self, name: str) -> None:
        if self._sessions.pop(name, None) is not None:
            gc.collect()

    async def infer(
        self, name: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        session = self._sessions.get(name)
        if session is None:
            raise InferenceError(f"model '{name}' is not loaded")
        names = list(outputs) if outputs else [o.name for o in session.get_outputs()]
        loop = asyncio.get_running_loop()
        try:
            values = await loop.run_in_executor(self._pool, session.run, names, dict(inputs))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise InferenceError(f"onnxruntime failed on '{name}': {exc}") from exc
        return dict(zip(names, values))

    async def stop(self) -> None:
        self._sessions.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
