"""``MACHINE_LEARNING_WORKERS``: several ``/predict`` processes behind one port, one Triton.

One ``immich-trt serve`` is one Python process with one event loop: with the models in
Triton on a GPU, its CPU work per request (HTTP, multipart, the gRPC call, postprocessing;
``bench/gpu_cpu_budget.md``) caps it near one core's worth of requests. With
``MACHINE_LEARNING_WORKERS=N`` (immich-ml's variable, gunicorn's workers upstream) the
server runs N processes that accept on the same port (``SO_REUSEPORT``: the kernel spreads
connections over them) and share one Triton:

* the **primary** (the process started) launches and supervises Triton as before, serves
  ``/predict``, the sidecar (``/v1``) and the page (``/ui``), and starts N - 1 workers
  once Triton is up; a worker that exits is started again (backoff up to 30 s);
* a **worker** (``immich-trt serve`` with ``IMMICH_TRT_WORKER_OF``) serves ``/predict``,
  ``/`` and ``/ping`` itself with ``TRITON_URL`` set to the primary's Triton, and passes
  every other request (the sidecar's, the page's) to the primary over loopback, after
  the same access rule (:mod:`immich_trt.web.access`: without ``IMMICH_TRT_API_KEY``,
  loopback clients only); ``/metrics`` on any connection is the sum over all processes.

Only a Triton whose repository is built before serving can be shared: the GPU target
(``IMMICH_TRT_PREPROCESS=gpu``) or a server given by ``TRITON_URL``. The in-process
runtime and Triton's CPU target (repository entries written on first use) run one
process and say why in one log line. Models stay loaded while several processes use them
(``MACHINE_LEARNING_MODEL_TTL`` is off: an unload seen by one process would cost the
others a reload), and record mode (``IMMICH_TRT_RECORD``), which stores results in the
primary's sidecar, needs one process (``ValueError`` at start).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import signal
import sys
from collections.abc import Iterable
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client.core import Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ..config import Settings
from ..runtime.launcher import die_with_parent, free_port
from ..web import METRICS, STATE, HTTPError
from ..web.access import DATA_PREFIX, PAGE_PREFIX, make_access_middleware
from .app import METRICS_OVERRIDE

log = logging.getLogger("immich_trt.server")

#: Set by the primary in each worker's environment: ``<index>:<primary's loopback
#: port>:<the worker's own loopback port>``.
WORKER_ENV = "IMMICH_TRT_WORKER_OF"
#: Headers that belong to one connection (RFC 9110 7.6.1), never passed on.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length",
})  # fmt: skip
#: Gauges whose processes share one value (the models are Triton's): the largest, not the sum.
SHARED_GAUGES = frozenset({"immich_trt_models_loaded"})
RESTART_BACKOFF_MAX_S = 30.0


@dataclasses.dataclass(frozen=True)
class WorkerRole:
    """What a worker process knows of its place: its index (1..N-1), the primary's
    loopback port (requests it does not serve itself) and its own loopback port (where
    the primary reads its metrics)."""

    index: int
    primary_port: int
    own_port: int

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> WorkerRole | None:
        """The role in ``environ`` (default ``os.environ``), None in the primary. Raises
        ``ValueError`` for a malformed value."""
        value = (os.environ if environ is None else environ).get(WORKER_ENV)
        if not value:
            return None
        try:
            index, primary, own = (int(part) for part in value.split(":"))
        except ValueError:
            raise ValueError(f"{WORKER_ENV} must be <index>:<port>:<port>, not {value!r}") from None
        return cls(index, primary, own)

    def env_value(self) -> str:
        return f"{self.index}:{self.primary_port}:{self.own_port}"


def process_count(settings: Settings, runtime_name: str) -> tuple[int, str | None]:
    """How many processes serve (``MACHINE_LEARNING_WORKERS``, at least 1) and, when fewer
    than asked, why (one log line). Raises ``ValueError`` for record mode with several."""
    asked = settings.workers
    if asked <= 1:
        return 1, None
    if runtime_name != "triton":
        return 1, (
            f"MACHINE_LEARNING_WORKERS={asked}: the in-process runtime serves from one process (its core plan "
            "already uses every core); running one"
        )
    if not settings.triton_url and settings.preprocess != "gpu":
        return 1, (
            f"MACHINE_LEARNING_WORKERS={asked}: Triton's CPU target writes its models on first use, in one "
            "process; several need the GPU target (IMMICH_TRT_PREPROCESS=gpu) or TRITON_URL; running one"
        )
    if settings.record:
        raise ValueError(
            f"IMMICH_TRT_RECORD stores /predict results in one process: set MACHINE_LEARNING_WORKERS=1 "
            f"(now {asked}) or turn record mode off"
        )
    return asked, None


def shared_settings(settings: Settings) -> Settings:
    """The primary's settings when it shares Triton with workers: no idle unload."""
    if settings.model_ttl > 0:
        log.info("MACHINE_LEARNING_MODEL_TTL=%s has no effect with several processes: models stay loaded",
                 settings.model_ttl)
    return dataclasses.replace(settings, model_ttl=0)


