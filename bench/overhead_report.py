"""The adapter overhead run as Markdown tables and PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend is chosen first
from matplotlib.ticker import FuncFormatter  # noqa: E402

LORA_COLUMNS = ("ours", "grouped", "bmm", "bgmv", "paper_bmm", "peft", "loop")
FLORA_COLUMNS = ("ours", "fused", "loop")  # fused: the one-kernel Triton FLoRA (CUDA with Triton only)
LABELS = {"flora ours": "FLoRA: ours", "flora loop": "FLoRA: loop", "flora fused": "FLoRA: fused (Triton)",
          "ours_no_adapter": "ours, rows without adapters",
          "ours_slots_r64": "ours, LoRA slots padded to rank 64", "paper_bmm": "paper's bmm (per row)",
          "bmm": "bmm (per chunk)", "bgmv": "bgmv (Triton)", "peft": "PEFT mixed batch",
          "loop": "loop over adapter groups"}
STYLE = {"ours": ("tab:blue", "o"), "grouped": ("tab:cyan", "s"), "bmm": ("tab:orange", "^"), "bgmv": ("black", "P"),
         "paper_bmm": ("tab:brown", "v"), "peft": ("tab:red", "D"), "loop": ("tab:gray", "x"),
         "ours_no_adapter": ("tab:green", "."), "ours_slots_r64": ("tab:olive", "*"),
         "flora ours": ("tab:purple", "o"), "flora loop": ("tab:pink", "x"), "flora fused": ("indigo", "P")}


@dataclass(frozen=True)
class Headline:
    """The issue's targets for one kind of machine: model-level decode, B rows, each with its own adapter."""

    batch: int
    targets: dict[str, float]  # kind -> the largest ratio to base that meets the target
    machine: str


CPU_HEADLINE = Headline(32, {"lora": 1.15, "flora": 1.05}, "the CPU")
GPU_HEADLINE = Headline(64, {"lora": 1.05, "flora": 1.02}, "a GPU")


def headline_for(device: str) -> Headline:
    """The GPU targets for a run on CUDA, the CPU ones otherwise."""
    return GPU_HEADLINE if device.startswith("cuda") else CPU_HEADLINE


