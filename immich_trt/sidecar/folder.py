"""``immich-trt ingest DIR``: ingest a whole folder through a running server's ``/v1/ingest``.

Files are hashed locally (imohash reads three 16 KiB samples, so this is cheap) and a
file whose content already has every requested task (and its thumbnail) stored is
skipped without uploading: an interrupted run resumes where it stopped, and a run over
a library ingested before thumbnails existed makes them. Uploads run with bounded
concurrency; transient failures (connection errors, 5xx) are retried with backoff.

A file the server refuses (4xx: undecodable, too large) is reported once and remembered
in a small JSON file (:class:`FailedFiles`, ``$IMMICH_TRT_DATA_DIR/ingest-failures.json``
by default) with its imohash; later runs skip it while its content is unchanged, unless
``--retry-failed``.

Problems that would fail every file stop the run at once with one line
(:class:`IngestAborted`): the folder missing, the server unreachable (before the first
upload, or for good in the middle of the run), the API key refused, no sidecar there.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
from imohash import hashfile
from tqdm import tqdm

from .. import contract
from ..config import clean_name

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif"}
RETRIES = 3
#: Name of the file that remembers refused files, in ``IMMICH_TRT_DATA_DIR``.
FAILURES_FILE = "ingest-failures.json"


class IngestAborted(Exception):
    """The folder ingest cannot go on: the message is the one line to print."""


class _Unreachable(Exception):
    """The server could not be reached after the retries (connection errors)."""


@dataclass
class FolderReport:
    ingested: int = 0
    skipped: int = 0
    failed: int = 0
    faces: int = 0
    failed_before: int = 0  # refused on an earlier run, unchanged since: not uploaded again
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"ingested": self.ingested, "skipped": self.skipped, "failed": self.failed, "faces": self.faces,
                "failedBefore": self.failed_before}


class FailedFiles:
    """Files the server refused, by absolute path: ``{path: {"imohash", "error", "at"}}``
    in a JSON file (written through a temporary file and renamed). A file is "known
    failed" while its imohash is the one recorded; an unreadable JSON file counts as empty."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, dict] = {}
        if path is not None and path.is_file():
            try:
                loaded = json.loads(path.read_text(encoding="utf-8"))
                self.entries = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                self.entries = {}
        self._dirty = False

    def known(self, path: str, digest: str) -> dict | None:
        entry = self.entries.get(path)
        return entry if isinstance(entry, dict) and entry.get("imohash") == digest else None

    def add(self, path: str, digest: str, error: str) -> None:
        self.entries[path] = {"imohash": digest, "error": error, "at": time.time()}
        self._dirty = True

    def forget(self, path: str) -> None:
        if self.entries.pop(path, None) is not None:
            self._dirty = True

    def save(self) -> None:
        """Write the file if anything changed (nothing without a path). Raises ``OSError``."""
        if self.path is None or not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(self.entries, out, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._dirty = False


def image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted; hidden entries left out)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in sorted(files) if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return found


async def check_server(session: aiohttp.ClientSession, base_url: str) -> None:
    """``GET /v1/status`` once before any upload. Raises :class:`IngestAborted` with the
    reason and the fix when the server is unreachable, refuses the key, or has no sidecar."""
    try:
        async with session.get(f"{base_url}/v1/status", timeout=aiohttp.ClientTimeout(total=30)) as response:
            status = response.status
            body = (await response.read())[:300].decode(errors="replace")
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise IngestAborted(
            f"cannot reach the server at {base_url} ({type(exc).__name__}: {exc}); start it "
            "(immich-trt serve) or pass --url"
        ) from None
    if status in (401, 403):
        raise IngestAborted(
            f"the server at {base_url} refused the request (HTTP {status}): set IMMICH_TRT_API_KEY to the server's "
            "key (a server without a key serves loopback clients only)"
        )
    if status == 404:
        raise IngestAborted(f"the server at {base_url} has no /v1 sidecar (IMMICH_TRT_SIDECAR=false there?)")
    if status != 200:
        raise IngestAborted(f"the server at {base_url} answered /v1/status with HTTP {status}: {body}")


