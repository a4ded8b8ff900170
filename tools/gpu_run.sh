#!/usr/bin/env bash
# The whole GPU experiment on the device machine (run from the repo root, OUT set to the folder that comes back).
#
# Before it: the two GGUF files were staged with ../shared/tools/device-carry.sh and copied chunk by chunk to
# $MODELS (/root/models) by back-to-back device calls; the last call carries .carry/c06 (last chunk + SHA256SUMS),
# .carry/tok (tokenizers converted by transformers 5.24, see below) and .whl (the gguf wheel), then runs this.
#
# It joins and checks the model files, converts both GGUFs once (in parallel), fixes their tokenizers, runs
# scripts/gpu_experiments.py --role all (one process), then packs the results:
#   $OUT/shipped_<task>.tar, $OUT/results.tar.gz, $OUT/log.txt
set -uo pipefail
MODELS=${MODELS:-/root/models}
WORK=${WORK:-/tmp/telepathy-run}
DEADLINE=${DEADLINE:-480}  # seconds after this script starts by which the roles are stopped (device calls: 600 s)
PIPELINE_ARGS=${PIPELINE_ARGS:-}  # e.g. the re-run: --skip-ablation --baseline-methods ... (docs/RESULTS.md)
EXTRA_ARGS=${EXTRA_ARGS:-}  # e.g. smoke-run sizes for a dry run on a CPU machine
: "${OUT:?set OUT}"
t0=$(date +%s)
stamp() { echo "[gpu_run $(( $(date +%s) - t0 ))s] $*"; }

(cd "$MODELS" && for f in $(ls *.part* 2>/dev/null | sed 's/[.]part[0-9]*$//' | sort -u); do
   cat "$f".part* > "$f" && rm "$f".part*; done && sha256sum -c SHA256SUMS) || { echo "model files incomplete"; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/gguf-*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export TELEPATHY_MODEL_FILES=$MODELS TELEPATHY_CACHE_DIR=/tmp/telepathy-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
stamp "files ready"

for p in smollm2-135m-instruct gemma-3-270m; do
  python3 -c "import sys; from bridge.embedded import converted_path, get_preset; print(converted_path(get_preset(sys.argv[1])))" "$p" 2>&1 | tail -1 &
done
wait
stamp "converted"

# transformers 5.17 (the device's) converts these GGUF tokenizers wrongly: Gemma's becomes character-level without
# BOS, SmolLM2's gets eos=<|im_start|>. The weights it converts are bit-identical to 5.24's, so only the tokenizer
# files are replaced by the ones transformers 5.24 wrote on the CPU machine; the fingerprints must then match.
mkdir -p /tmp/tok && tar xzf .carry/tok/tok.tgz -C /tmp/tok || exit 1
python3 - <<'EOF' || { echo "tokenizer fix failed"; exit 1; }
import shutil
from pathlib import Path
from bridge.embedded import converted_path, get_preset
from bridge.lm import LanguageModel
expected = {"smollm2-135m-instruct": ("smol", "fd79b26b1e26249f"), "gemma-3-270m": ("gemma", "065a555b13c7e5c9")}
for name, (folder, digest) in expected.items():
    target = converted_path(get_preset(name))
    for f in Path("/tmp/tok", folder).iterdir():
        shutil.copy(f, target / f.name)
    got = LanguageModel.load(name).fingerprint().digest
    print(name, got, "ok" if got == digest else f"MISMATCH (expected {digest})")
    assert got == digest
EOF
stamp "tokenizers fixed"

ROLE_TIMEOUT=$(( DEADLINE - ($(date +%s) - t0) ))
stamp "pipeline gets ${ROLE_TIMEOUT}s"
# One process: the first run (2026-11-26) ran the three roles as three processes sharing the GPU; the 9-bridge loop
# took 281 ms per step there, far above the launch-bound estimate (~80 ms), and the linear probe's LBFGS (many host
# syncs) 218 s. Time-slicing between processes is the likely cause, so the roles now run in turn in one process.
# shellcheck disable=SC2086
timeout "$ROLE_TIMEOUT" python3 scripts/gpu_experiments.py --role all --work "$WORK" --pack "$OUT" --no-progress \
  $PIPELINE_ARGS $EXTRA_ARGS > "$OUT/log.txt" 2>&1
stamp "pipeline finished (rc $?)"
# shellcheck disable=SC2086
python3 scripts/gpu_experiments.py --role pack --work "$WORK" --pack "$OUT" $EXTRA_ARGS
grep -v "Loading weights" "$OUT/log.txt" | tail -n 40
stamp "done"
