#!/usr/bin/env bash
# The GPU latency measurements of docs/PERFORMANCE.md in one go, on one CUDA card: tools/gpu_latency.py, then the
# services on the same card — two `telepathy serve` processes, then one `telepathy serve pair` — which fill
# services_b1_ms_p50 of its JSON. Needs the package installed with its serve extra (and CUDA torch) and OUT set:
#   OUT=results/run bash tools/gpu_latency_run.sh
set -uo pipefail
: "${OUT:?set OUT to the folder for the JSON files and logs}"
mkdir -p "$OUT"
t0=$(date +%s)
stamp() { echo "[gpu_latency_run $(( $(date +%s) - t0 ))s] $*"; }
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PYTHON=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
GPU_ARGS=${GPU_ARGS:---runs 120 --ablation-runs 30 --relay-runs 5 --relay-eager-runs 2 --throughput-seconds 1.5}
# shellcheck disable=SC2086  # GPU_ARGS is a list of flags
"$PYTHON" tools/gpu_latency.py $GPU_ARGS --out "$OUT/gpu_latency.json" > "$OUT/gpu_latency.log" 2>&1
stamp "gpu_latency done (exit $?)"; tail -25 "$OUT/gpu_latency.log"
SERVICES=(--sender random:llama-3.1-8b --receiver random:mistral-7b-v0.3 --device cuda --sender-layer 28
          --input-tokens 64 --dtypes int8 -n 200 --concurrency 16 --text-n 0 --max-queue-delay-ms 0
          --gpu-latency-json "$OUT/gpu_latency.json" --logs "$OUT")
if [ -z "${SKIP_TWO_PROCESSES:-}" ]; then
  "$PYTHON" tools/bench_services.py --processes "${SERVICES[@]}" --out "$OUT/services_two_processes.json" 2>&1 | tail -8
  stamp "two processes done"
fi
"$PYTHON" tools/bench_services.py --pair --processes "${SERVICES[@]}" --out "$OUT/services_pair.json" 2>&1 | tail -8
stamp "pair done"
