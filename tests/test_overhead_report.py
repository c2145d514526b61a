"""The adapter-overhead report's headline: the CPU's targets at B=32 on a CPU run, the GPU's at B=64 on CUDA.

Fed rows with known ratios, as bench.adapter_overhead writes them; the README quotes this table.
"""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

from bench.overhead_report import write_markdown, write_plots  # noqa: E402 - after the skip


def row(batch: int, kind: str, impl: str, ratio: float, floor: float) -> dict:
    rank = 16 if kind == "lora" else 1
    return {"level": "model", "target": "llama-moderate", "phase": "decode", "batch": batch, "tokens_per_row": 1,
            "distinct": batch, "kind": kind, "rank": rank, "pool_rank": rank if kind == "lora" else None,
            "impl": impl, "ms": 10 * ratio, "base_ms": 10.0, "ratio": ratio, "bytes_floor": floor}


def result(device: str) -> dict:
    machine = {"cpu": "test", "cpu_count": 2, "device": device, "torch": "t", "torch_threads": 1, "dtype": "bfloat16",
               "load_average_1_5_15": None, "load_average_after": None, "seconds": 1}
    rows = [row(32, "lora", "ours", 1.10, 1.364), row(32, "flora", "ours", 1.06, 1.023),
            row(64, "lora", "ours", 1.04, 1.70), row(64, "flora", "ours", 1.01, 1.044),
            row(64, "flora", "fused", 1.03, 1.044)]
    return {"machine": machine, "command": "test", "grid": {"name": "t"}, "ran": [], "rows": rows}


@pytest.mark.parametrize(("device", "expected"), [
    ("cpu", "| llama-moderate | 10.0 | 1.10 (meets 1.15) | 1.06 (misses 1.05) | "),
    ("cuda", "| llama-moderate | 10.0 | 1.04 (meets 1.05) | 1.01 (meets 1.02) | 1.03 (misses 1.02) | "),
])
def test_the_headline_holds_the_machines_own_targets_and_batch(tmp_path, device, expected):
    write_markdown(result(device), tmp_path / "report.md")
    report = (tmp_path / "report.md").read_text()
    batch = 64 if device == "cuda" else 32
    assert f"## Headline: model-level decode, B={batch}, every row with its own adapter (D={batch})" in report
    line = next(line for line in report.splitlines() if line.startswith("| llama-moderate | 10.0 |"))
    assert line.startswith(expected), line
    floors = "1.700 | 1.044 |" if device == "cuda" else "1.364 | 1.023 |"
    assert line.endswith(floors), line
    assert ("3x faster than PEFT" in report) == (device == "cpu")
    assert write_plots(result(device), tmp_path, "report")  # the decode plot draws that machine's target lines
