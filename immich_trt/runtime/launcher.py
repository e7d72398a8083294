"""Launches the Triton Inference Server bundled in the ``nvidia-pytriton`` wheel, or a
full installation (``IMMICH_TRT_TRITON_SERVER``, e.g. ``/opt/tritonserver`` in NVIDIA's
image, for TensorRT and DALI models).

Used when no ``TRITON_URL`` is given. The server runs on free loopback ports in
explicit model-control mode over the repository under ``engines/``, with the python
backend (the wheel's ``libtriton_python.so`` and the stub for this Python version).
:meth:`TritonLauncher.start` waits for ``/v2/health/ready``; a watchdog restarts the
server if it dies and calls ``on_restart`` so the runtime can load its models again;
:meth:`TritonLauncher.stop` sends SIGTERM and, after the exit timeout, SIGKILL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import socket
import sys
import sysconfig
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

log = logging.getLogger("immich_trt.triton")


#: How often the RSS guard reads the server's resident memory (seconds).
RSS_CHECK_S = 10.0


def _rss_mb(pid: int) -> int:
    """Resident memory of one process in MB (``/proc/PID/statm``); 0 when it is gone."""
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE") // 2**20


class TritonLaunchError(RuntimeError):
    """The bundled Triton server is missing, failed to start, or never became ready."""


@dataclass(frozen=True)
class TritonInstallation:
    """Files of a Triton server: the one shipped in the ``nvidia-pytriton`` wheel
    (python backend only), or a full installation such as ``/opt/tritonserver`` in
    NVIDIA's Triton image (TensorRT, DALI, python backends): ``backends`` is then its
    backend directory and ``stub`` is ``None``."""

    binary: Path
    python_backend: Path
    stub: Path | None
    libs: Path | None
    backends: Path | None = None

    @classmethod
    def at(cls, root: Path) -> TritonInstallation:
        """A full installation under ``root`` (``bin/tritonserver``, ``backends/``).
        Raises :class:`TritonLaunchError` if its server binary is missing."""
        root = Path(root)
        found = cls(
            binary=root / "bin" / "tritonserver",
            python_backend=root / "backends" / "python" / "libtriton_python.so",
            stub=None,
            libs=root / "lib" if (root / "lib").is_dir() else None,
            backends=root / "backends",
        )
        if not found.binary.exists():
            raise TritonLaunchError(f"no Triton server at {found.binary} (IMMICH_TRT_TRITON_SERVER)")
        return found

    @classmethod
    def find(cls, root: Path | None = None) -> TritonInstallation:
        """The installation under ``root`` when given, else the wheel's files.
        Raises :class:`TritonLaunchError` if absent."""
        if root is not None:
            return cls.at(root)
        try:
            import pytriton  # noqa: PLC0415
        except ImportError as exc:
            raise TritonLaunchError("nvidia-pytriton is not installed; set TRITON_URL or IMMICH_TRT_RUNTIME=onnxruntime") from exc
        root = Path(pytriton.__file__).parent / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        site = Path(pytriton.__file__).parents[1]
        found = cls(
            binary=root / "bin" / "tritonserver",
            python_backend=root / "backends" / "python" / "libtriton_python.so",
            stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
            libs=site / "nvidia_pytriton.libs",
        )
        for path in (found.binary, found.python_backend, found.stub):
            if not path.exists():
                raise TritonLaunchError(f"Triton file missing from the nvidia-pytriton wheel: {path}")
        return found


def die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: deliver SIGTERM to the child when the parent dies, so no Triton outlives us."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


#: Lines a CPU-only host always prints (no CUDA driver, NVML or DCGM): not errors here.
_HARMLESS = ("CudaDriverHelper", "NVML", "DCGM", "cuda", "CUDA", "GPU metrics")
_TRITON_LINE = re.compile(r"^([EWI])\d{4} ")


def triton_log_level(line: str) -> int:
    """Logging level for a Triton output line (``E``/``W``/``I`` prefixes)."""
    if any(word in line for word in _HARMLESS):
        return logging.DEBUG
    match = _TRITON_LINE.match(line)
    if match is None:
        return logging.DEBUG
    return {"E": logging.ERROR, "W": logging.WARNING}.get(match.group(1), logging.DEBUG)


async def _accepts(port: int) -> bool:
    """Whether a TCP connection to the loopback port succeeds."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    except (TimeoutError, OSError):
        return False
    writer.close()
    return True


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TritonLauncher:
    """Runs one local ``tritonserver`` process and keeps it alive."""

    def __init__(
        self,
        repository: Path,
        work_dir: Path,
        start_timeout_s: float = 120.0,
        exit_timeout_s: int = 5,
        on_restart: Callable[[], Awaitable[None]] | None = None,
        server_root: Path | None = None,
        max_rss_mb: int = 0,
    ) -> None:
        self.repository = Path(repository).resolve()
        self.work_dir = Path(work_dir)
        self.start_timeout_s = start_timeout_s
        self.exit_timeout_s = exit_timeout_s
        self.on_restart = on_restart
        self.server_root = server_root  # a full Triton installation; None = the wheel's
        self.http_port = self.grpc_port = self.metrics_port = 0
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        #: True from the moment the watchdog sees the server exit until the new one is up
        #: and ``on_restart`` (the runtime's model reload) has returned.
        self.restarting = False
        #: RSS bound of the tritonserver process (MB; 0 = none): above it the server is
        #: stopped gracefully and started again, a bound on its slow growth under load.
        self.max_rss_mb = max_rss_mb
        self.recycles = 0
        self._recycling = False
        self._rss_guard_task: asyncio.Task | None = None
        self._watchdog: asyncio.Task | None = None
        self._log_task: asyncio.Task | None = None
        self._stopping = False
        self.shm_prefix = f"immich_trt_{os.getpid()}_{id(self) & 0xFFFF:x}_"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def _backend_dir(self, install: TritonInstallation) -> Path:
        """``<work>/backends/python/``: links to the wheel's python backend files
        (library, ``triton_python_backend_utils.py``...) plus the stub for this Python;
        a full installation's own backend directory as it is."""
        if install.backends is not None:
            return install.backends
        assert install.stub is not None
        backend = self.work_dir / "backends" / "python"
        backend.mkdir(parents=True, exist_ok=True)
        for src in install.python_backend.parent.iterdir():
            dest = backend / src.name
            if not dest.exists() and not src.name.startswith("__"):
                dest.symlink_to(src)
        stub = backend / install.stub.name
        if not stub.exists():
            shutil.copy2(install.stub, stub)
        return backend.parent

    def _environment(self, install: TritonInstallation) -> dict[str, str]:
        env = dict(os.environ)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        # Without the interpreter's LIBDIR the stub loads the system libpython.
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(install.libs or ""), libdir, env.get("LD_LIBRARY_PATH", "")) if p
        )
        env["IMMICH_TRT_SITE_PACKAGES"] = sysconfig.get_paths()["purelib"]
        # the configs' instance_group gpus are MACHINE_LEARNING_DEVICE_IDS, nvidia-smi's
        # indices (PCI bus order); CUDA numbers devices fastest first unless told otherwise
        env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        return env

    async def start(self) -> None:
        """Start the server and wait until it is ready. Raises :class:`TritonLaunchError`."""
        self._stopping = False
        await self._spawn()
        if self._watchdog is None:
            self._watchdog = asyncio.create_task(self._watch())
        if self._rss_guard_task is None:
            self._rss_guard_task = asyncio.create_task(self._rss_guard())

    async def _spawn(self) -> None:
        install = TritonInstallation.find(self.server_root)
        self.repository.mkdir(parents=True, exist_ok=True)
        backends = self._backend_dir(install)
        if not self.http_port:
            self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        args = [
            str(install.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            "--model-control-mode=explicit",
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=true",
            f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            # our own shared-memory prefix, so stale regions are ours to remove
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            "--log-verbose=0",
        ]
        log.info("Starting Triton: %s", " ".join(args))
        started = time.monotonic()
        self.process = await asyncio.create_subprocess_exec(
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self._environment(install),
            start_new_session=True,
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
        )
        self._log_task = asyncio.create_task(self._relay_logs(self.process))
        await self._wait_ready(started)
        log.info("Triton ready on http %s, grpc %s after %.1f s", self.http_url, self.grpc_url, time.monotonic() - started)

    async def _relay_logs(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line:
                log.log(triton_log_level(line), "%s", line)

    async def _wait_ready(self, started: float) -> None:
        url = f"http://{self.http_url}/v2/health/ready"
        async with aiohttp.ClientSession() as session:
            while time.monotonic() - started < self.start_timeout_s:
                if self.process is None or self.process.returncode is not None:
                    raise TritonLaunchError(f"Triton exited with code {self.process.returncode if self.process else '?'} during start")
                try:
                    async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
                        if response.status == 200 and await _accepts(self.grpc_port):
                            return
                except (TimeoutError, aiohttp.ClientError):
                    pass
                await asyncio.sleep(0.1)
        await self._terminate()
        raise TritonLaunchError(f"Triton was not ready after {self.start_timeout_s:.0f} s")

    async def _watch(self) -> None:
        """Restart the server when it exits unexpectedly."""
        while not self._stopping:
            process = self.process
            if process is None:
                return
            # not process.wait(): it also waits for the output pipe to close, and backend
            # stubs that outlive a killed server keep it open
            while process.returncode is None:
                await asyncio.sleep(0.2)
            code = process.returncode
            if self._stopping:
                return
            self.restarting = True
            try:
                await self._restart(process, code)
            finally:
                self.restarting = False

    async def _rss_guard(self) -> None:
        """Every :data:`RSS_CHECK_S`, stop the server gracefully (SIGTERM: it finishes the
        calls in flight within its exit timeout) when its own RSS is over ``max_rss_mb``;
        the watchdog starts it again and the runtime reloads the models, while calls wait."""
        while not self._stopping:
            await asyncio.sleep(RSS_CHECK_S)
            process = self.process
            if not self.max_rss_mb or process is None or process.returncode is not None:
                continue
            if self.restarting or self._recycling:
                continue
            rss_mb = _rss_mb(process.pid)
            if rss_mb > self.max_rss_mb:
                log.warning(
                    "Triton holds %d MB (IMMICH_TRT_TRITON_MAX_RSS_MB=%d); restarting it, requests wait for it",
                    rss_mb, self.max_rss_mb,
                )
                self._recycling = True
                try:
                    process.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    self._recycling = False

    async def _restart(self, process: asyncio.subprocess.Process, code: int | None) -> None:
        """Kill what is left of the dead server, start a new one (retrying with backoff) and
        let the runtime reload its models (``on_restart``)."""
        try:  # the stubs of the dead server (its process group), hung or not
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self._recycling:  # stopped by the RSS guard: expected, already logged
            self._recycling = False
            self.recycles += 1
        else:
            self.restarts += 1
            log.error("Triton exited unexpectedly (code %s); restarting (restart #%d)", code, self.restarts)
        self._remove_shared_memory()
        delay = min(30.0, 0.5 * 2 ** min(self.restarts, 6))
        while not self._stopping:
            try:
                await self._spawn()
                break
            except TritonLaunchError as exc:
                log.error("Triton restart failed: %s; retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
        if self.on_restart is not None and not self._stopping:
            try:
                await self.on_restart()
            except Exception:
                log.exception("Reloading models after a Triton restart failed")

    async def _terminate(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            await asyncio.wait_for(process.wait(), self.exit_timeout_s + 5)
        except TimeoutError:
            log.warning("Triton did not exit after SIGTERM; killing it")
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await process.wait()

    async def stop(self) -> None:
        """Stop the server (and its backend stubs) and the watchdog."""
        self._stopping = True
        if self._rss_guard_task is not None:
            self._rss_guard_task.cancel()
            self._rss_guard_task = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        await self._terminate()
        if self._log_task is not None:
            self._log_task.cancel()
            self._log_task = None
        self._remove_shared_memory()

    def _remove_shared_memory(self) -> None:
        """Delete shared-memory regions a crashed stub may have left behind."""
        for path in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            try:
                path.unlink()
            except OSError:
                pass
