#!/usr/bin/env python3
"""Build the Triton model repository under engines/ (same as `immich-trt build-engines`).

`python build_engines.py --target cpu` writes python-backend models running onnxruntime;
`python build_engines.py --target tensorrt [--precision fp16|fp32|int8] [--gpus 0,1]
[--model NAME] [--output DIR] [--force]` builds TensorRT engines on this machine's GPU.
"""

import sys

from immich_trt.cli import main

if __name__ == "__main__":
    sys.exit(main(["build-engines", *sys.argv[1:]]))
