#!/usr/bin/env bash
# What a lent GPU is for, as commands meant to fit the device tool's 10 minutes each, in the order to
# run them. A task lent a GPU has 15 minutes of device time in all (starts and idle waits included),
# so `targets` comes first: it alone answers the issue's GPU targets, in one short call with time left
# to run it again; the other steps are for the time that is left after it, or for a later task.
#
#   bash bench/gpu_session.sh targets    # CUDA parity of every batched path (layers and models), then the
#                                        # targets' cells alone: model-level decode, B = D = 64, LoRA r16 and
#                                        # FLoRA r1, every implementation (Triton's too), bytes floors beside
#   bash bench/gpu_session.sh check      # CUDA parity (layers, models, engine), the CUDA-graph timer, then
#                                        # the LoRA crossover
#   bash bench/gpu_session.sh models     # the adapter-overhead GPU grid's models, bf16 (the B=64 targets)
#   bash bench/gpu_session.sh engine     # the engine alone on Llama-2-7B's shapes: base, 100 adapters
#                                        # (LoRA, one per step, DoRA, FLoRA r1 as it runs and fused), with a
#                                        # profile of one step
#   bash bench/gpu_session.sh tiles      # the fused FLoRA kernel's tilings searched per shape (split K too),
#                                        # against the base layer and flora_matmul: what tile_sizes is set from
#   bash bench/gpu_session.sh graphs     # the grid's layers, timing CUDA graph replays: the kernels alone
#   bash bench/gpu_session.sh layers     # the same layers timed eagerly
#
# It runs with the GPU machine's own python3 (PyTorch, transformers, PEFT, pytest, hypothesis and
# matplotlib are there; flora_core and these benchmarks need no Ray), or $PYTHON. Everything it
# writes goes to $OUT (the device tool's folder), else bench/results/gpu: one log per step plus
# the benchmarks' JSON, Markdown and PNG. Copy them into bench/results and the README by hand.
set -uo pipefail
cd "$(dirname "$0")/.."
step="${1:?usage: bash bench/gpu_session.sh targets|check|models|engine|tiles|graphs|layers}"
out="${OUT:-bench/results/gpu}"
python="${PYTHON:-python3}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=.

if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device: run this on the GPU machine (the device tool), not here" >&2
    exit 2
fi

case "$step" in
    targets)
        {
            nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
            "$python" -m pytest -q -p no:cacheprovider tests/test_cuda_parity.py \
                && "$python" -m bench.adapter_overhead --device cuda --targets --out-dir "$out"
        } 2>&1 | tee "$out/targets.log"
        ;;
    check)
        {
            nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
            "$python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
            "$python" -m pytest -q -p no:cacheprovider tests/test_cuda_parity.py tests/test_engine_on_devices.py \
                tests/test_bench_models.py
            "$python" -m bench.lora_strategies --device cuda --d-model 4096 --rank 16 --repeats 20 \
                --out "$out/lora_strategies_cuda.json"
        } 2>&1 | tee "$out/check.log"
        ;;
    layers | models)
        "$python" -m bench.adapter_overhead --device cuda --level "${step%s}" --out-dir "$out" 2>&1 | tee "$out/$step.log"
        ;;
    engine)
        "$python" -m bench.engine_load --device cuda --model llama-7b --dora --flora --duration 10 \
            --profile 3 --out-dir "$out" 2>&1 | tee "$out/engine.log"
        ;;
    tiles)
        "$python" -m bench.flora_tiles --device cuda --out-dir "$out" 2>&1 | tee "$out/tiles.log"
        ;;
    graphs)
        "$python" -m bench.adapter_overhead --device cuda --level layer --cuda-graphs --out-dir "$out" 2>&1 \
            | tee "$out/graphs.log"
        ;;
    *)
        echo "unknown step '$step': use targets, check, models, engine, tiles, graphs or layers" >&2
        exit 2
        ;;
esac
