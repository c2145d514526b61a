"""End-to-end serving benchmark: the running application under Poisson and closed-loop load.

    python -m bench.serving_e2e               # the full run (~12-15 min on 2 CPU cores)
    python -m bench.serving_e2e --quick       # a smoke run (~2-3 min)
    python -m bench.serving_e2e --model llama-moderate   # the headline points at real layer widths (~17 min)

Starts the application in-process (`serve.run(build_app(...))`, HTTP on 127.0.0.1:8040) on the
embedded default model with N random LoRA adapters (rank 8, every linear layer) written to a
temporary adapter root, and measures, per point, requests/s, output tokens/s, time to first
token and inter-token latency (p50/p99, from streaming timestamps) and failures:

- our engine (adapters mixed freely in every batch): adapters drawn uniformly and by Zipf over
  1, 10, 100 and 1,000 adapters, the base model alone (the ceiling), a closed-loop concurrency
  sweep and Poisson arrivals at several rates;
- the same application with `max_adapters_per_step: 1`: every running batch holds one adapter at
  a time, what serving each adapter as its own multiplexed model gives (Ray Serve multiplexing).

First the same closed loop runs against the engine alone, in this process (no Ray, no HTTP):
what batching gains inside the engine, apart from the serving stack's own cost per token.

Both applications are deployed at once (the second under /one), so the headline points (base,
uniform-100 and one adapter per batch at the saturation concurrency, streamed and whole) run in
`--rounds` interleaved rounds, each round in a rotated order, and are reported as the median round
with the range: on a shared machine the load drifts over minutes, and points measured minutes
apart differ by more than the gaps the targets are about. The engine-only points do the same.

`--model llama-moderate` serves bench/overhead_model.py's Llama-style model instead (TinyLlama-1.1B's
layer shapes, 4 layers, random weights, saved to a temporary folder with the embedded model's character
tokenizer, whose 76 entries replace its vocabulary): the headline and engine-only points over 100
adapters, where a step costs what real layers cost rather than what a 256-wide toy's costs.

Before measuring, every adapter is requested once (one token each), so adapters sit in the host
cache (no disk reads inside a point); device slots (128 LoRA slots) still load and evict as
traffic moves between adapters.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import httpx
import ray
import torch
from ray import serve
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from bench.engine_load import build_engine, engine_closed_loop
from bench.overhead_model import MODERATE_LLAMA
from bench.serving_load import Workload, closed_loop, poisson, summarize
from bench.result_files import write_results
from bench.serving_report import write_markdown, write_plots
from bench.timing import interleaved, load_average, machine_info
from deploy.app import build_app
from deploy.cluster_env import CLUSTER_ENV, cluster_env
from flora_core import AdapterKind, AdapterWeights, LoraModule, save_adapter
from flora_core.default_model import DEFAULT_MODEL_NAME, default_model_dir
from flora_core.host_memory import keep_freed_host_memory
from flora_core.patching import find_target_layers

PORT = 8040
ADAPTER_COUNTS = (1, 10, 100, 1000)


@dataclass(frozen=True)
class Point:
    """One measurement: which app, which workload, and closed-loop concurrency or a Poisson rate."""

    app: str  # "ours" or "one_adapter_per_step"
    workload: str  # "base", "uniform-100", "zipf-1000", ...
    concurrency: int | None = None
    rate: float | None = None
    stream: bool = True
    round: int | None = None  # which interleaved round of the headline points; None: run once

    @property
    def mode(self) -> str:
        return "closed" if self.concurrency is not None else "poisson"


def headline_points(saturation: int) -> list[Point]:
    """The points the targets are read from: base, uniform-100 and one adapter per batch, streamed and whole."""
    return [Point(app, workload, saturation, stream=stream) for stream in (True, False)
            for app, workload in (("ours", "base"), ("ours", "uniform-100"), ("one_adapter_per_step", "uniform-100"))]


def plan(quick: bool, rates: tuple[float, ...], saturation: int, rounds: int, headline_only: bool = False
         ) -> list[Point]:
    """Every point in the order it runs: the headline rounds first, then the rest once each."""
    first = [replace(p, round=k) for k, p in interleaved(headline_points(saturation), rounds)]
    if headline_only:
        return first
    if quick:
        return first + [Point("ours", "uniform-100", rate=rates[len(rates) // 2])]
    ours = [Point("ours", w, saturation) for w in (*(f"uniform-{n}" for n in ADAPTER_COUNTS if n != 100),
                                                   *(f"zipf-{n}" for n in ADAPTER_COUNTS[1:]))]
    ours += [Point("ours", w, c) for w in ("base", "uniform-100") for c in (1, 8, 64)]
    ours += [Point("ours", w, rate=r) for w in ("base", "uniform-100") for r in rates]
    one = [Point("one_adapter_per_step", w, saturation) for w in ("uniform-10", "uniform-1000", "zipf-100")]
    one += [Point("one_adapter_per_step", "uniform-100", rate=r) for r in rates]
    return first + ours + one


def workload(label: str, names: list[str], stream: bool = True) -> Workload:
    if label == "base":
        return Workload(label, (), stream=stream)
    distribution, count = label.split("-")
    return Workload(label, tuple(names[: int(count)]), distribution=distribution, stream=stream)


MODELS = {DEFAULT_MODEL_NAME: "the embedded default model",
          "llama-moderate": "llama-moderate (TinyLlama-1.1B's layer shapes, 4 layers, random weights)"}


def saved_model(name: str, folder: Path) -> Path:
    """The model directory to serve: the embedded default's, or llama-moderate saved under folder.

    llama-moderate is MODERATE_LLAMA with the embedded model's character tokenizer (its vocabulary,
    76 entries, replaces the 8192 there: the output head shrinks, the layers are TinyLlama's)."""
    if name == DEFAULT_MODEL_NAME:
        return default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    torch.manual_seed(0)
    config = LlamaConfig(**{**MODERATE_LLAMA, "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id})
    path = folder / name
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_lora_adapters(root: Path, count: int, rank: int, model_dir: Path) -> list[str]:
    """`count` random LoRA adapters of `rank` on every linear layer of the model in model_dir."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    shapes = {n: (model.get_submodule(n).in_features, model.get_submodule(n).out_features)
              for n in find_target_layers(model, "all-linear")}
    gen = torch.Generator().manual_seed(0)
    names = []
    for i in range(count):
        modules = {n: LoraModule(a=torch.randn(rank, d_in, generator=gen) / d_in**0.5,
                                 b=torch.randn(d_out, rank, generator=gen) * 0.05, scale=1.0)
                   for n, (d_in, d_out) in shapes.items()}
        names.append(f"lora-{i:04d}")
        save_adapter(AdapterWeights(AdapterKind.LORA, modules), root / names[-1])
    return names


def app_args(adapter_root: Path, one_adapter_per_step: bool, model_dir: Path | None = None) -> dict:
    """The app's arguments; model_dir None: the embedded default model."""
    model = DEFAULT_MODEL_NAME if model_dir is None or model_dir == default_model_dir() else str(model_dir)
    return {"model": model, "adapter_dir": str(adapter_root), "max_model_len": 64,
            "lora_slots": 128, "lora_max_rank": 8, "flora_slots": 1, "ia3_slots": 1, "max_running": 64,
            "max_batch_size": 32, "max_queued_requests": 1024, "replica_num_cpus": 1,
            "max_adapters_per_step": 1 if one_adapter_per_step else None}


async def warm_up(url: str, names: list[str], base_name: str) -> float:
    """Request every adapter (and the base model) once with one token: adapters reach the host cache."""
    start = time.perf_counter()
    queue = [base_name, *names]

    async def worker(http: httpx.AsyncClient) -> None:
        while queue:
            model = queue.pop()
            reply = await http.post(url, json={"model": model, "prompt": "warm=", "max_tokens": 1})
            reply.raise_for_status()

    async with httpx.AsyncClient(timeout=120) as http:
        await asyncio.gather(*(worker(http) for _ in range(32)))
    return time.perf_counter() - start


ROUTES = {"ours": "/", "one_adapter_per_step": "/one"}  # both applications run side by side
# The base model's name in the API is its directory's: the embedded default's is DEFAULT_MODEL_NAME.


def completions_url(app: str) -> str:
    return f"http://127.0.0.1:{PORT}{ROUTES[app].rstrip('/')}/v1/completions"


def run_point(point: Point, names: list[str], duration_s: float, seed: int, base_name: str) -> dict:
    url = completions_url(point.app)
    sampler = workload(point.workload, names, point.stream).sampler(base_name, seed)
    load_before = load_average()
    if point.mode == "closed":
        records, elapsed = asyncio.run(closed_loop(url, sampler, point.concurrency, duration_s))
    else:
        records, elapsed = asyncio.run(poisson(url, sampler, point.rate, duration_s, seed))
    stats = asdict(point) | {"mode": point.mode} | summarize(records, elapsed) | {"load_average": load_before}
    label = "" if point.round is None else f"r{point.round}"
    print(f"{label:3s}{point.app:21s} {point.workload:12s} {point.mode:7s} {'stream' if point.stream else 'whole ':6s} "
          f"{'C=' + str(point.concurrency) if point.concurrency else f'rate={point.rate}/s':10s} "
          f"{stats['requests_per_s']:7.2f} req/s {stats['output_tokens_per_s']:8.1f} tok/s  "
          f"TTFT p50/p99 {stats['ttft_ms_p50']}/{stats['ttft_ms_p99']} ms  "
          f"TPOT p50/p99 {stats['tpot_ms_p50']}/{stats['tpot_ms_p99']} ms  {stats['tokens_per_chunk']} tok/chunk  "
          f"failed {stats['failed']}  "
          f"load {load_before}", flush=True)
    return stats


def run_engine_points(root: Path, names: list[str], args, model_dir: Path) -> list[dict]:
    """The same closed loop straight against the engine (no Ray, no HTTP), in interleaved rounds."""
    keep_freed_host_memory()  # as a replica does
    engines = {app: build_engine(root, names, lora_slots=128, lora_max_rank=8, max_adapters_per_step=limit,
                                 model_dir=model_dir)
               for app, limit in (("engine", None), ("engine_one_adapter_per_step", 1))}
    points = [("engine", w) for w in dict.fromkeys(("base", "uniform-100", f"uniform-{len(names)}"))]
    points.append(("engine_one_adapter_per_step", "uniform-100"))
    results = []
    try:
        for k, (app, label) in interleaved(points, args.rounds):
            load_before = load_average()
            stats = engine_closed_loop(engines[app], workload(label, names), args.saturation, args.engine_duration,
                                       args.seed + k)
            results.append({"app": app, "workload": label, "concurrency": args.saturation, "round": k, **stats,
                            "load_average": load_before})
            print(f"r{k} {app:27s} {label:12s} C={args.saturation}  {stats['output_tokens_per_s']:8.1f} tok/s  "
                  f"{stats['mean_rows_per_step']} tokens/step  load {load_before}", flush=True)
    finally:
        for engine in engines.values():
            engine.close()
    return results


def deploy_apps(root: Path, names: list[str], model_dir: Path) -> dict:
    """Both applications, side by side (ROUTES), each warmed with every adapter; their start-up times."""
    apps = {}
    for app, route in ROUTES.items():
        started = time.perf_counter()
        serve.run(build_app(app_args(root, app == "one_adapter_per_step", model_dir)), name=app, route_prefix=route)
        ready_s = time.perf_counter() - started
        warm_s = asyncio.run(warm_up(completions_url(app), names, model_dir.name))
        print(f"{app}: ready in {ready_s:.1f} s, warm-up ({len(names)} adapters) {warm_s:.1f} s", flush=True)
        apps[app] = {"ready_s": round(ready_s, 1), "warm_up_s": round(warm_s, 1)}
    return apps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 4 points of 5 s, 100 adapters")
    parser.add_argument("--model", default=DEFAULT_MODEL_NAME, choices=list(MODELS),
                        help="llama-moderate: only the headline and engine-only points, 100 adapters, 30 s points")
    parser.add_argument("--duration", type=float, default=None, help="seconds per point (default 15; quick 5)")
    parser.add_argument("--saturation", type=int, default=32, help="closed-loop concurrency of the main points")
    parser.add_argument("--rates", type=float, nargs="+", default=[4.0, 8.0, 12.0], help="Poisson rates, req/s")
    parser.add_argument("--engine-duration", type=float, default=None,
                        help="seconds per engine-only point (default 10; quick 4)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds of the headline and engine-only points (default 3; quick 1)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    parser.add_argument("--tag", default=None, help="file name stem (default: serving_e2e or serving_e2e_quick)")
    args = parser.parse_args()
    moderate = args.model != DEFAULT_MODEL_NAME  # a step takes ~0.4 s there: longer points, fewer of them
    args.duration = args.duration or (5.0 if args.quick else 30.0 if moderate else 15.0)
    args.engine_duration = args.engine_duration or (4.0 if args.quick else 20.0 if moderate else 10.0)
    args.rounds = args.rounds or (1 if args.quick else 3)
    points = plan(args.quick, tuple(args.rates), args.saturation, args.rounds, headline_only=moderate)
    stem = args.tag or ("serving_e2e_quick" if args.quick else "serving_e2e") + (f"_{args.model}" if moderate else "")
    info = machine_info(torch.device("cpu"))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, root = saved_model(args.model, Path(tmp)), Path(tmp) / "adapters"
        names = write_lora_adapters(root, 100 if args.quick or moderate else max(ADAPTER_COUNTS), args.rank, model_dir)
        print(f"wrote {len(names)} adapters in {time.perf_counter() - started:.1f} s", flush=True)
        engine_results = run_engine_points(root, names, args, model_dir)
        with cluster_env():  # the Ray settings the image and the README's `serve run` give
            info["ray_env"] = {name: os.environ[name] for name in CLUSTER_ENV}
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": PORT})
            apps = deploy_apps(root, names, model_dir)
            results = [run_point(p, names, args.duration, args.seed + i, model_dir.name)
                       for i, p in enumerate(points)]
            for app in ROUTES:
                apps[app]["replicas"] = serve.get_app_handle(app).replica_stats.remote().result()
        finally:
            serve.shutdown()
            ray.shutdown()
    info |= {"load_average_after": load_average(), "seconds": round(time.perf_counter() - started)}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {"machine": info, "command": " ".join(["python -m bench.serving_e2e", *sys.argv[1:]]),
              "settings": settings,
              "app_args": app_args(Path("<tmp>/adapters"), False, Path("<tmp>") / args.model if moderate else None),
              "model_description": MODELS[args.model], "adapters": len(names),
              "apps": apps, "workload": asdict(Workload("default", ())), "results": results,
              "engine_only": engine_results}
    write_results(result, args.out_dir, stem, write_markdown, write_plots)


if __name__ == "__main__":
    main()
