"""Parsing of the ``entries`` form field, exactly as immich-ml ``get_entries``.

``entries`` is ``{task: {type: {"modelName": str, "options"?: object}}}``. Errors map as
upstream: JSON errors, a missing ``modelName`` (``KeyError``) and a non-object where an
object belongs (``AttributeError``) are 422 ``Invalid request format.``; an unknown model
(``ValueError``) and other type errors (``TypeError``) are not caught (HTTP 500).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .registry import resolve


class InvalidEntries(Exception):
    """422 ``{"detail":"Invalid request format."}``."""


@dataclass(frozen=True)
class InferenceEntry:
    name: str
    task: str
    type: str
    options: dict[str, Any] = field(default_factory=dict)


def parse_entries(
    entries: str, cache_folder: Path | None = None
) -> tuple[list[InferenceEntry], list[InferenceEntry]]:
    """Split the request into (entries without dependencies, entries with dependencies).
    ``cache_folder``: the model cache, where imported OCR models are found.

    Raises :class:`InvalidEntries` (422) or ``ValueError``/``TypeError`` (500).
    """
    without_deps: list[InferenceEntry] = []
    with_deps: list[InferenceEntry] = []
    try:
        request = orjson.loads(entries)
        for task, types in request.items():
            for type_, entry in types.items():
                parsed = InferenceEntry(
                    name=entry["modelName"], task=task, type=type_, options=entry.get("options", {})
                )
                _, depends = resolve(parsed.name, type_, task, cache_folder)
                (with_deps if depends else without_deps).append(parsed)
    except (orjson.JSONDecodeError, KeyError, AttributeError) as exc:
        raise InvalidEntries("Invalid request format.") from exc
    return without_deps, with_deps
