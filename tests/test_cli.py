"""The command line: build-engines, models list/fetch, and the dual-stack listener."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from immich_trt.cli import listen_socket, main
from immich_trt.tools.testing import UNREACHABLE


@pytest.fixture
def env(monkeypatch, ocr_cache: Path, tmp_path: Path) -> Path:
    monkeypatch.setenv("MACHINE_LEARNING_CACHE_FOLDER", str(ocr_cache))
    monkeypatch.setenv("IMMICH_TRT_ENGINES_DIR", str(tmp_path / "engines"))
    monkeypatch.setenv("IMMICH_TRT_RAPIDOCR_BASE_URL", UNREACHABLE)
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    return tmp_path / "engines"


def test_build_engines_writes_the_cpu_repository(env: Path, capsys) -> None:
    assert main(["build-engines", "--target", "cpu"]) == 0
    assert sorted(p.name for p in env.iterdir()) == ["ocr__PP-OCRv5_mobile__detection", "ocr__PP-OCRv5_mobile__recognition"]
    assert (env / "ocr__PP-OCRv5_mobile__detection" / "1" / "model.py").is_file()
    assert "2 model(s) written" in capsys.readouterr().out


def test_build_engines_script_is_the_same_program(env: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, str(root / "build_engines.py"), "--target", "cpu", "--model", "ocr__PP-OCRv5_mobile__detection"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "1 model(s) written" in result.stdout
    assert [p.name for p in env.iterdir()] == ["ocr__PP-OCRv5_mobile__detection"]


def test_models_list_and_fetch(env: Path, capsys) -> None:
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "ocr\tPP-OCRv5_mobile\tdetection" in out and "ocr\tPP-OCRv5_mobile\trecognition" in out
    assert main(["models", "fetch", "PP-OCRv5_mobile", "--task", "ocr", "--type", "recognition"]) == 0
    assert "characters.txt" in capsys.readouterr().out


def test_dual_stack_listener_accepts_ipv4() -> None:
    sock = listen_socket("[::]", 0)
    try:
        port = sock.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
    finally:
        sock.close()
    assert listen_socket("127.0.0.1", 0) is None
