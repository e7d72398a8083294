from pathlib import Path

import pytest

from immich_trt.models.registry import (
    INSIGHTFACE_MODELS,
    MCLIP_MODELS,
    OPENCLIP_MODELS,
    PADDLE_MODELS,
    ModelSource,
    ModelTask,
    ModelType,
    clip_dimension,
    get_model_source,
    model_path,
    resolve,
)


def test_every_immich_name_resolves_to_its_family() -> None:
    assert len(OPENCLIP_MODELS) == 54 and len(MCLIP_MODELS) == 4
    for name in OPENCLIP_MODELS:
        assert resolve(name, "visual", "clip") == (ModelSource.OPENCLIP, ())
        assert resolve(name, "textual", "clip") == (ModelSource.OPENCLIP, ())
    for name in MCLIP_MODELS:
        assert resolve(name, "visual", "clip")[0] is ModelSource.MCLIP
    for name in INSIGHTFACE_MODELS:
        assert resolve(name, "detection", "facial-recognition") == (ModelSource.INSIGHTFACE, ())
        assert resolve(name, "recognition", "facial-recognition")[1] == (
            (ModelType.DETECTION, ModelTask.FACIAL_RECOGNITION),
        )
    for name in PADDLE_MODELS:
        assert resolve(name, "detection", "ocr") == (ModelSource.PADDLE, ())
        assert resolve(name, "recognition", "ocr")[1] == ((ModelType.DETECTION, ModelTask.OCR),)


def test_names_are_cleaned_before_lookup() -> None:
    assert get_model_source("immich-app/ViT-B-32::openai") is ModelSource.OPENCLIP
    assert get_model_source("ViT-B-32__openai.") is ModelSource.OPENCLIP


@pytest.mark.parametrize(
    ("name", "type_", "task"),
    [
        ("nope", "visual", "clip"),
        ("buffalo_l", "visual", "clip"),
        ("PP-OCRv5_mobile", "textual", "ocr"),
        ("ViT-B-32__openai", "visual", "ocr"),
        ("PP-OCRv5_mobile", "detection", "facial-recognition"),
        ("PP-OCRv5_mobile", "bogus", "ocr"),
    ],
)
def test_unknown_combinations_raise_value_error(name: str, type_: str, task: str) -> None:
    with pytest.raises(ValueError):
        resolve(name, type_, task)


def test_clip_dimensions_follow_the_server_table() -> None:
    assert clip_dimension("ViT-B-32__openai") == 512
    assert clip_dimension("ViT-SO400M-16-SigLIP2-384__webli") == 1152
    assert clip_dimension("XLM-Roberta-Large-Vit-B-16Plus") == 640
    assert clip_dimension("nope") is None
    assert set(OPENCLIP_MODELS.values()) | set(MCLIP_MODELS.values()) == {512, 640, 768, 1024, 1152, 1536}


def test_cache_layout() -> None:
    assert model_path(Path("/cache"), "ocr", "EN__PP-OCRv5_mobile", "recognition") == Path(
        "/cache/ocr/EN__PP-OCRv5_mobile/recognition/model.onnx"
    )
    assert model_path(Path("/cache"), "clip", "immich-app/ViT-B-32::openai", "visual") == Path(
        "/cache/clip/ViT-B-32__openai/visual/model.onnx"
    )
