"""Property-based fuzzing (hypothesis) of the ``entries`` parser and the image decoder,
directly and through a live server.

Bounded for CI: a fixed number of derandomized examples per property (about 20 s in
all on 2 cores). ``IMMICH_TRT_FUZZ_EXAMPLES=N`` runs N random examples per property
instead (a longer local fuzzing session).

Properties:
- ``parse_entries`` either returns entries whose model names resolve, or raises exactly
  the errors Immich's ``get_entries`` maps (422) or leaves uncaught (500); nothing else.
- ``decode_pil`` on damaged images (truncated, bit-flipped, byte-inserted, header-patched
  PNG/JPEG/WebP/GIF/TIFF/BMP) either returns an RGB image within the pixel bound or
  raises an ``Exception`` (never a ``BaseException`` that would take a worker down),
  and never decodes past the bound.
- the live server answers any such request with 200/400/413/422/500 (never a dropped
  connection or another status) and keeps answering ``/ping``.
"""

from __future__ import annotations

import io
import os
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from immich_trt.contract import CLIP_MODEL, FACE_MODEL, OCR_MODEL, multipart_body
from immich_trt.models.entries import InvalidEntries, parse_entries
from immich_trt.models.registry import resolve
from immich_trt.models.transforms import ImageTooLarge, decode_pil
from immich_trt.tools.testing import LiveServer

RANDOM_EXAMPLES = int(os.environ.get("IMMICH_TRT_FUZZ_EXAMPLES", "0"))


def bounded(examples: int):
    """Hypothesis settings: ``examples`` derandomized examples in CI, or the
    ``IMMICH_TRT_FUZZ_EXAMPLES`` random ones."""
    return settings(
        max_examples=RANDOM_EXAMPLES or examples,
        derandomize=not RANDOM_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    )


# ------------------------------------------------------------------------- entries

NAMES = st.sampled_from([CLIP_MODEL, FACE_MODEL, OCR_MODEL, "ViT-B-32::openai", "immich-app/buffalo_l", "../x", "", "x"])
TASKS = st.sampled_from(["clip", "facial-recognition", "ocr", "colorize", ""])
TYPES = st.sampled_from(["visual", "textual", "detection", "recognition", "pipeline", ""])
JSON_SCALARS = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=20)
JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
ENTRY = st.fixed_dictionaries({"modelName": NAMES | JSON_SCALARS}, optional={"options": JSON})
PLAUSIBLE = st.dictionaries(TASKS, st.dictionaries(TYPES, ENTRY | JSON, max_size=3), max_size=3)
ENTRIES_TEXT = (
    PLAUSIBLE.map(lambda value: orjson.dumps(value).decode())
    | JSON.map(lambda value: orjson.dumps(value).decode())
    | st.text(max_size=200)
)


@bounded(400)
@given(ENTRIES_TEXT)
def test_entries_parser_answers_only_immichs_errors(text: str) -> None:
    try:
        without_deps, with_deps = parse_entries(text)
    except InvalidEntries:
        return  # 422 Invalid request format.
    except (ValueError, TypeError):
        return  # uncaught upstream too: 500
    for entry in without_deps + with_deps:
        resolve(entry.name, entry.type, entry.task)  # every returned entry names a real model
        assert isinstance(entry.name, str)


# --------------------------------------------------------------------------- images


def _seed_images() -> list[bytes]:
    image = Image.new("RGB", (48, 32))
    image.putdata([((x * 5) % 256, (y * 7) % 256, (x * y) % 256) for y in range(32) for x in range(48)])
    seeds = []
    for fmt, params in (("JPEG", {}), ("PNG", {}), ("WEBP", {}), ("GIF", {}), ("TIFF", {}), ("BMP", {}), ("PNG", {"bits": 4})):
        buffer = io.BytesIO()
        (image.convert("P") if fmt == "GIF" else image).save(buffer, format=fmt, **params)
        seeds.append(buffer.getvalue())
    return seeds


SEEDS = _seed_images()


@st.composite
def damaged_images(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "header", "set"]))
        if not data:
            break
        position = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[position:]
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "header":  # damage where sizes and counts live
            position = draw(st.integers(0, min(len(data), 64) - 1))
            data[position] = draw(st.integers(0, 255))
        else:
            data[position] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80]))
    return bytes(data)


IMAGE_BYTES = damaged_images() | st.binary(max_size=512)
LIMIT = 48 * 32 * 4  # small enough that header damage often announces more


@bounded(600)
@given(IMAGE_BYTES)
def test_decoder_returns_a_bounded_rgb_image_or_raises_an_exception(data: bytes) -> None:
    try:
        image = decode_pil(data, LIMIT)
    except ImageTooLarge:
        return
    except Exception:
        return  # undecodable: the server answers Immich's 500
    assert image.mode == "RGB"
    assert image.width * image.height <= LIMIT
    assert image.tobytes()  # the pixels are really there


# ---------------------------------------------------------------------- live server


@pytest.fixture(scope="module")
def server(model_cache: Path, tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz-server")
    env = {"IMMICH_TRT_RUNTIME": "onnxruntime", "IMMICH_TRT_MAX_IMAGE_PIXELS": str(LIMIT), "IMMICH_LOG_LEVEL": "warn"}
    with LiveServer(model_cache, work, env=env) as live:
        yield live


def post(url: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    request = urllib.request.Request(f"{url}/predict", data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


REQUEST_ENTRIES = st.sampled_from(
    [
        {"clip": {"visual": {"modelName": CLIP_MODEL}}},
        {"ocr": {"detection": {"modelName": OCR_MODEL}, "recognition": {"modelName": OCR_MODEL}}},
        {"facial-recognition": {"detection": {"modelName": FACE_MODEL}, "recognition": {"modelName": FACE_MODEL}}},
    ]
) | ENTRIES_TEXT


@bounded(60)
@given(entries=REQUEST_ENTRIES, image=IMAGE_BYTES | st.none(), text=st.text(max_size=100) | st.none())
def test_live_server_answers_fuzzed_requests_and_stays_up(server, entries, image, text) -> None:
    body, content_type = multipart_body(entries, image, text)
    status, payload = post(server.url, body, content_type)
    assert status in (200, 400, 413, 422, 500), (status, payload[:200])
    if status == 200:
        assert isinstance(orjson.loads(payload), dict)
    assert server.process.poll() is None
    with urllib.request.urlopen(f"{server.url}/ping", timeout=10) as response:
        assert response.status == 200
