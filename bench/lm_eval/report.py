"""The accuracy table of bench/lm_eval/run_all.sh: one row per served model, one column per task.

    python3 -m bench.lm_eval.report bench/results/lm_eval

Reads the newest lm_eval results_<time>.json under each model's folder and writes the table to
bench/results/lm_eval_demo.md (standard library only: it runs in any Python).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TASKS = ("flora_copy", "flora_reverse", "flora_uppercase", "flora_caesar", "flora_sort")
TABLE_FILE = Path(__file__).resolve().parents[1] / "results" / "lm_eval_demo.md"


def accuracies(results_dir: Path) -> dict[str, dict[str, float]]:
    """Model name -> task -> acc, from each model folder's newest results file."""
    table = {}
    for model_dir in sorted(p for p in results_dir.iterdir() if p.is_dir()):
        files = sorted(model_dir.rglob("results_*.json"), key=lambda p: p.name)  # results_<ISO time>.json
        if files:
            results = json.loads(files[-1].read_text())["results"]
            table[model_dir.name] = {task: results[task]["acc,none"] for task in TASKS if task in results}
    return table


def markdown(table: dict[str, dict[str, float]]) -> str:
    lines = ["| model | " + " | ".join(t.removeprefix("flora_") for t in TASKS) + " |",
             "|---|" + "---:|" * len(TASKS)]
    for model, row in table.items():
        lines.append(f"| {model} | " + " | ".join(f"{row[t]:.2f}" if t in row else "-" for t in TASKS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python3 -m bench.lm_eval.report RESULTS_DIR (bench/results/lm_eval)", file=sys.stderr)
        return 2
    table = accuracies(Path(argv[0]))
    if not table:
        print(f"no lm_eval results under {argv[0]}; run bench/lm_eval/run_all.sh first", file=sys.stderr)
        return 1
    text = markdown(table)
    TABLE_FILE.write_text(text)
    print(text + f"written to {TABLE_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
