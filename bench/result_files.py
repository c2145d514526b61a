"""Where a benchmark's results go: <stem>.json (every number), <stem>.md (the report) and its PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def write_results(result: dict, out_dir: Path, stem: str, write_markdown: Callable[[dict, Path], None],
                  write_plots: Callable[[dict, Path, str], list[Path]]) -> None:
    """Write result as JSON, its Markdown report and its plots into out_dir, and say what was written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, out_dir / f"{stem}.md")
    plots = write_plots(result, out_dir, stem)
    print(f"wrote {out_dir / stem}.json, .md and {', '.join(p.name for p in plots)} "
          f"in {result['machine']['seconds']} s")
