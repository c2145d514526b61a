"""The README's Python example runs and shows what it promises."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_mixed_batch_example_runs_three_kinds_in_one_batch():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "mixed_batch.py")], capture_output=True,
                            text=True, timeout=120, check=True)
    changes = dict(re.findall(r"adapter=(\S+)\s+max \|logit change vs base\| = ([0-9.]+)", result.stdout))
    assert set(changes) == {"summarize-lora", "polite-ia3", "pirate-flora", "base"}
    assert float(changes["base"]) == 0.0
    for name in ["summarize-lora", "polite-ia3", "pirate-flora"]:
        assert float(changes[name]) > 1e-3, f"{name} did not change its row"
