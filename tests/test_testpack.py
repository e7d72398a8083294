"""The built test models (immich_trt.tools.testpack): Immich's I/O names, shapes and
dtypes, the real CLIP tokenizer, and the analytic SCRFD detector."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from immich_trt.cli import main
from immich_trt.models.face import ScrfdLayout, decode_scrfd, scrfd_postprocess
from immich_trt.tools import testpack as tp

CLIP = "clip/ViT-B-32__openai"
FACES = "facial-recognition/buffalo_l"


@pytest.fixture(scope="module")
def bpe_vocab() -> Path:
    try:
        return tp.find_bpe_vocab()
    except FileNotFoundError as exc:  # offline with no package shipping the file
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory, bpe_vocab: Path) -> Path:
    root = tmp_path_factory.mktemp("test-pack")
    tp.make_test_pack(root, bpe_vocab=bpe_vocab)
    return root


@pytest.fixture(scope="module")
def face_pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("face-pack")
    tp.make_test_pack(root, clip_models=(), face_models=("buffalo_l",))
    return root


def session(source: Path | onnx.ModelProto) -> ort.InferenceSession:
    data = source.SerializeToString() if isinstance(source, onnx.ModelProto) else str(source)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def io(sess: ort.InferenceSession) -> tuple[list, list]:
    return [(i.name, i.type, i.shape) for i in sess.get_inputs()], [
        (o.name, o.type, o.shape) for o in sess.get_outputs()
    ]


# --- layout ------------------------------------------------------------------------------


def test_pack_writes_the_immich_layout(pack: Path) -> None:
    files = sorted(str(p.relative_to(pack)) for p in pack.rglob("*") if p.is_file())
    textual = [
        f"{CLIP}/textual/{n}"
        for n in (
            "merges.txt",
            "model.onnx",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "vocab.json",
        )
    ]
    assert files == sorted(
        [
            f"{CLIP}/config.json",
            f"{CLIP}/visual/model.onnx",
            f"{CLIP}/visual/preprocess_cfg.json",
            *textual,
            f"{FACES}/detection/model.onnx",
            f"{FACES}/recognition/model.onnx",
        ]
    )
    for path in pack.rglob("model.onnx"):
        onnx.checker.check_model(str(path))
        assert path.stat().st_size < 4 * 2**20


def test_clip_configs(pack: Path) -> None:
    config = json.loads((pack / CLIP / "config.json").read_text())
    assert config == {
        "embed_dim": 512,
        "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
    }
    assert json.loads((pack / CLIP / "visual" / "preprocess_cfg.json").read_text()) == {
        "size": [224, 224],
        "mode": "RGB",
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
        "fill_color": 0,
    }


def test_same_seed_same_models() -> None:
    cfg = tp.CLIP_CONFIGS[tp.DEFAULT_CLIP]
    assert tp.clip_visual_model(cfg, 3).SerializeToString() == tp.clip_visual_model(cfg, 3).SerializeToString()
    assert tp.clip_visual_model(cfg, 3).SerializeToString() != tp.clip_visual_model(cfg, 4).SerializeToString()
    assert tp.arcface_model(3).SerializeToString() == tp.arcface_model(3).SerializeToString()


def test_unknown_names_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no test CLIP model"):
        tp.make_test_pack(tmp_path, clip_models=("RN50__openai",), face_models=(), bpe_vocab=tmp_path / "x")
    with pytest.raises(ValueError, match="no test face model"):
        tp.make_test_pack(tmp_path, clip_models=(), face_models=("buffalo_xl",))


# --- CLIP ----------------------------------------------------------------------------------


def test_clip_visual(pack: Path) -> None:
    sess = session(pack / CLIP / "visual" / "model.onnx")
    assert io(sess) == ([("image", "tensor(float)", [1, 3, 224, 224])], [("embedding", "tensor(float)", [1, 512])])
    rng = np.random.default_rng(0)
    a, b = (sess.run(None, {"image": rng.normal(size=(1, 3, 224, 224)).astype(np.float32)})[0] for _ in range(2))
    assert a.dtype == np.float32 and a.shape == (1, 512)
    assert np.linalg.norm(a) == pytest.approx(1.0, abs=1e-5) and np.linalg.norm(b) == pytest.approx(1.0, abs=1e-5)
    assert (a @ b.T).item() < 0.99  # different images, different embeddings
    zero = sess.run(None, {"image": np.zeros((1, 3, 224, 224), np.float32)})[0]
    assert np.linalg.norm(zero) == pytest.approx(1.0, abs=1e-5)


def immich_tokenizer(textual: Path):
    """The tokenizer set up as immich-ml's textual encoder does."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(textual / "tokenizer.json"))
    pad_token = json.loads((textual / "tokenizer_config.json").read_text())["pad_token"]
    pad_id = tokenizer.token_to_id(pad_token)
    assert pad_id is not None
    tokenizer.enable_padding(length=77, pad_token=pad_token, pad_id=pad_id)
    tokenizer.enable_truncation(max_length=77)
    return tokenizer


