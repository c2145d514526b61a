"""The engine alone under the serving benchmark's workloads: no Ray, no HTTP, one process.

    python -m bench.engine_load --model llama-moderate      # ~3.5 min on 2 CPU cores
    python -m bench.engine_load --model llama-moderate --dora   # + the same adapters as DoRA, ~5 min
    python -m bench.engine_load --model flora-tiny-llama --flora   # + as many FLoRA rank-1 adapters, ~4 min
    python -m bench.engine_load --device cuda --model llama-7b --dora --flora   # a GPU, bfloat16

It separates what batching across adapters gains inside the engine from what the serving stack
(Ray Serve's proxy and handles, per-token SSE chunks) costs: the same closed loop of C requests
runs straight against `Engine.step()`, each finished request replaced at once by a new one.
bench/serving_e2e.py runs it on the embedded model; run alone, it takes the Llama-style model of
bench/overhead_model.py (TinyLlama-1.1B's layer shapes, 4 layers, random weights), where a
decode step costs what a real model's layers cost rather than Python's per-layer overhead. On a
GPU (`--device cuda`, bfloat16) take `llama-7b`, Llama-2-7B's shapes: there a step of the 4-layer
model is bound by kernel launches, and a 7B one by reading its weights, as in serving.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoTokenizer

from bench.bytes_floor import adapter_bytes, bytes_floor, decode_bytes
from bench.overhead_layer import strategy_switch
from bench.overhead_model import MODEL_NAMES, build_base
from bench.serving_load import Workload
from bench.serving_report import engine_table
from bench.timing import add_device_arguments, device_and_dtype, interleaved, load_average, machine_info
from flora_core.adapter_weights import AdapterKind, AdapterWeights, FloraModule, LoraModule
from flora_core.batched_ops import gpu_flora_matmuls
from flora_core.default_model import DEFAULT_MODEL_NAME, default_model_dir
from flora_core.engine import Engine, EngineConfig
from flora_core.host_memory import keep_freed_host_memory
from flora_core.multi_adapter_linear import SlotCapacity
from flora_core.multi_adapter_model import MultiAdapterModel
from flora_core.sampling_params import SamplingParams


def build_engine(adapter_root: Path, names: list[str], lora_slots: int, lora_max_rank: int,
                 max_adapters_per_step: int | None, model_dir: Path | None = None) -> Engine:
    """The replica's engine, built as the app builds it, with every adapter read into host memory.

    model_dir: a saved model with its tokenizer (default: the embedded default model)."""
    model_dir = default_model_dir() if model_dir is None else model_dir
    model = MultiAdapterModel.from_pretrained(model_dir, capacity=SlotCapacity(
        lora_slots=lora_slots, lora_max_rank=lora_max_rank, flora_slots=1, ia3_slots=1))
    for name in names:
        model.add_adapter(name, adapter_root / name)
        model.pool.prefetch_to_host(name)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = EngineConfig(max_model_len=64, max_running=64, max_batched_tokens=256,
                          max_adapters_per_step=max_adapters_per_step)
    return Engine(model, config, tokenizer)


def engine_closed_loop(engine: Engine, workload: Workload, concurrency: int, duration_s: float,
                       seed: int, encode: Callable[[str], list[int]] | None = None) -> dict:
    """Keep `concurrency` requests in the engine for duration_s; output tokens/s and requests/s.

    encode: turns the workload's text prompts into token ids, for an engine without a tokenizer.
    """
    sampler = workload.sampler(DEFAULT_MODEL_NAME, seed)  # the name only marks base requests here
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a replica with replica_num_cpus=1 runs it

    in_flight: set[str] = set()

    def add() -> None:
        body = sampler.next_body()
        adapter = None if body["model"] == DEFAULT_MODEL_NAME else body["model"]
        prompt = body["prompt"] if encode is None else encode(body["prompt"])
        in_flight.add(engine.add_request(prompt, SamplingParams(
            max_tokens=body["max_tokens"], temperature=0, ignore_eos=True), adapter))

    try:
        for _ in range(concurrency):
            add()
        start, steps, tokens, finished, kv_tokens, adapters = time.perf_counter(), 0, 0, 0, 0, 0
        while time.perf_counter() - start < duration_s:
            for output in engine.step():
                tokens += len(output.delta_token_ids)
                if output.finished:
                    finished += 1
                    in_flight.discard(output.request_id)
                    add()
            steps += 1
            occupancy = engine.stats()
            kv_tokens, adapters = kv_tokens + occupancy.kv_tokens, adapters + occupancy.pinned_adapters
        elapsed = time.perf_counter() - start
        for request_id in in_flight:  # drain: abort what is left
            engine.abort(request_id)
        while engine.has_unfinished():
            engine.step()
    finally:
        torch.set_num_threads(threads)
    return {"output_tokens_per_s": round(tokens / elapsed, 1), "requests_per_s": round(finished / elapsed, 2),
            "steps_per_s": round(steps / elapsed, 1), "mean_rows_per_step": round(tokens / max(steps, 1), 1),
            "mean_kv_tokens_per_step": round(kv_tokens / max(steps, 1), 1),
            "mean_adapters_per_step": round(adapters / max(steps, 1), 2), "elapsed_s": round(elapsed, 2)}


# ----------------------------------------------------------------- the Llama-style model, alone


def random_lora(shapes: dict[str, tuple[int, int]], rank: int, seed: int, dora: bool = False) -> AdapterWeights:
    """Random LoRA factors on every layer of shapes; with dora, a DoRA magnitude vector too."""
    gen = torch.Generator().manual_seed(seed)
    return AdapterWeights(AdapterKind.LORA, {
        name: LoraModule(a=torch.randn(rank, d_in, generator=gen) / d_in**0.5,
                         b=torch.randn(d_out, rank, generator=gen) * 0.05, scale=1.0,
                         magnitude=1 + 0.1 * torch.rand(d_out, generator=gen) if dora else None)
        for name, (d_in, d_out) in shapes.items()})


def random_flora(shapes: dict[str, tuple[int, int]], seed: int) -> AdapterWeights:
    """Random rank-1 FLoRA factors near one (a visible, bounded change) on every layer of shapes."""
    gen = torch.Generator().manual_seed(seed)
    return AdapterWeights(AdapterKind.FLORA, {
        name: FloraModule(flora_in=1 + 0.1 * torch.randn(1, d_in, generator=gen),
                          flora_out=1 + 0.1 * torch.randn(1, d_out, generator=gen))
        for name, (d_in, d_out) in shapes.items()})


def run_model(model_name: str, adapters: int, rank: int, concurrency: int, duration_s: float, seed: int,
              rounds: int, dora: bool = False, flora: bool = False, device: torch.device = torch.device("cpu"),
              dtype: torch.dtype = torch.float32, warmup_s: float = 0.0,
              profile_s: float = 0.0) -> tuple[list[dict], str | None]:
    """base / uniform over `adapters` / the same with one adapter per step (/ the same adapters as DoRA)
    (/ as many FLoRA rank-1 adapters, and on CUDA with Triton the same through the fused FLoRA kernel),
    on one patched model, in rounds after warmup_s of each point untimed. The adapters are made in
    float32 host memory, as loaded ones are; slot writes move them to the model's device and dtype.
    With profile_s, the LoRA point runs that long more under torch.profiler, and its table of ops by
    self time comes back beside the results."""
    model = MultiAdapterModel(build_base(model_name, device, dtype), capacity=SlotCapacity(
        lora_slots=2 * concurrency, lora_max_rank=rank, flora_slots=2 * concurrency if flora else 1,
        flora_max_rank=1, ia3_slots=1))
    shapes = {n: (layer.d_in, layer.d_out) for n, layer in model.layers.items()}
    names = [f"lora-{i:04d}" for i in range(adapters)]
    for i, name in enumerate(names):
        model.add_adapter(name, random_lora(shapes, rank, seed=i))
    dora_names = [f"dora-{i:04d}" for i in range(adapters)] if dora else []
    for i, name in enumerate(dora_names):
        model.add_adapter(name, random_lora(shapes, rank, seed=i, dora=True))
        with model.pool.pinned([name]):  # a first slot write computes its g (a pass over each W0), kept after
            pass
    flora_names = [f"flora-{i:04d}" for i in range(adapters)] if flora else []
    for i, name in enumerate(flora_names):
        model.add_adapter(name, random_flora(shapes, seed=i))
    vocab = model.model.config.vocab_size
    encode = lambda text: [3 + ord(c) % (vocab - 3) for c in text]  # noqa: E731 - a stand-in tokenizer
    uniform = f"uniform-{adapters}"
    # (label, adapter limit per step, adapters drawn from, a FLoRA implementation forced or None for the rule's)
    lora_point = (uniform, None, names, None)
    points = [("base", None, (), None), lora_point, (uniform, 1, names, None)]
    points += [(f"dora-{uniform}", None, dora_names, None)] if dora else []
    points += [(f"flora-{uniform}", None, flora_names, None)] if flora else []
    if flora and device.type == "cuda" and "fused" in gpu_flora_matmuls():
        points.append((f"flora-fused-{uniform}", None, flora_names, "fused"))

    def closed_loop(label: str, limit: int | None, drawn_from: Sequence[str], flora_matmul: str | None,
                    seconds: float, k: int) -> dict:
        engine = Engine(model, EngineConfig(max_model_len=64, max_running=64, max_batched_tokens=256,
                                            max_adapters_per_step=limit))
        try:
            workload = Workload(label, tuple(drawn_from))
            with strategy_switch() as switch:  # None: the rules choose, as in serving
                switch.name = flora_matmul
                return engine_closed_loop(engine, workload, concurrency, seconds, seed + k, encode)
        finally:
            engine.close()

    for point in points if warmup_s > 0 else ():  # kernels compiled, caches and allocator filled
        closed_loop(*point, warmup_s, -1)
    results = []
    for k, (label, limit, drawn_from, flora_matmul) in interleaved(points, rounds):
        load_before = load_average()
        stats = closed_loop(label, limit, drawn_from, flora_matmul, duration_s, k)
        floor = step_floor(model, stats, one_adapter_bytes(label, shapes, rank, model)) if drawn_from else None
        results.append({"app": "engine" if limit is None else "engine_one_adapter_per_step", "model": model_name,
                        "workload": label, "concurrency": concurrency, "round": k, **stats,
                        **({"bytes_floor": floor} if floor else {}), "load_average": load_before})
        print(f"r{k} {results[-1]['app']:27s} {label:12s} {stats['output_tokens_per_s']:8.1f} tok/s "
              f"{stats['steps_per_s']:6.1f} steps/s {stats['mean_rows_per_step']} tokens/step load {load_before}",
              flush=True)
    if not profile_s:
        return results, None
    return results, profile_table(lambda: closed_loop(*lora_point, profile_s, rounds), device)


def one_adapter_bytes(label: str, shapes: dict[str, tuple[int, int]], rank: int, model: MultiAdapterModel) -> int:
    """One adapter's bytes at a point: FLoRA rank 1, else LoRA at `rank` (DoRA adds its magnitude, d_out a layer)."""
    element = next(model.model.parameters()).element_size()
    size = adapter_bytes(shapes, 1 if label.startswith("flora") else rank, element)
    return size + (sum(d_out for _, d_out in shapes.values()) * element if label.startswith("dora") else 0)


