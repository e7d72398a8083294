"""immich-trt: a drop-in replacement for Immich's machine-learning service on Triton."""

__version__ = "0.1.0"
