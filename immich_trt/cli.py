"""Command line: ``immich-trt serve | doctor | build-engines | models | bench | ingest | opensearch | backup``.

``python -m immich_trt`` is the same program.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import __version__
from .config import NO_OP_VARIABLES, Settings
from .runtime import make_runtime
from .runtime.select import choose_runtime
from .tools.bench import add_arguments as add_bench_arguments
from .tools.quantize import DEFAULT_MAX_IMAGES

#: IMMICH_LOG_LEVEL values (Immich's names) to Python logging levels.
LOG_LEVELS = {
    "verbose": logging.DEBUG,
    "debug": logging.DEBUG,
    "log": logging.INFO,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
}


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=LOG_LEVELS.get(level.lower(), logging.INFO),
        format="[%(asctime)s] %(levelname)s [%(name)s] %(message)s",
        datefmt="%m/%d/%y %H:%M:%S",
    )


def listen_socket(host: str, port: int, reuse_port: bool = False):
    """A listening socket for ``host``. ``::`` (Immich's default ``[::]``) is bound
    dual-stack (IPv6 and IPv4, as gunicorn does), or IPv4-only where IPv6 is missing;
    other hosts return ``None`` and aiohttp binds them itself. ``reuse_port``: other
    processes may listen on the same port (``SO_REUSEPORT``, several processes)."""
    import socket

    if host not in ("::", "[::]"):
        return None
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        address = ("::", port)
    except OSError:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        address = ("0.0.0.0", port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def loopback_socket(port: int = 0):
    """A listening socket on ``127.0.0.1:port`` (0: a free port, read back from it); a
    port whose last owner's connections linger in TIME_WAIT is taken again (a restarted
    worker's own port)."""
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def run_server(app, settings: Settings, extra_socks: list, reuse_port: bool, listening: str) -> None:
    """``web.run_app`` on Immich's host and port (plus ``extra_socks``), logging
    ``listening`` once the sockets are open."""
    from aiohttp import web

    public = listen_socket(settings.host, settings.port, reuse_port)
    socks = ([public] if public is not None else []) + extra_socks
    log = logging.getLogger("immich_trt")
    web.run_app(
        app,
        host=None if public is not None else settings.bind_host,
        port=None if public is not None else settings.port,
        sock=socks or None,
        reuse_port=reuse_port if public is None else None,
        keepalive_timeout=settings.http_keepalive_timeout_s,
        access_log=None,
        print=lambda *_: log.info("%s", listening),
    )


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """Serve until SIGINT/SIGTERM: one process, or with ``MACHINE_LEARNING_WORKERS`` and a
    shared Triton several (:mod:`immich_trt.server.workers`). Returns 2 for settings it
    cannot serve."""
    import os

    from .application import create_app
    from .server import workers

    log = logging.getLogger("immich_trt")
    try:
        role = workers.WorkerRole.from_env()
        choice = choose_runtime(settings)  # once: the process count and the runtime follow from it
        count, why = (1, None) if role is not None else workers.process_count(settings, choice.name)
    except ValueError as exc:
        print(f"immich-trt: {exc}", file=sys.stderr)
        return 2
    if role is not None:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(logging.Formatter(
                f"[%(asctime)s] %(levelname)s [worker {role.index}] [%(name)s] %(message)s", "%m/%d/%y %H:%M:%S"
            ))  # fmt: skip
        app = create_app(settings, make_runtime(settings, choice))
        workers.install_worker(app, role, settings)
        run_server(app, settings, [loopback_socket(role.own_port)], True,
                   f"Worker {role.index} listening on {settings.host}:{settings.port}")
        return 0
    for name, why_not in NO_OP_VARIABLES.items():
        if any(k.upper() == name for k in os.environ):
            log.info("%s is accepted but has no effect here: %s", name, why_not)
    if why is not None:
        log.info("%s", why)
    if count > 1:
        settings = workers.shared_settings(settings)
    app = create_app(settings, make_runtime(settings, choice))
    extra = []
    if count > 1:
        private = loopback_socket()
        extra.append(private)
        workers.install_primary(app, workers.WorkerPool(count - 1, private.getsockname()[1]))
    run_server(app, settings, extra, count > 1, f"Listening on {settings.host}:{settings.port} (runtime: {choice.name})")
    return 0


def cmd_build_engines(args: argparse.Namespace, settings: Settings) -> int:
    """``--target cpu``: the python-backend repository. ``--target tensorrt``: TensorRT
    engines, DALI preprocessing models and the ensembles that chain them, then a summary
    table. ``--target standin``: the GPU target's repository with python-backend
    stand-ins of the same names and tensors (checks the wiring on any machine). Errors a
    user can act on print one line each and return 1: no TensorRT or GPU (nothing
    built), or a model TensorRT refuses (the others are still built)."""
    out = Path(args.output) if args.output else settings.engines_dir
    if args.target in ("tensorrt", "standin"):
        from .models.base import ModelLoadError
        from .tools.gpu.ensemble import build_gpu_repository, write_standin_repository
        from .tools.gpu.tensorrt import EngineBuildError, NoGPUError, TensorRTUnavailableError, summary_table

        gpus = args.gpus.split(",") if args.gpus is not None else None
        try:
            if args.target == "standin":
                written = write_standin_repository(settings, out, only=args.model)
            else:
                written = build_gpu_repository(
                    settings, out, only=args.model, precision=args.precision, gpus=gpus, force=args.force
                )
        except (TensorRTUnavailableError, NoGPUError, EngineBuildError, ModelLoadError, ValueError, OSError,
                RuntimeError) as exc:
            print(f"build-engines: {exc}", file=sys.stderr)
            return 1
        if args.target == "standin":
            for name in [*written.models, *written.preprocess, *written.ensembles]:
                print(name)
            print(f"{len(written.models)} stand-in model(s), {len(written.preprocess)} preprocessing model(s), "
                  f"{len(written.ensembles)} ensemble(s) in {out}")
            return 0
        results = written.models
        print(summary_table(results))
        count = {status: sum(r.status == status for r in results) for status in ("built", "cached", "failed")}
        print(f"{len(results)} TensorRT model(s) in {out}: " + ", ".join(f"{n} {s}" for s, n in count.items()))
        print(f"{len(written.preprocess)} DALI preprocessing model(s), {len(written.ensembles)} ensemble(s)")
        for result in results:
            if result.status == "failed":
                print(f"build-engines: {result.name}: {result.error}", file=sys.stderr)
        return 1 if count["failed"] else 0
    from .tools.engines import build_repository

    written = build_repository(settings, out, only=args.model)
    for name in written:
        print(name)
    print(f"{len(written)} model(s) written to {out}")
    return 0


#: Columns of ``models list``.
LIST_HEADER = ("task", "model", "type", "MiB", "note")


def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    from .models.fetch import ensure_model_files, list_cache

    if args.models_command == "list":
        rows = list_cache(settings.cache_folder)
        print("\t".join(LIST_HEADER))
        for row in rows:
            print("\t".join(row))
        if not rows:
            print(f"no models in {settings.cache_folder} (MACHINE_LEARNING_CACHE_FOLDER)", file=sys.stderr)
        return 0
    if args.models_command == "fetch":
        for path in ensure_model_files(settings, args.name, args.task, args.type):
            print(path)
        return 0
    if args.models_command == "make-test-pack":
        return cmd_make_test_pack(args)
    if args.models_command == "import-paddle":
        return cmd_import_paddle(args, settings)
    if args.models_command == "quantize":
        return cmd_quantize(args, settings)
    return 2


def cmd_import_paddle(args: argparse.Namespace, settings: Settings) -> int:
    """``models import-paddle``: convert, report what was applied, say what is missing."""
    from .models.registry import ModelTask, ModelType, model_path
    from .tools.paddle import PaddleImportError, import_paddle

    try:
        result = import_paddle(
            Path(args.dir), args.name, settings.cache_folder, args.task, args.processing, args.force
        )
    except PaddleImportError as exc:
        print(f"import-paddle: {exc}", file=sys.stderr)
        return 2
    print(result.path)
    print(f"{result.task}: processing from {result.processing.source}: {result.processing}")
    if result.characters is not None:
        print(f"dictionary: {result.characters} characters (ONNX metadata 'character')")
    for note in result.notes:
        print(f"note: {note}")
    other = ModelType.RECOGNITION if result.task is ModelType.DETECTION else ModelType.DETECTION
    if not model_path(settings.cache_folder, ModelTask.OCR, args.name, other).is_file():
        print(f"{other} model missing: import one with `immich-trt models import-paddle DIR --name {args.name}`")
    else:
        print(f"select '{args.name}' as the OCR model in Immich (Administration > Settings > Machine Learning > OCR)")
    return 0


def cmd_quantize(args: argparse.Namespace, settings: Settings) -> int:
    """int8 files for fast mode (``IMMICH_TRT_FAST``), calibrated on previews of
    ``--images``; prints one line per file written. Errors a user can act on print one
    line each and return 1 (no images, no model, a model without calibration input)."""
    from .tools.quantize import QuantizeError, calibration_previews, quantize_models

    folder = Path(args.images).expanduser()
    if not folder.is_dir():
        print(f"quantize: {folder} is not a folder of images", file=sys.stderr)
        return 1
    previews, skipped = calibration_previews(folder, args.max_images)
    if not previews:
        print(f"quantize: no image in {folder} could be read (JPEG, PNG, WebP, ...)", file=sys.stderr)
        return 1
    print(f"{len(previews)} previews from {folder}" + (f" ({len(skipped)} unreadable files skipped)" if skipped else ""))
    try:
        done, failed = quantize_models(settings, previews, args.task, progress=print)
    except (QuantizeError, OSError, ValueError) as exc:
        print(f"quantize: {exc}", file=sys.stderr)
        return 1
    for result in done:
        print(
            f"{result.dest}: {result.dest_bytes / 2**20:.0f} MB from {result.source_bytes / 2**20:.0f} MB, "
            f"{result.samples} calibration inputs, {result.seconds:.0f} s"
        )
    for message in failed:
        print(f"quantize: {message}", file=sys.stderr)
    if done:
        print("serve them with IMMICH_TRT_FAST=true (the in-process runtime)")
    return 1 if failed or not done else 0


def cmd_make_test_pack(args: argparse.Namespace) -> int:
    from .tools.testpack import DEFAULT_CLIP, DEFAULT_FACE, make_test_pack

    try:
        written = make_test_pack(
            Path(args.dir),
            full_size=args.full_size,
            clip_models=args.clip or [DEFAULT_CLIP],
            face_models=args.faces or [DEFAULT_FACE],
            batched_detector=args.batched_detector,
            mxnet_recognizer=args.mxnet_recognizer,
            seed=args.seed,
            bpe_vocab=args.bpe_vocab,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"make-test-pack: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    print(TEST_PACK_WARNING_FULL if args.full_size else TEST_PACK_WARNING, file=sys.stderr)
    return 0


#: Printed after ``models make-test-pack``: what the files are, and what they are not.
TEST_PACK_WARNING = (
    "WARNING: these are test models, not Immich's: their answers are placeholders. CLIP embeddings are random "
    "projections (smart search results are random), the face detector finds bright squares (it finds 'faces' on "
    "screenshots and misses real ones) and face embeddings are random. Use them for smoke tests only; the server "
    "logs a warning when it loads one and lists them under testPack in /v1/status. For real models remove them "
    "and run 'immich-trt models fetch' (see 'immich-trt doctor')."
)
TEST_PACK_WARNING_FULL = (
    "WARNING: these are test models, not Immich's: real architectures with random weights, for timing only; "
    "their answers mean nothing. The server logs a warning when it loads one and lists them under testPack in "
    "/v1/status. For real models remove them and run 'immich-trt models fetch' (see 'immich-trt doctor')."
)


def cmd_bench(args: argparse.Namespace) -> int:
    from .tools.bench import run

    return run(args)


def cmd_ingest(args: argparse.Namespace, settings: Settings) -> int:
    """Ingest a folder through a running server. Prints the files that failed (once: they
    are remembered and skipped later while unchanged, unless ``--retry-failed``) and a
    JSON summary; exit 1 when a file failed. A problem that would fail every file (no
    such folder, server unreachable or refusing the key) is one line and exit 1."""
    import asyncio

    from .sidecar.folder import FAILURES_FILE, IngestAborted, ingest_folder

    url = (args.url or f"http://127.0.0.1:{settings.port}").rstrip("/")
    failures = settings.data_dir / FAILURES_FILE
    try:
        report = asyncio.run(
            ingest_folder(
                url,
                Path(args.dir).expanduser(),
                concurrency=args.concurrency,
                api_key=settings.api_key,
                clip=not args.no_clip,
                faces=not args.no_faces,
                ocr=not args.no_ocr,
                progress=not args.quiet,
                failures=failures,
                retry_failed=args.retry_failed,
            )
        )
    except IngestAborted as exc:
        print(f"ingest: {exc}", file=sys.stderr)
        return 1
    for error in report.errors:
        print(f"failed: {error}", file=sys.stderr)
    if report.failed_before:
        print(f"{report.failed_before} file(s) failed on an earlier run and are unchanged: skipped (listed in "
              f"{failures}; --retry-failed tries them again)", file=sys.stderr)
    print(json.dumps(report.as_dict()))
    return 1 if report.failed else 0


def cmd_opensearch(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from .sidecar.opensearch import reindex_command

    if not settings.opensearch_url:
        print("OPENSEARCH_URL is not set", file=sys.stderr)
        return 2
    return asyncio.run(reindex_command(settings, recreate=args.recreate))


def cmd_backup(args: argparse.Namespace, settings: Settings) -> int:
    """An online copy of ``$IMMICH_TRT_DATA_DIR/sidecar.db`` (safe while the server
    runs); prints the file written. Errors print one line and return 1."""
    from .sidecar.backup import BackupError, backup_database
    from .sidecar.store import DB_NAME

    try:
        written = backup_database(settings.data_dir / DB_NAME, Path(args.dest).expanduser())
    except BackupError as exc:
        print(f"backup: {exc}", file=sys.stderr)
        return 1
    print(written)
    return 0


#: ``serve --help``: the settings most deployments set, all read from the environment.
SERVE_SETTINGS = """\
settings (environment variables; every one is listed in README.md, "Settings"):
  IMMICH_HOST                    address to listen on (default [::], IPv6 and IPv4)
  IMMICH_PORT                    port (default 3003)
  MACHINE_LEARNING_CACHE_FOLDER  model cache, Immich's layout (default ~/.cache/immich_ml)
  IMMICH_TRT_RUNTIME             triton (default: launches the bundled Triton) or onnxruntime (in-process)
  TRITON_URL                     use this Triton (host:port) instead of launching one
  MACHINE_LEARNING_WORKERS       server processes behind the port sharing one Triton (GPU image or TRITON_URL)
  IMMICH_TRT_API_KEY             bearer key for the /v1 sidecar routes (unset: loopback clients only)
  IMMICH_TRT_DATA_DIR            sidecar store (default ~/.local/share/immich_trt)
  OPENSEARCH_URL                 mirror the sidecar store into this OpenSearch (default: no mirror)
  IMMICH_LOG_LEVEL               verbose, debug, info (default), warn or error

example: IMMICH_PORT=3004 IMMICH_TRT_RUNTIME=onnxruntime immich-trt serve
before a first start: immich-trt doctor checks the cache, the models, Triton, the data folder and OpenSearch"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="immich-trt",
        description="A drop-in replacement for Immich's machine-learning service (POST /predict), with a sidecar "
        "that keeps faces, people, duplicates and OCR text (/v1). 'immich-trt COMMAND --help' tells more.",
    )
    parser.add_argument("--version", action="version", version=f"immich-trt {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", help="what to do (default: serve)")
    sub.add_parser(
        "serve",
        help="run the /predict server and the /v1 sidecar (the default command)",
        description="Immich's machine-learning API (/predict) and the sidecar (/v1), configured by the environment.",
        epilog=SERVE_SETTINGS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    build = sub.add_parser("build-engines", help="write the Triton model repository for the cached models")
    build.add_argument(
        "--target",
        choices=["cpu", "tensorrt", "standin"],
        default="cpu",
        help="cpu: python-backend models running onnxruntime; tensorrt: TensorRT plans, DALI preprocessing and "
        "ensembles (needs TensorRT, DALI and the GPU); standin: the tensorrt layout with python-backend stand-ins",
    )
    build.add_argument("--output", help="model repository folder (default: IMMICH_TRT_ENGINES_DIR)")
    build.add_argument("--model", action="append", help="only this Triton model name (repeatable)")
    build.add_argument(
        "--precision",
        choices=["fp16", "fp32", "int8"],
        help="tensorrt: engine precision (default: IMMICH_TRT_PRECISION)",
    )
    build.add_argument(
        "--gpus",
        metavar="IDS",
        help="tensorrt: comma-separated GPU ids, one instance group each (default: MACHINE_LEARNING_DEVICE_IDS)",
    )
    build.add_argument("--force", action="store_true", help="tensorrt: rebuild engines whose cache key matches")
    models = sub.add_parser("models", help="inspect or fetch the model cache")
    msub = models.add_subparsers(dest="models_command", required=True, help="what to do with the cache")
    msub.add_parser("list", help="list the ONNX files in the cache")
    fetch = msub.add_parser("fetch", help="download (or take offline) a model's files")
    fetch.add_argument("name", help="Immich model name, e.g. ViT-B-32__openai, buffalo_l, PP-OCRv5_mobile")
    fetch.add_argument("--task", required=True, choices=["clip", "facial-recognition", "ocr"], help="the model's task")
    fetch.add_argument(
        "--type", required=True, choices=["visual", "textual", "detection", "recognition"], help="the model's type"
    )
    imp = msub.add_parser(
        "import-paddle",
        help="convert a PaddleOCR inference model (inference.json/.pdmodel, .pdiparams, inference.yml) into the cache",
    )
    imp.add_argument("dir", help="folder of the PaddleOCR inference model")
    imp.add_argument("--name", required=True, help="the OCR model name to serve it under (Immich's OCR model setting)")
    imp.add_argument("--task", choices=["detection", "recognition"], help="default: from inference.yml PostProcess")
    imp.add_argument(
        "--processing",
        choices=["paddle", "immich"],
        default="paddle",
        help="detector normalisation and DB thresholds: from inference.yml (paddle) or Immich's PP-OCRv5 constants",
    )
    imp.add_argument("--force", action="store_true", help="replace a model already imported under this name")
    pack = msub.add_parser(
        "make-test-pack",
        help="build test models shaped like Immich's (placeholder answers, for smoke tests) into a model cache folder",
    )
    quantize = msub.add_parser(
        "quantize",
        help="int8 CLIP visual and ArcFace files for fast mode (IMMICH_TRT_FAST), calibrated on your photos",
        description="Static int8 quantization of the cached CLIP visual encoders and ArcFace recognizers, "
        "calibrated on Immich previews made from a folder of images, written to IMMICH_TRT_ENGINES_DIR "
        "(never into the model cache). Fast mode serves them; default mode never does.",
    )
    quantize.add_argument("--images", required=True, metavar="DIR", help="folder of photos (recursive); with people")
    quantize.add_argument(
        "--task", action="append", choices=["clip", "facial-recognition"], help="only this task (repeatable)"
    )
    quantize.add_argument(
        "--max-images",
        type=int,
        default=DEFAULT_MAX_IMAGES,
        metavar="N",
        help=f"at most N images, evenly spaced (default {DEFAULT_MAX_IMAGES}; 0: all)",
    )
    pack.add_argument("dir", help="model cache folder to write (Immich layout)")
    pack.add_argument("--full-size", action="store_true", help="real architectures, random weights (large files)")
    pack.add_argument("--clip", action="append", metavar="NAME", help="CLIP model (repeatable; ViT-B-32__openai)")
    pack.add_argument("--faces", action="append", metavar="NAME", help="face models (repeatable; buffalo_l)")
    pack.add_argument("--batched-detector", action="store_true", help="detector outputs [1,N,C] instead of [N,C]")
    pack.add_argument("--mxnet-recognizer", action="store_true", help="recognizer normalises in-graph (_minus/_mul)")
    pack.add_argument("--seed", type=int, default=0, help="weights seed")
    pack.add_argument("--bpe-vocab", metavar="PATH", help="bpe_simple_vocab_16e6.txt.gz (default: found or fetched)")
    add_bench_arguments(
        sub.add_parser(
            "bench",
            help="send Immich's requests to one or more ML servers, side by side",
            description="Immich's own /predict requests (CLIP on previews and queries, faces, OCR) to each "
            "target in turn: Immich's job mix (its job queues at once over the same assets, in assets/s), then "
            "each task at several concurrency levels; writes results.md, jobmix.csv, results.csv and "
            "throughput.png. "
            "Meant for servers you run on this machine: targets are loopback URLs (http://127.0.0.1:PORT).",
        )
    )
    ingest = sub.add_parser(
        "ingest", help="ingest a folder of images into the sidecar through a running server (resumable)"
    )
    ingest.add_argument("dir", help="folder of images (recursive)")
    ingest.add_argument("--url", help="server base URL (default http://127.0.0.1:$IMMICH_PORT)")
    ingest.add_argument("--concurrency", type=int, default=4, help="uploads in flight (default 4)")
    ingest.add_argument("--no-clip", action="store_true", help="skip CLIP embeddings")
    ingest.add_argument("--no-faces", action="store_true", help="skip faces")
    ingest.add_argument("--no-ocr", action="store_true", help="skip OCR")
    ingest.add_argument("--quiet", action="store_true", help="no progress bar")
    ingest.add_argument(
        "--retry-failed",
        action="store_true",
        help="upload again the files the server refused on an earlier run (skipped while unchanged otherwise; "
        "they are listed in $IMMICH_TRT_DATA_DIR/ingest-failures.json)",
    )
    sub.add_parser(
        "doctor",
        help="check the model cache, the default models, Triton, the data folder and OpenSearch; print the fixes",
        description="Checks what serve needs, with the same settings (environment variables), and prints one "
        "line per check: ok, warn or FAIL with the fix. Exit status 1 when something required is wrong. "
        "Nothing is downloaded.",
    )
    search = sub.add_parser("opensearch", help="OpenSearch mirror maintenance")
    osub = search.add_subparsers(dest="opensearch_command", required=True, help="what to do with the mirror")
    reindex = osub.add_parser("reindex", help="put the index templates and rebuild every document from the SQLite store")
    reindex.add_argument("--recreate", action="store_true", help="delete the indices first (mapping changes, stale documents)")
    backup = sub.add_parser(
        "backup", help="copy the sidecar database (people, faces, OCR, duplicates) safely, even while serving"
    )
    backup.add_argument(
        "dest", help="backup file, or an existing folder for a sidecar-YYYYmmdd-HHMMSS.db in it"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings.from_env()
    setup_logging(settings.log_level)
    command = args.command or "serve"
    if command == "serve":
        from .runtime.ensemble import check_gpu_settings

        try:
            check_gpu_settings(settings)
        except ValueError as exc:
            print(f"immich-trt: {exc}", file=sys.stderr)
            return 2
        return cmd_serve(args, settings)
    if command == "build-engines":
        return cmd_build_engines(args, settings)
    if command == "models":
        return cmd_models(args, settings)
    if command == "bench":
        return cmd_bench(args)
    if command == "ingest":
        return cmd_ingest(args, settings)
    if command == "doctor":
        from .doctor import run as run_doctor

        return run_doctor(settings)
    if command == "opensearch":
        return cmd_opensearch(args, settings)
    if command == "backup":
        return cmd_backup(args, settings)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
