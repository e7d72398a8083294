"""Property-based API test: schemathesis generates requests from ``/v1/openapi.json``
(valid and invalid ones) and sends them to the real server. No request may get a 5xx,
and every answer must be one the document declares (status, content type, schema).

The model-name enums are narrowed to the models of the test cache: any other Immich
model is valid input but cannot be obtained offline, which the API rightly answers with
503 (tested in test_sidecar_api)."""

from __future__ import annotations

import io

import hypothesis
import schemathesis
from hypothesis import strategies as st
from PIL import Image
from schemathesis.generation import GenerationMode

from immich_trt.sidecar.routes import openapi_document

OFFLINE_MODELS = {"clipModel": "ViT-B-32__openai", "faceModel": "buffalo_l", "ocrModel": "PP-OCRv5_mobile"}


def png(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


# decodable images for the file fields (an undecodable file is rightly a 400, which the
# schema cannot express; test_sidecar_api covers those)
schemathesis.openapi.format(
    "png-image",
    st.builds(png, st.tuples(st.integers(1, 64), st.integers(1, 64)), st.tuples(*[st.integers(0, 255)] * 3)),
)


def offline_document() -> dict:
    document = openapi_document()
    for path, operations in document["paths"].items():
        for operation in operations.values():
            for content in operation.get("requestBody", {}).get("content", {}).values():
                for name, prop in content["schema"]["properties"].items():
                    if prop.get("format") == "binary":
                        prop["format"] = "png-image"
                    if "enum" in prop:
                        model = OFFLINE_MODELS.get(name) or ("buffalo_l" if "face" in path else "ViT-B-32__openai")
                        assert model in prop["enum"]
                        prop["enum"] = [model]
    return document


schema = schemathesis.openapi.from_dict(offline_document())
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])


@schema.parametrize()
@hypothesis.settings(
    max_examples=12,
    deadline=None,
    derandomize=True,  # the same requests on every run: a CI failure reproduces locally
    suppress_health_check=list(hypothesis.HealthCheck),
    database=None,
)
def test_api_never_fails_and_matches_its_document(case, live_server) -> None:
    case.call_and_validate(base_url=live_server.url)
