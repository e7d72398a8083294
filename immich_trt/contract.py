"""The requests Immich's server sends to its machine-learning service, built the way it builds them.

One source for ``compat_tests``, the test suites and ``immich-trt bench``
(``docs/immich-ml-contract.md`` section 4):

* the ``entries`` of the four jobs with Immich's default settings (smart search indexing
  and query, faces, OCR) from the ``*_entries`` builders;
* the body: ``multipart/form-data`` exactly as Node's ``fetch`` (undici) encodes the
  ``FormData`` of ``machine-learning.repository.ts``: ``entries`` first, as
  ``JSON.stringify`` writes it (compact, non-ASCII unescaped, ``1`` for ``1.0``), then the
  image as a ``Blob`` part (``filename="blob"``, ``application/octet-stream``) or the
  ``text`` field; text parts carry no ``Content-Type``, line breaks in text values become
  CRLF, the boundary is ``----formdata-undici-0`` and 11 digits;
* :func:`predict`: ``POST new URL('predict', url)`` (a base URL with a path needs a
  trailing slash, as in Immich) and the answer as ``(status, content type, body bytes)``.

aiohttp's ``FormData`` would add ``Content-Type: text/plain; charset=utf-8`` to every text
part, so the body is written here byte for byte and sent as a ``BytesPayload``.
"""

from __future__ import annotations

import json
import math
import random
import re
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin

if TYPE_CHECKING:  # aiohttp is imported when a request is built, so that the CLI starts fast
    import aiohttp
    from aiohttp.payload import BytesPayload

# Immich's defaults (server/src/config.ts): system config "machineLearning" and the preview.
CLIP_MODEL = "ViT-B-32__openai"
FACE_MODEL = "buffalo_l"
FACE_MIN_SCORE = 0.7
OCR_MODEL = "PP-OCRv5_mobile"
OCR_MIN_DETECTION_SCORE = 0.5
OCR_MAX_RESOLUTION = 736
OCR_MIN_RECOGNITION_SCORE = 0.8
PREVIEW_SIZE = 1440
PREVIEW_QUALITY = 80

# ------------------------------------------------------------------------ entries


def clip_visual_entries(model_name: str = CLIP_MODEL) -> dict:
    """Smart search indexing of an asset's preview (``encodeImage``)."""
    return {"clip": {"visual": {"modelName": model_name}}}


def clip_textual_entries(model_name: str = CLIP_MODEL, language: str | None = None) -> dict:
    """Smart search query (``encodeText``). The server always sends ``options``;
    ``language`` is left out of them when the client gave none."""
    options = {} if language is None else {"language": language}
    return {"clip": {"textual": {"modelName": model_name, "options": options}}}


def face_entries(model_name: str = FACE_MODEL, min_score: float = FACE_MIN_SCORE) -> dict:
    """Face detection and recognition (``detectFaces``)."""
    return {
        "facial-recognition": {
            "detection": {"modelName": model_name, "options": {"minScore": min_score}},
            "recognition": {"modelName": model_name},
        }
    }


def face_detection_entries(model_name: str = FACE_MODEL, min_score: float = FACE_MIN_SCORE) -> dict:
    """Detection only: Immich's server never sends this; the contract allows it."""
    return {"facial-recognition": {"detection": face_entries(model_name, min_score)["facial-recognition"]["detection"]}}


def ocr_entries(
    model_name: str = OCR_MODEL,
    min_detection_score: float = OCR_MIN_DETECTION_SCORE,
    max_resolution: int = OCR_MAX_RESOLUTION,
    min_recognition_score: float = OCR_MIN_RECOGNITION_SCORE,
) -> dict:
    """OCR (``ocr``): detection options ``minScore`` and ``maxResolution``, recognition ``minScore``."""
    return {
        "ocr": {
            "detection": {
                "modelName": model_name,
                "options": {"minScore": min_detection_score, "maxResolution": max_resolution},
            },
            "recognition": {"modelName": model_name, "options": {"minScore": min_recognition_score}},
        }
    }


def ocr_detection_entries(
    model_name: str = OCR_MODEL,
    min_detection_score: float = OCR_MIN_DETECTION_SCORE,
    max_resolution: int = OCR_MAX_RESOLUTION,
) -> dict:
    """Detection only: Immich's server never sends this; the contract allows it."""
    return {"ocr": {"detection": ocr_entries(model_name, min_detection_score, max_resolution)["ocr"]["detection"]}}


# ------------------------------------------------------------------- JSON.stringify


