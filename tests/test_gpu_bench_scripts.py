"""The GPU bench scripts run end to end here: the CPU budget on the stand-in repository
(tiny request counts: the numbers are the committed bench/gpu_cpu_budget.md's job), the
parity table against a server (itself: every photo within the tolerances) and what it
says when the stock server is not there."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from conftest import SHARED_DATA, load_bench_script, requires_data

budget = load_bench_script("gpu_cpu_budget")
parity = load_bench_script("gpu_parity")


@requires_data
def test_cpu_budget_measures_every_kind(tmp_path: Path, capsys, monkeypatch) -> None:
    """One process and two (MACHINE_LEARNING_WORKERS=2) in turn, every kind answered."""
    monkeypatch.chdir(tmp_path)
    code = budget.main(["--requests", "clip=6,faces=4,ocr=2", "--warmup", "1", "--concurrency", "2",
                        "--workers", "1,2", "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert report.strip() in capsys.readouterr().out  # the same table on stdout
    for label in ("this, 1 process", "this, 2 processes"):
        rows = {m[0]: float(m[1]) for m in re.findall(rf"\| {label} \| (\w+) \| ([\d.]+) \|", report)}
        assert set(rows) == {"clip", "faces", "ocr"} and all(ms > 0 for ms in rows.values()), label
        # three faces a request: the recognizer's ensemble ran; no errors; a measured rate
        assert re.search(rf"\| {label} \| faces \| [\d.]+ \| 3 \| [\d,]+ \| [\d,]+ \| [\d.]+ \| [3-9]\.\d \| 0 \| [\d,]+ \|",
                         report), label  # fmt: skip
    assert "Machine: " in report and "Versions: python" in report


def test_tree_cpu_counts_this_process_and_excludes_tritonserver() -> None:
    import subprocess
    import sys

    # a child of its own: this test process may hold a tritonserver child of another test
    child = subprocess.Popen([sys.executable, "-c", "sum(range(3_000_000)); import time; time.sleep(30)"])
    try:
        time.sleep(1.0)
        server, triton = budget.tree_cpu(child.pid)
    finally:
        child.kill()
        child.wait()
    assert server > 0 and triton == 0
    assert budget.tree_cpu(2**22 + 12345) == (0.0, 0.0)  # a process that is gone


@requires_data
async def test_parity_of_a_server_with_itself_is_within_the_tolerances(base_url: str, tmp_path: Path, capsys) -> None:
    images = tmp_path / "photos"
    images.mkdir()
    for name in ("portrait.jpg", "denali.webp", "handwritten-notes.jpg"):
        (images / name).write_bytes((SHARED_DATA / "photos" / name).read_bytes())
    namespace = parity.argparse.Namespace(ours=base_url, stock=base_url, images=str(images), limit=200,
                                          out=str(tmp_path / "parity.md"))  # fmt: skip
    assert await parity.run(namespace) == 0
    table = (tmp_path / "parity.md").read_text()
    assert "3 photos" in table and table.count("| ok |") == 3 and "0 photo(s) outside" in table
    assert table in capsys.readouterr().out


@pytest.mark.parametrize("stock", ["http://127.0.0.1:9"])
async def test_parity_says_when_a_server_cannot_be_reached(base_url: str, tmp_path: Path, stock: str, capsys) -> None:
    images = tmp_path / "photos"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (64, 48), (10, 20, 30)).save(images / "a.jpg")
    namespace = parity.argparse.Namespace(ours=base_url, stock=stock, images=str(images), limit=1, out=None)
    assert await parity.run(namespace) == 2
    assert f"stock server at {stock} cannot be reached" in capsys.readouterr().err


def test_acceptance_script_parses_and_runs_the_job_mix_scenario() -> None:
    import shutil
    import subprocess

    from conftest import REPO

    script = REPO / "bench" / "gpu_acceptance.sh"
    done = subprocess.run([shutil.which("bash") or "/bin/bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = script.read_text()
    assert "immich-trt bench --scenario job-mix" in text and "bench/gpu_parity.py" in text
    assert "tests/test_dali_parity.py" in text  # with the image's own DALI
