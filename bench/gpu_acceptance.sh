#!/usr/bin/env bash
# The GPU acceptance run, one command on a host with an NVIDIA GPU, Docker and the
# NVIDIA Container Toolkit, from the repository root after README's two set-up commands:
#
#   bench/gpu_acceptance.sh /path/to/your/photos [output folder]
#
# 1. builds and starts immich-trt's GPU image (docker/compose.yml, profile gpu): the first
#    start fetches Immich's default models and builds the engines (minutes);
# 2. starts stock immich-ml's CUDA image beside it on the same model cache (port 3103);
# 3. runs the DALI parity tests inside our image, with the DALI its Triton backend runs
#    (CPU and GPU pipelines of that version, nvJPEG included);
# 4. compares both servers' answers on your photos (bench/gpu_parity.py: CLIP cosine,
#    face boxes and embeddings, OCR texts);
# 5. runs the job-mix bench (`immich-trt bench --scenario job-mix`: Immich's mix of
#    jobs) against both, our server's CPU measured;
# and prints one Markdown report to paste into an issue (also in the output folder).
# Stops stock immich-ml at the end; leaves immich-trt running.
set -euo pipefail

photos="${1:?usage: bench/gpu_acceptance.sh PHOTOS_DIR [OUT_DIR]}"
out="${2:-bench-results/gpu-acceptance}"
compose=(docker compose -f docker/compose.yml --profile gpu)
stock_image="${IMMICH_ML_STOCK_IMAGE:-ghcr.io/immich-app/immich-machine-learning:release-cuda}"
mkdir -p "$out"
report="$out/report.md"

wait_for() {  # url seconds
    local deadline=$((SECONDS + $2))
    until curl -fsS "$1/ping" >/dev/null 2>&1; do
        if ((SECONDS > deadline)); then
            echo "gpu_acceptance: $1 did not answer /ping within $2 s" >&2
            return 1
        fi
        sleep 10
    done
}

echo "== 1/5 immich-trt GPU image (first start builds the engines)"
"${compose[@]}" up -d --build ml-gpu
ours=$("${compose[@]}" ps -q ml-gpu)
wait_for http://localhost:3003 7200

echo "== 2/5 stock immich-ml ($stock_image) on the same model cache"
docker rm -f immich-ml-stock >/dev/null 2>&1 || true
docker run -d --name immich-ml-stock --gpus all -p 127.0.0.1:3103:3003 --volumes-from "$ours" "$stock_image" >/dev/null
trap 'docker rm -f immich-ml-stock >/dev/null 2>&1 || true' EXIT
wait_for http://localhost:3103 1800

echo "== 3/5 DALI parity with the image's DALI"
dali_log="$out/dali-parity.txt"
"${compose[@]}" run --rm --no-deps --user 0 --entrypoint bash -v "$PWD:/src" -w /src ml-gpu -c \
    'pip install -q "pytest==9.2.0" "pytest-asyncio==1.5.0" "pytest-aiohttp==1.1.1" "pyyaml==6.0.3" \
     && python3 -m pytest -q -p no:cacheprovider -s tests/test_dali_parity.py' >"$dali_log" 2>&1 \
    && dali_result="passed" || dali_result="FAILED (see $dali_log)"

echo "== 4/5 parity on your photos"
parity_status=0
.venv/bin/python bench/gpu_parity.py --images "$photos" --out "$out/parity.md" >/dev/null || parity_status=$?

echo "== 5/5 job-mix bench"
pid=$(docker inspect -f '{{.State.Pid}}' "$ours")
.venv/bin/immich-trt bench --scenario job-mix --images "$photos" --out "$out/job-mix" \
    --target "stock=http://localhost:3103" --target "ours=http://localhost:3003,pid=$pid"

{
    echo "### immich-trt GPU acceptance, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | paste -sd ';' -)"
    echo "- Triton: $(docker exec "$ours" printenv NVIDIA_TRITON_SERVER_VERSION 2>/dev/null || echo unknown)," \
        "TensorRT $(docker exec "$ours" gpu-versions.sh tensorrt), DALI $(docker exec "$ours" gpu-versions.sh dali)"
    echo "- immich-trt: $(git rev-parse --short HEAD 2>/dev/null || echo unknown); stock: $stock_image"
    echo "- DALI parity tests in the image: $dali_result"
    echo
    cat "$out/parity.md"
    echo
    cat "$out/job-mix/results.md"
} >"$report"
cat "$report"
exit "$parity_status"
