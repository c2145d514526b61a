"""Measure the LoRA strategies (gather+bmm vs grouped) to set pick_lora_strategy's threshold.

    python -m bench.lora_strategies --d-model 4096 --rank 16 --out bench/results/lora_strategies.json
    python -m bench.lora_strategies --d-model 256 --rank 16 --out bench/results/lora_strategies_cpu_d256.json

For each batch shape (tokens, distinct adapters) it times every strategy on one layer's delta
(on CUDA the Triton `bgmv` kernels too, where Triton is installed) and reports which wins, with
the rule's choice beside it.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from bench.timing import Timer
from flora_core.adapter_batch import AdapterBatch, AdapterSlot
from flora_core.adapter_weights import AdapterKind
from flora_core.batched_ops import LORA_STRATEGIES, gpu_lora_strategies, pick_lora_strategy


# (rows, tokens per row): decode, then prefill as the engine runs it (a few new prompts a step)
# and as a large batch does.
SHAPES = [(1, 1), (8, 1), (32, 1), (64, 1), (2, 16), (4, 24), (8, 24), (8, 16), (32, 4), (8, 128), (32, 128)]


def run(d_model: int, rank: int, repeats: int, device: str) -> list[dict]:
    slots = 64
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32  # as the replicas serve
    lora_a = torch.randn(slots, rank, d_model, device=device, dtype=dtype) * 0.01
    lora_b = torch.randn(slots, rank, d_model, device=device, dtype=dtype) * 0.01
    # Every strategy interleaved, a fixed number of rounds; CUDA events and a synchronize on a GPU.
    timer = Timer(torch.device(device), rounds=repeats, min_rounds=repeats, warmup=2)
    strategies = {**LORA_STRATEGIES, **(gpu_lora_strategies() if torch.device(device).type == "cuda" else {})}
    results = []
    for rows, tokens_per_row in SHAPES:
        for distinct in sorted({1, min(2, rows), max(1, rows // 4), rows}):
            row_slots = [AdapterSlot(AdapterKind.LORA, i % distinct) for i in range(rows)]
            batch = AdapterBatch.from_rows(row_slots, tokens_per_row, device)
            x = torch.randn(batch.num_tokens, d_model, device=device, dtype=dtype)
            with torch.no_grad():
                timings = timer.compare({name: (lambda fn=fn: fn(x, lora_a, lora_b, batch.lora, rank), None)
                                         for name, fn in strategies.items()})  # ms
            best = min(timings, key=timings.get)
            chosen = pick_lora_strategy(batch.lora, rank, 2 * d_model)
            results.append({"rows": rows, "tokens_per_row": tokens_per_row, "distinct": distinct,
                            "ms": {k: round(v, 4) for k, v in timings.items()},
                            "fastest": best, "rule_picks": chosen,
                            "rule_loss": round(timings[chosen] / timings[best], 3)})
            print(f"rows={rows:3d} tok/row={tokens_per_row:3d} distinct={distinct:3d} "
                  + " ".join(f"{k}={v:8.3f}ms" for k, v in timings.items())
                  + f"  fastest={best:8s} rule={chosen}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadiest on a shared machine)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/lora_strategies.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = run(args.d_model, args.rank, args.repeats, args.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "processor": platform.processor(), "threads": torch.get_num_threads(),
               "device": args.device, "dtype": "bfloat16" if args.device.startswith("cuda") else "float32",
               "torch": torch.__version__}
    args.out.write_text(json.dumps({"machine": machine, "d_model": args.d_model, "rank": args.rank,
                                    "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
