"""Decoding the sidecar's uploads: what ``/predict`` decodes, plus HEIC/HEIF originals.

Immich sends its ML service previews (JPEG/WebP), never HEIC, and immich-ml answers a
HEIC upload with a 500; ``/predict`` keeps that answer. The sidecar ingests originals,
and most phone libraries are HEIC, so its uploads that Pillow cannot read are tried with
pillow-heif's decoder (libheif), called directly: its Pillow opener is never registered,
so ``/predict`` in the same process still refuses HEIC as immich-ml does.
"""

from __future__ import annotations

from PIL import Image

from ..models.transforms import ImageTooLarge, UndecodableImage, decode_pil


def decode_heif(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Decode the primary image of a HEIC/HEIF file to RGB (8 bits per channel; the
    container's rotation and mirroring applied by libheif, EXIF orientation not applied,
    as :func:`decode_pil`).

    Raises :class:`ImageTooLarge` when its size exceeds ``max_pixels`` (checked before
    the pixels are decoded) and :class:`UndecodableImage` for bytes libheif cannot read."""
    import pillow_heif

    try:
        heif = pillow_heif.open_heif(data, convert_hdr_to_8bit=True)
        width, height = heif.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageTooLarge.of(width, height, max_pixels)
        image = heif.to_pillow()
        image.info.clear()  # EXIF, ICC and friends: the pixels are what is stored
        return image if image.mode == "RGB" else image.convert("RGB")
    except ImageTooLarge:
        raise
    except Exception as exc:  # libheif's HeifError, ValueError, ... for bytes it cannot decode
        raise UndecodableImage(type(exc).__name__) from exc


def decode_upload(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """An uploaded image as RGB: :func:`~immich_trt.models.transforms.decode_pil` (what
    ``/predict`` decodes), else, for HEIC/HEIF bytes, :func:`decode_heif`.

    Raises :class:`ImageTooLarge` and :class:`UndecodableImage` as those do."""
    try:
        return decode_pil(data, max_pixels)
    except UndecodableImage:
        import pillow_heif

        if not pillow_heif.is_supported(data):
            raise
    return decode_heif(data, max_pixels)
