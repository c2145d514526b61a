#!/usr/bin/env bash
# The transformers floor in pyproject.toml, kept honest: installs the oldest supported release beside
# .venv (pip --target, with the tokenizers and huggingface-hub it needs) and runs the tests that
# lean on transformers' internals against it: the engine's KV cache (and the name forward takes it
# by), patching, the embedded model and tokenizer, and parity with generate() and PEFT. Run after
# scripts/setup.sh; CI runs it too.
set -euo pipefail
cd "$(dirname "$0")/.."
OLDEST=${OLDEST_TRANSFORMERS:-4.56.2}
FLOOR=$(grep -o '"transformers>=[0-9.]*' pyproject.toml | cut -d'=' -f2)
if [[ "$OLDEST" != "$FLOOR".* && "$OLDEST" != "$FLOOR" ]]; then
  echo "oldest: pyproject.toml allows transformers>=$FLOOR but this tests $OLDEST; make them agree" >&2
  exit 1
fi
TARGET=.venv-oldest/transformers-$OLDEST
if [ ! -d "$TARGET" ]; then
  echo "oldest: installing transformers==$OLDEST into $TARGET"
  .venv/bin/python -m pip install --quiet --target "$TARGET" "transformers==$OLDEST"
fi
PYTHONPATH="$TARGET" .venv/bin/python -c \
  "import transformers; print('oldest: testing transformers', transformers.__version__)"
PYTHONPATH="$TARGET" exec .venv/bin/python -m pytest -q -m "not slow" -p no:cacheprovider \
  tests/test_cache_argument.py tests/test_running_batch.py tests/test_engine_parity.py tests/test_engine_text.py \
  tests/test_engine_sampling.py tests/test_engine_lifecycle.py tests/test_default_model.py tests/test_batched_parity.py \
  tests/test_peft_parity.py tests/test_prompt_logprobs.py "$@"
