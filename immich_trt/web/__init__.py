"""HTTP plumbing and typed state shared by Immich's ``/predict`` server and the sidecar
(neither imports the other)."""

from .http import METRICS, HTTPError, error_middleware, json_response, read_form
from .metrics import Metrics
from .state import STATE, AppState, PredictionHook

__all__ = [
    "METRICS", "STATE", "AppState", "HTTPError", "Metrics", "PredictionHook", "error_middleware", "json_response",
    "read_form",
]
