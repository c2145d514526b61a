"""Every batched path against the per-row reference (the adapter merged into the weights).

Layer level: one MultiAdapterLinear (nn.Linear and GPT-2's Conv1D), every adapter kind, ranks 1
to 64, every batch layout, fp32 and bf16, both LoRA strategies (per-chunk bmm on packed rows of
uneven lengths too), the CPU strategy rule, and random compositions
(hypothesis). Model level: tiny Llama, Qwen2 and GPT-2 with mixed adapters in one batch.
"""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import flora_core.batched_ops as batched_ops
import flora_core.layer_plan as layer_plan
from flora_core.adapter_batch import AdapterBatch, AdapterSlot
from flora_core.adapter_weights import AdapterKind, AdapterWeights, Ia3Module, LoraModule
from flora_core.batched_ops import LORA_STRATEGIES
from flora_core.layer_plan import SlotTable
from flora_core.multi_adapter_linear import MultiAdapterLinear, SlotCapacity
from flora_core.patching import adapter_batch_scope, patch_model
from tests.factories import TINY_MODELS, random_adapter
from tests.reference import merged_delta_weight, per_row_logits

# Max abs error allowed per row, relative to that row's largest |reference| value. Layer
# references are float64; model references are fp32 models with the adapter merged, whose own
# rounding through every layer needs the looser "fp32-model" entry.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, "fp32-model": 1e-4}
D_IN, D_OUT, TOKENS_PER_ROW = 48, 40, 3
LAYOUTS = {
    "one_adapter_many_rows": [0, 0, 0, 0, 0],
    "all_distinct": [0, 1, 2, 3],
    "interleaved": [0, 1, 0, 2, 1, 3, 0],
    "with_base_rows": [None, 0, None, 1, 2, None, 3],
    "base_only": [None, None],
    "empty": [],
}


def make_layer(layer_type: str, dtype: torch.dtype, capacity: SlotCapacity) -> MultiAdapterLinear:
    torch.manual_seed(1)
    base = nn.Linear(D_IN, D_OUT) if layer_type == "linear" else Conv1D(D_OUT, D_IN)
    if layer_type == "conv1d":
        nn.init.normal_(base.weight, std=0.2)
        nn.init.normal_(base.bias, std=0.2)
    return MultiAdapterLinear(base.to(dtype), capacity)


@torch.no_grad()
def reference_rows(layer: MultiAdapterLinear, adapters: list[AdapterWeights | None], x: torch.Tensor) -> torch.Tensor:
    """Row i of x ([B, S, d_in]) through the base layer with adapters[i] merged, in float64."""
    base = layer.base_layer
    weight = (base.weight.t() if isinstance(base, Conv1D) else base.weight).double()
    rows = []
    for adapter, x_row in zip(adapters, x.double()):
        module = adapter.modules["layer"] if adapter else None
        merged = merged_delta_weight(module, weight) if module else weight
        bias = base.bias.double()
        if isinstance(module, Ia3Module) and not module.on_input:
            bias = bias * module.scale.double()
        rows.append(x_row @ merged.t() + bias)
    return torch.stack(rows) if rows else x.new_zeros(0, x.shape[1], D_OUT, dtype=torch.float64)


