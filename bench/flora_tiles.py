"""Search the fused FLoRA kernel's tilings shape by shape, to set triton_flora.tile_sizes from a GPU's numbers.

    python -m bench.flora_tiles --device cuda                 # Llama-7B widths, bf16: meant to fit 10 min
    TRITON_INTERPRET=1 python -m bench.flora_tiles --quick    # the plumbing on a CPU; its timings mean nothing

For each shape (tokens, rank, d_in, d_out), every row with its own adapter, it times the base
layer (F.linear on W0), flora_matmul (the "gemm" the layer plan runs today) and the kernel under
the launcher's tiling, then searches from that tiling one knob at a time (columns per program,
split K, K step, tokens per program, warps, stages), keeping each knob's best value before it
tries the next. Each tiling's output is checked against flora_matmul's before it is timed, and one
that differs is reported, never chosen. A tiling the GPU cannot run (too many registers or too
much shared memory) is named with its error. JSON and a Markdown table go to --out-dir after each
shape, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.timing import Timer, add_device_arguments, device_and_dtype, load_average, machine_info
from flora_core.adapter_batch import AdapterBatch, AdapterSlot
from flora_core.adapter_weights import AdapterKind
from flora_core.batched_ops import flora_matmul


@dataclass(frozen=True)
class Shape:
    """One layer call: `rows` rows of `tokens_per_row` tokens, each row its own adapter, FLoRA at `rank`."""

    rows: int
    tokens_per_row: int
    rank: int
    d_in: int
    d_out: int

    @property
    def name(self) -> str:
        phase = "decode" if self.tokens_per_row == 1 else f"prefill {self.tokens_per_row}/row"
        return f"{phase} B={self.rows} r{self.rank} {self.d_in}x{self.d_out}"


@dataclass(frozen=True)
class Knobs:
    """The values the search tries for each FusedTiles field, in the order it tries the fields."""

    block_n: tuple[int, ...]
    split_k: tuple[int, ...]
    block_k: tuple[int, ...]
    pairs: tuple[int, ...]  # (token, rank index) pairs per program: block_t = pairs // block_r
    num_warps: tuple[int, ...]
    num_stages: tuple[int, ...]


# The most wanted first (a run cut short keeps the shapes it finished): decode at B=64, rank 1, the FLoRA
# r1 <= 1.02x target, in the attention's and the MLP's up and down projections; smaller decode batches;
# higher ranks; prefill.
GPU_SHAPES = (
    Shape(64, 1, 1, 4096, 4096), Shape(64, 1, 1, 4096, 11008), Shape(64, 1, 1, 11008, 4096),
    *(Shape(b, 1, 1, 4096, 4096) for b in (1, 8, 32)),
    *(Shape(64, 1, r, 4096, 4096) for r in (2, 4, 8)),
    Shape(4, 512, 1, 4096, 4096), Shape(4, 512, 2, 4096, 4096), Shape(4, 512, 1, 4096, 11008),
)
GPU_KNOBS = Knobs(block_n=(32, 64, 128, 256), split_k=(1, 2, 4, 8), block_k=(32, 64, 128), pairs=(16, 32, 64, 128),
                  num_warps=(2, 4, 8), num_stages=(2, 3, 4, 5))
QUICK_SHAPES = (Shape(4, 1, 1, 192, 80), Shape(4, 1, 3, 192, 80), Shape(2, 12, 2, 192, 80))
QUICK_KNOBS = Knobs(block_n=(16, 32), split_k=(1, 3), block_k=(16, 32), pairs=(16, 32), num_warps=(4,),
                    num_stages=(3,))


def inputs(shape: Shape, device: torch.device, dtype: torch.dtype) -> tuple:
    """(x [T, d_in], W0 [d_out, d_in], flora_in [S, R, d_in], flora_out [S, R, d_out], rows): row i in slot i."""
    slots = shape.rows
    x = torch.randn(shape.rows * shape.tokens_per_row, shape.d_in, device=device, dtype=dtype)
    weight = torch.randn(shape.d_out, shape.d_in, device=device, dtype=dtype) / shape.d_in ** 0.5
    flora_in = (1 + 0.1 * torch.randn(slots, shape.rank, shape.d_in, device=device)).to(dtype)
    flora_out = ((1 + 0.1 * torch.randn(slots, shape.rank, shape.d_out, device=device)) / shape.rank).to(dtype)
    row_slots = [AdapterSlot(AdapterKind.FLORA, i) for i in range(shape.rows)]
    rows = AdapterBatch.from_rows(row_slots, shape.tokens_per_row, device).flora
    return x, weight, flora_in, flora_out, rows


def candidates(tiles, knob: str, values: tuple[int, ...], tokens: int, d_in: int) -> list:
    """`tiles` with `knob` set to each of `values` that fits the shape, `tiles` itself first."""
    out = [tiles]
    for value in values:
        if knob == "pairs":  # no more tokens a tile than the batch has, beyond tl.dot's least of 16 pairs
            block_t = value // tiles.block_r
            if 1 <= block_t <= max(1 << (tokens - 1).bit_length(), 16 // tiles.block_r):
                out.append(dataclasses.replace(tiles, block_t=block_t))
        elif knob != "split_k" or value * tiles.block_k <= d_in:  # every split has a K step to take
            out.append(dataclasses.replace(tiles, **{knob: value}))
    return list(dict.fromkeys(out))


def search(shape: Shape, knobs: Knobs, device: torch.device, dtype: torch.dtype, rounds: int) -> dict:
    """The shape's base, gemm and rule timings, then the best tiling found one knob at a time."""
    from flora_core.triton_flora import flora_matmul_fused, multiprocessor_count, tile_sizes  # noqa: PLC0415

    x, weight, flora_in, flora_out, rows = inputs(shape, device, dtype)
    timer = Timer(device, rounds=rounds, min_rounds=rounds, warmup=1)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    tried: dict = {}  # FusedTiles -> {"ms": ...} or {"error": ...}
    with torch.no_grad():
        expected = flora_matmul(x, weight, flora_in, flora_out, rows, shape.rank).float()
        reference_ms = timer.compare({
            "base": (lambda: F.linear(x, weight), None),
            "gemm": (lambda: flora_matmul(x, weight, flora_in, flora_out, rows, shape.rank), None)})

        def ms(tiles) -> float:
            if tiles not in tried:
                tried[tiles] = outcome(lambda: flora_matmul_fused(x, weight, flora_in, flora_out, rows, shape.rank,
                                                                  tiles), expected, tolerance, timer)
            return tried[tiles].get("ms", float("inf"))

        rule = best = tile_sizes(rows.num_tokens, shape.rank, shape.d_out, multiprocessor_count(device))
        for knob in dataclasses.fields(knobs):
            best = min(candidates(best, knob.name, getattr(knobs, knob.name), rows.num_tokens, shape.d_in), key=ms)
    return {
        "shape": dataclasses.asdict(shape), "name": shape.name, "tokens": rows.num_tokens,
        "base_ms": reference_ms["base"], "gemm_ms": reference_ms["gemm"],
        "rule": dataclasses.asdict(rule), "rule_ms": tried[rule].get("ms"),
        "best": dataclasses.asdict(best), "best_ms": tried[best].get("ms"),
        "tried": [{**dataclasses.asdict(t), **result} for t, result in tried.items()],
    }


