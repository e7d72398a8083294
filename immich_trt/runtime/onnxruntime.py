"""In-process ONNX Runtime: the reference runtime and the fallback without Triton.

:func:`make_session` is also what the Triton python-backend models run (see
:mod:`immich_trt.runtime.repository`), so both runtimes execute the same session setup.
"""

from __future__ import annotations

import asyncio
import gc
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import InferenceError, ModelSpec, Runtime
from .cpu import CoreBudget, CpuPlan


def make_session(
    path: str | Path,
    inter_op: int = 1,
    intra_op: int = 2,
    arena: bool = True,
    spinning: bool = True,
    stop_spinning_after_run: bool = False,
):
    """A CPU ``onnxruntime.InferenceSession`` set up as immich-ml ``OrtSession`` on CPU.

    ``inter_op``/``intra_op`` threads (upstream defaults 1 and 2), ``ORT_PARALLEL`` when
    ``inter_op > 1``, ``enable_cpu_mem_arena=arena`` and ``arena_extend_strategy=
    kSameAsRequested``. ``spinning=False`` stops idle intra-op threads from busy-waiting
    (``session.intra_op.allow_spinning``), which frees CPU when several models or
    instances share the cores; ``stop_spinning_after_run`` lets them spin between the
    parallel sections of a call but not after it (``session.force_spinning_stop``).
    Results are the same. Raises onnxruntime's errors (``NoSuchFile``, ``InvalidProtobuf``...).
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
    elif stop_spinning_after_run:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(
        str(path),
        sess_options=options,
        providers=["CPUExecutionProvider"],
        provider_options=[{"arena_extend_strategy": "kSameAsRequested"}],
    )


#: ``factory(spec, inter_op, intra_op, arena, spinning, **options)`` (:func:`make_session`'s
#: parameters after the path): an object with ``run(output_names, feeds)`` and
#: ``get_outputs()`` for ``spec`` (:func:`make_session` on ``spec.onnx_path`` by default;
#: fast mode's :class:`.fast.FastSessions` may load another file or engine).
SessionFactory = Callable[..., object]


def default_sessions(spec: ModelSpec, inter_op: int, intra_op: int, arena: bool, spinning: bool, **options):
    """:func:`make_session` on the model's own file."""
    return make_session(spec.onnx_path, inter_op, intra_op, arena, spinning, **options)


@dataclass
class _Sessions:
    """A model's wide session and, for a small model, its one-thread session."""

    wide: object
    narrow: object | None = None


class OnnxRuntime(Runtime):
    """Runs each model in-process, in ONNX Runtime sessions set up by a :class:`CpuPlan`.

    Every call takes one core from one :class:`CoreBudget` (its calling thread; at most
    ``plan.cores`` calls run at once, first come first served), on the wide session when
    it is alone and on the narrow one, when the model has one, when other calls overlap
    (see :mod:`.cpu`); calls run in a pool of ``plan.cores`` threads (onnxruntime releases
    the GIL), so the event loop stays free.
    ``plan=None``: immich-ml's setup (``intra_op`` threads per session, calls limited only
    by the pool of ``threads``), the reference the plan is measured against.
    ``session_factory`` opens each session (:data:`SessionFactory`).
    """

    def __init__(
        self,
        inter_op: int = 1,
        intra_op: int = 2,
        arena: bool = True,
        threads: int = 4,
        spinning: bool = True,
        plan: CpuPlan | None = None,
        session_factory: SessionFactory = default_sessions,
    ) -> None:
        self.plan = plan
        self.session_factory = session_factory
        self._opts = (inter_op, intra_op, arena, spinning)
        self._sessions: dict[str, _Sessions] = {}
        self.calls: Counter[str] = Counter()  # inferences run on "wide" / "narrow" sessions
        self.budget = CoreBudget(plan.cores) if plan is not None else None
        workers = plan.cores if plan is not None else max(1, threads)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ort")

    def _open(self, spec: ModelSpec) -> _Sessions:
        inter_op, intra_op, arena, spinning = self._opts
        plan, path = self.plan, spec.onnx_path
        if plan is None:
            return _Sessions(self.session_factory(spec, inter_op, intra_op, arena, spinning))
        has_narrow = plan.has_narrow(Path(path).stat().st_size)
        # the wide session of a model with a narrow one, or of a latency-bound model, mostly
        # runs alone: its threads may spin between a call's parallel sections, never after it
        spin = plan.spinning or plan.spin_within_call(has_narrow, spec.latency_bound)
        wide = self.session_factory(spec, inter_op, plan.wide_threads, arena, spin, stop_spinning_after_run=not plan.spinning)
        narrow = self.session_factory(spec, 1, 1, arena, False) if has_narrow else None
        return _Sessions(wide, narrow)

    async def load(self, spec: ModelSpec) -> None:
        if spec.name in self._sessions:
            return
        loop = asyncio.get_running_loop()
        self._sessions[spec.name] = await loop.run_in_executor(self._pool, self._open, spec)

    async def unload(self, name: str) -> None:
        if self._sessions.pop(name, None) is not None:
            gc.collect()

    async def infer(
        self, name: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        sessions = self._sessions.get(name)
        if sessions is None:
            raise InferenceError(f"model '{name}' is not loaded")
        session, cores = sessions.wide, 0
        if self.budget is not None:
            if sessions.narrow is not None and self.budget.contended:
                session = sessions.narrow
            cores = await self.budget.acquire(1)
        self.calls["narrow" if session is sessions.narrow else "wide"] += 1
        names = list(outputs) if outputs else [o.name for o in session.get_outputs()]
        loop = asyncio.get_running_loop()
        try:
            values = await loop.run_in_executor(self._pool, session.run, names, dict(inputs))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise InferenceError(f"onnxruntime failed on '{name}': {exc}") from exc
        finally:
            if self.budget is not None and cores:
                self.budget.release(cores)
        return dict(zip(names, values))

    async def stop(self) -> None:
        self._sessions.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