async def ingest_folder(
    base_url: str,
    folder: Path,
    *,
    concurrency: int = 4,
    api_key: str | None = None,
    clip: bool = True,
    faces: bool = True,
    ocr: bool = True,
    progress: bool = True,
    failures: Path | None = None,
    retry_failed: bool = False,
) -> FolderReport:
    """Ingest every image of ``folder`` (see the module docstring). The file's
    absolute path is its ``assetId``. ``failures``: the JSON file of refused files
    (``None``: remember nothing); ``retry_failed``: upload them again.

    Raises :class:`IngestAborted` for a missing folder, a server that cannot be reached
    or refuses the key, or a server lost for good during the run."""
    folder = Path(folder)
    if not folder.is_dir():
        raise IngestAborted(f"{folder} is not a folder" if folder.exists() else f"{folder} does not exist")
    wanted = {
        task: clean_name(model)
        for task, model, on in (
            ("clip", contract.CLIP_MODEL, clip), ("faces", contract.FACE_MODEL, faces), ("ocr", contract.OCR_MODEL, ocr)
        )
        if on
    }
    files = image_files(folder)
    report = FolderReport()
    failed_files = FailedFiles(failures)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = asyncio.Semaphore(max(1, concurrency))
    lost: list[str] = []  # why the run stops (server gone, key refused): the first one is reported

    async def one(session: aiohttp.ClientSession, path: Path, bar: tqdm) -> None:
        async with limit:
            if lost:
                return
            key = str(path.resolve())
            digest = None
            try:
                digest = await asyncio.to_thread(hashfile, str(path), hexdigest=True)
                if not retry_failed and failed_files.known(key, digest) is not None:
                    report.failed_before += 1
                    return
                try:
                    async with session.get(f"{base_url}/v1/assets/{digest}") as response:
                        if response.status == 200:
                            asset = orjson.loads(await response.read())
                            done = asset.get("tasks", {})
                            ref_known = key in asset.get("refs", [])
                            # an asset stored before thumbnails existed is sent again for one
                            complete = asset.get("thumbnail", True) and all(
                                model in done.get(task, []) for task, model in wanted.items()
                            )
                            if ref_known and complete:
                                report.skipped += 1
                                failed_files.forget(key)
                                return
                        elif response.status != 404:
                            raise RuntimeError(f"GET asset: HTTP {response.status}")
                except aiohttp.ClientConnectionError as exc:
                    raise _Unreachable(f"{type(exc).__name__}: {exc}") from None
                data = await asyncio.to_thread(path.read_bytes)
                result = await _post_ingest(session, base_url, path, data, clip, faces, ocr)
                report.ingested += 1
                report.faces += result.get("faces", 0)
                failed_files.forget(key)
            except _Unreachable as exc:
                lost.append(f"lost the server at {base_url} while ingesting {path}: {exc}; the files done so far "
                            "are stored, and the next run resumes")
            except IngestAborted as exc:
                lost.append(str(exc))
            except _Refused as exc:
                report.failed += 1
                report.errors.append(f"{path}: {exc}")
                if digest is not None:
                    failed_files.add(key, digest, str(exc))
            except Exception as exc:  # noqa: BLE001 (one bad file never stops the folder)
                report.failed += 1
                report.errors.append(f"{path}: {exc}")
            finally:
                bar.update(1)

    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=600)) as session:
        await check_server(session, base_url)
        bar = tqdm(total=len(files), unit="img", disable=not progress)
        try:
            await asyncio.gather(*(one(session, path, bar) for path in files))
        finally:
            bar.close()
            try:
                failed_files.save()
            except OSError as exc:
                report.errors.append(f"cannot write {failures}: {exc}")
    if lost:
        raise IngestAborted(lost[0])
    return report


class _Refused(RuntimeError):
    """The server refused the file itself (4xx): not retried, remembered."""


async def _post_ingest(
    session: aiohttp.ClientSession, base_url: str, path: Path, data: bytes, clip: bool, faces: bool, ocr: bool
) -> dict:
    delay = 1.0
    for attempt in range(RETRIES + 1):
        form = aiohttp.FormData()
        form.add_field("image", data, filename=path.name, content_type="application/octet-stream")
        form.add_field("assetId", str(path.resolve()))
        form.add_field("filename", path.name)
        for name, on in (("clip", clip), ("faces", faces), ("ocr", ocr)):
            form.add_field(name, "true" if on else "false")
        try:
            async with session.post(f"{base_url}/v1/ingest", data=form) as response:
                body = await response.read()
                if response.status == 200:
                    return orjson.loads(body)
                if response.status in (401, 403):
                    raise IngestAborted(f"the server refused the upload (HTTP {response.status}): "
                                        f"{body[:200].decode(errors='replace')}")
                if response.status < 500:  # the file itself is bad: no retry
                    raise _Refused(f"HTTP {response.status}: {body[:200].decode(errors='replace')}")
                error, unreachable = f"HTTP {response.status}", False
        except aiohttp.ClientConnectionError as exc:
            error, unreachable = f"{type(exc).__name__}: {exc}", True
        if attempt < RETRIES:
            await asyncio.sleep(delay)
            delay *= 2
    if unreachable:
        raise _Unreachable(f"gave up after {RETRIES + 1} attempts: {error}")
    raise RuntimeError(f"gave up after {RETRIES + 1} attempts: {error}")
