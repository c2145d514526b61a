"""Adapter overhead: a heterogeneous batch's forward time divided by the base model's on the same batch.

    python -m bench.adapter_overhead                      # the CPU grid (~10-15 min on 2 cores)
    python -m bench.adapter_overhead --quick              # a smoke run (~1 min)
    python -m bench.adapter_overhead --device cuda        # the GPU grid (bf16), more prefill shapes
    python -m bench.adapter_overhead --level layer        # only the grid's layers (or: --level model)
    python -m bench.adapter_overhead --targets            # only the targets' cells (B=D=32 here, 64 on a GPU)

Layer level (bench/overhead_layer.py): Llama-7B-sized layers (4096x4096, 4096x11008) and the
embedded model's MLP layer (256x688), random weights. Model level (bench/overhead_model.py): the
embedded default model and a Llama-style model with TinyLlama-1.1B's layer shapes (4 layers,
random weights). Implementations side by side: ours (MultiAdapterLinear, pick_lora_strategy),
each LoRA strategy, the paper's bmm-LoRA, PEFT's mixed batch, and a loop over adapter groups.
Row i of a batch of B uses adapter i % D. Writes JSON, a Markdown report and PNG plots.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from bench import overhead_layer as ol
from bench import overhead_model as om
from bench.overhead_report import headline_for, write_markdown, write_plots
from bench.result_files import write_results, write_results_so_far
from bench.timing import Timer, add_device_arguments, device_and_dtype, load_average, machine_info
from flora_core.adapter_weights import AdapterKind
from flora_core.batched_ops import gpu_flora_matmuls, gpu_lora_strategies

LORA, FLORA = AdapterKind.LORA, AdapterKind.FLORA
BATCHES = (1, 8, 32, 64)
LORA_RANKS = (1, 2, 4, 8, 16, 64)
FLORA_RANKS = (1, 2, 4, 8)
SWEEP_BATCH = 32  # the rank sweep runs at this batch size, every row with its own adapter
PADDED_POOL_RANK = 64  # one case runs rank-16 adapters in slots of rank 64 (the serving default lora_max_rank)
LAYER_SHAPES = {"7B attn 4096x4096": (4096, 4096), "7B mlp 4096x11008": (4096, 11008),
                "tiny-llama mlp 256x688": (256, 688)}
MODEL_CONTEXT = {"flora-tiny-llama": 32, "llama-moderate": 128}  # KV cache tokens behind each decode row


def distinct_counts(batch: int) -> list[int]:
    return sorted({1, max(1, batch // 4), batch})


@dataclass(frozen=True)
class Grid:
    """What one run measures: per layer shape and per model, (batch, tokens/row) shapes and ranks."""

    name: str
    layer_shapes: tuple[str, ...]
    layer_decode_batches: tuple[int, ...]
    layer_prefill: dict[str, tuple[tuple[int, int], ...]]  # shape -> (batch, tokens per row)
    rank_sweep: bool
    models: tuple[str, ...]
    model_decode_batches: dict[str, tuple[int, ...]]
    model_prefill: dict[str, tuple[tuple[int, int], ...]]
    model_distinct: dict[str, tuple[int, ...]] = field(default_factory=dict)  # override: D values per model
    timer: dict = field(default_factory=dict)
    headline_timer: dict = field(default_factory=dict)  # overrides for model-level decode at B = D = 32
    model_loop_max_batch: int | None = None  # model level: no `loop` past this batch size (B forwards of 1 row)

    def describe(self) -> list[str]:
        """What was run, and what was left out, as Markdown bullet lines."""
        lines = [f"- grid `{self.name}`; row i of a batch of B uses adapter i % D; D in {{1, B/4, B}} unless noted"]
        for shape in self.layer_shapes:
            lines.append(f"- layer {shape}: decode B in {list(self.layer_decode_batches)} (LoRA r16: all "
                         f"implementations; FLoRA r1: ours, loop, and on CUDA the fused kernel); prefill "
                         f"(B, tokens/row) in {list(self.layer_prefill.get(shape, ()))}")
        for model in self.models:
            distinct = self.model_distinct.get(model)
            loop_note = (f"; `loop` only for B <= {self.model_loop_max_batch}" if self.model_loop_max_batch
                         and max(self.model_decode_batches[model]) > self.model_loop_max_batch else "")
            lines.append(f"- model {model}: decode B in {list(self.model_decode_batches[model])}{loop_note}"
                         f"{f' with D in {list(distinct)}' if distinct else ''}, over a KV cache of "
                         f"{MODEL_CONTEXT[model]} tokens; prefill (B, tokens/row) in {list(self.model_prefill[model])}"
                         + (" (its context is 64 positions)" if model == "flora-tiny-llama" else ""))
        if self.headline_timer:
            lines.append(f"- model-level decode at B=D={SWEEP_BATCH}, LoRA r16 and FLoRA r1 (the targets): at least "
                         f"{self.headline_timer.get('min_rounds')} interleaved rounds; elsewhere at least "
                         f"{self.timer.get('min_rounds')}, more while under {self.timer.get('budget_s')} s per call")
        if self.rank_sweep:
            lines.append(f"- rank sweep at B={SWEEP_BATCH}, D={SWEEP_BATCH}, decode: LoRA ranks {list(LORA_RANKS)} "
                         f"(layers: every implementation; models: ours, grouped, bmm), FLoRA ranks "
                         f"{list(FLORA_RANKS)} (ours; layers also loop; on CUDA also the fused kernel)")
        else:
            lines.append("- no rank sweep (LoRA rank 16 and FLoRA rank 1 only)")
        lines.append(f"- LoRA slots have the adapters' rank (SlotCapacity.lora_max_rank = r), except one case per "
                     f"layer and model: rank-16 adapters in slots of rank {PADDED_POOL_RANK} (the serving default), "
                     f"decode, B=D={SWEEP_BATCH}, ours only (`ours_slots_r{PADDED_POOL_RANK}`)")
        return lines


CPU_GRID = Grid(
    name="cpu", layer_shapes=tuple(LAYER_SHAPES), layer_decode_batches=BATCHES,
    layer_prefill={"7B attn 4096x4096": ((1, 128), (1, 512), (8, 128)), "7B mlp 4096x11008": ((1, 128),),
                   "tiny-llama mlp 256x688": ((1, 128), (1, 512), (8, 128), (32, 128))},
    rank_sweep=True, models=("flora-tiny-llama", "llama-moderate"),
    model_decode_batches={"flora-tiny-llama": BATCHES, "llama-moderate": BATCHES},
    model_prefill={"flora-tiny-llama": ((1, 48), (8, 48), (32, 48)), "llama-moderate": ((1, 128),)},
    timer={"rounds": 15, "min_rounds": 3, "warmup": 1, "budget_s": 0.4},
    headline_timer={"rounds": 15, "min_rounds": 11},
    model_loop_max_batch=32,
)
GPU_GRID = Grid(
    name="gpu", layer_shapes=tuple(LAYER_SHAPES), layer_decode_batches=BATCHES,
    layer_prefill={shape: tuple((b, t) for b in BATCHES for t in (128, 512)) for shape in LAYER_SHAPES},
    rank_sweep=True, models=("flora-tiny-llama", "llama-moderate"),
    model_decode_batches={"flora-tiny-llama": BATCHES, "llama-moderate": BATCHES},
    model_prefill={"flora-tiny-llama": ((1, 48), (8, 48), (32, 48)),
                   "llama-moderate": ((1, 128), (8, 128), (32, 128), (8, 512))},
    timer={"rounds": 30, "min_rounds": 5, "warmup": 3, "budget_s": 0.3},
)
QUICK_GRID = Grid(
    name="quick", layer_shapes=("7B attn 4096x4096", "tiny-llama mlp 256x688"), layer_decode_batches=(8, 32),
    layer_prefill={"7B attn 4096x4096": ((1, 128),), "tiny-llama mlp 256x688": ((8, 128),)},
    rank_sweep=False, models=("flora-tiny-llama", "llama-moderate"),
    model_decode_batches={"flora-tiny-llama": (32,), "llama-moderate": (32,)},
    model_prefill={"flora-tiny-llama": ((8, 48),), "llama-moderate": ()},
    model_distinct={"llama-moderate": (32,)},
    timer={"rounds": 5, "min_rounds": 2, "warmup": 1, "budget_s": 0.2},
)


def targets_grid(grid: Grid, batch: int) -> Grid:
    """Only the issue's target cells from `grid`: its models at decode, B = D = `batch` (32 on the CPU, 64 on a
    GPU), LoRA r16 and FLoRA r1 with every implementation, with the grid's timers; no layers, prefill or sweep."""
    models = grid.models
    return replace(grid, name=f"{grid.name}_targets", layer_shapes=(), rank_sweep=False,
                   model_decode_batches={m: (batch,) for m in models}, model_prefill={m: () for m in models},
                   model_distinct={m: (batch,) for m in models})


