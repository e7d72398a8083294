"""Bad input on ``/predict`` (in-process app, ONNX Runtime, real models): every case gets
Immich's documented answer or a clear 4xx, and the server keeps serving afterwards.

Immich's documented codes (immich-ml-contract.md 1.5) are kept where they exist: an
undecodable image (truncated, corrupt, not an image, empty, HEIC) is a plain 500
``Internal Server Error``; malformed ``entries`` is 422; an unknown model or task is 500.
Our own additions: a pixel bound (413, nothing decoded) and 400 for a body that cannot
be parsed (FastAPI's answer).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import struct
import zlib
from pathlib import Path

import aiohttp
import pytest
from PIL import Image

from conftest import NO_DATA_REASON, SHARED_DATA, requires_data
from immich_trt.application import create_app
from immich_trt.contract import CLIP_MODEL, build_form, clip_textual_entries, clip_visual_entries
from immich_trt.tools.testing import offline_settings

CLIP = clip_visual_entries()
TEXT = clip_textual_entries()


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def gradient(width: int = 96, height: int = 64) -> Image.Image:
    image = Image.new("RGB", (width, height))
    image.putdata([(x * 255 // width, y * 255 // height, (x + y) % 256) for y in range(height) for x in range(width)])
    return image


def png_header_only(width: int, height: int) -> bytes:
    """A 60-byte PNG whose IHDR announces ``width x height`` (8-bit RGB) and whose IDAT
    holds one compressed byte: a decompression bomb's header without its payload."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def png_bomb(side: int) -> bytes:
    """A real, complete 1-bit greyscale PNG of ``side x side`` zero pixels: a few kB on
    the wire, ``side**2 * 3`` bytes once decoded to RGB."""
    row = b"\0" + b"\0" * ((side + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def jpeg_with_size(width: int, height: int) -> bytes:
    """A small valid JPEG whose SOF0 marker is patched to announce ``width x height``."""
    data = bytearray(encode(gradient(16, 16), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.fixture(scope="module")
def photo() -> bytes:
    if not SHARED_DATA.is_dir():
        pytest.skip(NO_DATA_REASON)
    return (SHARED_DATA / "photos" / "prairie_falcon.jpg").read_bytes()


@pytest.fixture
def settings(model_cache: Path, tmp_path: Path):
    return offline_settings(model_cache, runtime="onnxruntime", model_ttl=0, engines_dir=tmp_path / "engines")


@pytest.fixture
async def client(aiohttp_client, settings):
    return await aiohttp_client(create_app(settings))


async def healthy(client) -> None:
    """The server still answers health checks and a good request afterwards."""
    assert (await client.get("/ping")).status == 200
    response = await client.post("/predict", data=build_form(CLIP, encode(gradient(), "JPEG")))
    assert response.status == 200
    assert (await response.json())["clip"].startswith("[")


# ------------------------------------------------------------------ undecodable images


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def corrupt_header(data: bytes) -> bytes:
    return data[:4] + bytes(b ^ 0xFF for b in data[4:64]) + data[64:]


UNDECODABLE = {
    "truncated JPEG": lambda photo: truncated(photo),
    "truncated PNG": lambda photo: truncated(encode(gradient(), "PNG")),
    "truncated WebP": lambda photo: truncated(encode(gradient(), "WEBP")),
    "truncated GIF": lambda photo: encode(gradient(), "GIF")[:40],
    "JPEG with a corrupt header": lambda photo: corrupt_header(photo),
    "PNG with a corrupt header": lambda photo: corrupt_header(encode(gradient(), "PNG")),
    "WebP with a corrupt header": lambda photo: corrupt_header(encode(gradient(), "WEBP")),
    "not an image": lambda photo: b"%PDF-1.4 this is not an image\n" * 20,
    "empty part": lambda photo: b"",
    "random bytes": lambda photo: os.urandom(4096),
    "JPEG magic only": lambda photo: b"\xff\xd8\xff",
}


@pytest.mark.parametrize("case", list(UNDECODABLE))
async def test_undecodable_image_is_immichs_500_and_the_server_survives(client, photo, case, caplog) -> None:
    response = await client.post("/predict", data=build_form(CLIP, UNDECODABLE[case](photo)))
    assert response.status == 500
    assert await response.text() == "Internal Server Error"  # Immich's documented answer
    assert "Traceback" not in caplog.text  # one log line per bad image, not a stack trace
    await healthy(client)


@requires_data
async def test_heic_is_undecodable_as_in_immich(client) -> None:
    data = (SHARED_DATA / "photos" / "IMG_2682.heic").read_bytes()
    response = await client.post("/predict", data=build_form(CLIP, data))
    assert response.status == 500
    await healthy(client)


async def test_a_corrupt_jpeg_scan_decodes_like_pillow_does(client, photo) -> None:
    """Damage inside the entropy-coded scan is concealed by libjpeg (as in Immich): the
    image decodes at its full size with wrong pixels, and the answer says so."""
    data = bytearray(photo)
    start = len(data) // 2
    data[start : start + 256] = bytes((i * 37) % 255 for i in range(256))  # no 0xFF: no marker
    response = await client.post("/predict", data=build_form(CLIP, bytes(data)))
    with Image.open(io.BytesIO(photo)) as original:
        size = original.size
    assert response.status == 200
    body = await response.json()
    assert (body["imageWidth"], body["imageHeight"]) == size


# ------------------------------------------------------------- unusual but valid images


def sixteen_bit_png() -> bytes:
    image = Image.new("I;16", (80, 60))
    image.putdata([(x * 800 + y) % 65536 for y in range(60) for x in range(80)])
    return encode(image, "PNG")


def palette_with_alpha_png() -> bytes:
    image = gradient().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(image, "PNG", transparency=0)


def animated(fmt: str) -> bytes:
    frames = [gradient(), Image.new("RGB", (96, 64), (255, 0, 0)), Image.new("RGB", (96, 64), (0, 0, 255))]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


VALID = {
    "16-bit greyscale PNG": (sixteen_bit_png, (80, 60)),
    "CMYK JPEG": (lambda: encode(gradient().convert("CMYK"), "JPEG"), (96, 64)),
    "palette + alpha PNG": (palette_with_alpha_png, (96, 64)),
    "RGBA PNG": (lambda: encode(gradient().convert("RGBA"), "PNG"), (96, 64)),
    "greyscale JPEG": (lambda: encode(gradient().convert("L"), "JPEG"), (96, 64)),
    "greyscale + alpha PNG": (lambda: encode(gradient().convert("LA"), "PNG"), (96, 64)),
    "1-bit PNG": (lambda: encode(gradient().convert("1"), "PNG"), (96, 64)),
    "animated GIF": (lambda: animated("GIF"), (96, 64)),
    "animated WebP": (lambda: animated("WEBP"), (96, 64)),
    "lossless WebP": (lambda: encode(gradient(), "WEBP", lossless=True), (96, 64)),
    "TIFF": (lambda: encode(gradient(), "TIFF"), (96, 64)),
    "BMP": (lambda: encode(gradient(), "BMP"), (96, 64)),
}


@pytest.mark.parametrize("case", list(VALID))
async def test_unusual_valid_images_are_answered(client, case) -> None:
    make, size = VALID[case]
    response = await client.post("/predict", data=build_form(CLIP, make()))
    assert response.status == 200, await response.text()
    body = await response.json()
    assert (body["imageWidth"], body["imageHeight"]) == size
    assert len(json.loads(body["clip"])) == 512


async def test_animated_images_use_their_first_frame(client) -> None:
    first = await (await client.post("/predict", data=build_form(CLIP, encode(gradient(), "PNG")))).json()
    for fmt in ("GIF", "WEBP"):
        body = await (await client.post("/predict", data=build_form(CLIP, animated(fmt)))).json()
        # lossy/paletted encodings of the same first frame, not the red or blue frames
        a, b = json.loads(first["clip"]), json.loads(body["clip"])
        cosine = sum(x * y for x, y in zip(a, b))
        assert cosine > 0.99, fmt


@requires_data
async def test_real_avif_and_webp_photos_decode(client) -> None:
    for name in ("8bit-sRGB.avif", "denali.webp"):
        data = (SHARED_DATA / "photos" / name).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
        response = await client.post("/predict", data=build_form(CLIP, data))
        assert response.status == 200, name
        body = await response.json()
        assert (body["imageWidth"], body["imageHeight"]) == size


# ------------------------------------------------------------------- decompression bombs


def peak_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


BOMBS = {
    "PNG header announcing 100000x100000": lambda: png_header_only(100_000, 100_000),
    "PNG header announcing 20000x20000": lambda: png_header_only(20_000, 20_000),
    "JPEG announcing 65000x65000": lambda: jpeg_with_size(65_000, 65_000),
    "JPEG announcing 12000x9000": lambda: jpeg_with_size(12_000, 9_000),
}


@pytest.mark.parametrize("case", list(BOMBS))
async def test_decompression_bomb_is_413_and_never_allocated(client, case) -> None:
    data = BOMBS[case]()
    assert len(data) < 1024
    before = peak_rss_kib()
    response = await client.post("/predict", data=build_form(CLIP, data))
    assert response.status == 413
    detail = (await response.json())["detail"]
    assert "pixels" in detail and "IMMICH_TRT_MAX_IMAGE_PIXELS" in detail or "exceeds limit" in detail
    # the smallest of these would be 324 MB as RGB; the peak resident size barely moves
    assert peak_rss_kib() - before < 64 * 1024
    await healthy(client)


async def test_a_complete_png_bomb_is_refused_before_decoding(client) -> None:
    data = png_bomb(12_000)  # 144 M pixels, 432 MB as RGB, ~20 kB on the wire
    assert len(data) < 64 * 1024
    before = peak_rss_kib()
    response = await client.post("/predict", data=build_form(CLIP, data))
    assert response.status == 413
    assert "144000000 pixels" in (await response.json())["detail"]
    assert peak_rss_kib() - before < 64 * 1024
    await healthy(client)


async def test_the_pixel_limit_is_exact_and_configurable(aiohttp_client, settings) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(settings, max_image_pixels=100 * 100)))
    at_limit = await client.post("/predict", data=build_form(CLIP, encode(gradient(100, 100), "PNG")))
    assert at_limit.status == 200
    over = await client.post("/predict", data=build_form(CLIP, encode(gradient(101, 100), "PNG")))
    assert over.status == 413
    assert (await over.json())["detail"] == (
        "Image has 10100 pixels (101x100); the limit is 10000 (IMMICH_TRT_MAX_IMAGE_PIXELS)"
    )
    # the sidecar's ingest applies the same bound
    ingest = aiohttp.FormData()
    ingest.add_field("image", encode(gradient(101, 100), "PNG"), filename="a.png")
    response = await client.post("/v1/ingest", data=ingest)
    assert response.status == 413


# ------------------------------------------------------------------------------ entries

ENTRIES = {
    # malformed: 422 Invalid request format (JSONDecodeError, KeyError, AttributeError)
    "not JSON": ("{clip", 422),
    "a JSON list": ("[1, 2]", 422),
    "a JSON string": ('"clip"', 422),
    "a task that is not an object": ('{"clip": 5}', 422),
    "missing modelName": ('{"clip": {"visual": {"options": {}}}}', 422),
    "nested 5000 deep": ("[" * 5000 + "]" * 5000, 422),
    "invalid UTF-8 escape": ('{"clip": {"visual": {"modelName": "\\ud800"}}}', 422),
    "modelName that is a number": ('{"clip": {"visual": {"modelName": 5}}}', 422),  # clean_name: AttributeError
    # Immich's uncaught errors: 500 (ValueError for unknown names, TypeError for wrong types)
    "unknown task": ('{"colorize": {"visual": {"modelName": "x"}}}', 500),
    "unknown type": ('{"clip": {"sideways": {"modelName": "ViT-B-32__openai"}}}', 500),
    "unknown model": ('{"clip": {"visual": {"modelName": "ViT-Z-99__nobody"}}}', 500),
    "type entry that is a string": ('{"clip": {"visual": "ViT-B-32__openai"}}', 500),
    "options that are a number": ('{"clip": {"visual": {"modelName": "ViT-B-32__openai", "options": 5}}}', 500),
    # valid: an empty request answers only the image size; unknown options are ignored
    "no tasks": ("{}", 200),
    "huge options": (json.dumps({"clip": {"visual": {"modelName": CLIP_MODEL, "options": {"x": [0] * 500_000}}}}), 200),
}


@pytest.mark.parametrize("case", list(ENTRIES))
async def test_entries_of_every_wrong_shape(client, case) -> None:
    entries, status = ENTRIES[case]
    response = await client.post("/predict", data=build_form(entries, encode(gradient(), "JPEG")))
    assert response.status == status, await response.text()
    if status == 422:
        assert await response.json() == {"detail": "Invalid request format."}
    await healthy(client)


async def test_ten_thousand_unknown_tasks_fail_fast(client) -> None:
    entries = {f"task{i}": {"visual": {"modelName": CLIP_MODEL}} for i in range(10_000)}
    response = await client.post("/predict", data=build_form(entries, encode(gradient(), "JPEG")))
    assert response.status == 500
    await healthy(client)


# --------------------------------------------------------------------------------- text

TEXTS = {
    "a megabyte of text": "a photo of a cat " * 60_000,
    "emoji and skin tones": "👩🏽‍🚀 🐈‍⬛ 🏳️‍🌈" * 50,
    "right-to-left with marks": "\u202eصورة قطة\u202c \u200f",
    "combining marks": "e" + "\u0301" * 5000,
    "NUL and control characters": "cat\x00\x01\x1b[31mdog",
    "only whitespace": " \t\n\r\u3000",
    "CJK": "一只猫的照片" * 200,
}


@pytest.mark.parametrize("case", list(TEXTS))
async def test_huge_and_odd_unicode_text_is_embedded(client, case) -> None:
    response = await client.post("/predict", data=build_form(TEXT, text=TEXTS[case]))
    assert response.status == 200, await response.text()
    assert len(json.loads((await response.json())["clip"])) == 512
    await healthy(client)


def raw_multipart(*parts: tuple[str, bytes, str | None]) -> tuple[bytes, str]:
    """A multipart body built byte by byte: ``(name, value, filename or None)`` parts."""
    boundary = "----immich-trt-test-boundary"
    body = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize("filename", [None, "query.txt"])
async def test_text_that_is_not_utf8_is_a_400(client, filename) -> None:
    body, content_type = raw_multipart(("entries", json.dumps(TEXT).encode(), None), ("text", b"\xff\xfe\xc3(", filename))
    response = await client.post("/predict", data=body, headers={"Content-Type": content_type})
    assert response.status == 400
    assert await response.json() == {"detail": "There was an error parsing the body"}
    await healthy(client)


@pytest.mark.parametrize(
    "case",
    ["unterminated", "no-boundary", "unknown-charset", "garbage"],
)
async def test_malformed_multipart_bodies_are_a_400(client, case) -> None:
    body, content_type = raw_multipart(("entries", json.dumps(TEXT).encode(), None), ("text", b"a cat", None))
    if case == "unterminated":
        body = body[: body.rindex(b"--") - 10]
    elif case == "no-boundary":
        content_type = "multipart/form-data"
    elif case == "unknown-charset":
        body = body.replace(b'name="text"\r\n', b'name="text"\r\nContent-Type: text/plain; charset=no-such-codec\r\n')
    else:
        body = b"\x00\xff" * 64
    response = await client.post("/predict", data=body, headers={"Content-Type": content_type})
    assert response.status == 400, case
    assert await response.json() == {"detail": "There was an error parsing the body"}
    await healthy(client)


def test_multipart_fields_as_starlette_gives_them() -> None:
    """The image as bytes with or without a filename, text decoded by its charset, parts
    without a name skipped, the last of a repeated field kept."""
    from immich_trt.web.http import parse_multipart

    body, content_type = raw_multipart(
        ("entries", b"first", None), ("image", b"\x89PNG\r\n\x00\xff", None), ("entries", b'{"a": 1}', None),
        ("doc", "é".encode("latin-1"), None), ("blob", b"\x00\x01", "x.bin"),
    )  # fmt: skip
    body = body.replace(b'name="doc"\r\n', b'name="doc"\r\nContent-Type: text/plain; charset=latin-1\r\n')
    unnamed = b'--' + content_type.split("=")[1].encode() + b'\r\nContent-Disposition: form-data\r\n\r\nzzz\r\n'
    body = unnamed + body
    fields = parse_multipart(body, content_type)
    assert fields == {"entries": '{"a": 1}', "image": b"\x89PNG\r\n\x00\xff", "doc": "é", "blob": b"\x00\x01"}


# ------------------------------------------------------------------ model-name paths


HOSTILE_NAMES = [
    "../../../../../../tmp/immich-trt-escape",
    "..\\..\\..\\immich-trt-escape",
    "ViT-B-32__openai/../../../../immich-trt-escape",
    "/etc/passwd",
    "....//....//immich-trt-escape",
    "%2e%2e%2f%2e%2e%2fimmich-trt-escape",
    "immich-trt-escape\x00.onnx",
    "~/immich-trt-escape",
    "a" * 5000,
    "../ViT-B-32__openai",  # cleans to a real model name: served from the cache
]


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


async def test_model_names_with_path_segments_never_leave_the_cache(aiohttp_client, model_cache, tmp_path) -> None:
    sandbox = tmp_path / "sandbox"
    cache = sandbox / "cache" / "inner"
    cache.mkdir(parents=True)
    for task in ("clip",):
        os.symlink(model_cache / task, cache / task)  # the real CLIP files, read-only use
    settings = offline_settings(cache, runtime="onnxruntime", model_ttl=0, engines_dir=sandbox / "engines",
                                data_dir=sandbox / "data")
    client = await aiohttp_client(create_app(settings))
    before = tree(sandbox)
    statuses = {}
    for name in HOSTILE_NAMES:
        for entries in (clip_visual_entries(name), {"ocr": {"detection": {"modelName": name}}},
                        {"facial-recognition": {"detection": {"modelName": name}}}):
            response = await client.post("/predict", data=build_form(entries, encode(gradient(), "JPEG")))
            statuses[(name, next(iter(entries)))] = response.status
            assert response.status in (200, 500), (name, await response.text())
    assert statuses[("../ViT-B-32__openai", "clip")] == 200
    assert statuses[("../../../../../../tmp/immich-trt-escape", "clip")] == 500
    after = tree(sandbox)
    created = after - before
    # anything created is inside the cache's task folders or the engines/data folders
    for path in created:
        assert path.startswith(("cache/inner/", "engines", "data")), path
    assert not list(Path("/tmp").glob("immich-trt-escape*"))
    assert not list(sandbox.parent.glob("*immich-trt-escape*"))
    await healthy(client)