def outcome(call, expected: torch.Tensor, tolerance: float, timer: Timer) -> dict:
    """{"ms": median} for a call whose output is within `tolerance` (of its largest value) of `expected`,
    else {"error": what went wrong}."""
    try:
        error = (call().float() - expected).abs().max().item() / expected.abs().max().item()
    except Exception as failure:  # noqa: BLE001 - e.g. Triton's OutOfResources: named, never chosen
        return {"error": f"{type(failure).__name__}: {str(failure)[:200]}"}
    if error > tolerance:
        return {"error": f"WRONG: max error {error:.3g} of the output's largest value"}
    return {"ms": timer.compare({"fused": (call, None)})["fused"]}


def write_report(result: dict, out_dir: Path) -> None:
    """flora_tiles_<device>.json (every tiling tried) and .md (a table: base, gemm, rule's and best tiling)."""
    stem = out_dir / f"flora_tiles_{result['machine']['device'].split(':')[0]}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))

    def ratio(ms, base):
        return f"{ms / base:.3f}x" if ms else "failed"

    lines = [f"# Fused FLoRA kernel tilings: {result['machine'].get('gpu', result['machine']['cpu'])}", "",
             f"`{result['command']}`, {result['machine']['dtype']}; each time is a median over "
             f"{result['rounds']} calls, and each ratio is over the base layer (F.linear on W0) on the same input.",
             "", "| shape | base | gemm (today) | fused, rule's tiling | fused, best tiling | best tiling | "
             "tilings tried (failed) |", "|---|---:|---:|---:|---:|---|---:|"]
    for row in result["rows"]:
        best = row["best"]
        tiling = (f"t{best['block_t']} r{best['block_r']} n{best['block_n']} k{best['block_k']} "
                  f"split{best['split_k']} w{best['num_warps']} s{best['num_stages']}")
        failed = sum("error" in t for t in row["tried"])
        lines.append(f"| {row['name']} | {row['base_ms'] * 1e3:.1f} us | {ratio(row['gemm_ms'], row['base_ms'])} | "
                     f"{ratio(row['rule_ms'], row['base_ms'])} | {ratio(row['best_ms'], row['base_ms'])} | {tiling} | "
                     f"{len(row['tried'])} ({failed}) |")
    wrong = [f"- {row['name']}: {t}" for row in result["rows"] for t in row["tried"]
             if t.get("error", "").startswith("WRONG")]
    if wrong:
        lines += ["", "**Tilings whose output differed from flora_matmul's (a bug to fix before any is used):**",
                  *wrong]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="three tiny shapes and two values a knob (the plumbing)")
    parser.add_argument("--rounds", type=int, default=None, help="timed calls per tiling (default 20; --quick 2)")
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    device, dtype = device_and_dtype(args)
    shapes, knobs = (QUICK_SHAPES, QUICK_KNOBS) if args.quick else (GPU_SHAPES, GPU_KNOBS)
    rounds = args.rounds or (2 if args.quick else 20)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine_info(device) | {"dtype": str(dtype).removeprefix("torch.")},
              "command": " ".join(["python -m bench.flora_tiles", *sys.argv[1:]]), "rounds": rounds,
              "knobs": dataclasses.asdict(knobs), "rows": []}
    started = time.perf_counter()
    for shape in shapes:
        torch.manual_seed(0)
        row = search(shape, knobs, device, dtype, rounds)
        result["rows"].append(row)
        result["machine"] |= {"load_average_after": load_average(), "seconds": round(time.perf_counter() - started)}
        write_report(result, args.out_dir)
        print(f"{row['name']}: base {row['base_ms'] * 1e3:.1f} us, gemm {row['gemm_ms'] / row['base_ms']:.3f}x, "
              f"rule {(row['rule_ms'] or float('nan')) / row['base_ms']:.3f}x, best "
              f"{(row['best_ms'] or float('nan')) / row['base_ms']:.3f}x ({len(row['tried'])} tilings, "
              f"{result['machine']['seconds']} s so far)", flush=True)
    print(f"wrote {args.out_dir}/flora_tiles_{device.type}.json and .md")


if __name__ == "__main__":
    main()