def layer_cases(grid: Grid, shape: str) -> list[ol.OverheadCase]:
    cases = []
    shapes = [(b, 1) for b in grid.layer_decode_batches] + list(grid.layer_prefill.get(shape, ()))
    for batch, tokens in shapes:
        for distinct in distinct_counts(batch):
            cases.append(ol.OverheadCase(batch, tokens, distinct, LORA, 16, ol.LORA_IMPLS))
            cases.append(ol.OverheadCase(batch, tokens, distinct, FLORA, 1, ol.FLORA_IMPLS))
    b = SWEEP_BATCH
    cases.append(ol.OverheadCase(b, 1, b, LORA, 16, ("ours",), pool_rank=PADDED_POOL_RANK))
    if grid.rank_sweep:
        cases += [ol.OverheadCase(b, 1, b, LORA, r, ol.LORA_IMPLS, pool_rank=r) for r in LORA_RANKS if r != 16]
        cases += [ol.OverheadCase(b, 1, b, FLORA, r, ol.FLORA_IMPLS) for r in FLORA_RANKS if r != 1]
    return cases


def model_cases(grid: Grid, model: str) -> list[ol.OverheadCase]:
    cases = []
    shapes = [(b, 1) for b in grid.model_decode_batches[model]] + list(grid.model_prefill[model])
    for batch, tokens in shapes:
        for distinct in grid.model_distinct.get(model) or distinct_counts(batch):
            lora_impls = om.LORA_IMPLS + (("ours_no_adapter",) if tokens == 1 and distinct == batch else ())
            flora_impls = om.FLORA_IMPLS
            if grid.model_loop_max_batch is not None and batch > grid.model_loop_max_batch:
                lora_impls = tuple(i for i in lora_impls if i != "loop")
                flora_impls = tuple(i for i in flora_impls if i != "loop")
            cases.append(ol.OverheadCase(batch, tokens, distinct, LORA, 16, lora_impls))
            cases.append(ol.OverheadCase(batch, tokens, distinct, FLORA, 1, flora_impls))
    b = SWEEP_BATCH
    cases.append(ol.OverheadCase(b, 1, b, LORA, 16, ("ours",), pool_rank=PADDED_POOL_RANK))
    if grid.rank_sweep:
        cases += [ol.OverheadCase(b, 1, b, LORA, r, ("ours", "grouped", "bmm"), pool_rank=r)
                  for r in LORA_RANKS if r != 16]
        cases += [ol.OverheadCase(b, 1, b, FLORA, r, ("ours",)) for r in FLORA_RANKS if r != 1]
    return cases