def adapter_set(kinds: str, rank: int, seed: int = 10) -> list[AdapterWeights]:
    """Four adapters on the module named "layer": of one kind, LoRA/FLoRA/IA3 mixed, or DoRA beside
    plain LoRA and IA3 (adapters 0 and 2 DoRA)."""
    shapes = {"layer": (D_IN, D_OUT)}
    order = {"lora": [AdapterKind.LORA] * 4, "flora": [AdapterKind.FLORA] * 4, "ia3": [AdapterKind.IA3] * 4,
             "mixed": [AdapterKind.LORA, AdapterKind.FLORA, AdapterKind.IA3, AdapterKind.LORA],
             "dora": [AdapterKind.LORA, AdapterKind.LORA, AdapterKind.LORA, AdapterKind.IA3]}[kinds]
    ranks = [rank, max(1, rank // 2), rank, 1]  # mixed ranks share one batch
    adapters = []
    for i, kind in enumerate(order):
        adapter = random_adapter(kind, shapes, rank=ranks[i], seed=seed + i, strength=1.0)
        if kind is AdapterKind.IA3 and i % 2:  # feed-forward style input scaling
            adapter = AdapterWeights(kind, {"layer": Ia3Module(1 + torch.randn(D_IN), on_input=True)})
        if kinds == "dora" and i in (0, 2):  # magnitudes far from the merged rows' norms
            lora = adapter.modules["layer"]
            magnitude = 0.5 + 1.5 * torch.rand(D_OUT, generator=torch.Generator().manual_seed(seed + i))
            adapter = AdapterWeights(kind, {"layer": LoraModule(lora.a, lora.b, lora.scale, magnitude)})
        adapters.append(adapter)
    return adapters


def load_into_slots(layer: MultiAdapterLinear, adapters: list[AdapterWeights]) -> list[AdapterSlot]:
    slots, used = [], {kind: 0 for kind in AdapterKind}
    for adapter in adapters:
        slot = AdapterSlot(adapter.kind, used[adapter.kind])
        used[adapter.kind] += 1
        layer.write_slot(slot.kind, slot.slot, adapter.modules["layer"])
        slots.append(slot)
    return slots


def run_layer(layer, slots, row_ids, x):
    row_slots = [slots[i] if i is not None else None for i in row_ids]
    batch = AdapterBatch.from_rows(row_slots, TOKENS_PER_ROW)
    with torch.no_grad():
        return layer(x, batch=batch)


def row_scale(ref: torch.Tensor) -> torch.Tensor:
    """Per-row scale [B]: the largest |value| of each row of ref ([B, ...]), at least 1."""
    return ref.reshape(ref.shape[0], -1).abs().amax(dim=1).clamp(min=1.0)


def assert_close_to_reference(out, ref, dtype):
    """Each row's max abs error is within TOLERANCE[dtype] times that row's scale."""
    if ref.numel() == 0:
        return
    err = (out.double() - ref).reshape(ref.shape[0], -1).abs().amax(dim=1)
    allowed = TOLERANCE[dtype] * row_scale(ref)
    assert bool((err <= allowed).all()), f"row errors {err.tolist()} over tolerance {allowed.tolist()}"


def assert_visible_effect(ref, base_ref, row_ids, dtype):
    """Not vacuous: every adapter row differs from the base far beyond the tolerance."""
    if ref.numel() == 0:
        return
    effect = (ref - base_ref).reshape(ref.shape[0], -1).abs().amax(dim=1)
    needed = 3 * TOLERANCE[dtype] * row_scale(ref)
    for i, adapter_id in enumerate(row_ids):
        if adapter_id is not None:
            assert effect[i] > needed[i], f"row {i} (adapter {adapter_id}) barely changes the output"


CAPACITY = SlotCapacity(lora_slots=4, lora_max_rank=64, flora_slots=4, flora_max_rank=64, ia3_slots=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layer_type", ["linear", "conv1d"])
@pytest.mark.parametrize(("kinds", "rank"), [(k, r) for k in ["lora", "flora", "mixed"] for r in [1, 2, 8, 64]]
                         + [("ia3", 1), ("dora", 1), ("dora", 8)])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layer_matches_per_row_reference(dtype, layer_type, kinds, rank, layout):
    layer = make_layer(layer_type, dtype, CAPACITY)
    adapters = adapter_set(kinds, rank)
    slots = load_into_slots(layer, adapters)
    row_ids = LAYOUTS[layout]
    x = torch.randn(len(row_ids), TOKENS_PER_ROW, D_IN).to(dtype)
    out = run_layer(layer, slots, row_ids, x)
    row_adapters = [adapters[i] if i is not None else None for i in row_ids]
    ref = reference_rows(layer, row_adapters, x)
    assert out.shape == (len(row_ids), TOKENS_PER_ROW, D_OUT)
    assert_close_to_reference(out, ref, dtype)
    assert_visible_effect(ref, reference_rows(layer, [None] * len(row_ids), x), row_ids, dtype)


@pytest.mark.parametrize("kinds", ["lora", "dora"])
@pytest.mark.parametrize("strategy", list(LORA_STRATEGIES))
@pytest.mark.parametrize("layout", ["one_adapter_many_rows", "all_distinct", "interleaved", "with_base_rows"])
def test_each_lora_strategy_matches_reference(monkeypatch, strategy, layout, kinds):
    monkeypatch.setattr(layer_plan, "pick_lora_strategy", lambda rows, rank, width: strategy)
    layer = make_layer("linear", torch.float32, CAPACITY)
    adapters = adapter_set(kinds, 8)
    slots = load_into_slots(layer, adapters)
    row_ids = LAYOUTS[layout]
    x = torch.randn(len(row_ids), TOKENS_PER_ROW, D_IN)
    ref = reference_rows(layer, [adapters[i] if i is not None else None for i in row_ids], x)
    assert_close_to_reference(run_layer(layer, slots, row_ids, x), ref, torch.float32)


def test_cpu_rule_follows_the_measured_crossover():
    """pick_lora_strategy on the CPU as bench/lora_strategies.py measured it (README, Performance)."""
    def rows(slot_per_row: list[int], tokens_per_row: int | list[int]):
        return AdapterBatch.from_rows([AdapterSlot(AdapterKind.LORA, s) for s in slot_per_row], tokens_per_row).lora

    pick = batched_ops.pick_lora_strategy
    assert pick(rows([0] * 32, 1), 16, 512) == "grouped"  # one adapter: no copy at all
    assert pick(rows(list(range(32)), 1), 16, 512) == "bmm"  # decode, narrow layer
    assert pick(rows(list(range(32)), 1), 16, 8192) == "grouped"  # decode, wide layer
    assert pick(rows(list(range(8)), 128), 16, 8192) == "bmm"  # prefill: a chunk of 128 per row
    assert pick(rows(list(range(32)), 4), 16, 8192) == "grouped"  # chunks shorter than the rank, wide
    assert pick(rows([0, 1, 0, 1], [127, 128, 128, 128]), 16, 512) == "grouped"  # gcd 1: 511 chunks


def flipped_ia3(adapter: AdapterWeights) -> AdapterWeights:
    """A new IA3 adapter scaling the other side of the layer than `adapter` does."""
    on_input = not adapter.modules["layer"].on_input
    scale = 1 + torch.randn(D_IN if on_input else D_OUT)
    return AdapterWeights(AdapterKind.IA3, {"layer": Ia3Module(scale, on_input=on_input)})


@pytest.mark.parametrize("kinds", ["lora", "dora", "flora", "ia3"])
def test_slot_rewrite_between_calls_of_one_batch_is_seen(kinds):
    """A layer's plan is memoized in the batch, so reusing one batch after a slot write must still
    apply the new adapter: a new rank (LoRA/FLoRA) or IA3 scaling the other side of the layer."""
    layer = make_layer("linear", torch.float32, CAPACITY)
    before = adapter_set(kinds, 2)
    after = [flipped_ia3(a) for a in before] if kinds == "ia3" else adapter_set(kinds, 16, seed=20)
    slots = load_into_slots(layer, before)
    row_ids = [0, 2, 0, 2, 2]  # adapters 0 and 2: IA3 on the output side before, on the input after
    batch = AdapterBatch.from_rows([slots[i] for i in row_ids], TOKENS_PER_ROW)
    x = torch.randn(len(row_ids), TOKENS_PER_ROW, D_IN)
    with torch.no_grad():
        first = layer(x, batch=batch)
        load_into_slots(layer, after)
        second = layer(x, batch=batch)
    ref_before = reference_rows(layer, [before[i] for i in row_ids], x)
    ref_after = reference_rows(layer, [after[i] for i in row_ids], x)
    assert_close_to_reference(first, ref_before, torch.float32)
    assert_close_to_reference(second, ref_after, torch.float32)
    assert_visible_effect(ref_after, ref_before, row_ids, torch.float32)


@pytest.mark.parametrize("kinds", ["lora", "dora", "flora", "ia3", "mixed"])
def test_rewriting_one_slot_leaves_every_other_slot_as_it_was(kinds):
    """Slots of mixed ranks (and DoRA or IA3 sides); slot 0 rewritten with an adapter of another rank
    or side: each row still gets its own slot's adapter, the new one in slot 0 and the old ones elsewhere."""
    layer = make_layer("linear", torch.float32, CAPACITY)
    adapters = adapter_set(kinds, 8)  # ranks 8, 4, 8, 1
    slots = load_into_slots(layer, adapters)
    same_kind = 1 if kinds == "dora" else 3  # a rank-1 adapter of slot 0's kind (plain LoRA where it was DoRA)
    adapters[0] = flipped_ia3(adapters[0]) if kinds == "ia3" else adapter_set(kinds, 2, seed=40)[same_kind]
    layer.write_slot(slots[0].kind, slots[0].slot, adapters[0].modules["layer"])
    x = torch.randn(6, TOKENS_PER_ROW, D_IN, generator=torch.Generator().manual_seed(4))
    # every slot together, then each alone (a LoRA batch computes at its slots' largest rank)
    for row_ids in ([3, 2, 1, 0, 1, 2], *([i] * 6 for i in range(4))):
        out = run_layer(layer, slots, row_ids, x)
        ref = reference_rows(layer, [adapters[i] for i in row_ids], x)
        assert_close_to_reference(out, ref, torch.float32)
        assert_visible_effect(ref, reference_rows(layer, [None] * len(row_ids), x), row_ids, torch.float32)


def test_slot_table_replace_at_sets_exactly_that_slot_of_the_fields_named():
    table = SlotTable(lora_rank=(8, 4, 8, 1), lora_dora=(True, False, True, False), flora_rank=(2, 0, 1),
                      ia3_in=(False, True), ia3_out=(True, False), width=96)
    assert table.replace_at(0, lora_rank=1, lora_dora=False) == table._replace(
        lora_rank=(1, 4, 8, 1), lora_dora=(False, False, True, False))
    assert table.replace_at(2, flora_rank=8) == table._replace(flora_rank=(2, 0, 8))
    assert table.replace_at(1, ia3_in=False, ia3_out=True) == table._replace(ia3_in=(False, False),
                                                                           ia3_out=(True, True))


@pytest.mark.parametrize("kind", list(AdapterKind))
def test_a_slot_the_layer_does_not_have_is_a_value_error(kind):
    """A hand-made AdapterSlot past the layer's slots is refused by name, never read from another slot."""
    layer = make_layer("linear", torch.float32, CAPACITY)
    x = torch.randn(2, TOKENS_PER_ROW, D_IN)
    with pytest.raises(ValueError, match=f"{kind.value} slot 4 but the layer has 4 {kind.value} slots"):
        run_layer(layer, [AdapterSlot(kind, 4)], [0, None], x)


def test_a_slot_going_dora_plain_dora_matches_the_reference_each_time():
    """DoRA's g is kept per adapter after its first write: a slot rewritten with plain LoRA is plain,
    and the DoRA adapter written back gets its own g again."""
    layer = make_layer("conv1d", torch.float32, CAPACITY)
    dora, plain = adapter_set("dora", 4)[0], adapter_set("lora", 4, seed=30)[0]
    x = torch.randn(2, TOKENS_PER_ROW, D_IN)
    for adapter in (dora, plain, dora):
        layer.write_slot(AdapterKind.LORA, 1, adapter.modules["layer"])
        out = run_layer(layer, [AdapterSlot(AdapterKind.LORA, 1)], [0, 0], x)
        assert_close_to_reference(out, reference_rows(layer, [adapter, adapter], x), torch.float32)


def test_base_rows_get_exactly_the_base_layer_output():
    layer = make_layer("linear", torch.float32, CAPACITY)
    adapters = adapter_set("mixed", 4)
    slots = load_into_slots(layer, adapters)
    x = torch.randn(5, TOKENS_PER_ROW, D_IN)
    # LoRA and IA3 rows beside base rows: the base GEMM runs on the whole batch, base rows untouched.
    out = run_layer(layer, slots, [None, 0, 2, None, 3], x)
    expected = layer.base_layer(x)
    assert torch.equal(out[[0, 3]], expected[[0, 3]])
    # With FLoRA rows, base rows go through the base layer on their own.
    out = run_layer(layer, slots, [None, 1, None], x[:3])
    assert torch.equal(out[[0, 2]], layer.base_layer(x[[0, 2]]))


def test_freed_slots_leave_the_base_layer():
    layer = make_layer("conv1d", torch.float32, CAPACITY)
    adapters = adapter_set("mixed", 8)
    slots = load_into_slots(layer, adapters)
    x = torch.randn(4, TOKENS_PER_ROW, D_IN)
    assert not torch.allclose(run_layer(layer, slots, [0, 1, 2, 3], x), layer.base_layer(x))
    for slot in slots:
        layer.clear_slot(slot.kind, slot.slot)
    assert torch.equal(run_layer(layer, slots, [0, 1, 2, 3], x), layer.base_layer(x))


ADAPTER_POOL = [(AdapterKind.LORA, 1), (AdapterKind.LORA, 8), (AdapterKind.FLORA, 1), (AdapterKind.FLORA, 4),
                (AdapterKind.IA3, 1), (AdapterKind.LORA, 64)]


def run_packed(layer, slots, adapters, rows, x=None) -> tuple[torch.Tensor, torch.Tensor, AdapterBatch]:
    """A packed batch (rows = [(adapter id or None, token count)], back to back; x [T, d_in] or
    random) through the layer, with its per-row reference: (output [T, d_out], reference, batch)."""
    counts = [n for _, n in rows]
    x = torch.randn(sum(counts), D_IN) if x is None else x
    batch = AdapterBatch.from_rows([slots[i] if i is not None else None for i, _ in rows], counts)
    with torch.no_grad():
        out = layer(x, batch=batch)
    pieces, start = [], 0
    for (adapter_id, n) in rows:
        adapter = adapters[adapter_id] if adapter_id is not None else None
        pieces.append(reference_rows(layer, [adapter], x[None, start:start + n])[0])
        start += n
    ref = torch.cat(pieces) if pieces else torch.zeros(0, D_OUT, dtype=torch.float64)
    return out, ref, batch


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.tuples(st.one_of(st.none(), st.integers(0, len(ADAPTER_POOL) - 1)), st.integers(1, 4)),
                  max_size=10),
    seed=st.integers(0, 2**16),
    strategy=st.sampled_from(["rule", *LORA_STRATEGIES]),
)
def test_random_batch_compositions_match_reference(rows, seed, strategy):
    torch.manual_seed(seed)
    layer = make_layer("linear", torch.float32, CAPACITY)
    adapters = [random_adapter(kind, {"layer": (D_IN, D_OUT)}, rank=r, seed=seed + i)
                for i, (kind, r) in enumerate(ADAPTER_POOL)]
    slots = load_into_slots(layer, adapters)
    rule = layer_plan.pick_lora_strategy
    with mock.patch.object(layer_plan, "pick_lora_strategy",
                           rule if strategy == "rule" else lambda rows, rank, width: strategy):
        out, ref, _ = run_packed(layer, slots, adapters, rows)
    assert_close_to_reference(out, ref, torch.float32)


def test_bmm_gathers_one_adapter_per_chunk_of_uneven_rows():
    """Rows of 4, 2, 6 and 4 tokens: each slot's tokens cut into chunks of gcd(10, 2, 4) = 2, and
    every chunk gets exactly its own adapter (rows of one adapter need not be neighbours)."""
    layer = make_layer("linear", torch.float32, CAPACITY)
    adapters = adapter_set("lora", 8)
    slots = load_into_slots(layer, adapters)
    rows = [(0, 4), (1, 2), (0, 6), (2, 4)]
    x = torch.randn(16, D_IN)
    with mock.patch.object(layer_plan, "pick_lora_strategy", lambda rows, rank, width: "bmm"):
        out, ref, batch = run_packed(layer, slots, adapters, rows, x)
    assert batch.lora.chunk_length == 2 and batch.lora.num_chunks == 8
    assert batch.lora.chunk_slots.tolist() == [0, 0, 0, 0, 0, 1, 2, 2]
    assert_close_to_reference(out, ref, torch.float32)
    base_ref = run_packed(layer, slots, adapters, [(None, n) for _, n in rows], x)[1]
    assert_visible_effect(ref, base_ref, [i for i, n in rows for _ in range(n)], torch.float32)


@pytest.mark.parametrize(("rows", "in_batch_order"), [
    ([(2, 1), (0, 1), (1, 1), (0, 1), (3, 1)], True),  # decode, interleaved: one chunk per token either way
    ([(1, 3), (0, 3), (2, 3)], True),  # a [B, S] prefill, every row its own adapter: one chunk per row
    ([(0, 1), (1, 2), (0, 1)], False),  # sorting cuts 2 chunks of 2 where batch order cuts 4
    ([(1, 1), None, (0, 1)], False),  # a base row: the LoRA tokens are not all of the batch
])
def test_bmm_takes_the_batch_order_where_it_cuts_no_more_chunks(rows, in_batch_order):
    """bmm over the tokens in batch order needs no gather of x and no scatter of its result; it is
    taken where it cuts no more chunks than the sorted tokens, and every token keeps its own adapter."""
    layer = make_layer("linear", torch.float32, CAPACITY)
    adapters = adapter_set("lora", 8)
    slots = load_into_slots(layer, adapters)
    rows = [row or (None, 1) for row in rows]
    x = torch.randn(sum(n for _, n in rows), D_IN)
    with mock.patch.object(layer_plan, "pick_lora_strategy", lambda rows, rank, width: "bmm"):
        out, ref, batch = run_packed(layer, slots, adapters, rows, x)
        plan = layer_plan.layer_plan(layer.slot_table, batch)
    assert plan.lora_rows is (batch.lora.token_order if in_batch_order else batch.lora)
    if in_batch_order:
        assert plan.lora_rows.covers_all_tokens and plan.lora_rows.num_chunks == batch.lora.num_chunks
    assert_close_to_reference(out, ref, torch.float32)
    base_ref = run_packed(layer, slots, adapters, [(None, n) for _, n in rows], x)[1]
    assert_visible_effect(ref, base_ref, [i for i, n in rows for _ in range(n)], torch.float32)


@pytest.mark.parametrize(("kinds", "kind", "row_ids"), [
    ("flora", AdapterKind.FLORA, [2, 0, 1, 0, 3]),  # rank 1 everywhere: one rank group holds every token
    ("ia3", AdapterKind.IA3, [3, 0, 1, 0, 2]),  # input and output scales
    ("dora", AdapterKind.LORA, [2, 0, 2, 0]),  # every token's slot is DoRA
])
def test_per_token_work_takes_the_batch_order_where_every_token_is_of_its_kind(kinds, kind, row_ids):
    """FLoRA's single rank group, IA3's scales and DoRA's rescale need no gather or scatter where every token
    of a decode batch is of their kind; each token still gets exactly its own adapter."""
    layer = make_layer("linear", torch.float32, CAPACITY)
    adapters = adapter_set(kinds, 1)
    slots = load_into_slots(layer, adapters)
    rows = [(i, 1) for i in row_ids]
    x = torch.randn(len(rows), D_IN)
    out, ref, batch = run_packed(layer, slots, adapters, rows, x)
    plan = layer_plan.layer_plan(layer.slot_table, batch)
    taken = {"flora": lambda: plan.flora_groups[0][1], "ia3": lambda: plan.ia3_rows, "dora": lambda: plan.dora_rows}
    in_order = batch.rows(kind).token_order
    assert in_order is not None and taken[kinds]() is in_order and in_order.covers_all_tokens
    assert_close_to_reference(out, ref, torch.float32)
    base_ref = run_packed(layer, slots, adapters, [(None, 1) for _ in rows], x)[1]
    assert_visible_effect(ref, base_ref, row_ids, torch.float32)


def linear_shapes(layers) -> dict[str, tuple[int, int]]:
    return {name: (layer.d_in, layer.d_out) for name, layer in layers.items()}


@pytest.mark.parametrize("arch", list(TINY_MODELS))
def test_model_mixed_batch_matches_merged_models(arch):
    base = TINY_MODELS[arch]()
    model = copy.deepcopy(base)
    layers = patch_model(model, "all-linear", SlotCapacity(lora_slots=2, flora_slots=3, ia3_slots=1))
    shapes = linear_shapes(layers)
    attention_only = {n: s for n, s in shapes.items() if "attn" in n}
    adapters = [
        random_adapter(AdapterKind.LORA, shapes, rank=8, seed=1),
        random_adapter(AdapterKind.FLORA, shapes, rank=2, seed=2),
        random_adapter(AdapterKind.IA3, shapes, seed=3),
        random_adapter(AdapterKind.LORA, attention_only, rank=1, seed=4),  # targets only some layers
        random_adapter(AdapterKind.FLORA, attention_only, rank=1, seed=5),
        random_adapter(AdapterKind.FLORA, shapes, rank=2, seed=6),  # two FLoRA slots in one rank group
    ]
    kinds_used = {kind: 0 for kind in AdapterKind}
    slots = []
    for adapter in adapters:
        slot = AdapterSlot(adapter.kind, kinds_used[adapter.kind])
        kinds_used[adapter.kind] += 1
        for name, layer in layers.items():
            layer.write_slot(slot.kind, slot.slot, adapter.modules.get(name))
        slots.append(slot)
    row_ids = [0, 1, None, 2, 3, 5, 1, 4, None, 0]
    input_ids = torch.randint(0, 128, (len(row_ids), 7), generator=torch.Generator().manual_seed(0))
    batch = AdapterBatch.from_rows([slots[i] if i is not None else None for i in row_ids], 7)
    with torch.no_grad(), adapter_batch_scope(layers.values(), batch):
        logits = model(input_ids=input_ids).logits
    row_adapters = [adapters[i] if i is not None else None for i in row_ids]
    ref = per_row_logits(base, row_adapters, input_ids)
    base_ref = per_row_logits(base, [None] * len(row_ids), input_ids)
    assert_close_to_reference(logits, ref.double(), "fp32-model")
    assert_visible_effect(ref.double(), base_ref.double(), row_ids, "fp32-model")
    # Outside the scope the patched model is the base model again, bit for bit.
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, base(input_ids=input_ids).logits)