def floor_lines(results: list[dict]) -> list[str]:
    """Markdown: each adapter point's bytes floor and distinct adapters a step, medians over its rounds."""
    points: dict[tuple[str, str], list[dict]] = {}
    for row in results:
        if "bytes_floor" in row:
            points.setdefault((row["app"], row["workload"]), []).append(row)
    lines = ["Bytes floors (bench/bytes_floor.py): the lowest ratio of a point's mean step to the same step "
             "without adapters where steps are bound by the bytes they read (a GPU's), so that point's throughput "
             "can be at most 1 / floor of those steps' without adapters; medians over rounds.", "",
             "| point | rows a step | distinct adapters a step | KV tokens a step | bytes floor | at most |",
             "|---|---:|---:|---:|---:|---:|"]
    for (app, workload), rows in points.items():
        rows_a_step, adapters, kv_tokens, floor = (
            statistics.median(row[key] for row in rows)
            for key in ("mean_rows_per_step", "mean_adapters_per_step", "mean_kv_tokens_per_step", "bytes_floor"))
        lines.append(f"| {app} {workload} | {rows_a_step:.1f} | {adapters:.1f} | {kv_tokens:.0f} | {floor:.3f}x | "
                     f"{100 / floor:.0f}% |")
    return lines if points else []


def step_floor(model: MultiAdapterModel, stats: dict, adapter_size: int) -> float | None:
    """The bytes floor (bench.bytes_floor) of this point's mean step: its mean rows, KV columns and
    distinct adapters; None if no step ran."""
    rows = round(stats["mean_rows_per_step"])
    if rows < 1:
        return None
    base = decode_bytes(model.model, rows, round(stats["mean_kv_tokens_per_step"] / rows))
    return round(bytes_floor(base, stats["mean_adapters_per_step"] * adapter_size), 4)


