"""A small synthetic photo library made for the test pack: what the web page's browser
tests ingest and what its screenshots show (no real photo is needed or committed).

* People: 640x640 pictures with "faces" as the small test-pack detector sees them (a
  white 32 px square on the 32 px grid, :func:`immich_trt.tools.testpack.square_face`),
  each inside a patch of its identity's colour. The small recognizer pools the aligned
  crop's colours (:func:`immich_trt.tools.testpack.arcface_model`), so red, green and
  blue surroundings give embeddings about orthogonal to each other (cosine < 0.1):
  three persons for Immich's clustering. Colours stay dark enough in the channel mean
  that nothing but the squares is a face.
* Text: grey words on a dark background, which PP-OCRv5 reads and the test detector
  ignores (grey 170 is below its threshold).
* Duplicates: one picture under two file names (an exact copy: one asset, two refs),
  one re-encoded as JPEG (a near duplicate: CLIP cosine 0.99999 with the test pack) and
  one brightened by 30 % (cosine 0.967: a near duplicate below 0.967 only, so the
  duplicate threshold changes the number of groups). Unrelated pictures stay below
  0.87.
"""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

SIZE = 640  # px: the detector's input size, so squares stay on its 32 px grid
IDENTITIES = {"red": (230, 0, 0), "green": (0, 210, 0), "blue": (0, 0, 230)}
TEXT_GREY = 170


@dataclass(frozen=True)
class DemoPhoto:
    """One file of the library: its ``name``, the ``identities`` of its faces (in the
    order of their squares), the ``words`` written on it."""

    name: str
    identities: tuple[str, ...] = ()
    words: tuple[str, ...] = ()


def _background(seed: int) -> np.ndarray:
    """Smooth colour blobs (a random 4x4 grid of channel values 0..120, scaled up
    bilinearly), different for every ``seed``: dark enough for the test detector, and
    different enough between pictures that no two are near duplicates by CLIP."""
    grid = np.random.default_rng(seed).integers(0, 121, (4, 4, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(grid).resize((SIZE, SIZE), Image.Resampling.BILINEAR)).copy()


def people_picture(faces: list[tuple[str, int, int]], seed: int) -> np.ndarray:
    """RGB uint8[640, 640, 3]: for each ``(identity, x, y)`` (multiples of 32) a 128 px
    patch of the identity's colour around a white 32 px square at ``(x, y)``."""
    image = _background(seed)
    for identity, x, y in faces:
        image[max(0, y - 48) : y + 80, max(0, x - 48) : x + 80] = IDENTITIES[identity]
    for _, x, y in faces:
        image[y : y + 32, x : x + 32] = 255
    return image


def text_picture(lines: tuple[str, ...], seed: int) -> np.ndarray:
    """RGB uint8[640, 640, 3]: ``lines`` in grey :data:`TEXT_GREY`, 48 px type, on a
    dark background."""
    picture = Image.fromarray(_background(seed))
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=48)
    for i, line in enumerate(lines):
        draw.text((48, 120 + i * 110), line, fill=(TEXT_GREY,) * 3, font=font)
    return np.asarray(picture)


PEOPLE: tuple[tuple[str, list[tuple[str, int, int]]], ...] = (
    ("beach-ada.png", [("red", 96, 96)]),
    ("garden-ada.png", [("red", 320, 192)]),
    ("kitchen-ada.png", [("red", 448, 448)]),
    ("party-ada-bob.png", [("red", 128, 320), ("green", 448, 160)]),
    ("park-bob.png", [("green", 192, 128)]),
    ("station-bob.png", [("green", 384, 384)]),
    ("bridge-bob.png", [("green", 96, 448)]),
    ("lake-cyd.png", [("blue", 256, 256)]),
    ("forest-cyd.png", [("blue", 448, 96)]),
    ("office-cyd.png", [("blue", 160, 416)]),
)
TEXTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("invoice.png", ("INVOICE 2041", "Total 129.50", "Paid by card")),
    ("menu.png", ("Cafe Menu", "Coffee 3.50", "Lemon cake 4.20")),
    ("sign.png", ("Platform 4", "Trains to Leeds")),
)


