"""The fused FLoRA Triton kernel (flora_core.triton_flora) against the per-row reference, on the CPU.

As in test_triton_lora, Triton's interpreter runs the kernel with NumPy where no GPU is, once
TRITON_INTERPRET=1 is set before the kernel is defined, so the check runs in a child process
(`python -m tests.test_triton_flora`): one layer in every layout, then tiny Llama, Qwen2 and GPT-2
with every adapter kind in one batch against the merged models. The interpreter computes bf16 dot
products wrongly, so it checks fp32 only; tests/test_cuda_parity.py runs the compiled kernel in
fp32 and bf16 on a GPU. Besides the launcher's own tiling, the layer is checked under tilings that
split a batch into several token tiles, column blocks and K splits (split K adds atomically).
"""

from __future__ import annotations

import sys
from unittest import mock

import pytest
import torch

import flora_core.layer_plan as layer_plan
from flora_core.adapter_batch import AdapterBatch
from tests import test_batched_parity as parity  # its model test is called, not collected again here
from tests.factories import TINY_MODELS
from tests.test_batched_parity import (
    CAPACITY, D_IN, LAYOUTS, TOKENS_PER_ROW, adapter_set, assert_close_to_reference, assert_visible_effect,
    load_into_slots, make_layer, reference_rows,
)
from tests.triton_interpreter import run_under_interpreter

LAYER_TYPES = ("linear", "conv1d")  # Conv1D's W0 is a transposed view: the kernel reads it by its strides
KINDS = ("flora", "mixed")  # mixed: FLoRA tokens are a subset of the batch, beside LoRA and IA3 rows
RANKS = (1, 3, 8, 64)  # adapter_set mixes ranks r, r // 2 and 1 in one batch: rank groups of 1 to 3


# tile_sizes stand-ins, (split_k, block_n, block_k) with the fewest tokens a tile takes: a batch spans
# several token tiles, column blocks (D_OUT = 40: the last one partial) and K splits (D_IN = 48: the last
# one masked past the end), and split K adds its partial sums atomically.
OTHER_TILINGS = {"split3": (3, 16, 16), "split2-k32": (2, 32, 32), "k32-cols16": (1, 16, 32)}


def forced_tiles(tiling: str):
    """A tile_sizes stand-in giving OTHER_TILINGS[tiling] at any rank (Triton is imported when it is called)."""
    split_k, block_n, block_k = OTHER_TILINGS[tiling]

    def tiles(n: int, rank: int, d_out: int, multiprocessors: int):
        from flora_core.triton_flora import FusedTiles, triton  # noqa: PLC0415

        block_r = triton.next_power_of_2(rank)
        return FusedTiles(max(1, 16 // block_r), block_r, block_n, block_k, split_k)
    return tiles


def check_every_layout() -> None:
    """The fused kernel forced in one layer: every tiling, layout, layer type, rank mix and kind, as the reference."""
    from flora_core import triton_flora  # noqa: PLC0415 - after TRITON_INTERPRET is set
    from flora_core.batched_ops import gpu_flora_matmuls  # noqa: PLC0415

    assert "fused" in gpu_flora_matmuls(), "Triton is installed but the fused FLoRA kernel did not load"
    tilings = {"rule": triton_flora.tile_sizes, **{name: forced_tiles(name) for name in OTHER_TILINGS}}
    with mock.patch.object(layer_plan, "pick_flora_matmul", lambda rows, rank: "fused"):
        for tiling, tile_rule in tilings.items():
            with mock.patch.object(triton_flora, "tile_sizes", tile_rule):
                check_layer_layouts(tiling)
        for arch in TINY_MODELS:  # every kind in one batch; a FLoRA adapter on some layers only (the identity
            parity.test_model_mixed_batch_matches_merged_models(arch)  # in the others): as the merged models'
            print(f"model {arch}: ok", flush=True)


def check_layer_layouts(tiling: str) -> None:
    for layer_type in LAYER_TYPES:
        for kinds in KINDS:
            for rank in RANKS:
                layer = make_layer(layer_type, torch.float32, CAPACITY)
                adapters = adapter_set(kinds, rank)
                slots = load_into_slots(layer, adapters)
                for name, row_ids in LAYOUTS.items():
                    x = torch.randn(len(row_ids), TOKENS_PER_ROW, D_IN)
                    row_slots = [slots[i] if i is not None else None for i in row_ids]
                    batch = AdapterBatch.from_rows(row_slots, TOKENS_PER_ROW)
                    with torch.no_grad():
                        out = layer(x, batch=batch)
                    plan = next(iter(batch.layer_plans.values()), None)
                    assert plan is None or plan.flora_matmul in (None, "fused"), plan
                    ref = reference_rows(layer, [adapters[i] if i is not None else None for i in row_ids], x)
                    assert_close_to_reference(out, ref, torch.float32)
                    base_ref = reference_rows(layer, [None] * len(row_ids), x)
                    assert_visible_effect(ref, base_ref, row_ids, torch.float32)
                    print(f"{tiling} {layer_type} {kinds} rank {rank:2d} {name}: ok", flush=True)


def test_fused_flora_kernel_matches_the_reference_in_the_interpreter():
    pytest.importorskip("triton", reason="Triton is not installed (CPU builds of torch do not bring it)")
    stdout = run_under_interpreter("tests.test_triton_flora")
    layer_checks = (1 + len(OTHER_TILINGS)) * len(LAYER_TYPES) * len(KINDS) * len(RANKS) * len(LAYOUTS)
    assert stdout.count(": ok") == layer_checks + len(TINY_MODELS), stdout
    for tiling in ("rule", *OTHER_TILINGS):
        assert f"{tiling} conv1d mixed rank 64 with_base_rows: ok" in stdout, stdout


def test_the_rule_keeps_the_differentiable_gemm():
    """Until the kernel is measured on a GPU, every batch's plan takes "gemm", which training needs."""
    layer = make_layer("linear", torch.float32, CAPACITY)
    slots = load_into_slots(layer, adapter_set("flora", 2))
    x = torch.randn(3, TOKENS_PER_ROW, D_IN, requires_grad=True)
    batch = AdapterBatch.from_rows([slots[0], slots[1], slots[3]], TOKENS_PER_ROW)
    layer(x, batch=batch).sum().backward()
    assert [plan.flora_matmul for plan in batch.layer_plans.values()] == ["gemm"]
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_no_fused_flora_without_triton():
    """Where Triton is absent the fused kernel is not offered, and asking for it names what it needs."""
    from flora_core import batched_ops  # noqa: PLC0415

    with mock.patch.dict(sys.modules, {"triton": None, "flora_core.triton_flora": None}):
        batched_ops.gpu_flora_matmuls.cache_clear()
        try:
            assert batched_ops.gpu_flora_matmuls() == {}
            with pytest.raises(ValueError, match="'fused' needs Triton"):
                batched_ops.flora_matmul_named("fused")
        finally:
            batched_ops.gpu_flora_matmuls.cache_clear()


if __name__ == "__main__":
    torch.manual_seed(0)
    check_every_layout()
