"""The errors of obtaining and loading a model's files (used by the model classes and by
the ONNX file helpers below them)."""

from __future__ import annotations

from pathlib import Path


class ModelLoadError(Exception):
    """A model's files could not be obtained or the runtime refused to load them.

    ``corrupt=True`` says the cached file itself is bad (unreadable protobuf, wrong
    checksum), so the cache folder is cleared before the retry, as upstream does.
    """

    def __init__(self, message: str, *, corrupt: bool = False) -> None:
        super().__init__(message)
        self.corrupt = corrupt


class ModelDownloadError(ModelLoadError):
    """A model file is not in the cache and downloading it failed.

    ``expected``: the file the cache should hold (``<cache>/<task>/<model>/<type>/model.onnx``);
    ``source``: where it was downloaded from (a URL or a Hugging Face repository);
    ``reason``: why the download failed, one line."""

    def __init__(self, message: str, *, expected: Path, source: str, reason: str) -> None:
        super().__init__(message)
        self.expected = expected
        self.source = source
        self.reason = reason
