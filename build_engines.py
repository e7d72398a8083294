#!/usr/bin/env python3
"""Build the Triton model repository under engines/ (same as `immich-trt build-engines`)."""

import sys

from immich_trt.cli import main

if __name__ == "__main__":
    sys.exit(main(["build-engines", *sys.argv[1:]]))