# ------------------------------------------------------------------ the primary


class WorkerPool:
    """The primary's workers: started once Triton is up, restarted when they exit,
    stopped (SIGTERM, then SIGKILL after ``stop_timeout_s``) at shutdown.

    With the launched Triton and shared memory on, each worker passes its tensors through
    system shared memory too, under the launcher's prefix plus its own (so a Triton
    restart's clean-up finds them); the regions of a worker that died are unregistered
    and unlinked before it starts again (``runtime.forget_shared_memory``)."""

    def __init__(self, count: int, primary_port: int, stop_timeout_s: float = 15.0) -> None:
        """``count`` workers (the processes besides the primary); ``primary_port`` is the
        primary's loopback port for the requests workers pass on."""
        self.stop_timeout_s = stop_timeout_s
        self.roles = [WorkerRole(i, primary_port, free_port()) for i in range(1, count + 1)]
        self.processes: dict[int, asyncio.subprocess.Process] = {}
        self.runtime = None  # the primary's runtime, from start()
        self._tasks: list[asyncio.Task] = []
        self._stopping = False

    def shm_prefix(self, role: WorkerRole, start: int) -> str | None:
        """The shared-memory prefix of ``role``'s ``start``-th process, None without it."""
        prefix = getattr(self.runtime, "shm_prefix", None)
        return f"{prefix}w{role.index}s{start}_" if prefix else None

    def environment(self, role: WorkerRole, triton_url: str, shm_prefix: str | None = None) -> dict[str, str]:
        """A worker's environment: the primary's, with its role, the primary's Triton (and
        its shared-memory prefix), no sidecar and no idle unload."""
        env = dict(os.environ)
        env.pop("IMMICH_TRT_TRITON_SHM_PREFIX", None)
        if shm_prefix:
            env["IMMICH_TRT_TRITON_SHM_PREFIX"] = shm_prefix
        env.update({
            WORKER_ENV: role.env_value(),
            "TRITON_URL": triton_url,
            "IMMICH_TRT_RUNTIME": "triton",
            "IMMICH_TRT_SIDECAR": "false",
            "MACHINE_LEARNING_WORKERS": "1",
            "MACHINE_LEARNING_MODEL_TTL": "0",
        })  # fmt: skip
        return env

    async def start(self, runtime) -> None:
        """Start every worker on ``runtime``'s Triton (its ``url``; returns once they are
        spawned, not when they listen)."""
        self._stopping = False
        self.runtime = runtime
        triton_url = runtime.url
        for role in self.roles:
            self._tasks.append(asyncio.create_task(self._supervise(role, triton_url)))
        log.info("Serving with %d processes (MACHINE_LEARNING_WORKERS): this one and %d workers on Triton %s",
                 len(self.roles) + 1, len(self.roles), triton_url)

    async def _spawn(self, role: WorkerRole, triton_url: str, shm_prefix: str | None) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "immich_trt", "serve",
            env=self.environment(role, triton_url, shm_prefix),
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
        )  # fmt: skip

    async def _supervise(self, role: WorkerRole, triton_url: str) -> None:
        delay = 0.5
        for start in itertools.count():
            if self._stopping:
                return
            shm_prefix = self.shm_prefix(role, start)
            try:
                process = await self._spawn(role, triton_url, shm_prefix)
            except OSError as exc:
                log.error("Worker %d could not start: %s; retrying in %.0f s", role.index, exc, delay)
                await asyncio.sleep(delay)
                delay = min(RESTART_BACKOFF_MAX_S, delay * 2)
                continue
            self.processes[role.index] = process
            started = asyncio.get_running_loop().time()
            code = await process.wait()
            if self._stopping:
                return
            if asyncio.get_running_loop().time() - started > 60:
                delay = 0.5  # it ran a while: a new failure, not a crash loop
            log.error("Worker %d (pid %d) exited with code %s; starting it again in %.1f s", role.index,
                      process.pid, code, delay)
            if shm_prefix:
                await self.runtime.forget_shared_memory(shm_prefix)
            await asyncio.sleep(delay)
            delay = min(RESTART_BACKOFF_MAX_S, delay * 2)

    async def stop(self) -> None:
        """SIGTERM every worker (graceful: requests in flight are answered), SIGKILL after
        ``stop_timeout_s``."""
        self._stopping = True
        running = [p for p in self.processes.values() if p.returncode is None]
        for process in running:
            try:
                process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        if running:
            await asyncio.wait([asyncio.create_task(p.wait()) for p in running], timeout=self.stop_timeout_s)
            for process in running:
                if process.returncode is None:
                    log.warning("Worker pid %d did not exit after SIGTERM; killing it", process.pid)
                    process.kill()
                    await process.wait()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def metrics_texts(self, session: aiohttp.ClientSession) -> list[str]:
        """Each running worker's own ``/metrics`` text (a worker that does not answer
        within 2 s is left out)."""

        async def one(role: WorkerRole) -> str | None:
            try:
                async with session.get(f"http://127.0.0.1:{role.own_port}/metrics",
                                       timeout=aiohttp.ClientTimeout(total=2)) as response:
                    return await response.text() if response.status == 200 else None
            except (aiohttp.ClientError, TimeoutError):
                return None

        return [text for text in await asyncio.gather(*(one(r) for r in self.roles)) if text is not None]


