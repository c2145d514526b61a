"""Adapter pool hit rate with two replicas and more adapters than one replica holds.

    python bench/routing_hit_rate.py --adapters 6 --slots 4 --rounds 60 --out bench/results/routing_hit_rate.json

Runs the application twice on a local Ray cluster (two model replicas on the embedded default
model): once with adapter-aware routing (router.adapter_router) and once with Ray Serve's
default power-of-two-choices. Each round sends a few concurrent requests with adapters drawn
uniformly; afterwards it reads every replica's pool counters: hit rate = hits / (hits + loads).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path

import httpx
import ray
import torch
from ray import serve
from transformers import AutoModelForCausalLM

from deploy.app import build_app
from flora_core import AdapterKind, AdapterWeights, LoraModule, save_adapter
from flora_core.default_model import DEFAULT_MODEL_NAME, default_model_dir
from flora_core.patching import find_target_layers

PORT = 8021


def write_lora_adapters(root: Path, count: int, rank: int = 4) -> list[str]:
    model = AutoModelForCausalLM.from_pretrained(default_model_dir())
    names = []
    for i in range(count):
        gen = torch.Generator().manual_seed(i)
        modules = {}
        for layer_name in find_target_layers(model, ["q_proj", "v_proj"]):
            layer = model.get_submodule(layer_name)
            modules[layer_name] = LoraModule(a=torch.randn(rank, layer.in_features, generator=gen) * 0.1,
                                             b=torch.randn(layer.out_features, rank, generator=gen) * 0.1, scale=1.0)
        names.append(f"lora-{i:03d}")
        save_adapter(AdapterWeights(AdapterKind.LORA, modules), root / names[-1])
    return names


async def traffic(names: list[str], rounds: int, per_round: int, seed: int) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=120) as http:
        for _ in range(rounds):
            picks = [rng.choice(names) for _ in range(per_round)]
            replies = await asyncio.gather(*(http.post(
                f"http://127.0.0.1:{PORT}/v1/completions",
                json={"model": name, "prompt": "hello=", "max_tokens": 4, "temperature": 0}) for name in picks))
            assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]


def pool_counters() -> dict[str, dict]:
    """Latest pool counters per replica (stats calls are routed, so ask until both have answered)."""
    handle = serve.get_app_handle("flora")
    seen: dict[str, dict] = {}
    for _ in range(40):
        for stats in handle.replica_stats.remote().result():
            seen[stats["replica_id"]] = stats["pool"]
        if len(seen) >= 2:
            break
    return seen


def run_mode(root: Path, names: list[str], aware: bool, args) -> dict:
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        serve.run(build_app({
            "model": DEFAULT_MODEL_NAME, "adapter_dir": str(root), "num_replicas": 2, "replica_num_cpus": 1,
            "lora_slots": args.slots, "flora_slots": 1, "ia3_slots": 1, "lora_max_rank": 8, "max_model_len": 64,
            "adapter_aware_routing": aware}), name="flora", route_prefix="/")
        start = time.perf_counter()
        asyncio.run(traffic(names, args.rounds, args.per_round, args.seed))
        elapsed = time.perf_counter() - start
        counters = pool_counters()
        hits = sum(c["hits"] for c in counters.values())
        loads = sum(c["loads"] for c in counters.values())
        return {"adapter_aware_routing": aware, "replicas": counters, "hits": hits, "loads": loads,
                "hit_rate": round(hits / max(1, hits + loads), 3), "seconds": round(elapsed, 1)}
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=6)
    parser.add_argument("--slots", type=int, default=4, help="LoRA slots per replica")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--per-round", type=int, default=3, help="concurrent requests per round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/routing_hit_rate.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        names = write_lora_adapters(Path(tmp), args.adapters)
        results = [run_mode(Path(tmp), names, aware, args) for aware in (True, False)]
    for r in results:
        print(f"adapter_aware_routing={r['adapter_aware_routing']!s:5}  hit rate {r['hit_rate']:.3f} "
              f"(hits {r['hits']}, loads {r['loads']}) in {r['seconds']} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)}, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
