"""The sidecar's HTTP API under ``/v1``: ingestion, people, search, duplicates.

Every route is declared once in :data:`ROUTES` with its parameters (:class:`Param`);
the same declaration validates requests (clear 400s naming the field) and produces
``GET /v1/openapi.json`` (OpenAPI 3.0). Biometric data is private: with
``IMMICH_TRT_API_KEY`` set, every ``/v1`` route needs ``Authorization: Bearer <key>``
(401 otherwise); without it, only loopback clients are served (403 otherwise); the rule
lives in :mod:`immich_trt.web.access`, shared with the web page. Request bodies and face data are never logged.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from aiohttp import web
from PIL import Image

from .. import __version__, contract
from ..config import Settings
from ..models.entries import parse_entries
from ..models.registry import INSIGHTFACE_MODELS, MCLIP_MODELS, OPENCLIP_MODELS, PADDLE_MODELS
from ..models.transforms import ImageTooLarge, UndecodableImage
from ..runtime.select import choose_runtime
from ..web import STATE, HTTPError, json_response, read_form
from ..web.access import DATA_PREFIX
from . import duplicates, persons, search, thumbnails
from .duplicates import imohash_of
from .errors import BadRequest, NotFound, SidecarError
from .images import decode_upload
from .ingest import IngestOptions, ingest_bytes
from .service import Sidecar

log = logging.getLogger("immich_trt.sidecar")

SIDECAR = web.AppKey("sidecar", Sidecar)
MIRROR = web.AppKey("mirror", object)  # the OpenSearch Mirror, when configured
PREFIX = DATA_PREFIX
MAX_INT = 2**63 - 1


# ----------------------------------------------------------------------------- params


@dataclass(frozen=True)
class Param:
    """One request parameter: ``kind`` is ``int``, ``float``, ``bool``, ``str``,
    ``"ids"`` (list of ints), or ``"image"`` (a multipart file)."""

    name: str
    kind: Any
    required: bool = False
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    max_length: int | None = None
    nullable: bool = False
    description: str = ""
    min_length: int | None = None  # strings
    exclusive_minimum: bool = False  # numbers: value > minimum
    enum: tuple[str, ...] | None = None  # strings: the accepted values
    pattern: str | None = None  # strings: a regular expression the value must contain a match of

    def schema(self) -> dict[str, Any]:
        """The OpenAPI 3.0 schema object of this parameter: type, bounds, length, enum,
        pattern, nullability, default and description."""
        if self.kind == "image":
            return {"type": "string", "format": "binary", "minLength": 1, "description": self.description}
        if self.kind == "ids":
            out: dict[str, Any] = {
                "type": "array",
                "items": {"type": "integer", "minimum": 1, "maximum": MAX_INT},
                "maxItems": self.max_length or 10000,
            }
            if self.required:
                out["minItems"] = 1
        else:
            out = {"type": {int: "integer", float: "number", bool: "boolean", str: "string"}[self.kind]}
        if self.minimum is not None:
            out["minimum"] = self.minimum
            if self.exclusive_minimum:
                out["exclusiveMinimum"] = True
        if self.maximum is not None:
            out["maximum"] = self.maximum
        if self.kind is str and self.max_length is not None:
            out["maxLength"] = self.max_length
        if self.kind is str and self.min_length is not None:
            out["minLength"] = self.min_length
        if self.enum is not None:
            out["enum"] = list(self.enum)
        if self.pattern is not None:
            out["pattern"] = self.pattern
        if self.nullable:
            out["nullable"] = True
        if self.default is not None:
            out["default"] = self.default
        if self.description:
            out["description"] = self.description
        return out

    def convert(self, value: Any, from_text: bool) -> Any:
        """Validate (and, for query/form text, parse) one value. Raises :class:`BadRequest`."""
        name = self.name
        if value is None:
            if self.nullable:
                return None
            raise BadRequest(f"{name} must not be null")
        kind = self.kind
        if from_text and kind is not str and isinstance(value, str):
            value = _parse_text(name, kind, value)
        if kind is bool:
            if not isinstance(value, bool):
                raise BadRequest(f"{name} must be a boolean")
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise BadRequest(f"{name} must be an integer")
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise BadRequest(f"{name} must be a number")
            value = float(value)
        elif kind is str:
            if not isinstance(value, str):
                raise BadRequest(f"{name} must be a string")
            if self.max_length is not None and len(value) > self.max_length:
                raise BadRequest(f"{name} is longer than {self.max_length} characters")
            if self.min_length is not None and len(value) < self.min_length:
                raise BadRequest(f"{name} must not be empty" if self.min_length == 1 else
                                 f"{name} is shorter than {self.min_length} characters")
            if self.enum is not None and value not in self.enum:
                raise BadRequest(f"unknown {name} {value!r}")
            if self.pattern is not None and re.search(self.pattern, value) is None:
                raise BadRequest(f"{name} must match {self.pattern!r}")
        elif kind == "ids":
            if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
                raise BadRequest(f"{name} must be a list of integers")
            if any(v < 1 or v > MAX_INT for v in value):
                raise BadRequest(f"{name} holds an id out of range")
            if self.max_length is not None and len(value) > self.max_length:
                raise BadRequest(f"{name} has more than {self.max_length} items")
            if self.required and not value:
                raise BadRequest(f"{name} must not be empty")
        if kind in (int, float):
            if self.minimum is not None and self.exclusive_minimum and value <= self.minimum:
                raise BadRequest(f"{name} must be > {self.minimum}")
            if self.minimum is not None and value < self.minimum:
                raise BadRequest(f"{name} must be >= {self.minimum}")
            if self.maximum is not None and value > self.maximum:
                raise BadRequest(f"{name} must be <= {self.maximum}")
        return value


def _parse_text(name: str, kind: Any, value: str) -> Any:
    """Parse query-string or form text as ``kind``: ``bool`` only from ``true``/``false``,
    ``int``/``float`` with Python's parsers, ``"ids"`` as JSON. Raises :class:`BadRequest`
    (400) naming ``name``."""
    if kind is bool:
        if value == "true":
            return True
        if value == "false":
            return False
        raise BadRequest(f"{name} must be true or false")
    try:
        return int(value) if kind is int else float(value) if kind is float else orjson.loads(value)
    except (ValueError, orjson.JSONDecodeError):
        raise BadRequest(f"{name} must be {'an integer' if kind is int else 'a number'}") from None


def _id(name: str = "id", description: str = "") -> Param:
    """A required integer id parameter in ``1..2**63 - 1`` (path or body)."""
    return Param(name, int, required=True, minimum=1, maximum=MAX_INT, description=description)


K = Param("k", int, default=20, minimum=1, maximum=1000, description="number of results")
OFFSET = Param("offset", int, default=0, minimum=0, maximum=MAX_INT)
LIMIT = Param("limit", int, default=50, minimum=1, maximum=500)
MIN_SIM = Param("minSimilarity", float, default=0.0, minimum=-1.0, maximum=1.0, description="cosine similarity")
CLIP_NAMES = tuple(sorted([*OPENCLIP_MODELS, *MCLIP_MODELS]))
FACE_NAMES = tuple(sorted(INSIGHTFACE_MODELS))
OCR_NAMES = tuple(sorted(PADDLE_MODELS))


# ----------------------------------------------------------------------------- routes

Handler = Callable[["Call"], Awaitable[Any]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # after /v1, aiohttp syntax: /persons/{id}
    handler: Handler
    summary: str
    body: str | None = None  # "json" | "multipart" | None (query string for GET)
    params: tuple[Param, ...] = ()
    path_params: tuple[Param, ...] = ()
    produces: str = "application/json"


@dataclass
class Call:
    """A validated request: ``args`` by parameter name, ``sidecar``, ``app``, and the
    ``request`` itself (for conditional requests)."""

    args: dict[str, Any]
    sidecar: Sidecar
    app: web.Application = field(repr=False)
    request: web.Request | None = field(default=None, repr=False)

    @property
    def settings(self) -> Settings:
        """The sidecar's :class:`Settings` (duplicate threshold, clustering defaults)."""
        return self.sidecar.settings


