"""Greedy CTC decode of the recognizer's output and its character list.

Sources reproduced: RapidOCR 3.8.1 ``ch_ppocr_rec/utils.py`` ``CTCLabelDecode``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..base import ModelLoadError
from ..download import DICT_FILENAME
from ..onnxfile import load_onnx


class CTCLabelDecode:
    """Greedy CTC decode: argmax per step, repeats collapsed, blank (index 0) dropped.

    Vocabulary ``["blank"] + characters + [" "]``. Score: mean of the kept steps' maxima,
    each rounded to 5 decimals (Python ``round``), the mean rounded again (numpy); 0.0
    for an empty line. As RapidOCR 3.8.1 ``CTCLabelDecode``.
    """

    def __init__(self, characters: Sequence[str]) -> None:
        self.vocab = ["blank", *characters, " "]

    def __call__(self, preds: np.ndarray) -> list[tuple[str, float]]:
        """``preds`` ``float32[B, T, C]`` softmax outputs -> ``(text, score)`` per row."""
        return self.decode(preds.argmax(axis=2), preds.max(axis=2))

    def decode(self, indices: np.ndarray, probs: np.ndarray) -> list[tuple[str, float]]:
        """Greedy decode from per-step argmax ``int[B, T]`` and max ``float32[B, T]``
        (what :func:`ctc_reduced_model` computes inside the graph)."""
        results = []
        for idx, prob in zip(indices, probs):
            selection = np.ones(len(idx), dtype=bool)
            selection[1:] = idx[1:] != idx[:-1]
            selection &= idx != 0
            conf = [round(float(p), 5) for p in prob[selection]] or [0]
            text = "".join(self.vocab[i] for i in idx[selection])
            results.append((text, np.mean(conf).round(5).tolist()))
        return results


def read_characters(model_file: Path) -> list[str]:
    """The recognizer's character list: ONNX metadata key ``character`` (Immich's and
    RapidOCR's files), else :data:`DICT_FILENAME` next to the model (one per line).

    Raises :class:`ModelLoadError` if neither exists or the file is corrupt."""
    return characters_of(load_onnx(model_file), model_file)


def characters_of(model, model_file: Path) -> list[str]:
    """:func:`read_characters` of an already loaded ``model`` read from ``model_file``."""
    for prop in model.metadata_props:
        if prop.key == "character":
            return prop.value.splitlines()
    dict_file = model_file.with_name(DICT_FILENAME)
    if dict_file.is_file():
        return dict_file.read_text(encoding="utf-8").splitlines()
    raise ModelLoadError(f"{model_file} has no 'character' metadata and no {DICT_FILENAME} beside it")
