#!/usr/bin/env bash
# Issue 7's measurements in one device call (docs/PERFORMANCE.md): tools/gpu_latency.py, then the services on the
# same card — two `telepathy serve` processes, then one `telepathy serve pair` — which fill services_b1_ms_p50.
# Needs OUT; carries .whl (grpcio / protobuf wheels for a machine without a package index).
set -uo pipefail
: "${OUT:?set OUT}"
t0=$(date +%s)
stamp() { echo "[gpu_latency_run $(( $(date +%s) - t0 ))s] $*"; }
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/grpc*.whl .whl/protobuf*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
GPU_ARGS=${GPU_ARGS:---runs 120 --ablation-runs 30 --relay-runs 5 --relay-eager-runs 2 --throughput-seconds 1.5}
python3 tools/gpu_latency.py $GPU_ARGS --out "$OUT/gpu_latency.json" > "$OUT/gpu_latency.log" 2>&1
stamp "gpu_latency done (exit $?)"; tail -25 "$OUT/gpu_latency.log"
SERVICES=(--sender random:llama-3.1-8b --receiver random:mistral-7b-v0.3 --device cuda --sender-layer 28
          --input-tokens 64 --dtypes int8 -n 200 --concurrency 16 --text-n 0 --max-queue-delay-ms 0
          --gpu-latency-json "$OUT/gpu_latency.json" --logs "$OUT")
if [ -z "${SKIP_TWO_PROCESSES:-}" ]; then
  python3 scripts/bench_services.py --processes "${SERVICES[@]}" --out "$OUT/services_two_processes.json" 2>&1 | tail -8
  stamp "two processes done"
fi
python3 scripts/bench_services.py --pair --processes "${SERVICES[@]}" --out "$OUT/services_pair.json" 2>&1 | tail -8
stamp "pair done"
