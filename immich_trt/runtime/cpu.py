"""How inference uses the CPU's cores: the one place that decides how many inferences run
at once and with how many threads each, across all models of the in-process runtime.

Why (measured in ``bench/NOTES.md``): immich-ml runs every model in an ONNX Runtime
session with 2 intra-op threads that busy-wait, called from 2 request threads, so under
Immich's job mix (smart search, face detection and OCR at once) 4 or more threads compete
for 2 cores and part of the CPU goes to spinning (CLIP visual at concurrency 2, 2 cores:
141 ms of CPU per image against 101 ms for the same work without the contention).

Here:

- at most one inference call per core runs at once: each takes one core from a
  :class:`CoreBudget`, first come first served, for its calling thread;
- a model has a *wide* session whose ``intra_op_num_threads`` is every usable core, and
  whose pool threads never spin (``session.intra_op.allow_spinning=0``): a call that runs
  alone is computed on every core, as fast as upstream's (measured: same images/s at
  concurrency 1, less CPU); when calls overlap, the pool threads sleep unless a core is
  idle, so overlapping calls cost about what they would on one thread each;
- the wide session spins between the parallel sections of a call, but not after it
  (``session.force_spinning_stop``), when its calls mostly run alone: models with a narrow
  session, and latency-bound ones (CLIP's text encoder: one search query at a time; c=1
  measured 22 -> 25 queries/s); the wide sessions of large image models, shared by
  overlapping calls under Immich's job mix, never spin;
- a model whose file is small (``IMMICH_TRT_CPU_NARROW_MAX_MB``) also has a *narrow*
  session of one thread, used when other calls are running or waiting: an ONNX Runtime
  session with one intra-op thread runs a call entirely on the calling thread, with no pool
  at all (a second copy of a small model costs a few MB; of CLIP's 350 MB, too much).

Both sessions compute the same graph with the same kernels; MLAS splits work over rows
and columns, never over the reduction, so results do not depend on the thread count
(bit-identical outputs: tests/test_cpu_plan.py, and the bench's agreement table).
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from dataclasses import dataclass


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's cpuset),
    at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class CpuPlan:
    """Thread counts of the in-process runtime.

    ``cores``: usable cores, the size of the :class:`CoreBudget` (calls at once);
    ``wide_threads``: intra-op threads of a model's wide session
    (``MACHINE_LEARNING_MODEL_INTRA_OP_THREADS`` when set, else ``cores``);
    ``narrow_max_bytes``: models whose ONNX file is at most this many bytes also get a
    one-thread session (0: none); ``spinning``: whether the wide sessions' idle pool
    threads busy-wait (``IMMICH_TRT_ORT_SPINNING``, off by default; narrow sessions have
    no pool threads).
    """

    cores: int
    wide_threads: int
    narrow_max_bytes: int
    spinning: bool = False

    @property
    def narrow_enabled(self) -> bool:
        return self.narrow_max_bytes > 0 and self.cores > 1

    def has_narrow(self, file_bytes: int) -> bool:
        """Whether a model of ``file_bytes`` gets a one-thread session as well."""
        return self.narrow_enabled and file_bytes <= self.narrow_max_bytes

    def spin_within_call(self, has_narrow: bool, latency_bound: bool) -> bool:
        """Whether a model's wide session may spin between the parallel sections of one
        call (never after it): when its calls mostly run alone, because overlapping calls
        go to its narrow session or because the model is latency-bound (a search query).
        A wide session shared by overlapping calls does not spin: its spinning threads
        would take the core of the other call."""
        return self.cores > 1 and (has_narrow or latency_bound)

    def describe(self) -> str:
        """One line for the log."""
        narrow = (
            f"a second, one-thread session for models up to {self.narrow_max_bytes / 2**20:.0f} MB when calls overlap"
            if self.narrow_enabled
            else "no one-thread sessions"
        )
        return (
            f"{self.cores} cores: each model runs on {self.wide_threads} intra-op threads "
            f"(spinning {'on' if self.spinning else 'off'}), {narrow}; at most {self.cores} inference calls at once"
        )


class CoreBudget:
    """Counts the cores held by running inferences (one per call in the in-process
    runtime); callers wait, first come first served, until the cores they ask for are free.

    Not thread-safe: use it from one event loop. ``acquire(n)`` with ``n > cores`` waits
    for every core (it is clamped). Strict FIFO order: a wide call waiting for all cores
    is not overtaken by later narrow calls, so it never starves.
    """

    def __init__(self, cores: int) -> None:
        if cores < 1:
            raise ValueError("a core budget needs at least one core")
        self.cores = cores
        self.free = cores
        self.peak_held = 0  # the most cores held at once so far
        self._waiting: deque[tuple[int, asyncio.Future]] = deque()

    @property
    def contended(self) -> bool:
        """Whether any core is held or any call is waiting."""
        return self.free < self.cores or bool(self._waiting)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def acquire(self, n: int) -> int:
        """Wait until ``n`` cores (clamped to 1..cores) are free, take them and return
        how many were taken (give that to :meth:`release`)."""
        n = min(max(1, n), self.cores)
        if not self._waiting and self.free >= n:
            self._take(n)
            return n
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((n, future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(n)  # granted just as we were cancelled: give the cores back
            else:
                self._waiting.remove((n, future))
                self._grant()
            raise
        return n

    def release(self, n: int) -> None:
        """Give back ``n`` cores taken by :meth:`acquire`."""
        self.free = min(self.cores, self.free + n)
        self._grant()

    def _grant(self) -> None:
        while self._waiting and self._waiting[0][0] <= self.free:
            n, future = self._waiting.popleft()
            if future.cancelled():
                continue
            self._take(n)
            future.set_result(None)

    def _take(self, n: int) -> None:
        self.free -= n
        self.peak_held = max(self.peak_held, self.cores - self.free)
