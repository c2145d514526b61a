"""The engine alone under the serving benchmark's workloads: no Ray, no HTTP, one process.

It separates what batching across adapters gains inside the engine from what the serving stack
(Ray Serve's proxy and handles, per-token SSE chunks) costs: the same closed loop of C requests
runs straight against `Engine.step()`, each finished request replaced at once by a new one.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from bench.serving_load import Workload
from flora_core.default_model import DEFAULT_MODEL_NAME, default_model_dir
from flora_core.engine import Engine, EngineConfig
from flora_core.multi_adapter_linear import SlotCapacity
from flora_core.multi_adapter_model import MultiAdapterModel
from flora_core.sampling_params import SamplingParams


def build_engine(adapter_root: Path, names: list[str], lora_slots: int, lora_max_rank: int,
                 max_adapters_per_step: int | None) -> Engine:
    """The replica's engine, built as the app builds it, with every adapter read into host memory."""
    model = MultiAdapterModel.from_pretrained(default_model_dir(), capacity=SlotCapacity(
        lora_slots=lora_slots, lora_max_rank=lora_max_rank, flora_slots=1, ia3_slots=1))
    for name in names:
        model.add_adapter(name, adapter_root / name)
        model.pool.prefetch_to_host(name)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    config = EngineConfig(max_model_len=64, max_running=64, max_batched_tokens=256,
                          max_adapters_per_step=max_adapters_per_step)
    return Engine(model, config, tokenizer)


def engine_closed_loop(engine: Engine, workload: Workload, concurrency: int, duration_s: float,
                       seed: int) -> dict:
    """Keep `concurrency` requests in the engine for duration_s; output tokens/s and requests/s."""
    sampler = workload.sampler(DEFAULT_MODEL_NAME, seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a replica with replica_num_cpus=1 runs it

    in_flight: set[str] = set()

    def add() -> None:
        body = sampler.next_body()
        adapter = None if body["model"] == DEFAULT_MODEL_NAME else body["model"]
        in_flight.add(engine.add_request(body["prompt"], SamplingParams(
            max_tokens=body["max_tokens"], temperature=0, ignore_eos=True), adapter))

    try:
        for _ in range(concurrency):
            add()
        start, steps, tokens, finished = time.perf_counter(), 0, 0, 0
        while time.perf_counter() - start < duration_s:
            for output in engine.step():
                tokens += len(output.delta_token_ids)
                if output.finished:
                    finished += 1
                    in_flight.discard(output.request_id)
                    add()
            steps += 1
        elapsed = time.perf_counter() - start
        for request_id in in_flight:  # drain: abort what is left
            engine.abort(request_id)
        while engine.has_unfinished():
            engine.step()
    finally:
        torch.set_num_threads(threads)
    return {"output_tokens_per_s": round(tokens / elapsed, 1), "requests_per_s": round(finished / elapsed, 2),
            "steps_per_s": round(steps / elapsed, 1), "mean_rows_per_step": round(tokens / max(steps, 1), 1),
            "elapsed_s": round(elapsed, 2)}