async def _read_args(request: web.Request, route: Route) -> dict[str, Any]:
    """Read and validate the arguments of a request to ``route``: path parameters, then the
    JSON body, the multipart form or the query string, defaults filled in.

    Returns ``{parameter name: value}`` (images as bytes). Raises :class:`BadRequest` (400)
    for a body that is not a JSON object, a non-multipart body where one is required,
    unknown, missing or invalid fields, and an empty image part; an unparsable form is a
    400 from ``read_form``."""
    args: dict[str, Any] = {}
    for param in route.path_params:
        args[param.name] = param.convert(request.match_info[param.name], from_text=True)
    supplied: dict[str, Any]
    from_text = True
    if route.body == "json":
        raw = await request.read()
        if raw.strip():
            try:
                supplied = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise BadRequest("body is not valid JSON") from None
            if not isinstance(supplied, dict):
                raise BadRequest("body must be a JSON object")
        else:
            supplied = {}
        from_text = False
    elif route.body == "multipart":
        if not request.content_type.startswith("multipart/"):
            raise BadRequest("body must be multipart/form-data")
        supplied = await read_form(request)
    else:
        supplied = dict(request.query)
    known = {p.name: p for p in route.params}
    unknown = sorted(set(supplied) - set(known))
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(map(str, unknown))}")
    for param in route.params:
        if param.name not in supplied:
            if param.required:
                raise BadRequest(f"{param.name} is required")
            args[param.name] = param.default
            continue
        value = supplied[param.name]
        if param.kind == "image":
            if not isinstance(value, bytes):
                raise BadRequest(f"{param.name} must be a file part")
            if not value:
                raise BadRequest(f"{param.name} is empty")
            args[param.name] = value
        else:
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            args[param.name] = param.convert(value, from_text)
    return args