def _index(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """(level, target, phase, batch, tokens, distinct, rank) -> {"<kind> <impl>": row}."""
    table: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        key = (r["level"], r["target"], r["phase"], r["batch"], r["tokens_per_row"], r["distinct"])
        table[key + (r["kind"], r["rank"])][r["impl"]] = r
    return table


def _cell(row: dict | None) -> str:
    return "" if row is None else f"{row['ratio']:.2f}"


def _headline(rows: list[dict], headline: Headline) -> list[str]:
    if not any(r["level"] == "model" for r in rows):
        return []
    table = _index(rows)
    fused = any(r["impl"] == "fused" for r in rows)
    b, targets = headline.batch, headline.targets
    lines = [f"## Headline: model-level decode, B={b}, every row with its own adapter (D={b})", "",
             f"Ratios are forward time / the base model's on the same batch. Targets on {headline.machine}: LoRA "
             f"rank 16 <= {targets['lora']}x, FLoRA rank 1 <= {targets['flora']}x"
             + (", and at least 3x faster than PEFT's mixed batch" if headline is CPU_HEADLINE else "")
             + ". The bytes floors "
             "are the lowest ratios a step bound by the bytes it reads can have (base weights and KV cache, "
             "plus each adapter's factors once; bench/bytes_floor.py): a GPU's decode step is bound so, a "
             "CPU's at one thread is bound by arithmetic instead.", "",
             "| model | base ms | ours, LoRA r16 | ours, FLoRA r1 | " + ("fused Triton, FLoRA r1 | " if fused else "")
             + "PEFT mixed batch, LoRA r16 | PEFT / ours: time | PEFT / ours: added time | loop over adapters, "
             "LoRA r16 | ours, no adapter rows | ours, LoRA r16 in rank-64 slots | bytes floor: LoRA r16 | "
             "bytes floor: FLoRA r1 |",
             "|---|" + "---:|" * (11 + fused)]
    for target in sorted({r["target"] for r in rows if r["level"] == "model"}):
        lora = table.get(("model", target, "decode", b, 1, b, "lora", 16), {})
        flora = table.get(("model", target, "decode", b, 1, b, "flora", 1), {})
        if "ours" not in lora:
            continue
        ours, peft = lora["ours"], lora.get("peft")
        added = (f"{(peft['ms'] - peft['base_ms']) / max(ours['ms'] - ours['base_ms'], 1e-9):.1f}x"
                 if peft and ours["ms"] > ours["base_ms"] else "")
        speedup = f"{peft['ms'] / ours['ms']:.2f}x" if peft else ""
        lines.append(f"| {target} | {ours['base_ms']:.1f} | {_verdict(ours, targets['lora'])} | "
                     f"{_verdict(flora.get('ours'), targets['flora'])} | "
                     + (f"{_verdict(flora.get('fused'), targets['flora'])} | " if fused else "")
                     + f"{_cell(peft)} | {speedup} | {added} | "
                     f"{_cell(lora.get('loop'))} | {_cell(lora.get('ours_no_adapter'))} | "
                     f"{_cell(next((v for k, v in lora.items() if k.startswith('ours_slots_r')), None))} | "
                     f"{_floor(ours)} | {_floor(flora.get('ours'))} |")
    return lines + [""]


def _floor(row: dict | None) -> str:
    return f"{row['bytes_floor']:.3f}" if row and "bytes_floor" in row else ""


def _verdict(row: dict | None, target: float) -> str:
    if row is None:
        return ""
    return f"{row['ratio']:.2f} ({'meets' if row['ratio'] <= target else 'misses'} {target})"


def _shape_tables(rows: list[dict]) -> list[str]:
    table = _index(rows)
    lines = []
    targets = sorted({(r["level"], r["target"]) for r in rows}, key=lambda t: (t[0] != "layer", t[1]))
    for level, target in targets:
        keys = sorted({k[:6] for k in table if k[0] == level and k[1] == target},
                      key=lambda k: (k[2] != "decode", k[3], k[4], k[5]))
        columns = [c for c in LORA_COLUMNS if any(c in table.get(k + ("lora", 16), {}) for k in keys)]
        flora_columns = [c for c in FLORA_COLUMNS if any(c in table.get(k + ("flora", 1), {}) for k in keys)]
        lines += [f"## {level} `{target}`: LoRA rank 16 and FLoRA rank 1", "",
                  "| phase | B | tokens/row | D | base ms | " + " | ".join(columns) + " | "
                  + " | ".join(f"FLoRA {c}" for c in flora_columns) + " |",
                  "|---|---:|---:|---:|---:|" + "---:|" * (len(columns) + len(flora_columns))]
        for key in keys:
            lora, flora = table.get(key + ("lora", 16), {}), table.get(key + ("flora", 1), {})
            if not lora and not flora:
                continue
            base = next(iter((lora or flora).values()))["base_ms"]
            cells = [_cell(lora.get(c)) for c in columns] + [_cell(flora.get(c)) for c in flora_columns]
            lines.append(f"| {key[2]} | {key[3]} | {key[4]} | {key[5]} | {base:.3f} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _rank_table(rows: list[dict]) -> list[str]:
    sweep = [r for r in rows if r["phase"] == "decode" and r["batch"] == 32 and r["distinct"] == 32]
    if len({r["rank"] for r in sweep}) < 3:
        return []
    columns = [c for c in (*LORA_COLUMNS, "fused") if any(r["impl"] == c for r in sweep)]
    lines = ["## Rank sweep: decode, B=32, D=32 (ratio to base)", "",
             "| level | target | kind | rank | base ms | " + " | ".join(columns) + " |",
             "|---|---|---|---:|---:|" + "---:|" * len(columns)]
    grouped: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in sweep:
        grouped[(r["level"], r["target"], r["kind"], r["rank"])][r["impl"]] = r
    for (level, target, kind, rank), impls in sorted(grouped.items(), key=lambda kv: (kv[0][0] != "layer",) + kv[0]):
        base = next(iter(impls.values()))["base_ms"]
        lines.append(f"| {level} | {target} | {kind} | {rank} | {base:.3f} | "
                     + " | ".join(_cell(impls.get(c)) for c in columns) + " |")
    return lines + [""]


def write_markdown(result: dict, path: Path) -> None:
    machine = result["machine"]
    lines = [f"# Adapter overhead: grid `{result['grid']['name']}`", "",
             f"Machine: {machine['cpu']} ({machine['cpu_count']} cores), {machine.get('gpu', 'no GPU')}, device "
             f"`{machine['device']}`, torch {machine['torch']} with {machine['torch_threads']} thread(s), "
             f"{machine['dtype']}" + (", CUDA graphs replayed (timed eagerly: calls that could not be captured, "
             "and model-level calls, which swap layers and reset the KV cache before each call; each row's "
             "`timed_eagerly` in the JSON names them)" if machine.get("cuda_graphs") else "")
             + f". Load average (1, 5, 15 min) before: {machine['load_average_1_5_15']}, "
             f"after: {machine['load_average_after']}. Ran {machine['seconds']} s.", "",
             f"Command: `{result['command']}`", "",
             *([] if result.get("finished", True) else ["**Unfinished**: the rows of the layers and models done "
                                                         "so far; the run was cut short or is still going.", ""]),
             "What ran (everything else in the full grid of batch sizes "
             "1/8/32/64, D in 1/B/4/B, ranks 1-64, decode and prefill was skipped):", "", *result["ran"], ""]
    lines += (_headline(result["rows"], headline_for(machine["device"])) + _shape_tables(result["rows"])
              + _rank_table(result["rows"]))
    path.write_text("\n".join(lines))


# ----------------------------------------------------------------- plots


def _series(rows, target, select, x_key) -> dict[str, tuple[list, list]]:
    series: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    for r in sorted((r for r in rows if r["target"] == target and select(r)), key=lambda r: r[x_key]):
        label = r["impl"] if r["kind"] == "lora" else f"flora {r['impl']}"
        series[label][0].append(r[x_key])
        series[label][1].append(r["ratio"])
    return series


def _panel(ax, series, title: str, xlabel: str, headline: Headline | None) -> None:
    for label, (xs, ys) in series.items():
        color, marker = STYLE.get(label, ("black", "."))
        ax.plot(xs, ys, marker=marker, color=color, linestyle="--" if label.startswith("flora") else "-",
                label=LABELS.get(label, label))
    ax.axhline(1.0, color="black", linewidth=0.8)
    if headline is not None:
        b = headline.batch
        ax.axhline(headline.targets["lora"], color="tab:green", linestyle=":", linewidth=1.2,
                   label=f"target at B=D={b}: LoRA r16 <= {headline.targets['lora']}")
        ax.axhline(headline.targets["flora"], color="tab:olive", linestyle="-.", linewidth=1.2,
                   label=f"target at B=D={b}: FLoRA r1 <= {headline.targets['flora']}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "2357" else ""))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.grid(True, which="both", alpha=0.3)


def _figure(rows, panels, select, x_key, xlabel, title, path: Path, headline: Headline) -> Path | None:
    panels = [p for p in panels if any(r["target"] == p[1] and select(r) for r in rows)]
    if not panels:
        return None
    cols = 3
    rows_needed = len(panels) // cols + 1  # one free cell at least, for the legend
    fig, axes = plt.subplots(rows_needed, cols, figsize=(15, 4.2 * rows_needed), squeeze=False)
    for ax, (level, target) in zip(axes.flat, panels):
        _panel(ax, _series(rows, target, lambda r: r["level"] == level and select(r), x_key),
               f"{level}: {target}", xlabel, headline if level == "model" else None)
        ax.set_ylabel("time / base model's time")
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    spare = list(axes.flat)[len(panels):]
    for ax in spare:
        ax.axis("off")
    spare[0].legend(list(handles.values()), list(handles), loc="center", fontsize=9, title="time / base time",
                    frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(result: dict, out_dir: Path, stem: str) -> list[Path]:
    rows = result["rows"]
    panels = sorted({(r["level"], r["target"]) for r in rows}, key=lambda t: (t[0] != "layer", t[1]))
    dev = f"{result['machine']['device']}, {result['machine']['dtype']}"
    headline = headline_for(result["machine"]["device"])
    made = [
        _figure(rows, panels, lambda r: r["phase"] == "decode" and r["distinct"] == r["batch"]
                and r["rank"] == (16 if r["kind"] == "lora" else 1), "batch",
                "batch size B (decode, one token per row)",
                f"Adapter overhead at decode, every row with its own adapter (D=B): LoRA r16, FLoRA r1 ({dev})",
                out_dir / f"{stem}_decode.png", headline),
        _figure(rows, panels, lambda r: r["phase"] == "decode" and r["batch"] == 32 and r["distinct"] == 32,
                "rank", "adapter rank", f"Adapter overhead vs rank: decode, B=32, D=32 ({dev})",
                out_dir / f"{stem}_rank.png", headline),
    ]
    return [p for p in made if p is not None]
