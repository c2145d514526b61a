"""The fused FLoRA kernel's tiling search (bench.flora_tiles): what a GPU session will set tile_sizes from.

Its timings mean something on a GPU only; here the search runs its tiny shapes under Triton's
interpreter, every tiling checked against flora_matmul, and a stand-in kernel shows that a tiling
computing the wrong thing, however fast, is named and never chosen.
"""

from __future__ import annotations

import json
from unittest import mock

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (CPU builds of torch do not bring it)")

from bench import flora_tiles  # noqa: E402 - after the skip
from flora_core.batched_ops import flora_matmul  # noqa: E402
from tests.triton_interpreter import run_under_interpreter  # noqa: E402


def test_the_search_runs_every_tiling_through_the_kernel_in_the_interpreter(tmp_path):
    stdout = run_under_interpreter("bench.flora_tiles", "--quick", "--out-dir", str(tmp_path))
    result = json.loads((tmp_path / "flora_tiles_cpu.json").read_text())
    assert [row["name"] for row in result["rows"]] == [shape.name for shape in flora_tiles.QUICK_SHAPES], stdout
    for row in result["rows"]:
        assert all("ms" in tiling for tiling in row["tried"]), row["tried"]  # each one matched flora_matmul
        tried = {json.dumps({k: v for k, v in t.items() if k != "ms"}, sort_keys=True) for t in row["tried"]}
        assert json.dumps(row["rule"], sort_keys=True) in tried and json.dumps(row["best"], sort_keys=True) in tried
        assert {t["split_k"] for t in row["tried"]} == {1, 3} and {t["block_n"] for t in row["tried"]} >= {16, 32}
        assert row["best_ms"] == min(t["ms"] for t in row["tried"])
    report = (tmp_path / "flora_tiles_cpu.md").read_text()
    assert all(f"| {shape.name} |" in report for shape in flora_tiles.QUICK_SHAPES) and "WRONG" not in report


def test_a_wrong_or_failing_tiling_is_named_and_never_chosen(tmp_path):
    """A split-K tiling returning zeros (the fastest answer there is) and one that cannot launch."""
    def stand_in(x, weight, flora_in, flora_out, rows, rank, tiles):
        if tiles.block_n == 16:
            raise RuntimeError("out of resources: shared memory")
        if tiles.split_k > 1:
            return x.new_zeros(rows.num_tokens, weight.shape[0])
        return flora_matmul(x, weight, flora_in, flora_out, rows, rank)

    shape = flora_tiles.QUICK_SHAPES[0]
    with mock.patch("flora_core.triton_flora.flora_matmul_fused", stand_in):
        row = flora_tiles.search(shape, flora_tiles.QUICK_KNOBS, torch.device("cpu"), torch.float32, rounds=2)
    split = [t for t in row["tried"] if t["split_k"] > 1]
    narrow = [t for t in row["tried"] if t["block_n"] == 16]
    assert split and all(t["error"].startswith("WRONG: max error 1 ") for t in split), row["tried"]
    assert narrow and all(t["error"] == "RuntimeError: out of resources: shared memory" for t in narrow)
    assert row["best"]["split_k"] == 1 and row["best"]["block_n"] != 16 and row["best_ms"] is not None
    result = {"machine": {"device": "cpu", "cpu": "test", "dtype": "float32"}, "command": "test", "rounds": 2,
              "rows": [row]}
    flora_tiles.write_report(result, tmp_path)
    report = (tmp_path / "flora_tiles_cpu.md").read_text()
    assert "differed from flora_matmul's" in report and f"- {shape.name}: " in report
