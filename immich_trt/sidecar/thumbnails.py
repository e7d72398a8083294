"""Small pictures the web page shows, made once while the image is decoded anyway.

* Asset thumbnails: the whole image, longest side at most :data:`ASSET_SIZE` px, WebP,
  stored in ``asset_thumbnails`` at ingestion and in record mode; an asset ingested
  before they existed gets one when its file is ingested again (nothing else is
  recomputed). The picture is in the pixel frame the models saw (no EXIF rotation,
  as Immich's ML service), so face boxes and OCR polygons overlay it exactly.
* Face thumbnails: the face box widened by :data:`FACE_MARGIN` per side, longest side
  at most :data:`FACE_SIZE` px, JPEG, stored in ``faces.thumbnail``.

Pages never read an original file: everything they show comes from these rows. Both
kinds are written once and never change (ids are never reused), so they are served
with long-lived caching headers.
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO

import numpy as np
from PIL import Image

from .errors import NotFound
from .store import Store

ASSET_SIZE = 256  # px, longest side of an asset thumbnail
ASSET_QUALITY = 80  # WebP quality
ASSET_MEDIA_TYPE = "image/webp"
FACE_SIZE = 160  # px, longest side of a stored face crop
FACE_MARGIN = 0.25  # of the box size, added on each side
FACE_QUALITY = 85  # JPEG quality
FACE_MEDIA_TYPE = "image/jpeg"


@dataclass(frozen=True)
class Thumbnail:
    """An encoded thumbnail: ``data`` (WebP), ``width`` and ``height`` in pixels."""

    data: bytes
    width: int
    height: int


def asset_thumbnail(image: Image.Image) -> Thumbnail:
    """WebP of ``image`` scaled (Lanczos, aspect kept) so that its longest side is at
    most :data:`ASSET_SIZE` px; never enlarged. Any mode is converted to RGB."""
    small = image.convert("RGB") if image.mode != "RGB" else image.copy()
    small.thumbnail((ASSET_SIZE, ASSET_SIZE), Image.Resampling.LANCZOS)
    out = BytesIO()
    small.save(out, format="WEBP", quality=ASSET_QUALITY)
    return Thumbnail(out.getvalue(), small.width, small.height)


def face_thumbnail(image: Image.Image, box: tuple[float, float, float, float]) -> bytes:
    """JPEG of the face ``box`` (x1, y1, x2, y2 pixels) widened by :data:`FACE_MARGIN`
    per side, clipped to the image, longest side at most :data:`FACE_SIZE` px."""
    x1, y1, x2, y2 = box
    mx, my = (x2 - x1) * FACE_MARGIN, (y2 - y1) * FACE_MARGIN
    left, top = max(0, int(x1 - mx)), max(0, int(y1 - my))
    right, bottom = min(image.width, int(np.ceil(x2 + mx))), min(image.height, int(np.ceil(y2 + my)))
    crop = image.crop((left, top, max(right, left + 1), max(bottom, top + 1)))
    crop.thumbnail((FACE_SIZE, FACE_SIZE))
    out = BytesIO()
    crop.convert("RGB").save(out, format="JPEG", quality=FACE_QUALITY)
    return out.getvalue()


def has_asset_thumbnail(store: Store, asset_id: int) -> bool:
    """Whether asset ``asset_id`` has a stored thumbnail."""
    return store.conn.execute("SELECT 1 FROM asset_thumbnails WHERE asset = ?", (asset_id,)).fetchone() is not None


def save_asset_thumbnail(store: Store, asset_id: int, thumbnail: Thumbnail, now: float) -> bool:
    """Store the thumbnail of ``asset_id`` unless it has one (call inside the writing
    transaction); returns whether it was written."""
    cursor = store.conn.execute(
        "INSERT OR IGNORE INTO asset_thumbnails (asset, width, height, data, created_at) VALUES (?, ?, ?, ?, ?)",
        (asset_id, thumbnail.width, thumbnail.height, thumbnail.data, now),
    )
    return cursor.rowcount > 0


def read_asset_thumbnail(store: Store, asset_id: int) -> tuple[bytes, str]:
    """``(WebP bytes, imohash)`` of asset ``asset_id``'s thumbnail (the imohash names its
    content, for an ETag). Raises :class:`NotFound` for an unknown asset or one without
    a thumbnail (ingested before thumbnails existed: ingest its file again)."""
    row = store.conn.execute(
        "SELECT t.data, a.imohash FROM assets a LEFT JOIN asset_thumbnails t ON t.asset = a.id WHERE a.id = ?",
        (int(asset_id),),
    ).fetchone()
    if row is None:
        raise NotFound(f"asset {asset_id} not found")
    if row[0] is None:
        raise NotFound(f"asset {asset_id} has no thumbnail (ingest its file again to make one)")
    return bytes(row[0]), row[1]


def read_face_thumbnail(store: Store, face_id: int) -> tuple[bytes, str]:
    """``(JPEG bytes, imohash of its asset)`` of face ``face_id``'s crop. Raises
    :class:`NotFound` for an unknown face or one stored without a crop."""
    row = store.conn.execute(
        "SELECT f.thumbnail, a.imohash FROM faces f JOIN assets a ON a.id = f.asset WHERE f.id = ?", (int(face_id),)
    ).fetchone()
    if row is None:
        raise NotFound(f"face {face_id} not found")
    if row[0] is None:
        raise NotFound(f"face {face_id} has no thumbnail")
    return bytes(row[0]), row[1]