def merge_metrics(texts: Iterable[str]) -> bytes:
    """Prometheus text expositions of several processes as one: every sample summed over
    the processes (``_created`` samples: the earliest; :data:`SHARED_GAUGES`: the
    largest). Parsed and written by ``prometheus_client``."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple, float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            samples = values.setdefault(family.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in samples:
                    samples[key] = sample.value
                elif sample.name.endswith("_created"):
                    samples[key] = min(samples[key], sample.value)
                elif family.name in SHARED_GAUGES:
                    samples[key] = max(samples[key], sample.value)
                else:
                    samples[key] += sample.value
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)

    class _Merged:
        def collect(self):
            return list(families.values())

    return generate_latest(_Merged())  # type: ignore[arg-type]


# ------------------------------------------------------------------- a worker


def install_worker(app: web.Application, role: WorkerRole, settings: Settings) -> None:
    """Make ``app`` (the server application, sidecar off) a worker's: requests it has no
    route for go to the primary; ``/metrics`` is the primary's sum, except on the
    worker's own loopback port, where the primary reads this process's figures."""
    primary = f"http://127.0.0.1:{role.primary_port}"
    session_key = web.AppKey("worker_session", aiohttp.ClientSession)

    async def session_context(app: web.Application):
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            app[session_key] = session
            yield

    async def forward(request: web.Request) -> web.StreamResponse:
        """Pass ``request`` to the primary and its answer back, unchanged but for the
        connection's own headers (repeated headers kept; no time limit of its own: the
        primary's routes have theirs)."""
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        body = await request.read()
        try:
            async with app[session_key].request(
                request.method, primary + request.raw_path, headers=headers, data=body or None,
                allow_redirects=False, timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            ) as answer:
                payload = await answer.read()
                out_headers = [(k, v) for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP]
                return web.Response(status=answer.status, body=payload, headers=out_headers)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.error("Worker %d could not reach the primary process on 127.0.0.1:%d (%s: %s); the primary is "
                      "stopping or gone: see its log", role.index, role.primary_port, type(exc).__name__, exc)
            raise HTTPError(502, "the primary process did not answer", "primary_unreachable") from exc

    async def metrics(request: web.Request) -> web.Response | None:
        """Own figures on the own port, else the primary's sum."""
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        if sockname is not None and sockname[1] == role.own_port:
            return None
        return await forward(request)

    # the primary sees every passed request come from loopback: its access rule is
    # applied here, to the real client, with the same middlewares
    app.middlewares.append(make_access_middleware(settings.api_key, DATA_PREFIX))
    app.middlewares.append(make_access_middleware(settings.api_key, PAGE_PREFIX, data=False))
    app.cleanup_ctx.append(session_context)
    app[METRICS_OVERRIDE] = metrics
    app.router.add_route("*", "/{tail:.*}", forward)


