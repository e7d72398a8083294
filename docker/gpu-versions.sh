#!/usr/bin/env bash
# What NVIDIA's Triton image loads, so the Python packages that build engines and
# serialize pipelines match its backends:
#
#   gpu-versions.sh tensorrt       the image's TensorRT library (libnvinfer), e.g. 10.8.0.43
#   gpu-versions.sh tensorrt-pip   the pip requirement of its Python bindings, e.g.
#                                  tensorrt-cu12==10.8.0.*  (cuNN from CUDA_VERSION)
#   gpu-versions.sh dali           the DALI the DALI backend bundles (and the image puts
#                                  on PYTHONPATH), e.g. 1.49.0
#   gpu-versions.sh check          the importable tensorrt and nvidia.dali are those
#
# PyPI's TensorRT wheels have 3-part versions up to 10.7 (10.3.0, 10.7.0.post1) and
# 4-part ones from 10.8 (10.8.0.43), while the library's package version always has
# four (10.3.0.26-1+cuda12.5): the requirement pins the first three parts, X.Y.Z.*,
# which is what a plan's compatibility depends on. GPU_VERSIONS_ROOT prefixes every
# path (tests).
set -euo pipefail
root="${GPU_VERSIONS_ROOT:-}"
dali_dir="$root/opt/tritonserver/backends/dali/wheel/dali"

tensorrt_library() {
    local version lib
    version=$(dpkg-query -W -f='${Version}\n' 'libnvinfer[0-9]*' 2>/dev/null | head -n1 | cut -d- -f1 || true)
    if [ -z "$version" ]; then
        lib=$(ls "$root"/usr/lib/*-linux-gnu/libnvinfer.so.[0-9]*.* "$root"/usr/local/tensorrt/lib/libnvinfer.so.[0-9]*.* \
            2>/dev/null | sort -V | tail -n1 || true)
        version=${lib##*libnvinfer.so.}
    fi
    echo "$version"
}

dali_backend() {
    # dali_backend's CMake installs the DALI wheel under backends/dali/wheel/dali (the
    # RPATH of libtriton_dali.so); the server's build.py puts that on PYTHONPATH
    local meta
    meta=$(ls -d "$dali_dir"/nvidia_dali*.dist-info 2>/dev/null | head -n1 || true)
    [ -n "$meta" ] && sed -n 's/^Version: //p' "$meta/METADATA" | head -n1
    return 0
}

fail() {
    echo "gpu-versions.sh: $1" >&2
    exit 1
}

case "${1:-}" in
tensorrt)
    version=$(tensorrt_library)
    [ -n "$version" ] || fail "cannot tell the TensorRT version of this image; pass --build-arg TENSORRT_VERSION=X.Y.Z"
    ;;
tensorrt-pip)
    library=$(tensorrt_library)
    [ -n "$library" ] || fail "cannot tell the TensorRT version of this image; pass --build-arg TENSORRT_VERSION=X.Y.Z"
    cuda="${CUDA_VERSION:-}"
    [ -n "$cuda" ] || fail "CUDA_VERSION is not set (NVIDIA's images set it): cannot pick tensorrt-cu12 or -cu13"
    version="tensorrt-cu${cuda%%.*}==$(echo "$library" | cut -d. -f1-3).*"
    ;;
dali)
    version=$(dali_backend)
    [ -n "$version" ] || fail "no DALI under $dali_dir: is this NVIDIA's Triton image with the DALI backend?"
    ;;
check)
    library=$(tensorrt_library)
    dali=$(dali_backend)
    python3 - "$library" "$dali" <<'EOF'
import sys

library, dali = sys.argv[1], sys.argv[2]
import tensorrt
import nvidia.dali

bindings = tensorrt.__version__
print(f"TensorRT: library {library}, Python bindings {bindings}; DALI: backend {dali}, Python {nvidia.dali.__version__}")
if bindings.split(".")[:3] != library.split(".")[:3]:
    sys.exit(f"TensorRT Python bindings {bindings} do not match the image's TensorRT {library}: engines would not load")
if nvidia.dali.__version__ != dali:
    sys.exit(f"DALI {nvidia.dali.__version__} is not the backend's {dali}: serialize pipelines with the backend's DALI")
EOF
    exit 0
    ;;
*)
    echo "usage: gpu-versions.sh tensorrt|tensorrt-pip|dali|check" >&2
    exit 2
    ;;
esac
echo "$version"
