"""Triton Inference Server runtime (``tritonclient`` asyncio clients, gRPC or HTTP).

With ``TRITON_URL`` unset, a local server is launched from the ``nvidia-pytriton`` wheel
(:mod:`.launcher`) over the repository in ``IMMICH_TRT_ENGINES_DIR``; models missing
from that repository are written on first use (:mod:`.repository`, CPU target) and
loaded in explicit model-control mode. With ``TRITON_URL`` set, the server is used as
it is (e.g. NVIDIA's image serving TensorRT plans of the same names) and models are
loaded through its repository API when it allows it.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..config import Settings
from .base import InferenceError, ModelSpec, Runtime, RuntimeUnavailableError
from .launcher import TritonLaunchError, TritonLauncher
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


class TritonRuntime(Runtime):
    """Runs models on a Triton server; see the module docstring."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.protocol = settings.triton_protocol
        self.repository = settings.engines_dir
        self.launcher: TritonLauncher | None = None
        self._work_dir: tempfile.TemporaryDirectory | None = None
        self._client = None
        self._specs: dict[str, ModelSpec] = {}
        self._ready_models: set[str] = set()
        self._lock = asyncio.Lock()

    # ----------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        if self.settings.triton_url:
            return self.settings.triton_url
        assert self.launcher is not None
        return self.launcher.grpc_url if self.protocol == "grpc" else self.launcher.http_url

    async def start(self) -> None:
        if not self.settings.triton_url:
            self._work_dir = tempfile.TemporaryDirectory(prefix="immich-trt-triton-")
            self.launcher = TritonLauncher(
                self.repository,
                Path(self._work_dir.name),
                start_timeout_s=self.settings.triton_start_timeout_s,
                on_restart=self._reload_all,
                server_root=self.settings.triton_server,
            )
            try:
                await self.launcher.start()
            except TritonLaunchError:
                await self.stop()
                raise
        self._client = self._make_client()

    def _make_client(self):
        url = self.url
        if "://" in url:
            url = url.split("://", 1)[1]
        if self.protocol == "grpc":
            import tritonclient.grpc.aio as grpcclient

            return grpcclient.InferenceServerClient(url)
        import tritonclient.http.aio as httpclient

        return httpclient.InferenceServerClient(url, conn_limit=64)

    async def stop(self) -> None:
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
        if self._client is None:
            return False
        try:
            return bool(await self._client.is_server_live())
        except Exception:
            return False

    async def _reload_all(self) -> None:
        """After a restart of the local server: load every model that was loaded.

        gRPC keeps a connection backoff for a while after the outage, so loads are
        retried for up to ``triton_start_timeout_s``."""
        if self._client is not None:
            await self._client.close()
        self._client = self._make_client()
        names = list(self._ready_models)
        self._ready_models.clear()
        deadline = asyncio.get_running_loop().time() + self.settings.triton_start_timeout_s
        for name in names:
            while True:
                try:
                    await self.load(self._specs[name])
                    break
                except (InferenceError, RuntimeUnavailableError) as exc:
                    if asyncio.get_running_loop().time() > deadline:
                        log.error("Could not reload '%s' after a Triton restart: %s", name, exc)
                        break
                    await asyncio.sleep(0.5)
        log.info("Reloaded %d model(s) after a Triton restart", len(names))

    # -------------------------------------------------------------------- models
    async def load(self, spec: ModelSpec) -> None:
        from tritonclient.utils import InferenceServerException

        if self._client is None:
            raise RuntimeUnavailableError("Triton is not started")
        async with self._lock:
            self._specs[spec.name] = spec
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
                if not await self._live():  # e.g. restarting after a crash: retryable
                    raise RuntimeUnavailableError(f"Triton is not live: {exc.message()}") from exc
                raise InferenceError(f"Triton could not load '{spec.name}': {exc.message()}") from exc
            except (OSError, asyncio.TimeoutError) as exc:
                raise RuntimeUnavailableError(f"Triton at {self.url} is unreachable: {exc}") from exc
            self._ready_models.add(spec.name)

    async def unload(self, name: str) -> None:
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
        spec = self._specs.get(name)
        limit = spec.max_batch_size if spec is not None else 0
        if spec is not None and name not in self._ready_models:
            await self.load(spec)  # e.g. lost in a restart of the local server
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
        from tritonclient.utils import InferenceServerException

        if self._client is None:
            raise RuntimeUnavailableError("Triton is not started")
        module = self._module()
        infer_inputs = []
        for key, value in inputs.items():
            value = np.ascontiguousarray(value)
            tensor = module.InferInput(key, list(value.shape), NP_TO_TRITON[value.dtype])
            if self.protocol == "http":
                tensor.set_data_from_numpy(value, binary_data=True)
            else:
                tensor.set_data_from_numpy(value)
            infer_inputs.append(tensor)
        requested = None
        if outputs:
            requested = [
                module.InferRequestedOutput(o, binary_data=True) if self.protocol == "http" else module.InferRequestedOutput(o)
                for o in outputs
            ]
        try:
            if self.protocol == "http":
                # tritonclient asks for gzip by default and mutates the headers it is given
                call = self._client.infer(name, infer_inputs, outputs=requested, headers={"Accept-Encoding": "identity"})
            else:
                call = self._client.infer(name, infer_inputs, outputs=requested)
            result = await asyncio.wait_for(call, self.settings.infer_timeout_s)
        except InferenceServerException as exc:
            if not await self._live():
                raise RuntimeUnavailableError(f"Triton is not live: {exc.message()}") from exc
            raise InferenceError(f"Triton failed on '{name}': {exc.message()}") from exc
        except asyncio.TimeoutError as exc:
            raise RuntimeUnavailableError(
                f"Triton did not answer '{name}' within {self.settings.infer_timeout_s:g} s"
            ) from exc
        except OSError as exc:
            raise RuntimeUnavailableError(f"Triton at {self.url} is unreachable: {exc}") from exc
        names = list(outputs) if outputs else [o["name"] for o in self._output_names(result)]
        return {o: result.as_numpy(o) for o in names}

    def _module(self):
        if self.protocol == "grpc":
            import tritonclient.grpc.aio as module
        else:
            import tritonclient.http.aio as module
        return module

    def _output_names(self, result) -> list[dict]:
        response = result.get_response(as_json=True) if self.protocol == "grpc" else result.get_response()
        return response.get("outputs", [])