def _handler(route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The aiohttp handler of ``route``: validates the arguments (:func:`_read_args`), runs the
    route's handler with a :class:`Call`, notifies the store's listeners after a successful
    non-GET call and answers 200 JSON (or the handler's own response). A
    :class:`SidecarError` is answered with its status (400, 404, 409); a model that cannot be
    loaded (``load_failed``) with 503."""
    async def handle(request: web.Request) -> web.StreamResponse:
        """Answer one request to the route (see :func:`_handler`)."""
        try:
            args = await _read_args(request, route)
            sidecar = request.app[SIDECAR]
            call = Call(args, sidecar, request.app, request)
            result = await route.handler(call)
            if route.method != "GET":
                sidecar.changed()
        except SidecarError as exc:
            raise HTTPError(exc.status, exc.message, f"sidecar_{exc.status}") from exc
        except HTTPError as exc:
            if exc.reason == "load_failed":  # a model that cannot be obtained: the service is unavailable
                raise HTTPError(503, exc.detail, "load_failed") from exc
            raise
        if isinstance(result, web.StreamResponse):
            return result
        return json_response(result)

    return handle


# ----------------------------------------------------------------------------- model I/O


async def _decode(call: Call, data: bytes) -> Image.Image:
    """Decode uploaded image bytes to an RGB PIL image, off the event loop (HEIC/HEIF
    included: :func:`~immich_trt.sidecar.images.decode_upload`).

    Raises ``HTTPError`` 413 when the header announces more pixels than
    ``IMMICH_TRT_MAX_IMAGE_PIXELS``, :class:`BadRequest` (400) for bytes Pillow cannot
    decode or an image of zero width or height."""
    try:
        state = call.app[STATE]
        assert state.ctx is not None
        image = await state.ctx.run(decode_upload, data, state.settings.max_image_pixels)
    except ImageTooLarge as exc:
        raise HTTPError(413, str(exc), "image_too_large") from None
    except UndecodableImage as exc:
        raise BadRequest(f"image cannot be decoded: {exc}") from None
    if image.width == 0 or image.height == 0:
        raise BadRequest("image has zero width or height")
    return image


async def _infer(call: Call, payload: Image.Image | str, entries: dict) -> tuple[dict[str, Any], dict]:
    """Run Immich ``/predict`` entries (``{task: {type: {"modelName", "options"}}}``) on a
    decoded image or a text, as ``/predict`` does.

    Returns (the ``/predict`` response by task, each model's raw outputs by ``(type,
    task)``). Model errors propagate as ``HTTPError`` (``load_failed``: 503 in
    :func:`_handler`)."""
    without_deps, with_deps = parse_entries(orjson.dumps(entries).decode(), call.app[STATE].settings.cache_folder)
    outputs: dict = {}
    response = await call.app[STATE].run_entries(payload, without_deps, with_deps, outputs)
    return response, outputs


async def _text_embedding(call: Call, query: str, model: str, language: str | None) -> np.ndarray:
    """The CLIP textual embedding of ``query`` by CLIP model ``model`` (``language``: the
    BCP-47 code multilingual models use, or None): a float32[D] vector as the model returns
    it. Model errors propagate as in :func:`_infer`."""
    response, _ = await _infer(call, query, contract.clip_textual_entries(model, language))
    return np.asarray(orjson.loads(response["clip"]), dtype=np.float32)


# ----------------------------------------------------------------------------- handlers


async def ingest(call: Call) -> dict:
    """``POST /v1/ingest`` (multipart): run every enabled task (CLIP, faces, OCR, each with its
    model, default Immich's) on ``image`` in one pass and store the results under
    ``assetId`` (default: the imohash); tasks already stored for the content are skipped.

    Answers 200 ``{"assetId", "imohash", "created", "ran", "skipped", "faces", "ocrLines",
    "clip"}``, plus ``"duplicates"`` (:func:`_duplicates_of`, CLIP hits) when asked;
    400 for an empty or undecodable image or no task enabled, 413 for too many pixels, 503
    when a model cannot be loaded."""
    a = call.args
    options = IngestOptions(
        clip=(a["clipModel"] or contract.CLIP_MODEL) if a["clip"] else None,
        faces=(a["faceModel"] or contract.FACE_MODEL) if a["faces"] else None,
        ocr=(a["ocrModel"] or contract.OCR_MODEL) if a["ocr"] else None,
        face_min_score=a["faceMinScore"],
    )
    result = await ingest_bytes(
        call.sidecar,
        a["image"],
        lambda data: _decode(call, data),
        lambda image, entries: _infer(call, image, entries),
        call.app[STATE].ctx.run,
        options,
        ref=a["assetId"],
        filename=a["filename"],
    )
    if a["duplicates"]:
        result["duplicates"] = await _duplicates_of(call, result["assetId"])
    return result


async def _duplicates_of(call: Call, asset_id: int) -> list[dict]:
    """Other assets that are exact (same bytes under other refs are one asset) or near
    (CLIP cosine >= the duplicate threshold) duplicates of ``asset_id``."""
    hits: list[dict] = []
    for model, index in call.sidecar.clip.items():
        vector = index.get(asset_id)
        if vector is None:
            continue
        found = await call.sidecar.call(
            search.search_clip, call.sidecar.clip, vector, model, 20, call.settings.duplicate_threshold, True
        )
        hits += [hit for hit in found if hit["assetId"] != asset_id]
    return hits


async def get_asset(call: Call) -> dict:
    """``GET /v1/assets/{ref}``: the asset named by a ref (caller's assetId, file path or
    ``imohash:<hex>``), by the asset id the API answers (``"assetId": 19``) or by a bare
    imohash (:func:`~immich_trt.sidecar.assets.resolve_ref`); a file path may be sent
    percent-encoded or as it is (``/v1/assets//home/ada/a.jpg``).

    Answers 200 with its summary plus ``"tasks"`` (``{task: [model]}``), ``"faces"`` (by
    face id), ``"ocr"`` (lines by model and position) and ``"thumbnail"`` (whether one is
    stored); 404 for an unknown ref."""
    from .assets import asset_ocr_lines, asset_summary, resolve_ref, tasks_done

    def read(store):
        """Resolve the ref and gather the asset's summary, tasks, faces and OCR lines (store thread)."""
        asset_id = resolve_ref(store, call.args["ref"])
        summary = asset_summary(store, asset_id)
        summary["tasks"] = {task: sorted(models) for task, models in tasks_done(store, asset_id).items()}
        summary["faces"] = persons.asset_faces(store, asset_id)
        summary["ocr"] = asset_ocr_lines(store, asset_id)
        summary["thumbnail"] = thumbnails.has_asset_thumbnail(store, asset_id)
        return summary

    return await call.sidecar.call(read)


async def cluster(call: Call) -> dict:
    """``POST /v1/faces/cluster`` (JSON): assign faces to persons (Immich's incremental
    DBSCAN; ``full`` reclusters every face not assigned by hand). ``minFaces`` and
    ``maxDistance`` (cosine distance) default to ``IMMICH_TRT_FACE_MIN_FACES`` and
    ``IMMICH_TRT_FACE_MAX_DISTANCE``.

    Answers 200 ``{"processed", "assigned", "newPersons", "deferred", "unassigned",
    "removedPersons"}``; 400 for an out-of-range parameter."""
    s = call.settings
    return await call.sidecar.call(
        persons.cluster_faces,
        call.sidecar.faces,
        min_faces=call.args["minFaces"] or s.face_min_faces,
        max_distance=call.args["maxDistance"] if call.args["maxDistance"] is not None else s.face_max_distance,
        full=call.args["full"],
    )


async def list_persons(call: Call) -> dict:
    """``GET /v1/persons?offset&limit&name``: a page of persons, most faces first, leaving out
    persons whose faces all lie on hidden assets (only those whose name contains ``name``,
    when given). Answers 200 ``{"total", "items": [person]}``; 400 for a bad page."""
    a = call.args
    return await call.sidecar.call(persons.list_persons, offset=a["offset"], limit=a["limit"], name=a["name"])


async def get_person(call: Call) -> dict:
    """``GET /v1/persons/{id}?sample``: one person with its ``sample`` best-scoring faces.
    Answers 200 the person with ``"faces"``; 404 for an unknown person."""
    return await call.sidecar.call(persons.get_person, call.args["id"], sample=call.args["sample"])


async def name_person(call: Call) -> dict:
    """``POST /v1/persons/{id}/name`` (JSON ``{"name"}``): set the person's name (stripped; an
    empty string clears it). Answers 200 the person without faces; 404 for an unknown
    person, 400 for a name over 200 characters."""
    return await call.sidecar.call(persons.name_person, call.args["id"], call.args["name"])


async def merge_persons(call: Call) -> dict:
    """``POST /v1/persons/merge`` (JSON ``{"targetId", "sourceIds"}``): move the sources' faces
    to the target (assigned by hand) and delete the sources. Answers 200 the target person;
    400 when the target is among the sources or faces of two face models would mix, 404
    for an unknown id."""
    return await call.sidecar.call(persons.merge_persons, call.args["targetId"], call.args["sourceIds"])


async def split_person(call: Call) -> dict:
    """``POST /v1/persons/split`` (JSON ``{"faceIds", "name"}``): move the faces to a new person
    (assigned by hand), optionally named. Answers 200 the new person; 400 for faces of
    several face models or a bad name, 404 for an unknown face."""
    return await call.sidecar.call(persons.split_person, call.args["faceIds"], call.args["name"])


async def delete_person(call: Call) -> dict:
    """``DELETE /v1/persons/{id}``: delete the person; its faces become unassigned and
    incremental clustering leaves them alone. Answers 200 ``{"id", "unassignedFaces"}``;
    404 for an unknown person."""
    return await call.sidecar.call(persons.delete_person, call.args["id"])


async def unassigned_faces(call: Call) -> dict:
    """``GET /v1/faces/unassigned?offset&limit``: a page of faces without a person, by face id.
    Answers 200 ``{"total", "items": [face]}``; 400 for a bad page."""
    return await call.sidecar.call(persons.unassigned_faces, offset=call.args["offset"], limit=call.args["limit"])


async def assign_face(call: Call) -> dict:
    """``POST /v1/faces/{id}/assign`` (JSON ``{"personId"}``): assign the face to a person by
    hand, or (null) unassign it by hand. Answers 200 the face; 404 for an unknown face or
    person, 400 when the person holds faces of another face model."""
    return await call.sidecar.call(persons.assign_face, call.args["id"], call.args["personId"])


async def person_thumbnail(call: Call) -> web.Response:
    """``GET /v1/persons/{id}/thumbnail``: the JPEG of the person's representative face, else of
    its best-scoring face with a thumbnail. Answers 200 ``image/jpeg``; 404 for an unknown
    person or one without a thumbnail."""
    jpeg = await call.sidecar.call(persons.person_thumbnail, call.args["id"])
    return web.Response(body=jpeg, content_type="image/jpeg")


async def person_faces(call: Call) -> dict:
    """``GET /v1/persons/{id}/faces?offset&limit``: a page of the person's faces, best
    detector score first. Answers 200 ``{"total", "items": [face]}``; 404 for an unknown
    person, 400 for a bad page."""
    a = call.args
    return await call.sidecar.call(persons.person_faces, a["id"], a["offset"], a["limit"])


#: Thumbnails never change under their id; a day in the browser's private cache, then a
#: cheap revalidation (ETag) in case the store was replaced by another one.
THUMBNAIL_CACHE_CONTROL = "private, max-age=86400"


def _picture(call: Call, body: bytes, media_type: str, etag: str) -> web.Response:
    """A thumbnail response with :data:`THUMBNAIL_CACHE_CONTROL` and ``etag``; 304 without
    a body when the request's ``If-None-Match`` names it."""
    headers = {"Cache-Control": THUMBNAIL_CACHE_CONTROL, "ETag": etag}
    request = call.request
    if request is not None and etag in {t.strip() for t in request.headers.get("If-None-Match", "").split(",")}:
        return web.Response(status=304, headers=headers)
    return web.Response(body=body, content_type=media_type, headers=headers)


async def asset_thumbnail(call: Call) -> web.Response:
    """``GET /v1/assets/{id}/thumbnail``: the asset's stored thumbnail (WebP, longest side
    at most 256 px, the pixel frame of the face boxes and OCR polygons), with caching
    headers. Answers 200 ``image/webp`` (304 for a matching ``If-None-Match``); 404 for
    an unknown asset or one ingested before thumbnails existed."""
    data, imohash = await call.sidecar.call(thumbnails.read_asset_thumbnail, call.args["id"])
    return _picture(call, data, thumbnails.ASSET_MEDIA_TYPE, f'"{imohash}"')


async def face_thumbnail(call: Call) -> web.Response:
    """``GET /v1/faces/{id}/thumbnail``: the stored crop of the face (JPEG, longest side at
    most 160 px), with caching headers. Answers 200 ``image/jpeg`` (304 for a matching
    ``If-None-Match``); 404 for an unknown face or one without a crop."""
    data, imohash = await call.sidecar.call(thumbnails.read_face_thumbnail, call.args["id"])
    return _picture(call, data, thumbnails.FACE_MEDIA_TYPE, f'"{imohash}-{call.args["id"]}"')


async def search_face(call: Call) -> dict:
    """``POST /v1/search/face`` (multipart ``image``): detect the faces of the image and, for
    each, the ``k`` nearest stored faces of the same face model (cosine similarity >=
    ``minSimilarity``, hidden assets left out) and their persons.

    Answers 200 ``{"imageWidth", "imageHeight" (pixels), "faces": [{"box", "score",
    "results", "persons"}]}``; 400 for an undecodable image, 413 for too many pixels, 503
    when the model cannot be loaded."""
    a = call.args
    model = a["model"] or contract.FACE_MODEL
    image = await _decode(call, a["image"])
    response, _ = await _infer(call, image, contract.face_entries(model, a["faceMinScore"]))
    faces = []
    for face in response["facial-recognition"]:
        embedding = np.asarray(orjson.loads(face["embedding"]), dtype=np.float32)
        hits = await call.sidecar.call(
            search.search_faces, call.sidecar.faces, embedding, model, a["k"], a["minSimilarity"]
        )
        faces.append(
            {"box": face["boundingBox"], "score": face["score"], "results": hits, "persons": search.group_by_person(hits)}
        )
    return {"imageWidth": image.width, "imageHeight": image.height, "faces": faces}


async def search_face_by_id(call: Call) -> dict:
    """``POST /v1/search/face/by-id`` (JSON ``{"faceId", "k", "minSimilarity"}``): the nearest
    stored faces of a stored face (itself left out) and their persons. Answers 200
    ``{"face", "results", "persons"}``; 404 for an unknown face."""
    a = call.args
    return await call.sidecar.call(
        search.search_face_by_id, call.sidecar.faces, a["faceId"], a["k"], a["minSimilarity"]
    )


async def search_text(call: Call) -> dict:
    """``POST /v1/search/text`` (JSON): assets ranked by cosine similarity of their CLIP
    embedding to the CLIP textual embedding of ``query`` (hidden assets left out unless
    ``includeHidden``). Answers 200 ``{"model", "results": [{"assetId", "similarity",
    "asset"}]}``; 400 for a blank query, 503 when the model cannot be loaded."""
    a = call.args
    model = a["model"] or contract.CLIP_MODEL
    embedding = await _text_embedding(call, a["query"], model, a["language"])
    results = await call.sidecar.call(
        search.search_clip, call.sidecar.clip, embedding, model, a["k"], a["minSimilarity"], a["includeHidden"]
    )
    return {"model": model, "results": results}


async def search_ocr(call: Call) -> dict:
    """``POST /v1/search/ocr`` (JSON): assets whose OCR lines contain ``query`` (case-insensitive
    substring), most matching lines first. Answers 200 ``{"total", "items": [{"assetId",
    "asset", "lines"}]}``; 400 for a blank or too long query."""
    a = call.args
    return await call.sidecar.call(search.search_ocr, a["query"], a["limit"], a["offset"], a["includeHidden"])


async def search_hybrid(call: Call) -> dict:
    """``POST /v1/search/hybrid`` (JSON): assets ranked by ``ocrWeight * OCR match + (1 -
    ocrWeight) * CLIP similarity`` to ``query`` (hidden assets left out). Answers 200
    ``{"model", "results": [{"assetId", "score", "ocrScore", "clipSimilarity", "lines",
    "asset"}]}``; 400 for a blank query, 503 when the model cannot be loaded."""
    a = call.args
    model = a["model"] or contract.CLIP_MODEL
    embedding = await _text_embedding(call, a["query"], model, a["language"])
    results = await call.sidecar.call(
        search.search_hybrid, call.sidecar.clip, a["query"], embedding, model, a["k"], a["ocrWeight"]
    )
    return {"model": model, "results": results}


async def duplicates_check(call: Call) -> dict:
    """``POST /v1/duplicates/check`` (multipart ``image``): whether content with the same
    imohash is stored; nothing is decoded or stored. Answers 200 ``{"imohash",
    "duplicate", "asset"}``."""
    return await call.sidecar.call(duplicates.check_exact, imohash_of(call.args["image"]))


async def duplicates_find(call: Call) -> dict:
    """``POST /v1/duplicates/find`` (JSON ``{"threshold"}``): recompute the unresolved duplicate
    groups, near ones by CLIP cosine similarity >= ``threshold`` (default
    ``IMMICH_TRT_DUPLICATE_THRESHOLD``) and exact ones. Answers 200 ``{"groups", "assets",
    "threshold"}``; 400 for a threshold outside (0, 1]."""
    threshold = call.args["threshold"]
    return await call.sidecar.call(
        duplicates.find_duplicates, call.sidecar.clip, call.settings.duplicate_threshold if threshold is None else threshold
    )


async def duplicates_groups(call: Call) -> dict:
    """``GET /v1/duplicates/groups?offset&limit&includeResolved&kind&assetId``: a page of
    duplicate groups by id (only ``kind`` 'exact' or 'near', only those holding asset
    ``assetId``, when given), members ordered as keeper candidates, with the suggested
    keeper. Answers 200 ``{"total", "items": [group]}``; 400 for a bad page."""
    a = call.args
    return await call.sidecar.call(
        duplicates.list_groups, a["offset"], a["limit"], a["includeResolved"], a["kind"], a["assetId"]
    )


async def duplicates_resolve(call: Call) -> dict:
    """``POST /v1/duplicates/resolve`` (JSON ``{"groupId", "keep", "undo"}``): keep one member
    (default the suggested keeper) and hide the others, or with ``undo`` reverse a
    resolution. Answers 200 the group; 404 for an unknown group, 409 when it is already
    resolved (``undo``: not resolved), 400 when ``keep`` is not a member."""
    a = call.args
    if a["undo"]:
        return await call.sidecar.call(duplicates.unresolve_group, a["groupId"])
    return await call.sidecar.call(duplicates.resolve_group, a["groupId"], a["keep"])


async def openapi(call: Call) -> dict:
    """``GET /v1/openapi.json``: this API as an OpenAPI 3.0.3 document (200)."""
    return openapi_document()


async def status(call: Call) -> dict:
    """``GET /v1/status``: the store's row counts (assets, faces, persons, OCR lines,
    duplicate groups, outbox), its schema version, what ingestion stored (``"ingested"``:
    assets per task, hidden assets, assets with a thumbnail), the runtime (``"runtime"``:
    ``{"name": "triton" | "onnxruntime", "reason": why it serves, "tritonUrl": the
    external server or None for the launched one, "ready": bool}``), the loaded models (``"models"``: ``[{"name", "task",
    "type"}]``), the OpenSearch mirror's status (null without a mirror) and
    ``"testPack"``: the names of loaded models whose files are test-pack placeholders
    (``immich-trt models make-test-pack``; ``[]`` when none). Answers 200."""
    def counts(store) -> dict:
        """The store's row counts and schema version, keyed as the response (store thread)."""
        rows = store.counts()
        return {
            "assets": rows["assets"],
            "faces": rows["faces"],
            "persons": rows["persons"],
            "ocrLines": rows["ocr_lines"],
            "duplicateGroups": rows["duplicate_groups"],
            "outbox": rows["outbox"],
            "schemaVersion": store.version,
            "ingested": store.ingest_counts(),
        }

    result = await call.sidecar.call(counts)
    state = call.app[STATE]
    settings = state.settings
    choice = state.runtime.choice or choose_runtime(settings)
    result["runtime"] = {
        "name": choice.name,
        "reason": choice.reason,
        "tritonUrl": settings.triton_url if choice.name == "triton" else None,
        "ready": await state.runtime.ready(),
    }
    models = state.cache.models if state.cache is not None else []
    result["models"] = sorted(
        ({"name": m.model_name, "task": str(m.task), "type": str(m.type)} for m in models if m.loaded),
        key=lambda m: (m["task"], m["type"], m["name"]),
    )
    mirror = call.app.get(MIRROR)
    result["opensearch"] = mirror.status() if mirror is not None else None
    cache = call.app[STATE].cache
    result["testPack"] = cache.test_pack_models() if cache is not None else []
    return result


_TEXT_QUERY = Param(
    "query", str, required=True, min_length=1, max_length=256, pattern=r"\S", description="search text, not blank"
)
_LANGUAGE = Param("language", str, max_length=35, description="BCP-47/Weblate code, as Immich's search")
_INCLUDE_HIDDEN = Param("includeHidden", bool, default=False, description="include assets hidden by a duplicate resolution")
_FACE_MIN_SCORE = Param("faceMinScore", float, default=contract.FACE_MIN_SCORE, minimum=0.0, maximum=1.0)

ROUTES: tuple[Route, ...] = (
    Route("POST", "/ingest", ingest, "Run every enabled model on an image in one pass and store the results",
          body="multipart", params=(
              Param("image", "image", required=True, description="encoded image (JPEG, PNG, WebP, HEIC, ...)"),
              Param("assetId", str, max_length=512, description="caller's id for the asset (default: the imohash)"),
              Param("filename", str, max_length=1024),
              Param("clip", bool, default=True), Param("faces", bool, default=True),
              Param("ocr", bool, default=True),
              Param("duplicates", bool, default=False, description="answer the asset's near duplicates too"),
              Param("clipModel", str, enum=CLIP_NAMES, description=f"default {contract.CLIP_MODEL}"),
              Param("faceModel", str, enum=FACE_NAMES, description=f"default {contract.FACE_MODEL}"),
              Param("ocrModel", str, enum=OCR_NAMES, description=f"default {contract.OCR_MODEL}"),
              _FACE_MIN_SCORE,
          )),
    Route("GET", "/assets/{id}/thumbnail", asset_thumbnail, "The asset's stored thumbnail (WebP, <= 256 px)",
          path_params=(_id(),), produces=thumbnails.ASSET_MEDIA_TYPE),
    Route("GET", "/assets/{ref}", get_asset,
          "An asset by its ref (caller's assetId or path), its asset id or its imohash, with faces and OCR lines",
          path_params=(Param("ref", str, required=True, max_length=1024),)),
    Route("POST", "/faces/cluster", cluster, "Cluster faces into persons (Immich's incremental DBSCAN)",
          body="json", params=(
              Param("full", bool, default=False, description="recluster every face not assigned by hand"),
              Param("minFaces", int, minimum=1, maximum=1000, nullable=True),
              Param("maxDistance", float, minimum=0.0, exclusive_minimum=True, maximum=2.0, nullable=True,
                    description="cosine distance"),
          )),
    Route("GET", "/persons", list_persons, "Persons with face counts, largest first",
          params=(OFFSET, LIMIT, Param("name", str, max_length=200, description="name contains (case-insensitive)"))),
    Route("GET", "/persons/{id}", get_person, "A person with sample faces",
          params=(Param("sample", int, default=12, minimum=0, maximum=500),), path_params=(_id(),)),
    Route("POST", "/persons/{id}/name", name_person, "Name a person (empty string clears the name)",
          body="json", params=(Param("name", str, required=True, max_length=200),), path_params=(_id(),)),
    Route("POST", "/persons/merge", merge_persons, "Merge persons into a target person", body="json",
          params=(_id("targetId"), Param("sourceIds", "ids", required=True, max_length=1000))),
    Route("POST", "/persons/split", split_person, "Move the given faces to a new person", body="json",
          params=(Param("faceIds", "ids", required=True, max_length=10000), Param("name", str, max_length=200))),
    Route("DELETE", "/persons/{id}", delete_person, "Delete a person; its faces become unassigned",
          path_params=(_id(),)),
    Route("GET", "/faces/unassigned", unassigned_faces, "Faces without a person", params=(OFFSET, LIMIT)),
    Route("POST", "/faces/{id}/assign", assign_face, "Assign a face to a person by hand (null: unassign)",
          body="json", params=(Param("personId", int, minimum=1, maximum=MAX_INT, nullable=True),),
          path_params=(_id(),)),
    Route("GET", "/persons/{id}/thumbnail", person_thumbnail, "The person's representative face (JPEG)",
          path_params=(_id(),), produces="image/jpeg"),
    Route("GET", "/persons/{id}/faces", person_faces, "A page of the person's faces, best first",
          params=(OFFSET, LIMIT), path_params=(_id(),)),
    Route("GET", "/faces/{id}/thumbnail", face_thumbnail, "The face's stored crop (JPEG, <= 160 px)",
          path_params=(_id(),), produces=thumbnails.FACE_MEDIA_TYPE),
    Route("POST", "/search/face", search_face, "Faces in an image and their nearest stored faces and persons",
          body="multipart", params=(Param("image", "image", required=True), K, MIN_SIM,
                                    Param("model", str, enum=FACE_NAMES), _FACE_MIN_SCORE)),
    Route("POST", "/search/face/by-id", search_face_by_id, "Nearest faces and persons of a stored face",
          body="json", params=(_id("faceId"), K, MIN_SIM)),
    Route("POST", "/search/text", search_text, "Images matching a text (CLIP)", body="json",
          params=(_TEXT_QUERY, K, Param("minSimilarity", float, default=-1.0, minimum=-1.0, maximum=1.0),
                  Param("model", str, enum=CLIP_NAMES), _LANGUAGE, _INCLUDE_HIDDEN)),
    Route("POST", "/search/ocr", search_ocr, "Images whose OCR text contains a substring (FTS5 trigram)",
          body="json", params=(_TEXT_QUERY, LIMIT, OFFSET, _INCLUDE_HIDDEN)),
    Route("POST", "/search/hybrid", search_hybrid, "Images ranked by OCR match plus CLIP similarity",
          body="json", params=(_TEXT_QUERY, K, Param("ocrWeight", float, default=0.5, minimum=0.0, maximum=1.0),
                               Param("model", str, enum=CLIP_NAMES), _LANGUAGE)),
    Route("POST", "/duplicates/check", duplicates_check, "Is this exact file (imohash) already stored?",
          body="multipart", params=(Param("image", "image", required=True),)),
    Route("POST", "/duplicates/find", duplicates_find, "Group near duplicates (CLIP cosine) and exact ones",
          body="json", params=(Param("threshold", float, minimum=0.0, exclusive_minimum=True, maximum=1.0,
                                     nullable=True,
                                     description="CLIP cosine similarity, default IMMICH_TRT_DUPLICATE_THRESHOLD"),)),
    Route("GET", "/duplicates/groups", duplicates_groups, "Duplicate groups with the suggested keeper",
          params=(OFFSET, LIMIT, Param("includeResolved", bool, default=False),
                  Param("kind", str, enum=("exact", "near"), description="only groups of this kind"),
                  Param("assetId", int, minimum=1, maximum=MAX_INT, description="only groups holding this asset"))),
    Route("POST", "/duplicates/resolve", duplicates_resolve, "Keep one asset of a group and hide the others",
          body="json", params=(_id("groupId"), Param("keep", int, minimum=1, maximum=MAX_INT, nullable=True),
                               Param("undo", bool, default=False, description="undo the group's resolution"))),
    Route("GET", "/status", status, "Store counts, the OpenSearch mirror's backlog, loaded test-pack models"),
    Route("GET", "/openapi.json", openapi, "This document"),
)

_ERRORS = {
    "400": "invalid input (the detail names the field)",
    "401": "missing or wrong API key",
    "403": "not a loopback client and no API key configured",
    "404": "unknown id",
    "409": "not allowed in the current state",
    "413": "request body too large",
    "503": "a model cannot be loaded (not in the cache and not downloadable)",
}


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.0.3 description of :data:`ROUTES`."""
    error = {"application/json": {"schema": {"type": "object", "properties": {"detail": {"type": "string"}}}}}
    paths: dict[str, dict] = {}
    for route in ROUTES:
        op: dict[str, Any] = {"summary": route.summary, "operationId": route.handler.__name__}
        parameters = [
            {"name": p.name, "in": "path", "required": True, "schema": p.schema()} for p in route.path_params
        ]
        if route.body is None:
            parameters += [
                {"name": p.name, "in": "query", "required": p.required, "schema": p.schema()} for p in route.params
            ]
        else:
            media = "application/json" if route.body == "json" else "multipart/form-data"
            schema = {
                "type": "object",
                "properties": {p.name: p.schema() for p in route.params},
                "additionalProperties": False,
            }
            required = [p.name for p in route.params if p.required]
            if required:
                schema["required"] = required
            op["requestBody"] = {"required": bool(required), "content": {media: {"schema": schema}}}
        if parameters:
            op["parameters"] = parameters
        ok = (
            {"application/json": {"schema": {"type": "object"}}}
            if route.produces == "application/json"
            else {route.produces: {"schema": {"type": "string", "format": "binary"}}}
        )
        op["responses"] = {"200": {"description": "OK", "content": ok}} | {
            code: {"description": text, "content": error} for code, text in _ERRORS.items()
        }
        paths.setdefault(PREFIX + route.path, {})[route.method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "immich-trt sidecar", "version": __version__},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}, {}],
        "paths": paths,
    }


# ----------------------------------------------------------------------------- registration


def add_routes(app: web.Application) -> None:
    """Register :data:`ROUTES` under ``/v1``."""
    for route in ROUTES:
        path = route.path
        for param in route.path_params:  # integer ids only match digits: /persons/merge is not /persons/{id}
            if param.kind is int:
                path = path.replace(f"{{{param.name}}}", f"{{{param.name}:\\d+}}")
            elif param.kind is str:  # a ref may be a file path: slashes included, encoded or not
                path = path.replace(f"{{{param.name}}}", f"{{{param.name}:.+}}")
        app.router.add_route(route.method, PREFIX + path, _handler(route))


__all__ = ["MIRROR", "ROUTES", "SIDECAR", "NotFound", "add_routes", "openapi_document"]