def test_a_scope_applies_its_own_batch_and_leaves_the_outer_one_after_it_ends_or_raises():
    """adapter_batch_scope sets the batch on the layers for the block alone: an inner scope's rows get
    the inner batch, the outer batch is back after it (also when the block raised), none after both."""
    layer = make_layer("linear", torch.float32, SlotCapacity(lora_slots=2, flora_slots=2, ia3_slots=0))
    adapters = adapter_set("mixed", rank=4)[:2]  # a LoRA and a FLoRA adapter
    slots = load_into_slots(layer, adapters)
    x = torch.randn(2, TOKENS_PER_ROW, D_IN, generator=torch.Generator().manual_seed(3))
    outer = AdapterBatch.from_rows(slots, TOKENS_PER_ROW)
    inner = AdapterBatch.from_rows(slots[::-1], TOKENS_PER_ROW)  # each row the other adapter
    outer_ref, inner_ref = reference_rows(layer, adapters, x), reference_rows(layer, adapters[::-1], x)
    with torch.no_grad(), adapter_batch_scope([layer], outer):
        with pytest.raises(RuntimeError, match="in the block"), adapter_batch_scope([layer], inner):
            assert_close_to_reference(layer(x), inner_ref, torch.float32)
            raise RuntimeError("in the block")
        assert_close_to_reference(layer(x), outer_ref, torch.float32)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base_layer(x))


