"""A checkout without the real images: the test command says what the skipped tests need."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_checkout_without_shared_data_lists_why_tests_skip(tmp_path: Path) -> None:
    checkout = tmp_path / "immich-trt"  # no ../shared/data beside it
    (checkout / "tests").mkdir(parents=True)
    shutil.copy(REPO / "conftest.py", checkout)
    shutil.copy(REPO / "pyproject.toml", checkout)
    (checkout / "tests" / "test_needs_images.py").write_text(
        "from conftest import requires_data\n\n\n@requires_data\ndef test_uses_a_photo():\n    pass\n\n\n"
        "def test_plain():\n    pass\n",
        encoding="utf-8",
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests"],
        cwd=checkout, env=env, capture_output=True, text=True, timeout=120,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "1 passed, 1 skipped" in out
    expected = tmp_path / "shared" / "data"
    assert f"real test images: not found at {expected}" in out  # the header
    summary = out[out.index("short test summary info"):]
    assert "SKIPPED [1] tests/test_needs_images.py" in summary
    assert f"needs the real test images in {expected}" in summary and "photos/" in summary
