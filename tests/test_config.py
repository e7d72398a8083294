from pathlib import Path

import pytest

from immich_trt.config import NO_OP_VARIABLES, Settings, clean_name


def test_defaults_match_immich_ml() -> None:
    s = Settings.from_env({})
    assert s.host == "[::]" and s.port == 3003
    assert s.model_ttl == 300 and s.model_ttl_poll_s == 10
    assert s.http_keepalive_timeout_s == 2.0
    assert s.max_batch_size_ocr == 6
    assert s.max_batch_size_facial_recognition is None
    assert s.ort_threads == (1, 2)
    assert s.cache_folder == Path("~/.cache/immich_ml").expanduser()
    assert s.runtime == "auto" and s.triton_url is None
    assert s.preload == {}


def test_machine_learning_variables_are_read_case_insensitively() -> None:
    s = Settings.from_env(
        {
            "machine_learning_cache_folder": "/models",
            "MACHINE_LEARNING_MODEL_TTL": "0",
            "MACHINE_LEARNING_MODEL_TTL_POLL_S": "3",
            "MACHINE_LEARNING_HTTP_KEEPALIVE_TIMEOUT_S": "7.5",
            "MACHINE_LEARNING_REQUEST_THREADS": "0",
            "MACHINE_LEARNING_MODEL_INTER_OP_THREADS": "2",
            "MACHINE_LEARNING_MODEL_INTRA_OP_THREADS": "4",
            "MACHINE_LEARNING_MODEL_ARENA": "false",
            "MACHINE_LEARNING_MAX_BATCH_SIZE__OCR": "3",
            "MACHINE_LEARNING_MAX_BATCH_SIZE__FACIAL_RECOGNITION": "1",
            "MACHINE_LEARNING_DEVICE_IDS": "0,1",
            "IMMICH_HOST": "0.0.0.0",
            "IMMICH_PORT": "3004",
            "IMMICH_LOG_LEVEL": "VERBOSE",
        }
    )
    assert s.cache_folder == Path("/models")
    assert s.model_ttl == 0 and s.model_ttl_poll_s == 3
    assert s.http_keepalive_timeout_s == 7.5
    assert s.request_threads == 0
    assert s.ort_threads == (2, 4)
    assert s.model_arena is False
    assert s.max_batch_size_ocr == 3 and s.max_batch_size_facial_recognition == 1
    assert s.device_ids == ("0", "1")
    assert (s.host, s.bind_host, s.port) == ("0.0.0.0", "0.0.0.0", 3004)
    assert s.log_level == "verbose"


def test_preload_lists() -> None:
    s = Settings.from_env(
        {
            "MACHINE_LEARNING_PRELOAD__OCR__DETECTION": " PP-OCRv5_mobile , EN__PP-OCRv5_mobile",
            "MACHINE_LEARNING_PRELOAD__CLIP__TEXTUAL": "ViT-B-32__openai",
            "MACHINE_LEARNING_PRELOAD__FACIAL_RECOGNITION__RECOGNITION": "",
        }
    )
    assert s.preload == {
        ("ocr", "detection"): ["PP-OCRv5_mobile", "EN__PP-OCRv5_mobile"],
        ("clip", "textual"): ["ViT-B-32__openai"],
    }


def test_ipv6_host_is_unbracketed_for_binding() -> None:
    assert Settings.from_env({"IMMICH_HOST": "[::1]"}).bind_host == "::1"


@pytest.mark.parametrize(
    "env",
    [{"IMMICH_TRT_RUNTIME": "tensorflow"}, {"IMMICH_TRT_TRITON_PROTOCOL": "udp"}, {"IMMICH_PORT": "three"}],
)
def test_bad_values_raise(env: dict) -> None:
    with pytest.raises(ValueError):
        Settings.from_env(env)


def test_every_documented_no_op_variable_is_accepted() -> None:
    env = {name: "1" for name in NO_OP_VARIABLES if name != "MACHINE_LEARNING_DEVICE_IDS"}
    assert Settings.from_env(env) == Settings.from_env({})
    assert set(NO_OP_VARIABLES) >= {
        "MACHINE_LEARNING_WORKER_TIMEOUT",
        "MACHINE_LEARNING_ANN",
        "MACHINE_LEARNING_RKNN",
        "MACHINE_LEARNING_OPENVINO_PRECISION",
        "MACHINE_LEARNING_ROCM_PRECISION",
    }


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("ViT-B-32::openai", "ViT-B-32__openai"),
        ("immich-app/buffalo_l", "buffalo_l"),
        ("PP-OCRv5_mobile", "PP-OCRv5_mobile"),
        ("a.b\\c", "ab_c"),
    ],
)
def test_clean_name(raw: str, clean: str) -> None:
    assert clean_name(raw) == clean
