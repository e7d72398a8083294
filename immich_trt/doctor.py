"""``immich-trt doctor``: what stands between this machine and a working server, and the fix.

Checks, in order, with the settings ``serve`` would use:

* the model cache folder (``MACHINE_LEARNING_CACHE_FOLDER``): there and writable, or creatable;
* each of Immich's default models (CLIP ``ViT-B-32__openai`` visual and textual, faces
  ``buffalo_l`` detection and recognition, OCR ``PP-OCRv5_mobile`` detection and
  recognition): its file present and loadable (parsed, prepared and loaded into an
  in-process ONNX Runtime, as the server loads it), or, when missing, whether its download
  location answers (or an installed package holds it);
* Triton, when the runtime is ``triton``: ``TRITON_URL`` answering its liveness check, or
  the Triton installation that ``serve`` launches present; the model repository writable;
* the sidecar's data folder (``IMMICH_TRT_DATA_DIR``): writable or creatable, and its
  ``sidecar.db`` readable with a schema this version knows;
* OpenSearch, when ``OPENSEARCH_URL`` is set: answering.

Each finding is one line: ``ok``, ``warn`` (works, but look) or ``FAIL`` (something
required is wrong), with the fix. The exit status is 1 when any check failed, else 0.
Nothing is downloaded and the store is opened read-only.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from . import contract
from .config import Settings
from .models import advice

#: Immich's default models: ``(task, model, type)``.
DEFAULT_MODELS = (
    ("clip", contract.CLIP_MODEL, "visual"),
    ("clip", contract.CLIP_MODEL, "textual"),
    ("facial-recognition", contract.FACE_MODEL, "detection"),
    ("facial-recognition", contract.FACE_MODEL, "recognition"),
    ("ocr", contract.OCR_MODEL, "detection"),
    ("ocr", contract.OCR_MODEL, "recognition"),
)


@dataclass(frozen=True)
class Finding:
    """One line of the report: ``status`` is ``ok``, ``warn`` or ``FAIL``."""

    status: str
    subject: str
    detail: str

    def line(self) -> str:
        return f"{self.status:<4}  {self.subject}: {self.detail}"


def _writable_or_creatable(folder: Path) -> str | None:
    """``None`` when ``folder`` is a writable folder or could be created; else why not."""
    if folder.exists():
        if not folder.is_dir():
            return f"{folder} is not a folder"
        return None if os.access(folder, os.W_OK | os.X_OK) else f"{folder} is not writable"
    parent = folder.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{folder} cannot be created: {parent} is not a folder"
    return None if os.access(parent, os.W_OK | os.X_OK) else f"{folder} cannot be created: {parent} is not writable"


def reachable(url: str, timeout_s: float = 5.0) -> str | None:
    """``None`` when ``url`` answers an HTTP ``HEAD`` with a status below 400 (after
    redirects); else why not, one line (connection refused, a timeout, ``HTTP 404``)."""
    try:
        request = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(request, timeout=timeout_s):
            return None
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except urllib.error.URLError as exc:
        return str(exc.reason)
    except (OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"


def check_cache(settings: Settings) -> Finding:
    folder = settings.cache_folder
    problem = _writable_or_creatable(folder)
    if problem is not None:
        return Finding("FAIL", "model cache", f"{problem} (MACHINE_LEARNING_CACHE_FOLDER); missing models cannot be "
                       "downloaded into it. To fix: make it writable or set MACHINE_LEARNING_CACHE_FOLDER to a "
                       "writable folder")
    if not folder.exists():
        return Finding("ok", "model cache", f"{folder} does not exist yet; it is created by the first download")
    return Finding("ok", "model cache", f"{folder} (writable)")


async def check_model(settings: Settings, task: str, name: str, model_type: str) -> Finding:
    """Present and loadable, or missing and obtainable (see the module docstring)."""
    from .models import build_model
    from .models.base import ModelContext, ModelLoadError
    from .models.registry import ModelTask, ModelType, resolve
    from .runtime.onnxruntime import OnnxRuntime

    subject = f"{task} {name} {model_type}"
    runtime = OnnxRuntime()
    ctx = ModelContext(settings=settings, runtime=runtime)
    source, _ = resolve(name, model_type, task)
    model = build_model(source, name, ModelType(model_type), ModelTask(task), ctx, {})
    try:
        if not model.model_file.is_file():
            if model.has_offline_copy():
                return Finding("ok", subject, f"not in the cache yet; taken from an installed package on first use "
                               f"({model.model_file})")
            url = model.download_source()
            why = reachable(url)
            if why is None:
                return Finding("warn", subject, f"not in the cache ({model.model_file}); it is downloaded from {url} "
                               "on first use, and that location answers")
            return Finding("FAIL", subject, f"not in the cache: expected {model.model_file}; its download location "
                           f"{url} does not answer ({why}). To fix: "
                           + advice.fixes(name, task, model_type, settings.cache_folder, url) + ".")
        try:
            await model.load()
        except ModelLoadError as exc:
            return Finding("FAIL", subject, f"{model.model_file} cannot be loaded: {exc}. To fix: delete "
                           f"{model.model_file.parent} and fetch it again: `{advice.cli_command()} models fetch "
                           f"{name} --task {task} --type {model_type}`")
        if model.test_pack:
            return Finding("warn", subject, advice.placeholder_loaded(
                name, task, model_type, settings.cache_folder, model.model_file, model.test_pack))
        return Finding("ok", subject, f"{model.model_file} loads")
    finally:
        await model.unload()
        await runtime.stop()


async def check_triton(settings: Settings) -> list[Finding]:
    from .runtime.select import choose_runtime

    choice = choose_runtime(settings)
    if choice.name != "triton":
        return [Finding("ok", "runtime", f"in-process ONNX Runtime ({choice.reason}); no Triton needed")]
    findings = []
    if settings.triton_url:
        from .runtime.triton import TritonRuntime

        runtime = TritonRuntime(settings)
        try:
            await runtime.start()
            live = await runtime.ready()
        except Exception as exc:  # noqa: BLE001 (any failure to connect is the finding)
            live, detail = False, f"{type(exc).__name__}: {exc}"
        else:
            detail = "no answer to its liveness check within 2 s"
        finally:
            await runtime.stop()
        if live:
            findings.append(Finding("ok", "Triton", f"{settings.triton_url} ({settings.triton_protocol}) is live"))
        else:
            findings.append(Finding(
                "FAIL", "Triton", f"TRITON_URL={settings.triton_url} ({settings.triton_protocol}) does not answer: "
                f"{detail}. To fix: start that Triton, or unset TRITON_URL to launch the bundled one, or set "
                "IMMICH_TRT_RUNTIME=onnxruntime to run the models in-process"))
    else:
        from .runtime.launcher import TritonInstallation, TritonLaunchError

        try:
            install = TritonInstallation.find(settings.triton_server)
        except TritonLaunchError as exc:
            findings.append(Finding("FAIL", "Triton", f"{exc}. To fix: reinstall (pip install -e .) or set "
                                    "IMMICH_TRT_RUNTIME=onnxruntime to run the models in-process"))
        else:
            findings.append(Finding("ok", "Triton", f"launched by serve from {install.binary}"))
    problem = _writable_or_creatable(settings.engines_dir)
    if problem is not None:
        findings.append(Finding("FAIL", "model repository", f"{problem} (IMMICH_TRT_ENGINES_DIR): Triton's models "
                                "are written there. To fix: make it writable or set IMMICH_TRT_ENGINES_DIR"))
    else:
        state = "writable" if settings.engines_dir.exists() else "created on first use"
        findings.append(Finding("ok", "model repository", f"{settings.engines_dir} ({state})"))
    return findings


def check_data_dir(settings: Settings) -> Finding:
    from .sidecar.store import DB_NAME, MIGRATIONS

    if not settings.sidecar:
        return Finding("ok", "sidecar data", "the sidecar is off (IMMICH_TRT_SIDECAR=false)")
    folder = settings.data_dir
    problem = _writable_or_creatable(folder)
    if problem is not None:
        return Finding("FAIL", "sidecar data", f"{problem} (IMMICH_TRT_DATA_DIR): the server cannot start its store. "
                       "To fix: make it writable or set IMMICH_TRT_DATA_DIR to a writable folder")
    db = folder / DB_NAME
    if not db.exists():
        return Finding("ok", "sidecar data", f"{folder}: no store yet; {DB_NAME} is created on the first start")
    try:
        conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            assets = conn.execute("SELECT count(*) FROM assets").fetchone()[0] if version else 0
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        return Finding("FAIL", "sidecar data", f"{db} cannot be read: {exc}. To fix: restore it from a backup "
                       "(immich-trt backup; README \"Backup and restore\") or move it away to start an empty store")
    if version > len(MIGRATIONS):
        return Finding("FAIL", "sidecar data", f"{db} has schema version {version}; this immich-trt knows up to "
                       f"{len(MIGRATIONS)}. To fix: run the newer immich-trt that wrote it, or restore a backup")
    return Finding("ok", "sidecar data", f"{db} (schema {version}, {assets} assets)")


def check_opensearch(settings: Settings) -> Finding | None:
    if not settings.opensearch_url:
        return None
    from .sidecar.opensearch import make_client, redact_url

    url = redact_url(settings.opensearch_url)
    client = make_client(settings.opensearch_url, timeout_s=5.0)
    try:
        info = client.info()
    except Exception as exc:  # noqa: BLE001 (the client raises its own and urllib3's errors)
        why = (str(exc).splitlines() or [""])[0][:200]
        return Finding("FAIL", "OpenSearch", f"OPENSEARCH_URL={url} does not answer: {type(exc).__name__}: {why}. "
                       "To fix: start OpenSearch (the store keeps every change until it answers) or unset "
                       "OPENSEARCH_URL")
    finally:
        client.close()
    version = (info.get("version") or {}).get("number", "?")
    return Finding("ok", "OpenSearch", f"{url} answers (version {version})")


async def diagnose(settings: Settings) -> list[Finding]:
    """Every finding, in the order of the module docstring."""
    findings = [check_cache(settings)]
    for task, name, model_type in DEFAULT_MODELS:
        findings.append(await check_model(settings, task, name, model_type))
    findings += await check_triton(settings)
    findings.append(check_data_dir(settings))
    opensearch = await asyncio.to_thread(check_opensearch, settings)
    if opensearch is not None:
        findings.append(opensearch)
    return findings


def run(settings: Settings) -> int:
    """Print the findings; 1 when one of them is ``FAIL``, else 0."""
    findings = asyncio.run(diagnose(settings))
    for finding in findings:
        print(finding.line(), flush=True)
    failed = sum(f.status == "FAIL" for f in findings)
    warned = sum(f.status == "warn" for f in findings)
    print(f"{failed} problem(s), {warned} warning(s)" if failed or warned else "everything looks right")
    return 1 if failed else 0
