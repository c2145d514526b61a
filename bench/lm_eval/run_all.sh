#!/usr/bin/env bash
# Every served model (the base and each adapter) through lm-evaluation-harness's flora_demo tasks,
# four lm_eval processes at a time, so requests for different adapters share the server's batches.
#   bash bench/lm_eval/run_all.sh [BASE_URL] [LM_EVAL]
# Needs the app running (`serve run deploy/serve_config.yaml`) and lm-eval installed where LM_EVAL
# points (pip install "lm-eval[api]" transformers, in a venv of its own). Writes one JSON per model
# under bench/results/lm_eval/ and prints the accuracy table.
set -euo pipefail
cd "$(dirname "$0")/../.."
BASE_URL=${1:-http://localhost:8000}
LM_EVAL=${2:-lm_eval}
OUT=bench/results/lm_eval
mkdir -p "$OUT"
models=$(curl -sf "$BASE_URL/v1/models" | python3 -c "import sys, json; print(' '.join(m['id'] for m in json.load(sys.stdin)['data']))")
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1  # the tasks read bench/lm_eval/held_out_words.jsonl only
echo "$models" | tr ' ' '\n' | xargs -P 4 -I{} sh -c "
  '$LM_EVAL' --model local-completions --tasks flora_demo --include_path bench/lm_eval \
    --model_args model={},base_url=$BASE_URL/v1/completions,tokenizer=flora_core/assets/flora-tiny-llama,add_bos_token=True,num_concurrent=8 \
    --output_path $OUT/{} > $OUT/{}.log 2>&1 && echo 'done: {}'"
python3 -m bench.lm_eval.report "$OUT"
