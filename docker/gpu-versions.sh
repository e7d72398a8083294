#!/usr/bin/env bash
# Prints the version of TensorRT (`gpu-versions.sh tensorrt`) or DALI (`gpu-versions.sh
# dali`) that the Triton installation of this image loads, so the Python packages used
# to build engines and serialize pipelines match its backends.
set -euo pipefail
case "${1:-}" in
tensorrt)
    version=$(dpkg-query -W -f='${Version}' libnvinfer10 2>/dev/null | cut -d- -f1 || true)
    if [ -z "$version" ]; then
        lib=$(ls /usr/lib/x86_64-linux-gnu/libnvinfer.so.10.* /usr/local/tensorrt/lib/libnvinfer.so.10.* 2>/dev/null | head -n1 || true)
        version=${lib##*libnvinfer.so.}
    fi
    ;;
dali)
    meta=$(ls -d /opt/tritonserver/backends/dali/*/nvidia_dali*.dist-info /opt/tritonserver/backends/dali/nvidia_dali*.dist-info 2>/dev/null | head -n1 || true)
    version=""
    if [ -n "$meta" ]; then
        version=$(sed -n 's/^Version: //p' "$meta/METADATA" | head -n1)
    fi
    if [ -z "$version" ]; then
        file=$(ls /opt/tritonserver/backends/dali/dali/VERSION /opt/tritonserver/backends/dali/VERSION 2>/dev/null | head -n1 || true)
        version=$([ -n "$file" ] && tr -d '[:space:]' <"$file" || true)
    fi
    ;;
*)
    echo "usage: gpu-versions.sh tensorrt|dali" >&2
    exit 2
    ;;
esac
if [ -z "${version:-}" ]; then
    echo "gpu-versions.sh: cannot tell the $1 version of this image; pass --build-arg ${1^^}_VERSION=..." >&2
    exit 1
fi
echo "$version"