def js_number(value: float) -> str:
    """``String(x)`` of a JavaScript number (ECMAScript Number::toString): the shortest
    round-trip digits, decimal for 1e-7 <= |x| < 1e21, else ``1e-7`` / ``1.5e+21``;
    ``null`` for NaN and infinities, as ``JSON.stringify`` writes them."""
    if isinstance(value, bool):
        raise TypeError("bool is not a number")
    if isinstance(value, int):
        value = float(value) if abs(value) >= 10**21 else value
        if isinstance(value, int):
            return str(value)
    if not math.isfinite(value):
        return "null"
    if value == 0:
        return "0"
    sign = "-" if value < 0 else ""
    _, digit_tuple, exponent = Decimal(repr(abs(value))).normalize().as_tuple()
    digits = "".join(map(str, digit_tuple))
    k = len(digits)
    n = exponent + k  # the value is 0.digits * 10**n
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        text = "0." + "0" * (-n) + digits
    else:
        e = n - 1
        text = digits[0] + ("." + digits[1:] if k > 1 else "") + "e" + ("+" if e > 0 else "-") + str(abs(e))
    return sign + text


def js_json(value: Any) -> str:
    """``JSON.stringify(value)`` for JSON-like Python values (dict keys in insertion order)."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, (int, float)):
        return js_number(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return "{" + ",".join(f"{js_json(str(k))}:{js_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(js_json(v) for v in value) + "]"
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


# ------------------------------------------------------------------------ the body

_LINE_BREAKS = re.compile(r"\r?\n|\r")


def _normalize_linefeeds(value: str) -> str:
    return _LINE_BREAKS.sub("\r\n", value)


def _escape_name(value: str) -> str:
    return value.replace("\n", "%0A").replace("\r", "%0D").replace('"', "%22")


def node_boundary(rng: random.Random | None = None) -> str:
    """A boundary as undici makes it: ``----formdata-undici-0`` and 11 random digits."""
    return f"----formdata-undici-0{(rng or random).randrange(10**11):011d}"


def multipart_body(
    entries: dict | str | None,
    image: bytes | None = None,
    text: str | None = None,
    boundary: str | None = None,
) -> tuple[bytes, str]:
    """The body and ``Content-Type`` of Immich's ``/predict`` request.

    ``entries``: a dict (written as ``JSON.stringify`` would), a string (sent as is, for
    malformed requests) or ``None`` (no ``entries`` field). ``image`` and ``text`` as in
    Immich; both may be given or absent, to test the server's answers."""
    boundary = boundary or node_boundary()
    prefix = f"--{boundary}\r\nContent-Disposition: form-data".encode()
    chunks: list[bytes] = []

    def text_field(name: str, value: str) -> None:
        chunks.append(prefix + f'; name="{_escape_name(name)}"\r\n\r\n{_normalize_linefeeds(value)}\r\n'.encode())

    if entries is not None:
        text_field("entries", entries if isinstance(entries, str) else js_json(entries))
    if image is not None:
        chunks.append(prefix + b'; name="image"; filename="blob"\r\nContent-Type: application/octet-stream\r\n\r\n')
        chunks.append(bytes(image))
        chunks.append(b"\r\n")
    if text is not None:
        text_field("text", text)
    chunks.append(f"--{boundary}--".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def build_form(
    entries: dict | str | None, image: bytes | None = None, text: str | None = None, boundary: str | None = None
) -> BytesPayload:
    """Immich's request body as an aiohttp payload: ``session.post(url, data=build_form(...))``.

    A payload is sent once; build one per request (or keep :func:`multipart_body`'s bytes)."""
    from aiohttp.payload import BytesPayload

    body, content_type = multipart_body(entries, image, text, boundary)
    return BytesPayload(body, content_type=content_type)


def predict_url(base_url: str) -> str:
    """``new URL('predict', url)``: ``http://h:3003`` and ``http://h:3003/`` give
    ``http://h:3003/predict``; ``http://h/ml/`` gives ``/ml/predict``, ``http://h/ml`` gives ``/predict``."""
    return urljoin(base_url, "predict")


async def predict(
    session: aiohttp.ClientSession | None,
    base_url: str,
    entries: dict | str | None,
    image: bytes | None = None,
    text: str | None = None,
) -> tuple[int, str, bytes]:
    """``POST /predict`` like Immich's server; returns (status, content type, body bytes).

    ``session`` may be ``None``: a session is opened for this request only."""
    if session is None:
        import aiohttp

        async with aiohttp.ClientSession() as own:
            return await predict(own, base_url, entries, image, text)
    async with session.post(predict_url(base_url), data=build_form(entries, image, text)) as response:
        return response.status, response.headers.get("Content-Type", ""), await response.read()
