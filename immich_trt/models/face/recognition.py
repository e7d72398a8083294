"""ArcFace face recognition: normalisation detection, blob, dynamic-batch copy and the
model.

Sources reproduced: immich-ml ``immich_ml/models/facial_recognition/recognition.py``
around insightface 0.7.3 ``model_zoo/arcface_onnx.py`` (``ArcFaceONNX.__init__``/
``get_feat``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx

from ...runtime.base import ModelSpec
from ...runtime.ensemble import FACE_LANDMARKS
from ..base import ModelContext
from ..onnxfile import is_up_to_date, load_onnx, save_onnx_atomic
from ..registry import ModelTask, ModelType
from ..transforms import ImageInput, encoded_bytes, pixels, serialize_np, to_bgr
from .alignment import norm_crop
from .base import _FaceModel

#: The most faces one ArcFace call (Triton ``max_batch_size``, the engine's largest
#: profile batch) takes; a photo with more is sent in chunks.
ARCFACE_MAX_BATCH = 64


def arcface_normalisation(model: Path | onnx.GraphProto) -> tuple[float, float]:
    """(input_mean, input_std) of an ArcFace file or parsed graph: (0, 1) when the first
    8 graph nodes include names starting with Sub/_minus and Mul/_mul (normalisation
    inside the graph), else (127.5, 127.5), as insightface ``ArcFaceONNX.__init__``."""
    graph = model if isinstance(model, onnx.GraphProto) else load_onnx(model).graph
    find_sub = any(n.name.startswith("Sub") or n.name.startswith("_minus") for n in graph.node[:8])
    find_mul = any(n.name.startswith("Mul") or n.name.startswith("_mul") for n in graph.node[:8])
    return (0.0, 1.0) if find_sub and find_mul else (127.5, 127.5)


def recognition_blob(crops: list[np.ndarray], mean: float, std: float) -> np.ndarray:
    """``float32[N, 3, 112, 112]`` RGB ``(x - mean) / std`` (``cv2.dnn.blobFromImages``)."""
    return cv2.dnn.blobFromImages(crops, 1.0 / std, (112, 112), (mean, mean, mean), swapRB=True)


def dynamic_batch_copy(src: Path, dest: Path) -> Path:
    """Write a copy of ``src`` whose first input and output have a symbolic batch axis
    (``"batch"``), for recognizers exported with a static batch of 1. The user's file is
    never rewritten (upstream rewrites it in place). Reuses an up-to-date copy."""
    if is_up_to_date(dest, src):
        return dest
    model = load_onnx(src)
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    return save_onnx_atomic(model, dest, source=src)


class FaceRecognizer(_FaceModel):
    """ArcFace recognizer over the detector's landmarks.

    Output: ``[{"boundingBox": {"x1", "y1", "x2", "y2"}, "embedding": str, "score": f}]``
    in detection order; ``[]`` without faces."""

    type = ModelType.RECOGNITION
    depends = ((ModelType.DETECTION, ModelTask.FACIAL_RECOGNITION),)

    def __init__(self, model_name: str, ctx: ModelContext, **options: Any) -> None:
        super().__init__(model_name, ctx, **options)
        self.batch_size = ctx.settings.max_batch_size_facial_recognition
        self.input_name = "input.1"
        self.output_name: str | None = None
        self.mean, self.std = 127.5, 127.5
        self.runtime_file = self.model_file

    def _spec(self) -> ModelSpec:
        return ModelSpec(
            self.triton_name,
            self.runtime_file,
            max_batch_size=0 if self.batch_size == 1 else ARCFACE_MAX_BATCH,
            from_encoded_image=True,
        )

    def prepare_files(self) -> None:
        graph = load_onnx(self.model_file).graph
        initializers = {i.name for i in graph.initializer}
        first = [i for i in graph.input if i.name not in initializers][0]
        self.input_name = first.name
        self.output_name = graph.output[0].name
        self.mean, self.std = arcface_normalisation(graph)
        batch_dim = first.type.tensor_type.shape.dim[0]
        if batch_dim.HasField("dim_value") and batch_dim.dim_value > 0 and self.batch_size != 1:
            dest = self.ctx.settings.engines_dir / self.triton_name / "1" / "model.onnx"
            self.runtime_file = dynamic_batch_copy(self.model_file, dest)

    def _crops(self, image: ImageInput, landmarks: np.ndarray) -> dict[str, np.ndarray]:
        """The CPU preprocessing: the aligned faces' blob ``{input: float32[N, 3, 112,
        112]}`` (decodes an :class:`EncodedImage`: call it in the executor)."""
        bgr = to_bgr(pixels(image))
        return {self.input_name: recognition_blob([norm_crop(bgr, lmk) for lmk in landmarks], self.mean, self.std)}

    async def _predict(self, image: ImageInput, faces: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        if faces["boxes"].shape[0] == 0:
            return []
        landmarks = faces["landmarks"]
        size = min(len(landmarks) if self.batch_size is None else max(1, self.batch_size), ARCFACE_MAX_BATCH)
        encoded = encoded_bytes(image)
        chunks = []
        for start in range(0, len(landmarks), size):
            chunk = landmarks[start : start + size]
            out = await self.ctx.runtime.infer_image(
                self.triton_name,
                encoded,
                lambda chunk=chunk: self.ctx.run(self._crops, image, chunk),
                ensemble_inputs={FACE_LANDMARKS: np.ascontiguousarray(chunk, dtype=np.float32)[None]},
                outputs=[self.output_name],
                image_size=image.size,
            )
            chunks.append(out[self.output_name])
        embeddings = np.concatenate(chunks)
        return [
            {"boundingBox": {"x1": x1, "y1": y1, "x2": x2, "y2": y2}, "embedding": serialize_np(embedding), "score": score}
            for (x1, y1, x2, y2), embedding, score in zip(faces["boxes"], embeddings, faces["scores"])
        ]