def test_a_base_only_scope_inside_an_adapter_scope_runs_the_base_layer():
    """A batch with no adapter rows, scoped inside a scope with adapters, must not inherit the outer
    batch's adapters: its rows get the base layer, and the outer batch is back after it."""
    layer = make_layer("linear", torch.float32, SlotCapacity(lora_slots=2, flora_slots=2, ia3_slots=0))
    adapters = adapter_set("mixed", rank=4)[:2]
    slots = load_into_slots(layer, adapters)
    x = torch.randn(2, TOKENS_PER_ROW, D_IN, generator=torch.Generator().manual_seed(4))
    outer = AdapterBatch.from_rows(slots, TOKENS_PER_ROW)
    base_only = AdapterBatch.from_rows([None, None], TOKENS_PER_ROW)
    with torch.no_grad(), adapter_batch_scope([layer], outer):
        with adapter_batch_scope([layer], base_only):
            assert torch.equal(layer(x), layer.base_layer(x))
        assert_close_to_reference(layer(x), reference_rows(layer, adapters, x), torch.float32)


def test_flora_tokens_are_computed_at_their_own_rank():
    """Grouping by rank: rank-1 adapters beside a rank-8 one are not padded to rank 8, and a slot
    that does not target the layer (rank 0, the identity) joins the rank-1 group."""
    slot_ranks = [1, 8, 0, 1, 4]
    batch = AdapterBatch.from_rows([AdapterSlot(AdapterKind.FLORA, s) for s in [3, 1, 0, 2, 3]], 2)
    groups = layer_plan._flora_rank_groups(slot_ranks, batch.flora)
    assert [(rank, rows.distinct_slots) for rank, rows in groups] == [(1, (0, 2, 3)), (8, (1,))]
    assert layer_plan._flora_rank_groups((0, 0, 0, 0, 0), batch.flora) == ()
    subset = batch.flora.subset((0, 3))
    # Rows 4 and 0 use slot 3, row 2 slot 0; tokens stay sorted by slot, then by position.
    assert subset.token_index.tolist() == [4, 5, 0, 1, 8, 9]
    assert subset.slots.tolist() == [0, 0, 3, 3, 3, 3]
    assert [(s.slot, s.start, s.length) for s in subset.segments] == [(0, 0, 2), (3, 2, 4)]
    assert subset.distinct_slots == (0, 3) and subset.num_tokens == 6 and not subset.covers_all_tokens
    assert batch.flora.subset((0, 3)) is subset  # memoized for the other layers
