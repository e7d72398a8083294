"""bench/ocr_accuracy.py: its metrics on known cases, and its whole code path (rendering
with the Debian fonts, Immich-like previews, the in-process OCR, the tables) on a few
images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import SHARED_DATA, load_bench_script, requires_data

bench = load_bench_script("ocr_accuracy")


def test_substring_fit_finds_the_best_place() -> None:
    assert bench.substring_fit("world", "helloworld") == (0, 5)
    assert bench.substring_fit("wrld", "helloworld") == (1, 5)
    assert bench.substring_fit("abc", "xyz")[0] == 3
    assert bench.levenshtein("kitten", "sitting") == 3 and bench.levenshtein("", "abc") == 3


def test_scores_of_known_cases() -> None:
    exact = bench.score_image(["Hello world", "42"], ["42", "Hello world"])
    assert (exact.cer, exact.recall, exact.precision) == (0.0, 1.0, 1.0)
    # a line read in two pieces, in any order, is whole again; spaces do not count
    split = bench.score_image(["Hello world"], ["world", "Hello"])
    assert (split.errors, split.recalled, split.assigned) == (0, 1, 2)
    # NFKC: ℃ is °C, full-width ￥ is ¥
    assert bench.score_image(["-40°C ￥5"], ["-40℃ ¥5"]).errors == 0
    # a missed line is all deletions; junk is a false positive, not a CER error
    missed = bench.score_image(["abcd", "efgh"], ["abcd", "zzzzzz"])
    assert (missed.gt_chars, missed.errors, missed.recalled, missed.predicted, missed.assigned) == (8, 4, 1, 2, 1)
    # one error in 10 characters is still recalled, two are not
    assert bench.score_image(["abcdefghij"], ["abcdefghiX"]).recalled == 1
    assert bench.score_image(["abcdefghij"], ["abcdefghXX"]).recalled == 0
    # equal lines (two price tags) each get one reading
    twice = bench.score_image(["10.0起", "10.0起"], ["10.0起", "10.0起"])
    assert (twice.errors, twice.recalled) == (0, 2)
    empty = bench.score_image([], ["noise"])
    assert (empty.cer, empty.recall, empty.precision) == (0.0, 1.0, 0.0)


def test_labels_name_real_files_of_the_shared_data() -> None:
    labels = json.loads(bench.LABELS.read_text(encoding="utf-8"))["images"]
    assert len(labels) == 19 and sum(len(e["lines"]) for e in labels.values()) == 97
    if SHARED_DATA.is_dir():
        assert all((SHARED_DATA / name).is_file() for name in labels)


def test_missing_fonts_say_what_to_install(monkeypatch) -> None:
    monkeypatch.setattr(bench, "FONT_DIRS", ("/nonexistent",))
    with pytest.raises(SystemExit, match="apt-get install fonts-dejavu-core fonts-liberation"):
        bench.font_files("cjk")


@requires_data
def test_the_bench_runs_end_to_end_on_a_few_images(ocr_models_cache, tmp_path: Path, capsys) -> None:
    cache, _ = ocr_models_cache
    out = tmp_path / "result.json"
    code = bench.main(
        ["--models", "PP-OCRv5_mobile,PP-OCRv6_tiny-immichproc", "--synthetic", "1", "--real", "en.jpg,short.png",
         "--cache", str(cache), "--json", str(out), "--save-images", str(tmp_path / "images")]
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "| PP-OCRv5_mobile |" in table and "| PP-OCRv6_tiny-immichproc |" in table and "CPU s/image" in table
    result = json.loads(out.read_text(encoding="utf-8"))
    assert len(result["samples"]) == 6 + 2 and len(list((tmp_path / "images").glob("*.jpg"))) == 6
    en = next(s for s in result["samples"] if s["name"] == "ocr/en.jpg")
    assert "of this dataset are specified as follows." in en["predicted"]["PP-OCRv5_mobile"]
    scores = result["scores"]["PP-OCRv5_mobile"]
    assert scores["real"]["cer"] < 0.2 and scores["synthetic"]["gt_lines"] >= 6
    assert result["speed"]["PP-OCRv5_mobile"]["images"] == 8 and result["speed"]["PP-OCRv5_mobile"]["cpu_s"] > 0
