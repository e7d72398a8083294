#!/usr/bin/env bash
# First start: fetch the models Immich uses by default (IMMICH_TRT_GPU_MODELS) into the
# model cache, build TensorRT engines + DALI pipelines + ensembles for every cached model
# on this GPU (cached: a restart rebuilds nothing), then serve. The server launches and
# supervises /opt/tritonserver itself (IMMICH_TRT_TRITON_SERVER).
set -euo pipefail

# A bind mount created by Docker (or by root on the host) is owned by root; the server
# runs as uid 10001 (group 0) and must write there. Named volumes take the image's
# ownership and never fail this.
for dir in "${MACHINE_LEARNING_CACHE_FOLDER:-/cache}" "${IMMICH_TRT_ENGINES_DIR:-/engines}" "${IMMICH_TRT_DATA_DIR:-/data}"; do
    if [ -d "$dir" ] && ! [ -w "$dir" ]; then
        echo "entrypoint: $dir is not writable by uid $(id -u); on the host run: sudo chown -R $(id -u):0 <the folder mounted at $dir> (or use the named volumes of docker/compose.yml)" >&2
        exit 1
    fi
done

models="${IMMICH_TRT_GPU_MODELS:-clip:ViT-B-32__openai ocr:PP-OCRv5_mobile facial-recognition:buffalo_l}"
for item in $models; do
    task="${item%%:*}"
    name="${item#*:}"
    case "$task" in
    clip) types="visual textual" ;;
    *) types="detection recognition" ;;
    esac
    for type in $types; do
        immich-trt models fetch "$name" --task "$task" --type "$type" >/dev/null \
            || echo "entrypoint: could not fetch $task $type model '$name' (offline?); it is built when present" >&2
    done
done

# a model that fails to build is reported in the summary and answered with a load error
# (Immich then tries its next ML URL); the others are served
immich-trt build-engines --target tensorrt \
    --output "${IMMICH_TRT_ENGINES_DIR:-/engines}" \
    --precision "${IMMICH_TRT_PRECISION:-fp16}" \
    --gpus "${MACHINE_LEARNING_DEVICE_IDS:-0}" \
    || echo "entrypoint: engine build reported failures (see above); serving what was built" >&2

exec immich-trt serve "$@"
