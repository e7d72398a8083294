"""README.md: the two set-up commands on top, unchanged; every other command runs when
pasted after them (the program is ``.venv/bin/immich-trt``: the one-line install puts
nothing on PATH), and each ``immich-trt`` command line is one its parser accepts."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from immich_trt.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"
SETUP = [
    'python3 -m venv .venv && .venv/bin/pip install -e ".[offline]" && .venv/bin/immich-trt serve',
    'python3 -m venv .venv && .venv/bin/pip install -e ".[test]" && .venv/bin/python -m pytest',
]


def blocks() -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def command_lines() -> list[str]:
    """Shell lines of every block after the set-up ones (continuations joined, comments cut)."""
    lines = []
    for block in blocks()[2:]:
        for line in block.replace("\\\n", " ").splitlines():
            code = line.split(" #", 1)[0].strip()
            if code and not code.startswith("#"):
                lines.append(code)
    return lines


def test_the_two_setup_commands_open_the_readme() -> None:
    assert [b.strip() for b in blocks()[:2]] == SETUP
    text = README.read_text(encoding="utf-8")
    assert text.index(SETUP[0]) < text.index(SETUP[1]) < text.index("```sh", text.index(SETUP[1]) + 1)


def test_no_command_calls_a_bare_immich_trt() -> None:
    bare = [line for line in command_lines() if re.search(r"(^|[\s;&|(])immich-trt\s", line)]
    assert bare == []
    spans = re.findall(r"`(immich-trt [^`]*)`", README.read_text(encoding="utf-8"))
    assert spans == []  # inline commands in the prose, too


@pytest.mark.parametrize("line", [line for line in command_lines() if ".venv/bin/immich-trt" in line])
def test_every_immich_trt_command_parses(line: str) -> None:
    for command in re.split(r"\s*(?:&&|;|\|)\s*", line):
        words = shlex.split(command)
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):  # VAR=value prefixes
            words.pop(0)
        if words and words[0] == ".venv/bin/immich-trt":
            if words[1:] == ["--version"]:
                continue
            build_parser().parse_args(words[1:])  # SystemExit(2) on an unknown command or option
