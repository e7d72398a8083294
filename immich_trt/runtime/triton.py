"""Triton Inference Server runtime (``tritonclient`` asyncio clients, gRPC or HTTP).

With ``TRITON_URL`` unset, a local server is launched from the ``nvidia-pytriton`` wheel
(:mod:`.launcher`) over the repository in ``IMMICH_TRT_ENGINES_DIR``; models missing
from that repository are written on first use (:mod:`.repository`, CPU target) and
loaded in explicit model-control mode. With ``TRITON_URL`` set, the server is used as
it is (e.g. NVIDIA's image serving TensorRT plans of the same names) and models are
loaded through its repository API when it allows it.

With ``IMMICH_TRT_TRITON_SHM`` and the local launched server, tensors travel through
system shared memory instead of the gRPC/HTTP body (:class:`ShmPool`): each call takes
a region from a pool (reused, grown when too small), writes its inputs there and, when
every requested output's size can be derived from the inputs, has Triton write its
outputs there too; otherwise outputs come back over the wire. Regions are named with
the launcher's shared-memory prefix (so its clean-up after a crash removes them), are
re-created after a restart of the server and are unregistered and unlinked on stop. A
call that fails for a shared-memory reason is repeated over the wire.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import Settings
from .base import InferenceError, ModelSpec, Runtime, RuntimeUnavailableError
from .launcher import TritonLauncher, TritonLaunchError
from .repository import write_model

log = logging.getLogger(__name__)

#: numpy dtypes -> Triton wire data types.
NP_TO_TRITON = {
    np.dtype(np.float32): "FP32",
    np.dtype(np.float16): "FP16",
    np.dtype(np.float64): "FP64",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.int8): "INT8",
    np.dtype(np.bool_): "BOOL",
}


#: Triton config data types -> numpy dtypes.
CONFIG_TO_NP = {"TYPE_" + k: v for v, k in NP_TO_TRITON.items()}
_ALIGN = 64  # byte alignment of each tensor inside a region
_MIN_REGION = 1 << 16
_SHAPE_MEMO = 256  # observed input -> output shapes kept per model


def _aligned(n: int) -> int:
    """``n`` bytes rounded up to the 64-byte alignment of each tensor inside a region."""
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _region_size(n: int) -> int:
    """Region size for ``n`` bytes: the next power of two (>= 64 KiB), so regions of
    varying tensors (OCR images) are reused rather than grown every call."""
    return max(_MIN_REGION, 1 << max(0, math.ceil(math.log2(max(1, n)))))


class ShmUnavailable(OSError):
    """No shared-memory region of the size needed can be had (e.g. ``/dev/shm`` full)."""


@dataclass
class ShmRegion:
    """One registered system shared-memory region of the pool."""

    name: str
    size: int
    handle: object
    generation: int

    def write(self, offset: int, value: np.ndarray) -> None:
        """Copy ``value`` (any shape and dtype) into the region at byte ``offset``; the caller
        sized the region so that it fits."""
        view = np.ndarray(value.shape, value.dtype, buffer=self.handle._mpsm_handle.buf, offset=offset)
        view[...] = value

    def read(self, offset: int, dtype: np.dtype, shape: Sequence[int]) -> np.ndarray:
        """A copy of the ``dtype`` array of ``shape`` at byte ``offset`` (a copy: the region goes
        back to the pool)."""
        view = np.ndarray(tuple(shape), dtype, buffer=self.handle._mpsm_handle.buf, offset=offset)
        return view.copy()  # the region goes back to the pool


async def registered_regions(client) -> list[str]:
    """The names of the system shared-memory regions ``client``'s server has registered,
    from any client (gRPC or HTTP asyncio ``tritonclient``). Raises what the client raises."""
    if "grpc" in type(client).__module__:  # {"regions": {name: {...}}}
        status = await client.get_system_shared_memory_status(as_json=True)
        return list(status.get("regions", {}))
    return [r.get("name", "") for r in await client.get_system_shared_memory_status()]  # [{"name": ...}]


async def unregister_prefixed(client, prefix: str) -> int:
    """Unregister from ``client``'s server every system shared-memory region whose name
    starts with ``prefix`` (other clients of the same server keep theirs); returns how
    many. Raises what the client raises."""
    names = [name for name in await registered_regions(client) if name.startswith(prefix)]
    for name in names:
        await client.unregister_system_shared_memory(name)
    return len(names)


class ShmPool:
    """Per-call system shared-memory regions for one Triton server (see the module
    docstring). Used from the event loop only. It unregisters only regions of its own
    ``prefix``: other processes (workers) may share the server."""

    def __init__(self, prefix: str) -> None:
        """An empty pool; region names start with ``prefix`` (the launcher's shared-memory
        prefix, so its clean-up after a crash finds them)."""
        self.prefix = prefix
        self.generation = 0
        self._free: list[ShmRegion] = []
        self._busy: set[str] = set()
        self._counter = itertools.count()
        self._stale: list[str] = []  # discarded regions still registered with the server

    async def acquire(self, client, size: int) -> ShmRegion:
        """A free region of at least ``size`` bytes, registered with ``client``'s server:
        the smallest that fits, else the largest free one grown, else a new one."""
        while self._stale:
            name = self._stale.pop()
            try:
                await client.unregister_system_shared_memory(name)
            except Exception:
                log.debug("unregistering shared memory %s failed", name, exc_info=True)
        fits = [r for r in self._free if r.size >= size]
        if fits:
            region = min(fits, key=lambda r: r.size)
            self._free.remove(region)
        else:
            if self._free:  # grow: replace the largest free region by a bigger one
                old = max(self._free, key=lambda r: r.size)
                self._free.remove(old)
                await self._unregister(client, old)
                self._destroy(old)
            region = await self._create(client, _region_size(size))
        self._busy.add(region.name)
        return region

    def discard(self, region: ShmRegion) -> None:
        """Drop a region the server may still use (a call that timed out or was
        cancelled): unlinked now, unregistered on the next :meth:`acquire`."""
        self._busy.discard(region.name)
        if region.generation == self.generation:
            self._stale.append(region.name)
        self._destroy(region)

    def release(self, region: ShmRegion) -> None:
        """Return a region the server is finished with: to the free list, or destroyed when it
        was created for a server that has since been restarted."""
        self._busy.discard(region.name)
        if region.generation == self.generation:
            self._free.append(region)
        else:  # created for a server that has since been restarted
            self._destroy(region)

    async def _create(self, client, size: int) -> ShmRegion:
        """A new region of ``size`` bytes: created, its pages reserved (``posix_fallocate``) and
        registered with ``client``'s server. Raises :class:`ShmUnavailable` when it cannot be
        created or reserved; a registration error propagates (the region destroyed)."""
        from tritonclient.utils import shared_memory as shm

        name = f"{self.prefix}client_{next(self._counter)}"
        try:
            handle = shm.create_shared_memory_region(name, "/" + name, size, create_only=True)
        except Exception as exc:
            raise ShmUnavailable(f"cannot create a {size}-byte region in /dev/shm: {exc}") from exc
        region = ShmRegion(name, size, handle, self.generation)
        try:
            # reserve the pages now: on a full /dev/shm (a container's 64 MB default) a
            # write into a sparse mapping would kill the process with SIGBUS
            fd = os.open(f"/dev/shm/{name}", os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
        except OSError as exc:
            self._destroy(region)
            raise ShmUnavailable(f"cannot reserve {size} bytes of /dev/shm: {exc}") from exc
        try:
            await client.register_system_shared_memory(name, "/" + name, size)
        except BaseException:
            self._destroy(region)
            raise
        return region

    async def _unregister(self, client, region: ShmRegion) -> None:
        """Unregister ``region`` from the server; a failure is logged at debug level and ignored."""
        try:
            await client.unregister_system_shared_memory(region.name)
        except Exception:
            log.debug("unregistering shared memory %s failed", region.name, exc_info=True)

    def _destroy(self, region: ShmRegion) -> None:
        """Unmap and unlink (the launcher may have unlinked it already after a crash)."""
        from tritonclient.utils import shared_memory as shm

        try:
            shm.destroy_shared_memory_region(region.handle)
        except Exception:  # noqa: BLE001 (whatever the reason, the region is gone)
            # already unlinked: still forget it in multiprocessing's resource tracker
            try:
                from multiprocessing import resource_tracker

                resource_tracker.unregister(region.handle._mpsm_handle._name, "shared_memory")
            except Exception:  # noqa: BLE001, S110 (best effort: the tracker may not know it)
                pass

    async def reset(self, client) -> None:
        """After a restart of the server: it knows none of the regions. Free ones are
        dropped now, busy ones when released; new ones are registered on demand."""
        self.generation += 1
        self._stale.clear()
        if client is not None:
            try:  # a call between the restart and now may have registered one
                await unregister_prefixed(client, self.prefix + "client_")
            except Exception:
                log.debug("unregistering shared memory after a restart failed", exc_info=True)
        free, self._free = self._free, []
        for region in free:
            self._destroy(region)

    async def close(self, client) -> None:
        """Unregister (when the server still answers) and unlink every free region;
        regions in use are destroyed when released."""
        self.generation += 1
        if client is not None and self._free:
            try:
                await asyncio.wait_for(unregister_prefixed(client, self.prefix + "client_"), 5)
            except Exception:
                log.debug("unregistering shared memory on stop failed", exc_info=True)
        free, self._free = self._free, []
        for region in free:
            self._destroy(region)


@dataclass
class _ShmModel:
    """What the shared-memory path knows of one model's tensors (from its config)."""

    batched: bool
    inputs: dict[str, list[int]]
    outputs: dict[str, tuple[np.dtype, list[int]]]
    rule: bool | None = None  # dynamic output dims == the first input's, in order; None: untested
    memo: dict[tuple, dict[str, tuple[int, ...]]] = field(default_factory=dict)

    @staticmethod
    def _key(inputs: Mapping[str, np.ndarray]) -> tuple:
        """The memo key of a call: each input's (name, shape, dtype string), in order."""
        return tuple((k, v.shape, v.dtype.str) for k, v in inputs.items())

    def by_rule(self, inputs: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, tuple[int, ...]] | None:
        """Output shapes from the config: fixed dims as they are, dynamic ones taken in
        order from the first input's dynamic dims (OCR detection: H, W); None if the
        counts differ or an output is unknown."""
        name, first = next(iter(inputs.items()))
        batch = tuple(first.shape[:1]) if self.batched else ()
        in_dims = self.inputs.get(name, [])
        shape = first.shape[len(batch):]
        if len(in_dims) != len(shape):
            return None
        dynamic_in = [d for d, c in zip(shape, in_dims) if c < 0]
        shapes = {}
        for n in names:
            if n not in self.outputs:
                return None
            out = list(self.outputs[n][1])
            dynamic = [i for i, d in enumerate(out) if d < 0]
            if dynamic and len(dynamic) != len(dynamic_in):
                return None
            for i, value in zip(dynamic, dynamic_in):
                out[i] = int(value)
            shapes[n] = batch + tuple(out)
        return shapes

    def output_shapes(self, inputs: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, tuple[int, ...]] | None:
        """Full output shapes for these inputs: seen before with the same input shapes,
        or by the rule once it held on a call over the wire; else None (unknown)."""
        seen = self.memo.get(self._key(inputs))
        if seen is not None and all(n in seen for n in names):
            return {n: seen[n] for n in names}
        fixed = all(d >= 0 for n in names if n in self.outputs for d in self.outputs[n][1])
        if fixed or self.rule:
            return self.by_rule(inputs, names)
        return None

    def observe(self, inputs: Mapping[str, np.ndarray], shapes: dict[str, tuple[int, ...]]) -> None:
        """Record output shapes seen over the wire; settle the rule on its first test."""
        if len(self.memo) >= _SHAPE_MEMO:
            self.memo.pop(next(iter(self.memo)))
        self.memo[self._key(inputs)] = dict(shapes)
        if self.rule is None:
            self.rule = self.by_rule(inputs, list(shapes)) == shapes