# ------------------------------------------------------------ looking from outside


def workers_of(pid: int) -> dict[int, WorkerRole]:
    """The running workers of the primary ``pid``, by pid, with their roles (read from
    ``/proc``: their parent and ``IMMICH_TRT_WORKER_OF``; Linux)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != pid:
                continue
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        env = dict(item.decode(errors="replace").split("=", 1) for item in environ if b"=" in item)
        try:
            role = WorkerRole.from_env(env)
        except ValueError:
            continue
        if role is not None:
            found[int(stat.parent.name)] = role
    return found


async def wait_for_workers(pid: int, count: int, timeout_s: float = 90.0) -> dict[int, WorkerRole]:
    """Wait until the primary ``pid`` has ``count`` workers answering ``/ping`` on their
    own loopback ports; returns them (:func:`workers_of`). Raises ``TimeoutError``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with aiohttp.ClientSession() as session:
        while asyncio.get_running_loop().time() < deadline:
            workers = workers_of(pid)
            up = 0
            for role in workers.values():
                try:
                    async with session.get(f"http://127.0.0.1:{role.own_port}/ping",
                                           timeout=aiohttp.ClientTimeout(total=2)) as response:
                        up += response.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    pass
            if len(workers) == count and up == count:
                return workers
            await asyncio.sleep(0.3)
    raise TimeoutError(f"{count} workers of pid {pid} were not listening after {timeout_s:.0f} s")


# ----------------------------------------------------------------- the primary's app


def install_primary(app: web.Application, pool: WorkerPool) -> None:
    """Start ``pool`` on the application's runtime (Triton) once it is up, and stop it
    first at shutdown; ``/metrics`` becomes the sum over all processes."""
    session_key = web.AppKey("primary_session", aiohttp.ClientSession)

    async def lifespan(app: web.Application):
        async with aiohttp.ClientSession() as session:
            app[session_key] = session
            await pool.start(app[STATE].runtime)
            yield
            await pool.stop()

    async def metrics(request: web.Request) -> web.Response:
        own, _ = request.app[METRICS].render()
        body = merge_metrics([own.decode(), *await pool.metrics_texts(request.app[session_key])])
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.cleanup_ctx.append(lifespan)
    app[METRICS_OVERRIDE] = metrics

