import pytest

from immich_trt.models.entries import InvalidEntries, parse_entries


def test_dependency_split() -> None:
    without, with_ = parse_entries(
        '{"ocr":{"detection":{"modelName":"PP-OCRv5_mobile","options":{"minScore":0.5}},'
        '"recognition":{"modelName":"PP-OCRv5_mobile"}},"clip":{"visual":{"modelName":"ViT-B-32__openai"}}}'
    )
    assert [(e.task, e.type) for e in without] == [("ocr", "detection"), ("clip", "visual")]
    assert [(e.task, e.type) for e in with_] == [("ocr", "recognition")]
    assert without[0].options == {"minScore": 0.5}
    assert with_[0].options == {}


def test_empty_request_is_valid() -> None:
    assert parse_entries("{}") == ([], [])


@pytest.mark.parametrize(
    "entries",
    [
        "not json",  # JSONDecodeError
        '{"clip":{"visual":{}}}',  # KeyError: modelName
        "[]",  # AttributeError: list.items
        '"text"',
        '{"clip":[1]}',  # AttributeError: list.items
        '{"clip":{"visual":{"modelName":5}}}',  # AttributeError in clean_name, as upstream
    ],
)
def test_malformed_is_invalid_request_format(entries: str) -> None:
    with pytest.raises(InvalidEntries, match="Invalid request format."):
        parse_entries(entries)


@pytest.mark.parametrize(
    ("entries", "error"),
    [
        ('{"clip":{"visual":{"modelName":"nope"}}}', ValueError),
        ('{"clip":{"visual":"ViT-B-32__openai"}}', TypeError),  # str indices: uncaught upstream
        ('{"clip":{"visual":null}}', TypeError),
    ],
)
def test_errors_that_upstream_does_not_catch(entries: str, error: type) -> None:
    with pytest.raises(error):
        parse_entries(entries)
