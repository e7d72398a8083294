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
    assert out.splitlines()[0] == "task\tmodel\ttype\tMiB\tnote"
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


def _actions(parser, path=("immich-trt",)):
    """``(command path, action)`` of every action of ``parser`` and its subcommands."""
    import argparse

    for action in parser._actions:
        yield path, action
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                yield path, choice
            for name, sub in action.choices.items():
                yield from _actions(sub, (*path, name))


def test_every_command_and_option_has_help_text() -> None:
    from immich_trt.cli import build_parser

    missing = [
        f"{' '.join(path)} {action.dest}"
        for path, action in _actions(build_parser())
        if not (action.help or "").strip()
    ]
    assert missing == []
    commands = {path[1] for path, _ in _actions(build_parser()) if len(path) > 1}
    assert {"serve", "models", "ingest", "doctor", "bench", "backup", "opensearch", "build-engines"} <= commands


def test_version_and_serve_help(capsys) -> None:
    from immich_trt import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"immich-trt {__version__}"
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for variable in ("IMMICH_HOST", "IMMICH_PORT", "MACHINE_LEARNING_CACHE_FOLDER", "IMMICH_TRT_RUNTIME",
                     "TRITON_URL", "IMMICH_TRT_API_KEY", "README.md"):
        assert variable in out, variable


def test_version_is_the_installed_distribution_version() -> None:
    """``immich-trt --version`` says what pyproject.toml says."""
    import tomllib

    from immich_trt import __version__

    root = Path(__file__).resolve().parents[1]
    assert tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"] == __version__


def test_models_list_prints_a_header_even_for_an_empty_cache(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setenv("MACHINE_LEARNING_CACHE_FOLDER", str(tmp_path / "empty"))
    assert main(["models", "list"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["task\tmodel\ttype\tMiB\tnote"]
    assert "no models in" in captured.err
