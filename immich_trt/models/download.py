"""Obtaining model files the way immich-ml does, atomically.

* CLIP and faces: a Hugging Face snapshot of ``immich-app/<model>`` into the model's
  cache folder, skipping ``*.armnn``/``*.rknn`` (immich-ml ``InferenceModel._download``).
* OCR: RapidOCR's ModelScope URL for the file, checked against its SHA-256
  (RapidOCR 3.8.1 ``default_models.yaml`` and ``DownloadFile``).
* Offline: OCR files from an installed package (``immich_trt.models.ocr.catalog``);
  a recognizer's characters that its file lacks come from the package's dict file,
  copied next to the model as :data:`DICT_FILENAME`.

Every file lands through a temporary file in the destination folder and ``os.replace``,
so a crash or a failed download never leaves a partial ``model.onnx``; the folders a
failed download created are removed again when they hold no file (:func:`new_folder`).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: Characters of a recognizer that carries none in its ONNX metadata (one per line).
DICT_FILENAME = "characters.txt"

CHUNK = 1 << 20


class DownloadError(OSError):
    """A model file could not be downloaded or failed its checksum."""

    @property
    def reason(self) -> str:
        """Why, in one line: the cause's first line (the Hugging Face client adds a
        paragraph of generic advice after it)."""
        cause = self.__cause__ if self.__cause__ is not None else self
        text = str(cause).strip() or type(cause).__name__
        if isinstance(cause, urllib.error.URLError) and not isinstance(cause, urllib.error.HTTPError):
            text = str(cause.reason)
        first = text.splitlines()[0].strip()
        if first.startswith("Got: "):  # huggingface_hub's wording of a transport error
            first = first[len("Got: "):]
        return first[:300]


@dataclass(frozen=True)
class RemoteFile:
    """A file under the RapidOCR base URL with its expected SHA-256."""

    path: str
    sha256: str


#: RapidOCR 3.8.1 ``default_models.yaml``, ``onnxruntime`` / ``PP-OCRv5`` section.
OCR_DETECTION_FILES = {
    "mobile": RemoteFile("det/ch_PP-OCRv5_det_mobile.onnx", "4d97c44a20d30a81aad087d6a396b08f786c4635742afc391f6621f5c6ae78ae"),
    "server": RemoteFile("det/ch_PP-OCRv5_det_server.onnx", "0f8846b1d4bba223a2a2f9d9b44022fbc22cc019051a602b41a7fda9667e4cad"),
}
OCR_RECOGNITION_FILES = {
    ("CH", "mobile"): RemoteFile("rec/ch_PP-OCRv5_rec_mobile.onnx", "5825fc7ebf84ae7a412be049820b4d86d77620f204a041697b0494669b1742c5"),
    ("CH", "server"): RemoteFile("rec/ch_PP-OCRv5_rec_server.onnx", "e09385400eaaaef34ceff54aeb7c4f0f1fe014c27fa8b9905d4709b65746562a"),
    ("EN", "mobile"): RemoteFile("rec/en_PP-OCRv5_rec_mobile.onnx", "c3461add59bb4323ecba96a492ab75e06dda42467c9e3d0c18db5d1d21924be8"),
    ("LATIN", "mobile"): RemoteFile("rec/latin_PP-OCRv5_rec_mobile.onnx", "b20bd37c168a570f583afbc8cd7925603890efbcdc000a59e22c269d160b5f5a"),
    ("ESLAV", "mobile"): RemoteFile("rec/eslav_PP-OCRv5_rec_mobile.onnx", "08705d6721849b1347d26187f15a5e362c431963a2a62bfff4feac578c489aab"),
    ("KOREAN", "mobile"): RemoteFile("rec/korean_PP-OCRv5_rec_mobile.onnx", "cd6e2ea50f6943ca7271eb8c56a877a5a90720b7047fe9c41a2e541a25773c9b"),
    ("TH", "mobile"): RemoteFile("rec/th_PP-OCRv5_rec_mobile.onnx", "de541dd83161c241ff426f7ecfd602a0ba77d686cf3ab9a6c255ea82fd08006e"),
    ("EL", "mobile"): RemoteFile("rec/el_PP-OCRv5_rec_mobile.onnx", "b4368bccd557123c702b7549fee6cd1e94b581337d1c9b65310f109131542b7f"),
}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_target(dest: Path) -> tuple[int, str]:
    dest.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)


@contextmanager
def new_folder(folder: Path) -> Iterator[Path]:
    """Create ``folder`` (and its missing parents) for a download; if the body raises,
    remove again every folder this created that holds no file (a failed download leaves
    no empty model folder behind; a partial file kept for a resumed download stays).

    Only empty folders are removed (``os.rmdir``, deepest first), so a file another
    process writes meanwhile is never lost."""
    created: list[Path] = []
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        created.append(probe)
        probe = probe.parent
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    except BaseException:
        for top in created:  # deepest first
            if top.is_dir():
                for root, _, _ in os.walk(top, topdown=False):
                    try:
                        os.rmdir(root)
                    except OSError:  # holds a file: keep it
                        pass
        raise


def download_url(url: str, dest: Path, sha256: str | None = None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` through a temporary file, verifying ``sha256``.

    Raises :class:`DownloadError` on network errors, HTTP errors, a body shorter than
    its ``Content-Length`` (a connection cut midway) or a checksum mismatch; ``dest`` is
    then untouched, and folders created for it are removed again (:func:`new_folder`).
    """
    with new_folder(dest.parent):
        return _download_url(url, dest, sha256, timeout)


