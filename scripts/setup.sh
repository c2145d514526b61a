#!/usr/bin/env bash
# Creates .venv and installs flora-serve with its test extras.
# torch is installed first at a pinned version: on a CPU machine pip takes the local CPU build,
# on a GPU machine (nvidia-smi present) it takes the CUDA build from PyPI. Installing the
# project afterwards then pulls no second torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TRITON_VERSION=${TRITON_VERSION:-3.6.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
HAS_GPU=false
command -v nvidia-smi >/dev/null 2>&1 && HAS_GPU=true
if $HAS_GPU; then
  echo "setup: GPU found, installing torch==$TORCH_VERSION (CUDA build)"
else
  echo "setup: no GPU found, installing torch==$TORCH_VERSION (CPU build where one is offered)"
fi
.venv/bin/python -m pip install --quiet "torch==$TORCH_VERSION"
if ! $HAS_GPU; then
  # A CUDA build of torch brings its own Triton; here it runs our Triton kernels under its
  # interpreter and compiles them for sm_90 (tests/test_triton_*.py, test_bench_flora_tiles.py).
  # Skipped (those tests skip too) where no wheel fits. Triton 3.9.0 passes them as well.
  echo "setup: installing triton==$TRITON_VERSION for the kernel tests (Triton's CPU interpreter)"
  .venv/bin/python -m pip install --quiet "triton==$TRITON_VERSION" || echo "setup: no triton wheel here; its tests will skip"
fi
echo "setup: installing flora-serve and its test/bench extras"
.venv/bin/python -m pip install --quiet -e ".[test,bench]"
# LoRAX's own client, for the tests of our LoRAX-compatible routes. --no-deps: it pins
# huggingface-hub<1 and certifi, which transformers 5 outgrows, and imports neither (it needs
# requests, aiohttp and pydantic, installed above with Ray).
.venv/bin/python -m pip install --quiet --no-deps "lorax-client==0.6.3"
echo "setup: done. Activate with: source .venv/bin/activate"
