"""Prometheus metrics, served at ``GET /metrics``.

One registry per application so that several apps in one process (tests) do not clash.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

#: Latency buckets in seconds: from a cached text embedding to a cold model load.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Metrics:
    """The server's counters and histograms (names prefixed ``immich_trt_``)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "immich_trt_http_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.request_latency = Histogram(
            "immich_trt_predict_seconds", "Whole /predict latency", buckets=LATENCY_BUCKETS, registry=r
        )
        self.inference_latency = Histogram(
            "immich_trt_inference_seconds",
            "Latency of one model step (preprocess + inference + postprocess) by task and type",
            ["task", "type"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "immich_trt_errors", "Error responses by status and reason", ["status", "reason"], registry=r
        )
        self.model_loads = Counter(
            "immich_trt_model_loads", "Model loads by task, type and outcome", ["task", "type", "outcome"], registry=r
        )
        self.model_load_seconds = Histogram(
            "immich_trt_model_load_seconds", "Model load time", ["task", "type"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.models_loaded = Gauge("immich_trt_models_loaded", "Models currently loaded", registry=r)
        self.in_flight = Gauge("immich_trt_predict_in_flight", "/predict requests in flight", registry=r)

    def render(self) -> tuple[bytes, str]:
        """Body and content type of the text exposition format."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