def rows_of(level: str, target: str, case, timings: dict[str, float], eager: tuple[str, ...] = (),
            floor: float | None = None) -> list[dict]:
    """One row per implementation; eager: with CUDA graphs, the calls (base among them) timed eagerly;
    floor: the case's bytes floor (bench.bytes_floor), decode only."""
    base = timings["base"]
    return [{"level": level, "target": target, "phase": case.phase, "batch": case.batch,
             "tokens_per_row": case.tokens_per_row, "distinct": case.distinct, "kind": case.kind.value,
             "rank": case.rank, "pool_rank": case.pool_rank if case.kind is LORA else None,
             "impl": impl if case.kind is FLORA or case.pool_rank == case.rank else f"{impl}_slots_r{case.pool_rank}",
             "ms": round(ms, 4), "base_ms": round(base, 4), "ratio": round(ms / base, 4)}
            | ({"timed_eagerly": [name for name in eager if name in ("base", impl)]} if eager else {})
            | ({"bytes_floor": round(floor, 4)} if floor else {})
            for impl, ms in timings.items() if impl != "base"]


def measured(bench, case, timer: Timer) -> tuple[dict[str, float], tuple[str, ...]]:
    """bench.measure's ms per implementation, and the calls that timer did not capture in CUDA graphs."""
    before = len(timer.timed_eagerly)
    timings = bench.measure(case, timer)
    return timings, tuple(name for name, _ in timer.timed_eagerly[before:])


