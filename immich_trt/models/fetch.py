"""Obtaining and listing model files outside a running server (``immich-trt models``)."""

from __future__ import annotations

from pathlib import Path

from ..config import Settings
from .base import ModelContext
from .registry import ModelTask, ModelType, resolve


def ensure_model_files(settings: Settings, name: str, task: str, model_type: str) -> list[Path]:
    """Download (or take offline) the files of one Immich model into the cache.

    Returns the model's files. Raises ``ValueError`` for an unknown model and
    :class:`~immich_trt.models.base.ModelLoadError` when the files cannot be had."""
    from . import build_model

    source, _ = resolve(name, model_type, task, settings.cache_folder)
    ctx = ModelContext(settings=settings)  # prepares files only: no runtime
    model = build_model(source, name, ModelType(model_type), ModelTask(task), ctx, {})
    model._obtain()  # noqa: SLF001 - the one public way in without a runtime
    folder = model.cache_dir / str(model.type)
    return sorted(p for p in folder.iterdir() if p.is_file())


def list_cache(cache_folder: Path) -> list[tuple[str, str, str, str, str]]:
    """``(task, model, type, size in MiB, note)`` for every ``model.onnx`` in an Immich
    cache; the note is ``test pack: <mark>`` for a test-pack file, else empty."""
    from .onnxfile import marked_test_pack

    rows = []
    for path in sorted(Path(cache_folder).glob("*/*/*/model.onnx")):
        model_type, model, task = path.parent.name, path.parent.parent.name, path.parent.parent.parent.name
        mark = marked_test_pack(path)
        note = f"test pack: {mark}" if mark else ""
        rows.append((task, model, model_type, f"{path.stat().st_size / 2**20:.1f}", note))
    return rows