#: A call waits through at most this many outages (a call that keeps failing while the
#: server answers its liveness check is not waiting for an outage to end).
MAX_OUTAGES_PER_CALL = 8


def _lost_model(message: str) -> bool:
    """Whether Triton's error says it does not know (or has not loaded) the model, as it
    answers after a restart: "Request for unknown model: 'x' is not found", "... has no
    available versions", "... is not ready"."""
    return "unknown model" in message or "is not ready" in message or "no available versions" in message


class TritonRuntime(Runtime):
    """Runs models on a Triton server; see the module docstring."""

    def __init__(self, settings: Settings) -> None:
        """A runtime for ``settings`` (protocol, engines repository, ``TRITON_URL``, shared
        memory); nothing is launched or connected before :meth:`start`."""
        self.settings = settings
        self.protocol = settings.triton_protocol
        self.repository = settings.engines_dir
        self.launcher: TritonLauncher | None = None
        self._work_dir: tempfile.TemporaryDirectory | None = None
        self._client = None
        self._specs: dict[str, ModelSpec] = {}
        self._ready_models: set[str] = set()
        self._lock = asyncio.Lock()
        self._shm: ShmPool | None = None  # IMMICH_TRT_TRITON_SHM with the local server
        self._shm_models: dict[str, _ShmModel | None] = {}
        self._back = asyncio.Event()  # cleared while an outage lasts (see _wait_through_outage)
        self._back.set()
        self._outage_task: asyncio.Task | None = None
        self._outages = 0  # outages seen so far

    # ----------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        """The server address in use (``host:port``, or as ``TRITON_URL`` gives it): ``TRITON_URL``
        when set, else the launched server's gRPC or HTTP address for the protocol."""
        if self.settings.triton_url:
            return self.settings.triton_url
        assert self.launcher is not None
        return self.launcher.grpc_url if self.protocol == "grpc" else self.launcher.http_url

    async def start(self) -> None:
        """Launch the local server (unless ``TRITON_URL`` is set), create the client and, with
        ``IMMICH_TRT_TRITON_SHM`` and the launched server, the shared-memory pool. Raises
        :class:`TritonLaunchError` when the server does not come up (after stopping what started)."""
        if not self.settings.triton_url:
            self._work_dir = tempfile.TemporaryDirectory(prefix="immich-trt-triton-")
            self.launcher = TritonLauncher(
                self.repository,
                Path(self._work_dir.name),
                start_timeout_s=self.settings.triton_start_timeout_s,
                on_restart=self._reload_all,
                server_root=self.settings.triton_server,
                max_rss_mb=self.settings.triton_max_rss_mb,
            )
            try:
                await self.launcher.start()
            except TritonLaunchError:
                await self.stop()
                raise
        self._client = self._make_client()
        if self.settings.triton_shm and self.launcher is not None:
            self._shm = ShmPool(self.launcher.shm_prefix)
        elif self.settings.triton_shm and self.settings.triton_shm_prefix:  # a local server another process launched
            self._shm = ShmPool(self.settings.triton_shm_prefix)

    @property
    def shm_prefix(self) -> str | None:
        """The shared-memory prefix of the launched server when this runtime passes tensors
        through shared memory (regions of other local clients of it start with it too);
        None otherwise."""
        return self.launcher.shm_prefix if self.launcher is not None and self._shm is not None else None

    async def forget_shared_memory(self, prefix: str) -> int:
        """Unregister from the server and unlink every system shared-memory region whose
        name starts with ``prefix`` (those of a client that died: the server would keep
        them mapped until it restarts). Returns how many were registered; failures are
        logged, never raised."""
        count = 0
        if self._client is not None:
            try:
                count = await unregister_prefixed(self._client, prefix)
            except Exception as exc:  # noqa: BLE001 (the server may be restarting: it forgets them anyway)
                log.warning("Could not unregister the shared memory of %s* (%s: %s)", prefix, type(exc).__name__, exc)
        for path in Path("/dev/shm").glob(f"{prefix}*"):
            try:
                path.unlink()
            except OSError:
                pass
        return count

    def _make_client(self):
        """A ``tritonclient`` asyncio client for :attr:`url` (scheme stripped): gRPC, or HTTP with
        up to 64 connections."""
        url = self.url
        if "://" in url:
            url = url.split("://", 1)[1]
        if self.protocol == "grpc":
            import tritonclient.grpc.aio as grpcclient

            return grpcclient.InferenceServerClient(url)
        import tritonclient.http.aio as httpclient

        return httpclient.InferenceServerClient(url, conn_limit=64)

    async def stop(self) -> None:
        """Unregister and unlink the shared-memory regions, close the client, stop the launched
        server and delete its working directory; a second call does nothing."""
        if self._outage_task is not None:
            self._outage_task.cancel()
            self._outage_task = None
        self._back.set()
        if self._shm is not None:
            await self._shm.close(self._client)
            self._shm = None
        if self._client is not None:
            try:
                await self._client.close()
            except Exception:
                log.debug("closing the Triton client failed", exc_info=True)
            self._client = None
        if self.launcher is not None:
            await self.launcher.stop()
            self.launcher = None
        if self._work_dir is not None:
            self._work_dir.cleanup()
            self._work_dir = None

    async def ready(self) -> bool:
        """Whether the server answers (a model that failed to load makes Triton report
        not-ready as a whole, so liveness is the useful signal)."""
        return await self._live()

    async def _live(self) -> bool:
        """Whether the server answers its liveness check within 2 s; False when not started,
        unreachable or hung (never raises)."""
        if self._client is None:
            return False
        try:
            return bool(await asyncio.wait_for(self._client.is_server_live(), 2.0))
        except Exception:  # noqa: BLE001 (any failure to answer means not live)
            return False

    # ------------------------------------------------------------------- outages
    def _restarting(self) -> bool:
        """Whether the launched server is being restarted (its models not yet reloaded)."""
        return self.launcher is not None and self.launcher.restarting

    async def _wait_through_outage(self, operation):
        """Run ``operation()`` (a coroutine factory), waiting through an outage of the server.

        Inference is idempotent, so a call that finds Triton unreachable, restarting or not
        live (:class:`RuntimeUnavailableError`) waits until the server is back (the launched
        one restarted by its watchdog and its models reloaded, or a ``TRITON_URL`` server
        answering again) and runs again, for up to ``infer_timeout_s`` after its first
        failure in that outage (a call that lives through several outages gets that long
        in each); only then the error is raised (the server answers 503 with
        ``Retry-After``). A call that got no answer within ``infer_timeout_s`` (a hung server)
        is not repeated.
        One WARNING line per outage, one INFO line when it ends."""
        loop = asyncio.get_running_loop()
        deadline = 0.0  # infer_timeout_s after the first failure in the current outage
        outage = -1  # the outage that deadline belongs to
        outages_seen = 0
        while True:
            try:
                return await operation()
            except RuntimeUnavailableError as exc:
                if self._client is None:  # stopped (or never started): nothing to wait for
                    raise
                outages_seen += 1
                if outages_seen > MAX_OUTAGES_PER_CALL:  # failing against a live server: not an outage
                    raise
                if isinstance(exc.__cause__, TimeoutError):  # a hung call waited its whole timeout
                    raise
                self._begin_outage(exc)
                if outage != self._outages:  # a new outage (this call may have lived through others)
                    outage, deadline = self._outages, loop.time() + self.settings.infer_timeout_s
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise
                try:
                    await asyncio.wait_for(self._back.wait(), remaining)
                except TimeoutError:
                    raise exc from None

    def _begin_outage(self, cause: Exception) -> None:
        """Note an outage (once) and start watching for the server's return."""
        if not self._back.is_set():
            return
        self._outages += 1
        self._back.clear()
        log.warning(
            "Triton is unavailable (%s); requests wait up to %g s for it", cause, self.settings.infer_timeout_s
        )
        self._outage_task = asyncio.create_task(self._watch_outage(asyncio.get_running_loop().time()))

    async def _watch_outage(self, started: float) -> None:
        """Poll until the server is live again and, for the launched one, restarted with its
        models reloaded; a ``TRITON_URL`` server gets a fresh client every 2 s meanwhile (gRPC
        backs off reconnecting). Then release the waiting calls."""
        loop = asyncio.get_running_loop()
        fresh_client_at = loop.time() + 2.0
        try:
            while self._client is not None:
                if not self._restarting() and await self._live():
                    break
                if self.launcher is None and loop.time() >= fresh_client_at:
                    old, self._client = self._client, self._make_client()
                    fresh_client_at = loop.time() + 2.0
                    try:
                        await old.close()
                    except Exception:  # noqa: BLE001 (a client of a dead connection)
                        log.debug("closing the old Triton client failed", exc_info=True)
                await asyncio.sleep(0.2)
            if self._client is not None:
                log.info("Triton is back after %.1f s", loop.time() - started)
        finally:
            self._outage_task = None
            self._back.set()

    async def _reload_all(self) -> None:
        """After a restart of the local server: load every model that was loaded.

        gRPC keeps a connection backoff for a while after the outage, so loads are
        retried for up to ``triton_start_timeout_s``."""
        if self._client is not None:
            await self._client.close()
        self._client = self._make_client()
        if self._shm is not None:  # the new server knows none of our regions
            await self._shm.reset(self._client)
        names = list(self._ready_models)
        self._ready_models.clear()
        deadline = asyncio.get_running_loop().time() + self.settings.triton_start_timeout_s
        for name in names:
            while True:
                try:
                    await self._load_once(self._specs[name])
                    break
                except (InferenceError, RuntimeUnavailableError) as exc:
                    if asyncio.get_running_loop().time() > deadline:
                        log.error("Could not reload '%s' after a Triton restart: %s", name, exc)
                        break
                    await asyncio.sleep(0.5)
        log.info("Reloaded %d model(s) after a Triton restart", len(names))

    # -------------------------------------------------------------------- models
    async def load(self, spec: ModelSpec) -> None:
        """Make ``spec.name`` ready on the server (see :meth:`Runtime.load`): with the launched
        server and the CPU target its repository entry is written first, then it is loaded
        unless the server already has it ready. Waits through an outage of the server for up
        to ``infer_timeout_s`` (:meth:`_wait_through_outage`).

        Raises :class:`RuntimeUnavailableError` when not started, or unreachable, restarting
        or not live past that wait (retryable), :class:`InferenceError` when the live server
        cannot load the model."""
        await self._wait_through_outage(lambda: self._load_once(spec))

    async def _load_once(self, spec: ModelSpec) -> None:
        """One attempt of :meth:`load`, errors as it says."""
        from tritonclient.utils import InferenceServerException

        if self._client is None:
            raise RuntimeUnavailableError("Triton is not started")
        async with self._lock:
            self._specs[spec.name] = spec
            self._shm_models.pop(spec.name, None)  # its config is read again on first use
            if spec.name in self._ready_models:
                return
            if self.launcher is not None and self.settings.preprocess == "cpu":
                # CPU target: python-backend models written on first use. The GPU target's
                # repository is prebuilt (build-engines --target tensorrt) and never rewritten.
                await asyncio.get_running_loop().run_in_executor(
                    None, write_model, self.repository, spec, self.settings
                )
            try:
                if not await self._client.is_model_ready(spec.name):
                    await self._client.load_model(spec.name)
            except InferenceServerException as exc:
                if self._restarting() or not await self._live():  # e.g. restarting after a crash: retryable
                    raise RuntimeUnavailableError(f"Triton is not live: {exc.message()}") from exc
                raise InferenceError(f"Triton could not load '{spec.name}': {exc.message()}") from exc
            except (TimeoutError, OSError) as exc:
                raise RuntimeUnavailableError(f"Triton at {self.url} is unreachable: {exc}") from exc
            except Exception as exc:  # e.g. aiohttp's ServerDisconnectedError over HTTP during a restart
                if self._restarting() or not await self._live():
                    raise RuntimeUnavailableError(f"Triton is not live: {type(exc).__name__}: {exc}") from exc
                raise InferenceError(f"Triton could not load '{spec.name}': {type(exc).__name__}: {exc}") from exc
            self._ready_models.add(spec.name)

    async def unload(self, name: str) -> None:
        """Forget the model and unload it from the launched server (never from a server given by
        ``TRITON_URL``, which we do not own); a failure is logged, not raised."""
        from tritonclient.utils import InferenceServerException

        async with self._lock:
            self._ready_models.discard(name)
            if self._client is None or self.launcher is None:
                return  # never unload models from a server we do not own
            try:
                await self._client.unload_model(name)
            except (InferenceServerException, OSError) as exc:
                log.warning("Unloading '%s' from Triton failed: %s", name, exc)

    # ----------------------------------------------------------------- inference
    async def infer(
        self, name: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run model ``name`` on ``inputs`` (numpy arrays by input name, batch axis first for
        batched models); a known model that is not loaded (unloaded, lost in a restart) is
        loaded first. A batch over the model's ``max_batch_size`` is split into calls of at most
        that size and the outputs concatenated along axis 0.

        Returns the requested outputs (all when ``outputs`` is None) by name, as numpy arrays of
        the model's output dtypes. Raises :class:`InferenceError` (Triton rejected or failed
        the call) or :class:`RuntimeUnavailableError` (not started, unreachable, not live, or
        no answer within ``infer_timeout_s`` seconds)."""
        return await self._wait_through_outage(lambda: self._infer_loaded(name, inputs, outputs))

    async def _infer_loaded(
        self, name: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None
    ) -> dict[str, np.ndarray]:
        """One attempt of :meth:`infer`: the model loaded first when it is not (unloaded, or
        lost in a restart); a live server that no longer knows a model we loaded (a
        ``TRITON_URL`` server that restarted) gets it loaded again once."""
        spec = self._specs.get(name)
        if spec is not None and name not in self._ready_models:
            await self._load_once(spec)
        try:
            return await self._infer_split(name, inputs, outputs, spec)
        except InferenceError as exc:
            if spec is None or not _lost_model(str(exc)):
                raise
            log.warning("Triton no longer has '%s' (%s); loading it again", name, exc)
            self._ready_models.discard(name)
            await self._load_once(spec)
            return await self._infer_split(name, inputs, outputs, spec)

    async def _infer_split(
        self, name: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None, spec: ModelSpec | None
    ) -> dict[str, np.ndarray]:
        """A batch over the model's ``max_batch_size`` split into calls of at most that size,
        the outputs concatenated along axis 0; else one call."""
        limit = spec.max_batch_size if spec is not None else 0
        first = next(iter(inputs.values()))
        if limit > 0 and first.shape[0] > limit:
            parts = [
                await self._infer_once(name, {k: v[i : i + limit] for k, v in inputs.items()}, outputs)
                for i in range(0, first.shape[0], limit)
            ]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return await self._infer_once(name, inputs, outputs)

    async def _infer_once(
        self, name: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None
    ) -> dict[str, np.ndarray]:
        """One inference call, inputs made C-contiguous: through shared memory when the pool is on,
        every input is non-empty and the model's config is known; otherwise, or when that path
        gives up, over the wire. Raises :class:`RuntimeUnavailableError` when not started."""
        if self._client is None:
            raise RuntimeUnavailableError("Triton is not started")
        inputs = {k: np.ascontiguousarray(v) for k, v in inputs.items()}
        if self._shm is not None and all(v.nbytes > 0 for v in inputs.values()):
            info = await self._shm_model(name)
            if info is not None:
                result = await self._infer_shm(name, info, inputs, outputs)
                if result is not None:
                    return result
        return await self._infer_wire(name, inputs, outputs)

    async def _call(self, name: str, infer_inputs, requested):
        """One inference call; Triton's and the transport's errors mapped to ours."""
        from tritonclient.utils import InferenceServerException

        try:
            if self.protocol == "http":
                # tritonclient asks for gzip by default and mutates the headers it is given
                call = self._client.infer(name, infer_inputs, outputs=requested, headers={"Accept-Encoding": "identity"})
            else:
                call = self._client.infer(name, infer_inputs, outputs=requested)
            return await asyncio.wait_for(call, self.settings.infer_timeout_s)
        except InferenceServerException as exc:
            if self._restarting() or not await self._live():
                raise RuntimeUnavailableError(f"Triton is not live: {exc.message()}") from exc
            raise InferenceError(f"Triton failed on '{name}': {exc.message()}") from exc
        except TimeoutError as exc:
            raise RuntimeUnavailableError(
                f"Triton did not answer '{name}' within {self.settings.infer_timeout_s:g} s"
            ) from exc
        except OSError as exc:
            raise RuntimeUnavailableError(f"Triton at {self.url} is unreachable: {exc}") from exc
        except Exception as exc:  # e.g. a client closed under the call by a restart's reload
            if self._restarting() or not await self._live():
                raise RuntimeUnavailableError(f"Triton is not live: {type(exc).__name__}: {exc}") from exc
            raise InferenceError(f"Triton failed on '{name}': {type(exc).__name__}: {exc}") from exc

    def _requested(self, module, names: Sequence[str]):
        """``InferRequestedOutput`` objects of ``module`` for ``names`` (binary data over HTTP)."""
        if self.protocol == "http":
            return [module.InferRequestedOutput(o, binary_data=True) for o in names]
        return [module.InferRequestedOutput(o) for o in names]

    async def _infer_wire(
        self, name: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None
    ) -> dict[str, np.ndarray]:
        """One inference call with the tensors in the request and response bodies (binary data
        over HTTP). Returns the requested outputs, else every output the server returned, by
        name; errors as :meth:`_call`."""
        module = self._module()
        infer_inputs = []
        for key, value in inputs.items():
            tensor = module.InferInput(key, list(value.shape), NP_TO_TRITON[value.dtype])
            if self.protocol == "http":
                tensor.set_data_from_numpy(value, binary_data=True)
            else:
                tensor.set_data_from_numpy(value)
            infer_inputs.append(tensor)
        requested = self._requested(module, outputs) if outputs else None
        result = await self._call(name, infer_inputs, requested)
        names = list(outputs) if outputs else [o["name"] for o in self._output_names(result)]
        return {o: result.as_numpy(o) for o in names}

    # ------------------------------------------------------------ shared memory
    async def _shm_model(self, name: str) -> _ShmModel | None:
        """The model's tensor description from its Triton config (cached); None when the
        config cannot be read or has a tensor type we do not map (then: the wire)."""
        if name in self._shm_models:
            return self._shm_models[name]
        info = None
        try:
            if self.protocol == "grpc":
                config = (await self._client.get_model_config(name, as_json=True))["config"]
            else:
                config = await self._client.get_model_config(name)
            info = _ShmModel(
                batched=int(config.get("max_batch_size", 0) or 0) > 0,
                inputs={t["name"]: [int(d) for d in t.get("dims", [])] for t in config.get("input", [])},
                outputs={
                    t["name"]: (np.dtype(CONFIG_TO_NP[t.get("data_type", "TYPE_FP32")]), [int(d) for d in t.get("dims", [])])
                    for t in config.get("output", [])
                },
            )
        except Exception as exc:  # noqa: BLE001 (unknown model, odd type: the wire path reports it)
            log.debug("no shared memory for '%s': %s", name, exc)
            return None
        self._shm_models[name] = info
        return info

    async def _infer_shm(
        self, name: str, info: _ShmModel, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None
    ) -> dict[str, np.ndarray] | None:
        """Inputs (and outputs when their shapes are known) through a pooled region.
        None: a shared-memory problem; the caller repeats the call over the wire."""
        from tritonclient.utils import triton_to_np_dtype

        assert self._shm is not None
        names = list(outputs) if outputs else list(info.outputs)
        shapes = info.output_shapes(inputs, names)
        offsets: dict[str, int] = {}
        total = 0
        for key, value in inputs.items():
            offsets[key] = total
            total += _aligned(value.nbytes)
        out_offsets: dict[str, tuple[int, int]] = {}
        if shapes is not None:
            for n in names:
                nbytes = int(np.prod(shapes[n], dtype=np.int64)) * info.outputs[n][0].itemsize
                if nbytes == 0:
                    shapes = None
                    out_offsets.clear()
                    break
                out_offsets[n] = (total, nbytes)
                total += _aligned(nbytes)
        module = self._module()
        pool = self._shm

        try:
            region = await pool.acquire(self._client, total)
        except ShmUnavailable as exc:
            log.warning("Shared memory unavailable for '%s' (%s); this call goes over the wire", name, exc)
            return None
        except Exception as exc:  # noqa: BLE001 (tritonclient, aiohttp or gRPC errors alike)
            # the region could not be registered (e.g. Triton just resumed or restarting):
            # the wire call reports the server's state with the runtime's own errors
            log.debug("registering shared memory for '%s' failed (%s); this call goes over the wire", name, exc)
            return None
        done = False  # the server is finished with the region: it can go back to the pool
        try:
            infer_inputs = []
            for key, value in inputs.items():
                region.write(offsets[key], value)
                tensor = module.InferInput(key, list(value.shape), NP_TO_TRITON[value.dtype])
                tensor.set_shared_memory(region.name, value.nbytes, offsets[key])
                infer_inputs.append(tensor)
            requested = self._requested(module, names)
            for tensor, n in zip(requested, names):
                if n in out_offsets:
                    tensor.set_shared_memory(region.name, out_offsets[n][1], out_offsets[n][0])
            try:
                result = await self._call(name, infer_inputs, requested)
            except InferenceError as exc:
                done = True
                text = str(exc).lower()
                if "shared memory" not in text and "shm" not in text:
                    raise
                log.warning("Shared memory failed on '%s' (%s); repeating over the wire", name, exc)
                if out_offsets and "should be at least" in text:
                    info.rule = False  # outputs larger than derived: over the wire from now on
                    info.memo.pop(info._key(inputs), None)
                elif "unable to find" in text:  # a region this server does not know
                    await pool.reset(self._client)
                return None
            done = True
            got: dict[str, np.ndarray] = {}
            if out_offsets:
                for n in names:
                    shape, datatype = self._output_meta(result, n)
                    dtype = np.dtype(triton_to_np_dtype(datatype))
                    offset, room = out_offsets[n]
                    if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize > room:
                        raise InferenceError(f"Triton wrote more than the region holds for '{name}' output '{n}'")
                    got[n] = region.read(offset, dtype, shape)
            else:
                got = {n: result.as_numpy(n) for n in names}
                info.observe(inputs, {n: tuple(v.shape) for n, v in got.items()})
            return got
        finally:
            if done:
                pool.release(region)
            else:  # timed out or cancelled: the server may still write into it
                pool.discard(region)

    def _output_meta(self, result, name: str) -> tuple[list[int], str]:
        """``(shape, Triton datatype)`` of output ``name`` in ``result``, for either protocol.
        Raises :class:`InferenceError` when the result lacks that output."""
        output = result.get_output(name)
        if output is None:
            raise InferenceError(f"Triton returned no output '{name}'")
        if self.protocol == "grpc":
            return [int(d) for d in output.shape], output.datatype
        return [int(d) for d in output["shape"]], output["datatype"]

    def _module(self):
        """The ``tritonclient`` asyncio module of the protocol (``grpc.aio`` or ``http.aio``)."""
        if self.protocol == "grpc":
            import tritonclient.grpc.aio as module
        else:
            import tritonclient.http.aio as module
        return module

    def _output_names(self, result) -> list[dict]:
        """The output descriptions (dicts with a ``name``) of ``result``'s response, for either protocol."""
        response = result.get_response(as_json=True) if self.protocol == "grpc" else result.get_response()
        return response.get("outputs", [])