def by_pool_rank(cases: list) -> dict[int, list]:
    """Cases grouped by the LoRA slots' rank each needs (one bench per group), the main group first."""
    groups: dict[int, list] = {}
    for case in sorted(cases, key=lambda c: c.pool_rank != 16):
        groups.setdefault(case.pool_rank, []).append(case)
    return groups


def is_headline(case) -> bool:
    """The issue's targets: decode, B=32, every row with its own adapter, LoRA rank 16 or FLoRA rank 1."""
    return (case.phase == "decode" and case.batch == case.distinct == SWEEP_BATCH
            and case.rank == (16 if case.kind is LORA else 1))


def with_gpu_strategies(cases: list, device: torch.device) -> list:
    """On CUDA with Triton, every case that compares LoRA strategies also times the Triton `bgmv`, and
    every FLoRA case the fused Triton FLoRA kernel."""
    if device.type != "cuda":
        return cases
    bgmv, fused = "bgmv" in gpu_lora_strategies(), "fused" in gpu_flora_matmuls()
    return [replace(c, impls=c.impls + ("bgmv",)) if bgmv and c.kind is LORA and "bmm" in c.impls
            else replace(c, impls=c.impls + ("fused",)) if fused and c.kind is FLORA else c
            for c in cases]


def run(grid: Grid, device: torch.device, dtype: torch.dtype, cuda_graphs: bool = False,
        checkpoint: Callable[[list[dict]], None] = lambda rows: None) -> list[dict]:
    """Every case of the grid, a row per implementation; `checkpoint` gets the rows so far after each layer
    shape and each model."""
    graphs = {"cuda_graphs": cuda_graphs, "never_capture": frozenset({"peft"})}  # PEFT indexes rows with lists
    timer = Timer(device, **grid.timer, **graphs)
    headline_timer = Timer(device, **(grid.timer | grid.headline_timer), **graphs)
    rows: list[dict] = []
    for shape in grid.layer_shapes:
        d_in, d_out = LAYER_SHAPES[shape]
        for pool_rank, cases in by_pool_rank(with_gpu_strategies(layer_cases(grid, shape), device)).items():
            flora_ranks = [c.rank for c in cases if c.kind is FLORA] or [1]
            bench = ol.LayerBench(d_in, d_out, device, dtype, max_distinct=max(c.distinct for c in cases),
                                  max_lora_rank=pool_rank, max_flora_rank=max(flora_ranks))
            for case in cases:
                rows += report(rows_of("layer", shape, case, *measured(bench, case, timer), bench.decode_floor(case)))
            del bench
            gc.collect()
        checkpoint(rows)
    for model in grid.models:
        base = om.build_base(model, device, dtype)
        for pool_rank, cases in by_pool_rank(with_gpu_strategies(model_cases(grid, model), device)).items():
            flora_ranks = [c.rank for c in cases if c.kind is FLORA] or [1]
            bench = om.ModelBench(model, base, max_distinct=max(c.distinct for c in cases), max_lora_rank=pool_rank,
                                  max_flora_rank=max(flora_ranks), context=MODEL_CONTEXT[model],
                                  with_peft=any("peft" in c.impls for c in cases))
            for case in cases:
                case_timer = headline_timer if is_headline(case) else timer
                rows += report(rows_of("model", model, case, *measured(bench, case, case_timer),
                                       bench.decode_floor(case)))
            del bench
            gc.collect()
        del base
        checkpoint(rows)
    return rows


