"""The sidecar through the real server and Triton: ``immich-trt ingest`` of the real
photos, interrupted (SIGKILL) and resumed, then clustering, search and duplicates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import SHARED_DATA, requires_data
from immich_trt.sidecar.folder import image_files

PHOTOS = SHARED_DATA / "photos"


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def ingest_cli(url: str, folder: Path, state: Path, *extra: str) -> subprocess.Popen:
    """``immich-trt ingest`` in a subprocess; ``state``: its IMMICH_TRT_DATA_DIR (the
    file of refused files)."""
    return subprocess.Popen(
        [sys.executable, "-m", "immich_trt", "ingest", str(folder), "--url", url, "--quiet", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "IMMICH_TRT_DATA_DIR": str(state)},
    )


@requires_data
def test_folder_ingest_is_resumable_after_sigkill(live_server, tmp_path: Path) -> None:
    url = live_server.url
    files = image_files(PHOTOS)
    assert len(files) >= 15
    before = get(f"{url}/v1/status")["assets"]

    first = ingest_cli(url, PHOTOS, tmp_path, "--concurrency", "1")
    deadline = time.monotonic() + 300
    while get(f"{url}/v1/status")["assets"] < before + 3 and time.monotonic() < deadline:
        assert first.poll() is None, first.communicate()
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    interrupted_at = get(f"{url}/v1/status")["assets"] - before
    assert 3 <= interrupted_at < len(files)

    second = ingest_cli(url, PHOTOS, tmp_path, "--concurrency", "2")
    out, err = second.communicate(timeout=900)
    report = json.loads(out.strip().splitlines()[-1])
    # every file is ingested, the iPhone HEIC included (decoded by pillow-heif in the sidecar)
    assert second.returncode == 0 and report["failed"] == 0, err
    assert report["skipped"] >= interrupted_at  # finished files were not uploaded again
    assert report["ingested"] + report["skipped"] == len(files)

    status = get(f"{url}/v1/status")
    assert status["assets"] - before == len(files)
    third = ingest_cli(url, PHOTOS, tmp_path)
    out, _ = third.communicate(timeout=300)
    assert json.loads(out.strip().splitlines()[-1]) == {
        "ingested": 0, "skipped": len(files), "failed": 0, "faces": 0, "failedBefore": 0
    }
    assert get(f"{url}/v1/status") == status  # nothing duplicated
    heic = get(f"{url}/v1/assets/{urllib.request.quote(str((PHOTOS / 'IMG_2682.heic').resolve()), safe='')}")
    assert (heic["width"], heic["height"]) == (4032, 3024) and set(heic["tasks"]) == {"clip", "faces", "ocr"}

    portrait = get(f"{url}/v1/assets/{urllib.request.quote(str((PHOTOS / 'portrait.jpg').resolve()), safe='')}")
    assert portrait["width"] == 840 and portrait["tasks"]["faces"] == ["buffalo_l"]
    book = get(f"{url}/v1/assets/{urllib.request.quote(str((PHOTOS / 'book-beside-flowers.jpg').resolve()), safe='')}")
    words = " ".join(line["text"] for line in book["ocr"])
    assert "dost." in words  # the large word on the printed page (MANIFEST)
    found = post(f"{url}/v1/search/ocr", {"query": "dost."})
    assert book["id"] in [item["assetId"] for item in found["items"]]
