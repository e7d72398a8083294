"""The image known from its header (``EncodedImage``, the GPU path): size, formats and
the pixel bound without a decode; pixels decoded once, on first need, equal to
``decode_pil``'s; errors as ``decode_pil`` raises them. Decodes are counted by wrapping
``transforms._decode_rgb``, the one function that decodes pixels."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED_DATA, requires_data
from immich_trt.models.transforms import (
    EncodedImage,
    ImageTooLarge,
    UndecodableImage,
    decode_pil,
    encoded_bytes,
    open_encoded,
    pixels,
)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def gradient(mode: str = "RGB", size: tuple[int, int] = (64, 48)) -> Image.Image:
    x = np.linspace(0, 255, size[0], dtype=np.uint8)
    rgb = np.stack(np.broadcast_arrays(x[None, :], x[::-1, None][: size[1]], 128 * np.ones((size[1], 1), np.uint8)), -1)
    return Image.fromarray(np.ascontiguousarray(rgb)).convert(mode)


def test_the_header_gives_size_format_and_mode_without_a_decode(decodes) -> None:
    data = encode(gradient(), "JPEG", quality=90)
    image = open_encoded(data)
    assert (image.size, image.width, image.height, image.format, image.mode) == ((64, 48), 64, 48, "JPEG", "RGB")
    assert image.gpu_decodable and encoded_bytes(image) is data
    assert decodes == []
    assert "not decoded" in repr(image)


def test_pixels_are_decoded_once_and_equal_decode_pil(decodes) -> None:
    data = encode(gradient(), "PNG")
    image = open_encoded(data)
    first, second = pixels(image), pixels(image)
    assert first is second and decodes == [len(data)]
    reference = decode_pil(data)
    assert first.mode == "RGB" and np.array_equal(np.asarray(first), np.asarray(reference))
    assert encoded_bytes(first) == encoded_bytes(reference) == data
    assert pixels(reference) is reference  # a decoded image is its own pixels


def test_concurrent_steps_share_one_decode(decodes) -> None:
    data = encode(gradient(size=(1200, 900)), "JPEG", quality=95)
    image = open_encoded(data)
    barrier = threading.Barrier(8)
    got: list[Image.Image] = []

    def step() -> None:
        barrier.wait()
        got.append(pixels(image))

    threads = [threading.Thread(target=step) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == 8 and all(g is got[0] for g in got)
    assert decodes == [len(data)]


@pytest.mark.parametrize(
    ("mode", "fmt", "gpu"),
    [("RGB", "JPEG", True), ("L", "JPEG", True), ("RGB", "WEBP", True), ("L", "PNG", True), ("CMYK", "JPEG", False),
     ("P", "PNG", False), ("RGBA", "PNG", False), ("RGB", "TIFF", False), ("RGB", "BMP", False)],
)  # fmt: skip
def test_only_what_the_gpu_decodes_as_pillow_keeps_its_bytes(mode: str, fmt: str, gpu: bool, decodes) -> None:
    data = encode(gradient(mode), fmt)
    image = open_encoded(data)
    assert image.mode == mode and image.gpu_decodable is gpu
    assert (encoded_bytes(image) is not None) is gpu
    assert decodes == []
    # the decision from the header is decode_pil's, made after its decode
    assert (encoded_bytes(decode_pil(data)) is not None) is gpu
    assert np.array_equal(np.asarray(pixels(image)), np.asarray(decode_pil(data)))


@requires_data
def test_every_real_image_reads_the_same_from_its_header_as_after_a_decode() -> None:
    """Mode and size from the header alone are what ``decode_pil`` sees after
    ``load()`` on every photo and OCR image (the GPU path's decision is the CPU path's)."""
    checked = 0
    for path in sorted((SHARED_DATA / "photos").iterdir()) + sorted((SHARED_DATA / "ocr").iterdir()):
        if path.suffix == ".md":
            continue
        data = path.read_bytes()
        try:
            decoded = decode_pil(data)
        except UndecodableImage:
            continue  # e.g. HEIC without its plugin: undecodable on both paths
        image = open_encoded(data)
        assert image.size == decoded.size, path.name
        assert (encoded_bytes(image) is not None) == (encoded_bytes(decoded) is not None), path.name
        checked += 1
    assert checked >= 30


def test_bound_and_bad_headers_raise_at_open(decodes) -> None:
    data = encode(gradient(size=(400, 300)), "PNG")
    with pytest.raises(ImageTooLarge, match="120000 pixels"):
        open_encoded(data, max_pixels=1000)
    with pytest.raises(UndecodableImage, match="UnidentifiedImageError"):
        open_encoded(b"not an image at all")
    assert decodes == []


def test_pixels_pillow_cannot_decode_raise_when_asked_for_every_time() -> None:
    data = encode(gradient(size=(640, 480)), "JPEG", quality=95)
    image = open_encoded(data[: len(data) // 2])  # a valid header, truncated pixels
    assert image.size == (640, 480)
    for _ in range(2):
        with pytest.raises(UndecodableImage):
            pixels(image)
    with pytest.raises(UndecodableImage):
        decode_pil(data[: len(data) // 2])


def test_an_encoded_image_is_not_a_pil_image() -> None:
    """Models accept both; anything that needs PIL calls ``pixels`` first."""
    image = open_encoded(encode(gradient(), "PNG"))
    assert isinstance(image, EncodedImage) and not isinstance(image, Image.Image)
    assert isinstance(pixels(image), Image.Image)


def test_decode_pil_is_unchanged_for_the_cpu_path(tmp_path: Path) -> None:
    """``decode_pil`` = header + decode, as before: same pixels, mode and kept bytes."""
    for mode, fmt in (("RGB", "JPEG"), ("L", "PNG"), ("P", "PNG"), ("CMYK", "JPEG")):
        data = encode(gradient(mode), fmt)
        image = decode_pil(data)
        reference = Image.open(io.BytesIO(data))
        reference.load()
        assert image.mode == "RGB"
        assert np.array_equal(np.asarray(image), np.asarray(reference.convert("RGB")))