def report(rows: list[dict]) -> list[dict]:
    first = rows[0]
    print(f"{first['level']:5s} {first['target']:24s} {first['phase']:7s} B={first['batch']:<3d} "
          f"T={first['tokens_per_row']:<3d} D={first['distinct']:<3d} {first['kind']:5s} r={first['rank']:<2d} "
          f"R={first['pool_rank'] or '-'!s:2s} "
          f"base {first['base_ms']:9.3f} ms  " + "  ".join(f"{r['impl']} {r['ratio']:.2f}x" for r in rows)
          + "".join(f"  ({r['impl']} eager: {', '.join(r['timed_eagerly'])})" for r in rows if r.get("timed_eagerly"))
          + (f"  (bytes floor {first['bytes_floor']:.3f}x)" if "bytes_floor" in first else ""), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_arguments(parser)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadiest on a shared machine)")
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="a smoke run (~1 min on the CPU)")
    sizes.add_argument("--targets", action="store_true",
                       help="only the targets' cells: model-level decode, B=D=32 on the CPU (~3 min), 64 on a GPU")
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    parser.add_argument("--tag", default=None, help="file name stem (default: adapter_overhead_<grid>)")
    parser.add_argument("--level", choices=["all", "layer", "model"], default="all",
                        help="run only the grid's layers or only its models (e.g. to fit a time limit per command)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="on a GPU, time replays of CUDA graphs: the kernels' cost without launches or Python")
    args = parser.parse_args()
    device, dtype = device_and_dtype(args)
    if args.cuda_graphs and device.type != "cuda":
        parser.error(f"--cuda-graphs needs a CUDA device, not {device}: leave it out on the CPU")
    torch.set_num_threads(args.threads)
    grid = QUICK_GRID if args.quick else (GPU_GRID if device.type == "cuda" else CPU_GRID)
    if args.targets:
        grid = targets_grid(grid, headline_for(str(device)).batch)
    if args.level == "layer":
        grid = replace(grid, name=f"{grid.name}_layers", models=())
    elif args.level == "model":
        grid = replace(grid, name=f"{grid.name}_models", layer_shapes=())
    stem = args.tag or f"adapter_overhead_{grid.name}" + ("_graphs" if args.cuda_graphs else "")
    command = " ".join(["python -m bench.adapter_overhead", *sys.argv[1:]])
    info = machine_info(device) | {"dtype": str(dtype).removeprefix("torch."), "cuda_graphs": args.cuda_graphs}
    started = time.perf_counter()

    def result_of(rows: list[dict], finished: bool) -> dict:
        machine = info | {"load_average_after": load_average(), "seconds": round(time.perf_counter() - started)}
        return {"machine": machine, "command": command, "grid": asdict(grid), "ran": grid.describe(), "rows": rows,
                "finished": finished}

    # JSON and Markdown after each layer shape and model: a run cut short (a GPU command's time limit) keeps them.
    rows = run(grid, device, dtype, args.cuda_graphs,
               checkpoint=lambda rows: write_results_so_far(result_of(rows, False), args.out_dir, stem, write_markdown))
    write_results(result_of(rows, True), args.out_dir, stem, write_markdown, write_plots)


if __name__ == "__main__":
    main()