def test_clip_tokenizer_known_encodings(pack: Path) -> None:
    textual = pack / CLIP / "textual"
    tokenizer = immich_tokenizer(textual)
    ids = tokenizer.encode("a photo of a cat").ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70
    assert tokenizer.encode("hello world").ids[:5] == [49406, 3306, 1002, 49407, 49407]
    # lowercase and whitespace normalisation, punctuation and digits split as CLIP does
    assert tokenizer.encode("  A   PHOTO of\ta Dog! ").ids[:9] == [49406, 320, 1125, 539, 320, 1929, 256, 49407, 49407]
    assert tokenizer.encode("don't 123").tokens[:7] == [
        "<|startoftext|>",
        "don</w>",
        "'t</w>",
        "1</w>",
        "2</w>",
        "3</w>",
        "<|endoftext|>",
    ]
    long = tokenizer.encode("cat " * 100).ids
    assert len(long) == 77 and long[0] == 49406 and long[-1] == 49407


def test_clip_tokenizer_files(pack: Path, bpe_vocab: Path) -> None:
    textual = pack / CLIP / "textual"
    vocab = json.loads((textual / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and vocab["!"] == 0 and vocab["a</w>"] == 320 and vocab["<|endoftext|>"] == 49407
    merges = (textual / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and merges[1] == "i n" and len(merges) == 1 + 48894
    config = json.loads((textual / "tokenizer_config.json").read_text())
    assert (config["pad_token"], config["bos_token"], config["eos_token"], config["model_max_length"]) == (
        "<|endoftext|>",
        "<|startoftext|>",
        "<|endoftext|>",
        77,
    )
    assert json.loads((textual / "special_tokens_map.json").read_text())["pad_token"] == "<|endoftext|>"
    model = json.loads((textual / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    assert (model["type"], model["end_of_word_suffix"], model["unk_token"]) == ("BPE", "</w>", "<|endoftext|>")
    assert list(tp.bytes_to_unicode().values())[:3] == ["!", '"', "#"] and len(tp.bytes_to_unicode()) == 256


def test_bpe_vocab_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tp, "_BPE_VOCAB_PACKAGES", ())
    (tmp_path / tp.BPE_VOCAB_NAME).write_bytes(b"not the vocabulary")
    with pytest.raises(FileNotFoundError):
        tp.find_bpe_vocab(tmp_path, download=False)


def test_clip_textual(pack: Path) -> None:
    sess = session(pack / CLIP / "textual" / "model.onnx")
    assert io(sess) == ([("text", "tensor(int32)", [1, 77])], [("embedding", "tensor(float)", [1, 512])])
    tokenizer = immich_tokenizer(pack / CLIP / "textual")

    def embed(text: str) -> np.ndarray:
        ids = np.array([tokenizer.encode(text).ids], np.int32)
        return sess.run(None, {"text": ids})[0]

    cat, dog = embed("a photo of a cat"), embed("a photo of a dog")
    assert cat.shape == (1, 512) and cat.dtype == np.float32
    assert np.linalg.norm(cat) == pytest.approx(1.0, abs=1e-5) and np.linalg.norm(dog) == pytest.approx(1.0, abs=1e-5)
    assert (cat @ dog.T).item() < 0.999
    np.testing.assert_array_equal(cat, embed("a photo of a cat"))


# --- face detection -------------------------------------------------------------------------


def test_detector_io(face_pack: Path) -> None:
    inputs, outputs = io(session(face_pack / FACES / "detection" / "model.onnx"))
    assert inputs == [("input.1", "tensor(float)", [1, 3, "?", "?"])]
    assert [o[0] for o in outputs] == list(tp.SCRFD_OUTPUTS)
    assert [(o[1], len(o[2]), o[2][-1]) for o in outputs] == [
        ("tensor(float)", 2, c) for c in (1, 1, 1, 4, 4, 4, 10, 10, 10)
    ]


def test_detector_responds_at_the_square_only(face_pack: Path) -> None:
    sess = session(face_pack / FACES / "detection" / "model.onnx")
    image = tp.bright_square_image(640, 640, [(320, 192, 32)])
    blob = tp.scrfd_blob(image)
    outputs = sess.run(None, {"input.1": blob})
    assert [o.shape for o in outputs] == [(n, c) for c in (1, 4, 10) for n in (12800, 3200, 800)]
    reference = tp.scrfd_reference(blob)
    for got, want in zip(outputs[:3], reference[:3]):
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
    for got, want in zip(outputs[3:], reference[3:]):
        np.testing.assert_array_equal(got, want)

    layout = ScrfdLayout(list(tp.SCRFD_OUTPUTS), batched=False)
    scores, boxes, kps = (np.concatenate(x) for x in decode_scrfd(outputs, layout, (640, 640), 0.7))
    assert len(scores) == 2 + 8 + 32  # every anchor of every cell inside the square, nothing else
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    assert ((centres >= (320, 192)) & (centres < (352, 224))).all()
    np.testing.assert_array_equal(boxes[:, 2:] - boxes[:, :2], np.full((42, 2), 96))
    np.testing.assert_array_equal(kps - centres[:, None, :], np.broadcast_to(np.float32(tp.SCRFD_LANDMARKS), (42, 5, 2)))
    # every raw score is sigmoid(20 * (255/256 - T) + DELTA * n / N) of its own row: no ties
    m = 255 / 256
    for score_rows, s in zip(outputs[:3], tp.STRIDES):
        rows = np.flatnonzero(score_rows[:, 0] >= 0.7)
        i, j, a = rows // 2 // (640 // s), rows // 2 % (640 // s), rows % 2
        assert ((i * s >= 192) & (i * s < 224) & (j * s >= 320) & (j * s < 352)).all()
        t = np.array(tp.SCRFD_THRESHOLDS[s])[a]
        expected = 1 / (1 + np.exp(-(20 * (m - t) + tp.SCRFD_TIE_BREAK * rows / len(score_rows))))
        np.testing.assert_allclose(score_rows[rows, 0], expected, atol=2e-6, rtol=0)
    assert len(np.unique(scores)) == 42
    black_outputs = sess.run(None, {"input.1": tp.scrfd_blob(np.zeros((640, 640, 3), np.uint8))})
    assert max(o.max() for o in black_outputs[:3]) < 1e-14
    black = decode_scrfd(black_outputs, layout, (640, 640), 1e-9)
    assert sum(len(x) for x in black[0]) == 0


@pytest.mark.parametrize("value", [255, 245, 235, 215])
def test_uniform_images_have_no_tied_scores(face_pack: Path, value: int) -> None:
    """The tie-breaker: all 16800 rows of a uniform 640x640 image (scores ~0.03..0.995)
    score differently, across strides too; same-anchor neighbours differ by 2 * DELTA / N
    in the logit."""
    sess = session(face_pack / FACES / "detection" / "model.onnx")
    blob = tp.scrfd_blob(np.full((640, 640, 3), value, np.uint8))
    outputs = sess.run(None, {"input.1": blob})
    scores = np.concatenate([o.ravel() for o in outputs[:3]])
    assert scores.shape == (16800,) and len(np.unique(scores)) == 16800
    for got, want in zip(outputs[:3], tp.scrfd_reference(blob)[:3]):
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
    if value == 255:  # scores 0.94..0.995: the steps stay well above float32 resolution
        for o in outputs[:3]:
            steps = np.diff(o[:, 0].astype(np.float64).reshape(-1, 2), axis=0)
            assert steps.min() > 1e-6
        s8 = outputs[0][:, 0].astype(np.float64)
        near = np.flatnonzero(np.abs(s8 - 0.98) < 0.005)
        near = near[near + 2 < len(s8)]
        assert len(near) > 0 and (s8[near + 2] - s8[near]).min() > 3e-6


def test_tie_break_and_square_face() -> None:
    tie = tp.scrfd_tie_break(12800)
    assert tie.dtype == np.float32 and tie[0] == 0 and tie[-1] < tp.SCRFD_TIE_BREAK
    assert (np.diff(tie) > 0).all()
    np.testing.assert_allclose(tie, tp.SCRFD_TIE_BREAK * np.arange(12800) / 12800, rtol=1e-6, atol=0)
    # square_face is the stride-32 anchor-0 row of its square, tie-breaker included
    for x0, y0 in ((0, 0), (320, 192), (608, 608)):
        n = 2 * ((y0 // 32) * 20 + x0 // 32)
        logit = 20 * (255 / 256 - 0.8) + tp.SCRFD_TIE_BREAK * n / 800
        assert tp.square_face(x0, y0)[1] == pytest.approx(1 / (1 + np.exp(-logit)), abs=1e-6)


def test_squares_give_one_face_each_after_nms(face_pack: Path) -> None:
    """The pipeline's decode + NMS (immich_trt.models.face) against the analytic truth."""
    sess = session(face_pack / FACES / "detection" / "model.onnx")
    squares = [(320, 192, 32, 255), (64, 448, 32, 245), (576, 0, 32, 238)]
    image = np.zeros((640, 640, 3), np.uint8)
    for x0, y0, side, value in squares:
        image[y0 : y0 + side, x0 : x0 + side] = value
    layout = ScrfdLayout(list(tp.SCRFD_OUTPUTS), batched=False)
    faces = scrfd_postprocess(sess.run(None, {"input.1": tp.scrfd_blob(image)}), layout, (640, 640), 1.0, 0.7)
    assert len(faces["scores"]) == 3
    for i, (x0, y0, _, value) in enumerate(squares):  # score order = grey-level order
        box, score, landmarks = tp.square_face(x0, y0, value)
        np.testing.assert_array_equal(faces["boxes"][i], box)
        np.testing.assert_array_equal(faces["landmarks"][i], landmarks)
        assert faces["scores"][i] == pytest.approx(score, abs=2e-6)


def test_equal_squares_are_ordered_by_place(face_pack: Path) -> None:
    """At one grey level the tie-breaker orders the faces: later stride-32 row first."""
    sess = session(face_pack / FACES / "detection" / "model.onnx")
    squares = [(320, 192), (64, 448), (576, 0), (0, 608)]
    image = tp.bright_square_image(640, 640, [(x0, y0, 32) for x0, y0 in squares])
    layout = ScrfdLayout(list(tp.SCRFD_OUTPUTS), batched=False)
    faces = scrfd_postprocess(sess.run(None, {"input.1": tp.scrfd_blob(image)}), layout, (640, 640), 1.0, 0.7)
    expected = sorted(squares, key=lambda p: (p[1] // 32, p[0] // 32), reverse=True)
    assert len(faces["scores"]) == 4 and len(set(faces["scores"].tolist())) == 4
    for i, (x0, y0) in enumerate(expected):
        box, score, landmarks = tp.square_face(x0, y0)
        np.testing.assert_array_equal(faces["boxes"][i], box)
        np.testing.assert_array_equal(faces["landmarks"][i], landmarks)
        assert faces["scores"][i] == pytest.approx(score, abs=2e-6)


def test_detector_other_sizes_and_batched_layout() -> None:
    blob = tp.scrfd_blob(tp.bright_square_image(480, 320, [(64, 64, 64)]))
    outputs = session(tp.scrfd_model()).run(None, {"input.1": blob})
    assert [o.shape[0] for o in outputs[:3]] == [40 * 60 * 2, 20 * 30 * 2, 10 * 15 * 2]
    batched_sess = session(tp.scrfd_model(batched=True))
    assert all(len(o.shape) == 3 and o.shape[0] == 1 for o in batched_sess.get_outputs())
    batched = batched_sess.run(None, {"input.1": blob})
    for got, want in zip(batched, outputs):
        np.testing.assert_array_equal(got, want[None])
    for got, want in zip(batched, tp.scrfd_reference(blob, batched=True)):
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)


# --- face recognition -----------------------------------------------------------------------


def first_nodes_normalise(model: onnx.ModelProto) -> bool:
    nodes = model.graph.node[:8]
    sub = any(n.name.startswith(("Sub", "_minus")) for n in nodes)
    mul = any(n.name.startswith(("Mul", "_mul")) for n in nodes)
    return sub and mul


def test_recognizer(face_pack: Path) -> None:
    path = face_pack / FACES / "recognition" / "model.onnx"
    assert not first_nodes_normalise(onnx.load(str(path)))  # insightface uses mean = std = 127.5
    sess = session(path)
    assert io(sess) == (
        [("input.1", "tensor(float)", ["None", 3, 112, 112])],
        [("683", "tensor(float)", ["None", 512])],
    )
    rng = np.random.default_rng(1)
    for n in (1, 3):
        crops = rng.integers(0, 256, (n, 3, 112, 112)).astype(np.float32)
        out = sess.run(None, {"input.1": (crops - 127.5) / 127.5})[0]
        assert out.shape == (n, 512) and out.dtype == np.float32
        assert (np.linalg.norm(out, axis=1) > 1.5).all()  # not normalised


def test_recognizer_mxnet_variant() -> None:
    plain, mxnet = tp.arcface_model(5), tp.arcface_model(5, mxnet_normalisation=True)
    assert first_nodes_normalise(mxnet) and not first_nodes_normalise(plain)
    pixels = np.random.default_rng(2).integers(0, 256, (2, 3, 112, 112)).astype(np.float32)
    got = session(mxnet).run(None, {"input.1": pixels})[0]
    want = session(plain).run(None, {"input.1": (pixels - 127.5) * np.float32(1 / 128)})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# --- full-size architectures (shallow, to stay fast) and the CLI ----------------------------


def test_full_size_builders_keep_the_io() -> None:
    tiny = tp.ClipConfig(64, 64, 32, 64, 1, 64, 2, 1)
    visual = session(tp.clip_visual_full(tiny))
    emb = visual.run(None, {"image": np.random.default_rng(0).normal(size=(1, 3, 64, 64)).astype(np.float32)})[0]
    assert emb.shape == (1, 64) and np.linalg.norm(emb) == pytest.approx(1.0, abs=1e-5)
    textual = session(tp.clip_textual_full(tiny))
    ids = np.full((1, 77), 49407, np.int32)
    ids[0, :4] = [49406, 3306, 1002, 49407]
    emb = textual.run(None, {"text": ids})[0]
    assert emb.shape == (1, 64) and np.linalg.norm(emb) == pytest.approx(1.0, abs=1e-5)

    crops = np.random.default_rng(1).normal(size=(3, 3, 112, 112)).astype(np.float32)
    for model in (tp.iresnet_model(layers=(1, 1, 1, 1)), tp.mobilefacenet_model(scale=1, mxnet_normalisation=True)):
        out = session(model).run(None, {"input.1": crops})[0]
        assert out.shape == (3, 512) and np.isfinite(out).all()
    detector = session(tp.scrfd_full_model(width=0.25))
    assert [o.name for o in detector.get_outputs()] == list(tp.SCRFD_OUTPUTS)
    outputs = detector.run(None, {"input.1": np.zeros((1, 3, 640, 640), np.float32)})
    assert [o.shape for o in outputs] == [(n, c) for c in (1, 4, 10) for n in (12800, 3200, 800)]
    assert outputs[0].max() < 0.5


def test_cli_make_test_pack(tmp_path: Path, bpe_vocab: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "models",
        "make-test-pack",
        str(tmp_path),
        "--faces",
        "buffalo_s",
        "--faces",
        "antelopev2",
        "--batched-detector",
    ]
    assert main([*argv, "--bpe-vocab", str(bpe_vocab)]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 13 and all(Path(p).is_file() for p in printed)
    detector = session(tmp_path / "facial-recognition" / "antelopev2" / "detection" / "model.onnx")
    assert len(detector.get_outputs()[0].shape) == 3
    assert main(["models", "make-test-pack", str(tmp_path), "--clip", "nope"]) == 2


def test_every_model_file_of_the_pack_is_marked(pack: Path, tmp_path: Path) -> None:
    """The ONNX metadata says "test pack" in every model.onnx written; the server's
    reader (which skips the graph) agrees with onnx's full parse."""
    from immich_trt.models.onnxfile import TEST_PACK_KEY, marked_test_pack, metadata

    files = sorted(pack.glob("*/*/*/model.onnx"))
    assert len(files) == 4
    for path in files:
        assert marked_test_pack(path) == "placeholder", path
        assert metadata(path) == {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    full = tp._save(tp.arcface_model(), tmp_path / "full" / "model.onnx", full_size=True)
    assert marked_test_pack(full) == "full-size random weights"
    assert {p.key for p in onnx.load(str(full)).metadata_props} == {TEST_PACK_KEY}


def test_real_and_damaged_files_are_not_marked(ocr_cache: Path, tmp_path: Path) -> None:
    from immich_trt.models.onnxfile import marked_test_pack, metadata

    for path in sorted(ocr_cache.glob("ocr/*/*/model.onnx")):  # real PP-OCRv5 files
        assert marked_test_pack(path) is None
        assert metadata(path) == {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff" * 64 + b"not protobuf")
    assert marked_test_pack(garbage) is None
    assert marked_test_pack(tmp_path / "absent.onnx") is None


def test_cli_make_test_pack_warns_that_answers_are_placeholders(tmp_path: Path, bpe_vocab: Path, capsys) -> None:
    assert main(["models", "make-test-pack", str(tmp_path), "--bpe-vocab", str(bpe_vocab)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("WARNING: these are test models") and "placeholders" in err and "smoke tests only" in err
    from immich_trt.models.fetch import list_cache

    rows = list_cache(tmp_path)
    assert len(rows) == 4 and all(row[4] == "test pack: placeholder" for row in rows)
