"""What the SCRFD detector and the ArcFace recognizer share: the task and the file
download from Immich's Hugging Face repositories."""

from __future__ import annotations

from ..base import InferenceModel
from ..registry import ModelTask


class _FaceModel(InferenceModel):
    task = ModelTask.FACIAL_RECOGNITION

    def _obtain(self) -> None:
        self._obtain_from_hub(self.model_file)
