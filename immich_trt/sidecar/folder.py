"""``immich-trt ingest DIR``: ingest a whole folder through a running server's ``/v1/ingest``.

Files are hashed locally (imohash reads three 16 KiB samples, so this is cheap) and a
file whose content already has every requested task stored is skipped without
uploading: an interrupted run resumes where it stopped. Uploads run with bounded
concurrency; transient failures (connection errors, 5xx) are retried with backoff.
"""

from __future__ import annotations

import asyncio
import os
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


@dataclass
class FolderReport:
    ingested: int = 0
    skipped: int = 0
    failed: int = 0
    faces: int = 0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"ingested": self.ingested, "skipped": self.skipped, "failed": self.failed, "faces": self.faces}


def image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted; hidden entries left out)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in sorted(files) if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return found


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
) -> FolderReport:
    """Ingest every image of ``folder`` (see the module docstring). The file's
    absolute path is its ``assetId``."""
    wanted = {
        task: clean_name(model)
        for task, model, on in (
            ("clip", contract.CLIP_MODEL, clip), ("faces", contract.FACE_MODEL, faces), ("ocr", contract.OCR_MODEL, ocr)
        )
        if on
    }
    files = image_files(Path(folder))
    report = FolderReport()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = asyncio.Semaphore(max(1, concurrency))
    bar = tqdm(total=len(files), unit="img", disable=not progress)

    async def one(session: aiohttp.ClientSession, path: Path) -> None:
        async with limit:
            try:
                digest = await asyncio.to_thread(hashfile, str(path), hexdigest=True)
                async with session.get(f"{base_url}/v1/assets/{digest}") as response:
                    if response.status == 200:
                        asset = orjson.loads(await response.read())
                        done = asset.get("tasks", {})
                        ref_known = str(path.resolve()) in asset.get("refs", [])
                        if ref_known and all(model in done.get(task, []) for task, model in wanted.items()):
                            report.skipped += 1
                            return
                    elif response.status != 404:
                        raise RuntimeError(f"GET asset: HTTP {response.status}")
                data = await asyncio.to_thread(path.read_bytes)
                result = await _post_ingest(session, base_url, path, data, clip, faces, ocr)
                report.ingested += 1
                report.faces += result.get("faces", 0)
            except Exception as exc:  # noqa: BLE001 (one bad file never stops the folder)
                report.failed += 1
                report.errors.append(f"{path}: {exc}")
            finally:
                bar.update(1)

    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=600)) as session:
        await asyncio.gather(*(one(session, path) for path in files))
    bar.close()
    return report


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
                if response.status < 500:  # the file itself is bad: no retry
                    raise RuntimeError(f"HTTP {response.status}: {body[:200].decode(errors='replace')}")
                error = f"HTTP {response.status}"
        except aiohttp.ClientConnectionError as exc:
            error = f"{type(exc).__name__}: {exc}"
        if attempt < RETRIES:
            await asyncio.sleep(delay)
            delay *= 2
    raise RuntimeError(f"gave up after {RETRIES + 1} attempts: {error}")
