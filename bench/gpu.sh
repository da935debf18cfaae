#!/usr/bin/env bash
# Benchmarks on a CUDA machine, on the tiny model: evaluation log-probs batched vs one at a time
# (bench/evaluate.py, goal >= 4x), then the `sft` stage with both engines (unsloth, transformers) vs a plain
# TRL script, packing on/off, and peak memory by method; prints one table per part.
#
# Run from the repository root on a machine with a CUDA GPU and the project installed (.venv or the
# current python):   bash bench/gpu.sh [extra bench/train.py arguments, e.g. --size medium]
# Needs nothing from the network: the tiny base model, its tokenizer and the data are built here by the
# pipeline's own stages (offline provider), and every Hugging Face library is forced offline.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
[ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false TQDM_DISABLE=1
unset ANTHROPIC_API_KEY

"$PY" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("bench/gpu.sh: no CUDA device visible to torch (use bench/train.py on CPU)")
print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
try:
    import unsloth  # noqa: F401  (imported first, as the engine layer does)
    print(f"unsloth {unsloth.__version__}")
except Exception as err:  # the transformers rows still run
    print(f"unsloth unavailable: {err}")
EOF

"$PY" -m bench.evaluate --device cuda --repeats 5

WORKSPACE=${WORKSPACE:-${TMPDIR:-/tmp}/tuneforge-bench-gpu}
exec "$PY" bench/train.py --workspace "$WORKSPACE" --engines unsloth,transformers \
    --only throughput,packing,rss --repeats 3 --out reports/bench_gpu.json "$@"
