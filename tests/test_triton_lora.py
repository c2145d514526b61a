"""The Triton LoRA kernels (flora_core.triton_lora) against the per-row reference, on the CPU.

Triton's interpreter runs the kernels with NumPy where no GPU is, but only when TRITON_INTERPRET=1
is set before the kernels are defined, so the check runs in a child process
(`python -m tests.test_triton_lora`). Skipped where Triton is not installed (CPU builds of torch
do not bring it); on a GPU, tests/test_cuda_parity.py runs the same kernels compiled, every
layout and dtype.
"""

from __future__ import annotations

import sys
from unittest import mock

import pytest
import torch

import flora_core.layer_plan as layer_plan
from flora_core.adapter_batch import AdapterBatch
from tests.test_batched_parity import (
    CAPACITY, D_IN, LAYOUTS, TOKENS_PER_ROW, adapter_set, assert_close_to_reference, assert_visible_effect,
    load_into_slots, make_layer, reference_rows, run_packed,
)
from tests.triton_interpreter import run_under_interpreter


DTYPES = (torch.float32, torch.bfloat16)
RANKS = (1, 5, 64)


def check_every_layout() -> None:
    """bgmv forced in one layer, fp32 and bf16, every layout and ranks 1, 5 and 64, packed rows too: as the
    reference."""
    from flora_core.batched_ops import gpu_lora_strategies  # noqa: PLC0415 - after TRITON_INTERPRET is set

    assert "bgmv" in gpu_lora_strategies(), "Triton is installed but the bgmv strategy did not load"
    with mock.patch.object(layer_plan, "pick_lora_strategy", lambda rows, rank, width: "bgmv"):
        for dtype in DTYPES:
            for rank in RANKS:
                layer = make_layer("linear", dtype, CAPACITY)
                adapters = adapter_set("lora", rank)
                slots = load_into_slots(layer, adapters)
                for name, row_ids in LAYOUTS.items():
                    x = torch.randn(len(row_ids), TOKENS_PER_ROW, D_IN).to(dtype)
                    row_slots = [slots[i] if i is not None else None for i in row_ids]
                    batch = AdapterBatch.from_rows(row_slots, TOKENS_PER_ROW)
                    with torch.no_grad():
                        out = layer(x, batch=batch)
                    ref = reference_rows(layer, [adapters[i] if i is not None else None for i in row_ids], x)
                    assert_close_to_reference(out, ref, dtype)
                    assert_visible_effect(ref, reference_rows(layer, [None] * len(row_ids), x), row_ids, dtype)
                    print(f"{dtype} rank {rank:2d} {name}: ok", flush=True)
                x = torch.randn(13, D_IN).to(dtype)
                out, ref, _ = run_packed(layer, slots, adapters, [(0, 4), (None, 2), (2, 6), (0, 1)], x)
                assert_close_to_reference(out, ref, dtype)
                print(f"{dtype} rank {rank:2d} packed rows: ok", flush=True)


def test_bgmv_kernels_match_the_reference_in_the_interpreter():
    pytest.importorskip("triton", reason="Triton is not installed (CPU builds of torch do not bring it)")
    stdout = run_under_interpreter("tests.test_triton_lora")
    assert stdout.count(": ok") == len(DTYPES) * len(RANKS) * (len(LAYOUTS) + 1), stdout


def test_no_bgmv_strategy_without_triton():
    """Where Triton is absent the GPU strategies are empty, and asking for one names the strategy."""
    from flora_core import batched_ops  # noqa: PLC0415

    with mock.patch.dict(sys.modules, {"triton": None, "flora_core.triton_lora": None}):
        batched_ops.gpu_lora_strategies.cache_clear()
        try:
            assert batched_ops.gpu_lora_strategies() == {}
            with pytest.raises(ValueError, match="'bgmv' needs Triton"):
                batched_ops.lora_strategy("bgmv")
        finally:
            batched_ops.gpu_lora_strategies.cache_clear()


if __name__ == "__main__":
    torch.manual_seed(0)
    check_every_layout()
