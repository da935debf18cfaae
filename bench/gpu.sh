#!/usr/bin/env bash
# Everything that needs a GPU, as one script for a machine with a CUDA GPU (none was available here):
#   1. evaluation log-probs: pair_logprobs vs one at a time vs TRL's DPOTrainer.evaluate(), tiny and 128,256-vocab
#   2. the shape rehearsal (presets/rehearsal-8b-shapes.yaml) through every stage with unsloth, each stage's
#      CUDA peak against stages/common/memory.py
#   3. the recipe preset (Llama-3.1-8B-Instruct, unsloth QLoRA, 4-bit DPO) through every stage at reduced steps
#      (offline data, 5 optimizer steps each); needs the weights in the HF cache or hub access (HF_TOKEN or
#      `huggingface-cli login`; the token is read from there, never written anywhere)
#   4. the `sft` stage vs plain TRL with both engines, packing on/off, peak memory by method (bench/train.py)
# Run from the repository root with the project installed (.venv or the current python):
#   bash bench/gpu.sh [--skip-recipe]
# It stops at once, before any GPU work, when torch sees no CUDA device or unsloth does not import.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
[ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
SKIP_RECIPE=0
[ "${1:-}" = "--skip-recipe" ] && SKIP_RECIPE=1

export HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false
export PREFECT_SERVER_ANALYTICS_ENABLED=false TQDM_DISABLE=1
unset ANTHROPIC_API_KEY
OUT=${OUT:-reports}
WORKSPACE=${WORKSPACE:-${TMPDIR:-/tmp}/tuneforge-gpu}
mkdir -p "$OUT" "$WORKSPACE"

"$PY" -m bench.gpu   # exits non-zero with the reason when there is no usable GPU

echo "== 1. evaluation log-probs (tiny, then the rehearsal's 128,256-token vocabulary)"
HF_HUB_OFFLINE=1 "$PY" -m bench.evaluate --device cuda --repeats 5 | tee "$OUT/gpu_evaluate_tiny.json"
HF_HUB_OFFLINE=1 "$PY" -m bench.evaluate --device cuda --shape rehearsal --repeats 3 | tee "$OUT/gpu_evaluate_rehearsal.json"

echo "== 2. shape rehearsal, every stage, unsloth"
HF_HUB_OFFLINE=1 "$PY" bench/rehearsal.py --fresh --device cuda --workspace "$WORKSPACE/rehearsal" \
    --set sft.engine=unsloth --out "$OUT/gpu_rehearsal.json"

if [ "$SKIP_RECIPE" = 0 ]; then
    echo "== 3. the recipe preset (Llama-3.1-8B-Instruct), every stage, reduced steps"
    "$PY" bench/rehearsal.py --fresh --device cuda --workspace "$WORKSPACE/recipe" \
        --preset presets/recipe-llama-3.1-8b.yaml --reduced --out "$OUT/gpu_recipe.json"
fi

echo "== 4. sft stage vs plain TRL, both engines"
HF_HUB_OFFLINE=1 "$PY" bench/train.py --workspace "$WORKSPACE/train" --engines unsloth,transformers \
    --only throughput,packing,rss --repeats 3 --out "$OUT/bench_gpu.json"
