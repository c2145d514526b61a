"""Table 1 of the demo: held-out exact match of the base model and of every demo adapter.

Rows are the demo tasks, columns the base model and the four adapter kinds. Every prediction is
decoded twice: (a) all adapters served in ONE mixed batch (rows of every task x kind and base
rows interleaved in the same forward passes), and (b) one adapter at a time. Both use the same
left padding, so a row's computation differs only in which other rows share its batch; the
predictions must agree exactly, and `main` exits with status 1 when any does not.

    python -m flora_core.demo_eval --n 100 --seed 1234 --json table1.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

from flora_core.cache_argument import cache_kwargs
from flora_core.demo_adapters import DEMO_KINDS, KIND_LABELS, demo_adapter_name, demo_adapters_dir, load_demo_model
from flora_core.demo_tasks import MAX_WORD_LEN, TASKS, exact_match_accuracy, make_examples
from flora_core.multi_adapter_model import MultiAdapterModel

BASE = "base"  # the column of rows served with no adapter
COLUMNS = (BASE, *DEMO_KINDS)
MAX_NEW_TOKENS = MAX_WORD_LEN + 4  # the longest answer, its eos, and room to see a run-on
DEFAULT_BATCH_ROWS = 256  # rows per forward pass; larger batches ran slower on CPU


@dataclass(frozen=True)
class EvalRow:
    """One held-out prompt served with one adapter (None: the base model)."""

    task: str
    column: str  # BASE or a kind in DEMO_KINDS
    adapter: str | None
    prompt: str
    target: str


@torch.no_grad()
def greedy_decode(
    model: MultiAdapterModel,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    adapter_names: Sequence[str | None],
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    width: int | None = None,
) -> list[str]:
    """Greedy completions, row i with adapter_names[i], each ending at its first eos.

    One prefill over the left-padded prompts, then one token per row per step over a KV cache; a
    finished row keeps stepping (on pad tokens) until every row is done. width: pad every prompt
    to this many tokens (None: to the longest prompt), so a prompt is padded alike in any batch.
    """
    padding = {"padding": "max_length", "max_length": width} if width is not None else {"padding": True}
    batch = tok(list(prompts), return_tensors="pt", **padding)
    ids, mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: every prompt starts at position 0
    cache = DynamicCache()
    done = torch.zeros(len(prompts), dtype=torch.bool, device=model.device)
    new_tokens = []
    for _ in range(max_new_tokens):
        logits = model(ids, adapter_names, attention_mask=mask, position_ids=positions,
                       **cache_kwargs(model.model, cache), use_cache=True).logits
        token = logits[:, -1].argmax(-1).masked_fill(done, tok.pad_token_id)
        new_tokens.append(token)
        done |= token == tok.eos_token_id
        if done.all():
            break
        ids, positions = token[:, None], positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return tok.batch_decode(_cut_at_eos(torch.stack(new_tokens, 1), tok.eos_token_id), skip_special_tokens=True)


def _cut_at_eos(tokens: torch.Tensor, eos: int) -> list[list[int]]:
    rows = []
    for row in tokens.tolist():
        rows.append(row[: row.index(eos)] if eos in row else row)
    return rows


def eval_rows(n: int, seed: int) -> list[EvalRow]:
    """n held-out prompts per task, each with the base model and every kind; example-major order.

    Consecutive rows belong to different adapters, so any slice of the list mixes them all.
    """
    per_task = {task.name: make_examples(task, n, seed, split="held_out") for task in TASKS}
    rows = []
    for i in range(n):
        for task in TASKS:
            prompt, target = per_task[task.name][i]
            for column in COLUMNS:
                adapter = None if column == BASE else demo_adapter_name(task.name, column)
                rows.append(EvalRow(task.name, column, adapter, prompt, target))
    return rows


def decode_mixed(model, tok, rows: Sequence[EvalRow], batch_rows: int = DEFAULT_BATCH_ROWS) -> list[str]:
    """Predictions with rows of all adapters (and the base) interleaved in the same batches."""
    width = max(len(tok(r.prompt).input_ids) for r in rows)
    predictions = []
    for start in range(0, len(rows), batch_rows):
        chunk = rows[start : start + batch_rows]
        predictions += greedy_decode(model, tok, [r.prompt for r in chunk], [r.adapter for r in chunk], width=width)
    return predictions


def decode_one_at_a_time(model, tok, rows: Sequence[EvalRow], batch_rows: int = DEFAULT_BATCH_ROWS) -> list[str]:
    """Predictions with each batch holding the rows of a single adapter (or only base rows)."""
    width = max(len(tok(r.prompt).input_ids) for r in rows)
    by_adapter: dict[str | None, list[int]] = {}
    for i, row in enumerate(rows):
        by_adapter.setdefault(row.adapter, []).append(i)
    predictions: list[str] = [""] * len(rows)
    for adapter, indices in by_adapter.items():
        for start in range(0, len(indices), batch_rows):
            chunk = indices[start : start + batch_rows]
            texts = greedy_decode(model, tok, [rows[i].prompt for i in chunk], [adapter] * len(chunk), width=width)
            for i, text in zip(chunk, texts):
                predictions[i] = text
    return predictions


def accuracy_table(rows: Sequence[EvalRow], predictions: Sequence[str]) -> dict[str, dict[str, float]]:
    """Exact-match accuracy per task (outer key) and column (inner key, in COLUMNS order)."""
    table = {}
    for task in TASKS:
        table[task.name] = {}
        for column in COLUMNS:
            picked = [(p, r.target) for r, p in zip(rows, predictions) if r.task == task.name and r.column == column]
            table[task.name][column] = exact_match_accuracy([p for p, _ in picked], [t for _, t in picked])
    return table


def format_table(table: dict[str, dict[str, float]]) -> str:
    """A Markdown table of accuracies in percent: rows are tasks, then their mean."""
    header = ["task", "base", *(KIND_LABELS[k] for k in DEMO_KINDS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task, row in table.items():
        lines.append(f"| {task} | " + " | ".join(f"{100 * row[c]:.1f}" for c in COLUMNS) + " |")
    means = [sum(row[c] for row in table.values()) / len(table) for c in COLUMNS]
    lines.append("| **mean** | " + " | ".join(f"{100 * m:.1f}" for m in means) + " |")
    return "\n".join(lines)


def mismatches(rows: Sequence[EvalRow], mixed: Sequence[str], alone: Sequence[str]) -> list[dict[str, str]]:
    """Every row whose mixed-batch and one-at-a-time predictions differ."""
    return [{**asdict(r), "mixed": m, "one_at_a_time": a} for r, m, a in zip(rows, mixed, alone) if m != a]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="held-out examples per task")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the held-out words")
    parser.add_argument("--adapters", type=Path, default=demo_adapters_dir(), help="demo adapters directory")
    parser.add_argument("--batch-rows", type=int, default=DEFAULT_BATCH_ROWS, help="rows per forward pass")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the tables and mismatches here")
    args = parser.parse_args(argv)
    if args.n < 1 or args.batch_rows < 1:
        parser.error(f"--n and --batch-rows must be >= 1, got {args.n} and {args.batch_rows}")
    torch.set_num_threads(args.threads)
    model, tok = load_demo_model(args.adapters)
    rows = eval_rows(args.n, args.seed)
    start = time.perf_counter()
    mixed = decode_mixed(model, tok, rows, args.batch_rows)
    mixed_seconds = time.perf_counter() - start
    alone = decode_one_at_a_time(model, tok, rows, args.batch_rows)
    alone_seconds = time.perf_counter() - start - mixed_seconds
    tables = {"mixed": accuracy_table(rows, mixed), "one_at_a_time": accuracy_table(rows, alone)}
    diff = mismatches(rows, mixed, alone)
    print(f"held-out exact match (%), n={args.n} per task, seed {args.seed}\n")
    print(f"(a) all 16 adapters and the base in one mixed batch ({mixed_seconds:.0f}s):\n")
    print(format_table(tables["mixed"]) + "\n")
    print(f"(b) one adapter at a time ({alone_seconds:.0f}s):\n")
    print(format_table(tables["one_at_a_time"]) + "\n")
    print(f"predictions agree: {not diff} ({len(rows) - len(diff)}/{len(rows)} rows identical)")
    for row in diff:
        print(f"  MISMATCH {row['adapter'] or BASE} {row['prompt']!r}: mixed {row['mixed']!r}, "
              f"one at a time {row['one_at_a_time']!r}")
    if args.json is not None:
        record = {"n": args.n, "seed": args.seed, **tables, "agree": not diff, "mismatches": diff,
                  "command": "python -m flora_core.demo_eval " + " ".join(sys.argv[1:] if argv is None else argv)}
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