def profile_table(run: Callable[[], object], device: torch.device) -> str:
    """torch.profiler's table of run's ops, by their own time on the device (on a GPU) or the CPU."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        run()
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort_by, row_limit=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-moderate", choices=MODEL_NAMES,
                        help="llama-7b: for a GPU (27 GB in float32)")
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per point and round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds; each point's median round is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=float, default=2.0, help="untimed seconds of each point before the rounds")
    parser.add_argument("--profile", type=float, default=0.0,
                        help="seconds of the LoRA point under torch.profiler after the rounds (0: none)")
    parser.add_argument("--dora", action="store_true", help="also the same adapters as DoRA (a magnitude each)")
    parser.add_argument("--flora", action="store_true", help="also as many FLoRA rank-1 adapters (on CUDA with "
                        "Triton, through the fused FLoRA kernel too)")
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    add_device_arguments(parser)
    args = parser.parse_args()
    device, dtype = device_and_dtype(args)
    torch.set_num_threads(1)
    keep_freed_host_memory()  # as a replica does
    started = time.perf_counter()
    info = machine_info(device) | {"dtype": str(dtype).removeprefix("torch.")}
    results, profile_text = run_model(args.model, args.adapters, args.rank, args.concurrency, args.duration,
                                      args.seed, args.rounds, args.dora, args.flora, device, dtype, args.warmup,
                                      args.profile)
    info |= {"load_average_after": load_average(), "seconds": round(time.perf_counter() - started)}
    stem = f"engine_load_{args.model}" + ("_dora" if args.dora else "") + ("_flora" if args.flora else "")
    stem += "" if device.type == "cpu" else f"_{device.type}"
    command = " ".join(["python -m bench.engine_load", *sys.argv[1:]])
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{stem}.json").write_text(json.dumps(
        {"machine": info, "command": command, "settings": settings, "results": results}, indent=1))
    also = ", the same as DoRA" if args.dora else ""
    also += f", {args.adapters} FLoRA rank-1 adapters" if args.flora else ""
    lines = [f"# The engine alone on `{args.model}`: {args.adapters} LoRA adapters (rank {args.rank}, every linear "
             f"layer){also}; closed loop of {args.concurrency}", "",
             f"Machine: {info.get('gpu', info['cpu'])} ({info['cpu_count']} CPU cores), torch {info['torch']}, "
             f"1 thread, {info['dtype']}. Load "
             f"average before: {info['load_average_1_5_15']}, after: {info['load_average_after']}. Ran "
             f"{info['seconds']} s. Command: `{command}`", "", *engine_table({"engine_only": results}),
             *floor_lines(results)]
    (args.out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    if profile_text is not None:
        (args.out_dir / f"{stem}_profile.txt").write_text(profile_text)
    print(f"wrote {args.out_dir / stem}.json and .md" + (" and _profile.txt" if profile_text else "")
          + f" in {info['seconds']} s")


if __name__ == "__main__":
    main()