def _download_url(url: str, dest: Path, sha256: str | None, timeout: float) -> Path:
    fd, tmp = _atomic_target(dest)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    expected = response.headers.get("Content-Length")
                    received = 0
                    while chunk := response.read(CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        received += len(chunk)
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                raise DownloadError(f"download of {url} failed: {exc}") from exc
        if expected is not None and expected.isdigit() and received != int(expected):
            raise DownloadError(f"download of {url} failed: incomplete, {received} of {expected} bytes")
        if sha256 is not None and digest.hexdigest() != sha256.lower():
            raise DownloadError(f"checksum mismatch for {url}: expected {sha256}, got {digest.hexdigest()}")
        os.replace(tmp, dest)
        log.info("Downloaded %s to %s", url, dest)
        return dest
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def copy_atomic(src: Path, dest: Path) -> Path:
    """Copy ``src`` to ``dest`` through a temporary file and ``os.replace``."""
    fd, tmp = _atomic_target(dest)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
            shutil.copyfileobj(f, out, CHUNK)
        os.replace(tmp, dest)
        return dest
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def hf_snapshot(repo_id: str, local_dir: Path, endpoint: str | None = None) -> Path:
    """Download a Hugging Face model repository into ``local_dir``, as immich-ml does
    for ONNX (``ignore_patterns=["*.armnn", "*.rknn"]``).

    huggingface_hub downloads each file to an ``.incomplete`` file and renames it.
    Raises :class:`DownloadError` when the hub cannot be reached or has no such repo;
    folders created for it that hold no file are then removed (:func:`new_folder`).
    """
    with new_folder(local_dir):
        return _hf_snapshot(repo_id, local_dir, endpoint)


def _hf_snapshot(repo_id: str, local_dir: Path, endpoint: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        snapshot_download(
            repo_id,
            cache_dir=local_dir,
            local_dir=local_dir,
            ignore_patterns=["*.armnn", "*.rknn"],
            endpoint=endpoint,
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError, KeyError, AssertionError) as exc:
        raise DownloadError(f"download of Hugging Face repository {repo_id} failed: {exc}") from exc
    except Exception as exc:  # the hub client's own transport errors (e.g. a connection cut midway)
        raise DownloadError(
            f"download of Hugging Face repository {repo_id} failed: {type(exc).__name__}: {exc}"
        ) from exc
    return local_dir
