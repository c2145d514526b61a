"""The batched paths on a CUDA device against the per-row float64 reference; skipped without CUDA.

CI has no GPU: these run where one is lent, `bash scripts/test.sh tests/test_cuda_parity.py`.
The layers, adapters and references are test_batched_parity's; only the device differs, and
every LoRA strategy (the Triton `bgmv` too, where Triton is installed) is forced as well as left
to the CUDA rule of `pick_lora_strategy`, and so is every FLoRA implementation (the fused Triton
kernel too, under its launcher's tiling and under those that split K).
"""

from __future__ import annotations

import copy

import pytest
import torch

import flora_core.layer_plan as layer_plan
from flora_core.adapter_batch import AdapterBatch, AdapterSlot
from flora_core.adapter_weights import AdapterKind
from flora_core.batched_ops import (
    CUDA_BMM_MIN_DISTINCT, FLORA_MATMULS, LORA_STRATEGIES, gpu_flora_matmuls, gpu_lora_strategies, pick_lora_strategy,
)
from flora_core.multi_adapter_linear import SlotCapacity
from flora_core.patching import adapter_batch_scope, patch_model
from tests.factories import TINY_MODELS, random_adapter
from tests.reference import per_row_logits
from tests.test_batched_parity import (
    CAPACITY, D_IN, D_OUT, LAYOUTS, TOKENS_PER_ROW, adapter_set, assert_close_to_reference, assert_visible_effect,
    load_into_slots, make_layer, reference_rows,
)
from tests.test_triton_flora import OTHER_TILINGS, forced_tiles

DEVICE = "cuda"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")


@pytest.mark.parametrize("strategy", ["rule", *LORA_STRATEGIES, *gpu_lora_strategies()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("kinds", "rank"), [("lora", 1), ("lora", 16), ("flora", 1), ("flora", 4), ("ia3", 1),
                                             ("mixed", 8), ("dora", 8)])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layer_on_cuda_matches_reference(monkeypatch, strategy, dtype, kinds, rank, layout):
    if strategy != "rule":
        monkeypatch.setattr(layer_plan, "pick_lora_strategy", lambda rows, r, width: strategy)
    check_layer_on_cuda("linear", dtype, kinds, rank, layout)


@pytest.mark.parametrize("matmul", [*FLORA_MATMULS, *gpu_flora_matmuls()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layer_type", ["linear", "conv1d"])
@pytest.mark.parametrize(("kinds", "rank"), [("flora", 1), ("flora", 3), ("flora", 8), ("mixed", 4)])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_flora_on_cuda_matches_reference(monkeypatch, matmul, dtype, layer_type, kinds, rank, layout):
    monkeypatch.setattr(layer_plan, "pick_flora_matmul", lambda rows, r: matmul)
    check_layer_on_cuda(layer_type, dtype, kinds, rank, layout)


@pytest.mark.skipif("fused" not in gpu_flora_matmuls(), reason="the fused FLoRA kernel needs Triton")
@pytest.mark.parametrize("tiling", list(OTHER_TILINGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fused_flora_tilings_on_cuda_match_reference(monkeypatch, tiling, dtype, layout):
    """The fused kernel under bench.flora_tiles' other tilings: token tiles, column blocks, split K's atomic adds."""
    monkeypatch.setattr(layer_plan, "pick_flora_matmul", lambda rows, r: "fused")
    monkeypatch.setattr("flora_core.triton_flora.tile_sizes", forced_tiles(tiling))
    check_layer_on_cuda("linear", dtype, "mixed", 4, layout)


def check_layer_on_cuda(layer_type: str, dtype: torch.dtype, kinds: str, rank: int, layout: str) -> None:
    """One layer's batch on CUDA against the float64 per-row reference computed on the CPU."""
    reference_layer = make_layer(layer_type, dtype, CAPACITY)
    layer = copy.deepcopy(reference_layer).to(DEVICE)
    adapters = adapter_set(kinds, rank)
    slots = load_into_slots(layer, adapters)
    row_ids = LAYOUTS[layout]
    x = torch.randn(len(row_ids), TOKENS_PER_ROW, D_IN).to(dtype)
    batch = AdapterBatch.from_rows([slots[i] if i is not None else None for i in row_ids], TOKENS_PER_ROW,
                                   device=DEVICE)
    with torch.no_grad():
        out = layer(x.to(DEVICE), batch=batch)
    assert out.device.type == torch.device(DEVICE).type and out.shape == (len(row_ids), TOKENS_PER_ROW, D_OUT)
    ref = reference_rows(reference_layer, [adapters[i] if i is not None else None for i in row_ids], x)
    assert_close_to_reference(out.cpu(), ref, dtype)
    assert_visible_effect(ref, reference_rows(reference_layer, [None] * len(row_ids), x), row_ids, dtype)


def test_cuda_rule_takes_bmm_for_many_adapters_with_few_chunks_each():
    def rows(distinct: int, tokens_per_row: int | list[int]):
        slots = [AdapterSlot(AdapterKind.LORA, i) for i in range(distinct)]
        return AdapterBatch.from_rows(slots, tokens_per_row, device=DEVICE).lora

    assert pick_lora_strategy(rows(CUDA_BMM_MIN_DISTINCT, 1), 16, 8192) == "bmm"  # decode
    assert pick_lora_strategy(rows(CUDA_BMM_MIN_DISTINCT - 1, 1), 16, 8192) == "grouped"
    assert pick_lora_strategy(rows(CUDA_BMM_MIN_DISTINCT, 128), 16, 8192) == "bmm"  # prefill: a chunk per row
    uneven = [127 + i % 2 for i in range(CUDA_BMM_MIN_DISTINCT)]  # gcd 1: a chunk per token
    assert pick_lora_strategy(rows(CUDA_BMM_MIN_DISTINCT, uneven), 16, 8192) == "grouped"


@pytest.mark.parametrize("arch", list(TINY_MODELS))
def test_model_mixed_batch_on_cuda_matches_merged_models(arch):
    base = TINY_MODELS[arch]()
    model = copy.deepcopy(base)
    layers = patch_model(model, "all-linear", SlotCapacity(lora_slots=2, flora_slots=2, ia3_slots=1))
    model.to(DEVICE)
    shapes = {name: (layer.d_in, layer.d_out) for name, layer in layers.items()}
    adapters = [random_adapter(AdapterKind.LORA, shapes, rank=8, seed=1),
                random_adapter(AdapterKind.FLORA, shapes, rank=2, seed=2),
                random_adapter(AdapterKind.IA3, shapes, seed=3)]
    slots = [AdapterSlot(adapter.kind, 0) for adapter in adapters]
    for adapter, slot in zip(adapters, slots):
        for name, layer in layers.items():
            layer.write_slot(slot.kind, slot.slot, adapter.modules.get(name))
    row_ids = [0, 1, None, 2, 1, 0, None, 2]
    input_ids = torch.randint(0, 128, (len(row_ids), 7), generator=torch.Generator().manual_seed(0))
    batch = AdapterBatch.from_rows([slots[i] if i is not None else None for i in row_ids], 7, device=DEVICE)
    with torch.no_grad(), adapter_batch_scope(layers.values(), batch):
        logits = model(input_ids=input_ids.to(DEVICE)).logits.cpu()
    row_adapters = [adapters[i] if i is not None else None for i in row_ids]
    ref = per_row_logits(base, row_adapters, input_ids).double()
    assert_close_to_reference(logits, ref, "fp32-model")
    assert_visible_effect(ref, per_row_logits(base, [None] * len(row_ids), input_ids).double(), row_ids,
                          "fp32-model")
