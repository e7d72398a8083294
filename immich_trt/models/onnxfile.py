"""Reading and writing ONNX files: parse errors as load errors, atomic writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .base import ModelLoadError


def load_onnx(model_file: Path):
    """Parse an ONNX file (weights included). Raises :class:`ModelLoadError` with
    ``corrupt=True`` when it is not a valid ONNX protobuf."""
    import onnx

    try:
        return onnx.load(str(model_file), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise ModelLoadError(f"cannot read {model_file}: {exc}", corrupt=True) from exc


def save_onnx_atomic(model, dest: Path) -> Path:
    """Write ``model`` to ``dest`` through a temporary file and ``os.replace``."""
    import onnx

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".model.", suffix=".onnx", dir=dest.parent)
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def is_up_to_date(derived: Path, source: Path) -> bool:
    """Whether a file derived from ``source`` exists and is not older than it."""
    return derived.is_file() and derived.stat().st_mtime >= source.stat().st_mtime
