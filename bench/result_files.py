"""Where a benchmark's results go: <stem>.json (every number), <stem>.md (the report) and its PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def write_results(result: dict, out_dir: Path, stem: str, write_markdown: Callable[[dict, Path], None],
                  write_plots: Callable[[dict, Path, str], list[Path]]) -> None:
    """Write result as JSON, its Markdown report and its plots into out_dir, and say what was written."""
    _write_json_and_markdown(result, out_dir, stem, write_markdown)
    plots = write_plots(result, out_dir, stem)
    print(f"wrote {out_dir / stem}.json, .md and {', '.join(p.name for p in plots)} "
          f"in {result['machine']['seconds']} s")


def write_results_so_far(result: dict, out_dir: Path, stem: str, write_markdown: Callable[[dict, Path], None]) -> None:
    """Write an unfinished run's results as JSON and Markdown (plots come with the finished run)."""
    _write_json_and_markdown(result, out_dir, stem, write_markdown)
    print(f"results so far in {out_dir / stem}.json and .md ({result['machine']['seconds']} s)", flush=True)


def _write_json_and_markdown(result: dict, out_dir: Path, stem: str,
                             write_markdown: Callable[[dict, Path], None]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, out_dir / f"{stem}.md")