def make_demo_library(folder: Path) -> list[DemoPhoto]:
    """Write the library into ``folder`` (created) and describe it: 10 people pictures
    (3 identities, 11 faces), 3 with text, an exact copy of ``beach-ada.png``
    (``beach-ada-copy.png``), a JPEG re-encoding of ``lake-cyd.png``
    (``lake-cyd-small.jpg``) and a brightened ``garden-ada.png``
    (``garden-ada-bright.png``): 16 files, 15 distinct contents, 13 faces."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    photos: list[DemoPhoto] = []
    for seed, (name, faces) in enumerate(PEOPLE):
        Image.fromarray(people_picture(faces, seed)).save(folder / name)
        photos.append(DemoPhoto(name, identities=tuple(identity for identity, _, _ in faces)))
    for seed, (name, lines) in enumerate(TEXTS, start=len(PEOPLE)):
        Image.fromarray(text_picture(lines, seed)).save(folder / name)
        photos.append(DemoPhoto(name, words=lines))
    (folder / "beach-ada-copy.png").write_bytes((folder / "beach-ada.png").read_bytes())
    photos.append(DemoPhoto("beach-ada-copy.png", identities=("red",)))
    out = io.BytesIO()
    Image.open(folder / "lake-cyd.png").convert("RGB").save(out, format="JPEG", quality=90)
    (folder / "lake-cyd-small.jpg").write_bytes(out.getvalue())
    photos.append(DemoPhoto("lake-cyd-small.jpg", identities=("blue",)))
    ImageEnhance.Brightness(Image.open(folder / "garden-ada.png").convert("RGB")).enhance(1.3).save(
        folder / "garden-ada-bright.png"
    )
    photos.append(DemoPhoto("garden-ada-bright.png", identities=("red",)))
    return photos


@dataclass
class DemoLibrary:
    """The demo library served by a started :class:`immich_trt.tools.testing.LiveServer`:
    ``folder`` holds the files; with ``by_path`` they were ingested by ``immich-trt
    ingest`` (refs are absolute paths), else through ``/v1/ingest`` with their file names
    as refs."""

    server: object
    folder: Path
    photos: list[DemoPhoto]
    by_path: bool
    key: str | None = None

    @property
    def url(self) -> str:
        return self.server.url

    def ref(self, name: str) -> str:
        """The ref of the library file ``name``, URL-encoded for ``/v1/assets/{ref}``."""
        import urllib.parse

        return urllib.parse.quote(str((self.folder / name).resolve()) if self.by_path else name, safe="")

    def call(self, path: str, body: dict | None = None, method: str | None = None) -> dict:
        """``/v1`` JSON call (GET without ``body``, else POST); raises ``urllib.error.HTTPError``."""
        import json
        import urllib.request

        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers=headers,
                                         method=method or ("GET" if body is None else "POST"))
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())

    def asset(self, name: str) -> dict:
        """The stored asset of the library file ``name``."""
        return self.call(f"/v1/assets/{self.ref(name)}")

    def stop(self) -> None:
        self.server.stop()


async def _ingest_by_name(library: DemoLibrary) -> None:
    """POST every file of ``library`` to ``/v1/ingest`` with its file name as ref."""
    import aiohttp

    headers = {"Authorization": f"Bearer {library.key}"} if library.key else {}
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=600)) as session:
        for photo in library.photos:
            form = aiohttp.FormData()
            form.add_field("image", (library.folder / photo.name).read_bytes(), filename=photo.name)
            form.add_field("assetId", photo.name)
            form.add_field("filename", photo.name)
            async with session.post(f"{library.url}/v1/ingest", data=form) as response:
                if response.status != 200:
                    raise RuntimeError(f"ingesting {photo.name} failed: HTTP {response.status} {await response.text()}")


def serve_demo_library(
    cache_folder: Path, work_dir: Path, env: dict[str, str] | None = None, by_path: bool = True
) -> DemoLibrary:
    """Start ``immich-trt serve`` (:class:`immich_trt.tools.testing.LiveServer`, ``env``
    added to its environment) and fill its sidecar with the demo library written to
    ``work_dir/library``: ingested by ``immich-trt ingest`` (a subprocess, with the
    server's API key when ``env`` sets one) with ``by_path``, else through
    ``/v1/ingest`` with file names as refs (what screenshots show); then clustered and
    grouped into duplicates. The caller stops it (:meth:`DemoLibrary.stop`). Raises
    ``RuntimeError`` when the ingestion fails."""
    import json
    import os
    import subprocess
    import sys

    from .testing import LiveServer

    folder = Path(work_dir) / "library"
    photos = make_demo_library(folder)
    key = (env or {}).get("IMMICH_TRT_API_KEY")
    library = DemoLibrary(LiveServer(cache_folder, work_dir, env).start(), folder, photos, by_path, key)
    try:
        if by_path:
            done = subprocess.run(
                [sys.executable, "-m", "immich_trt", "ingest", str(folder), "--url", library.url, "--quiet"],
                capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})},
            )
            report = json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else {}
            if done.returncode != 0 or report.get("failed"):
                raise RuntimeError(f"ingesting the demo library failed: {done.stdout} {done.stderr[-2000:]}")
        else:
            asyncio.run(_ingest_by_name(library))
        library.call("/v1/faces/cluster", {})
        library.call("/v1/duplicates/find", {})
    except BaseException:
        library.stop()
        raise
    return library
