"""AdapterBatch.from_rows against its definition, token by token.

from_rows works per row on the host for speed; every field it builds is checked here against a
plain per-token reference: a kind's tokens stably sorted by slot, their runs, whether they are
the whole batch in order, their runs in batch order, chunks of the gcd of the runs' lengths,
and the tokens that take the base layer's path. Any row or token given the wrong slot fails it.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flora_core.adapter_batch import AdapterBatch, AdapterSlot, SlotRows
from flora_core.adapter_weights import AdapterKind

ROW_SLOT = st.one_of(st.none(), st.builds(AdapterSlot, st.sampled_from(list(AdapterKind)), st.integers(0, 4)))


def reference_runs(slots: list[int]) -> list[tuple[int, int, int]]:
    """(slot, start, length) of each run of equal consecutive slots."""
    runs = []
    for position, slot in enumerate(slots):
        if runs and runs[-1][0] == slot:
            runs[-1] = (slot, runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((slot, position, 1))
    return runs


def assert_rows_match(rows: SlotRows, positions: list[int], slots: list[int], num_tokens: int) -> None:
    """rows against the tokens `positions` (in the order rows should hold them) with `slots`."""
    assert rows.token_index.tolist() == positions
    assert rows.slots.tolist() == slots
    runs = reference_runs(slots)
    assert [(s.slot, s.start, s.length) for s in rows.segments] == runs
    assert rows.distinct_slots == tuple(slot for slot, _, _ in runs)
    assert rows.covers_all_tokens == (positions == list(range(num_tokens)))
    length = math.gcd(*(length for _, _, length in runs)) or 1
    assert rows.chunk_length == length
    assert rows.chunk_slots.tolist() == slots[::length]
    assert rows.token_index.dtype == rows.slots.dtype == rows.chunk_slots.dtype == torch.long


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(ROW_SLOT, st.integers(0, 3)), max_size=10), st.booleans())
def test_from_rows_equals_its_per_token_definition(rows, uniform):
    row_slots = [slot for slot, _ in rows]
    counts = [count for _, count in rows]
    if uniform:  # a [B, S] batch: one count for every row
        counts = [counts[0] if counts else 1] * len(rows)
    batch = AdapterBatch.from_rows(row_slots, counts[0] if uniform and counts else counts)
    token_slots = [slot for slot, count in zip(row_slots, counts) for _ in range(count)]  # [T]
    assert batch.num_tokens == len(token_slots)
    for kind in AdapterKind:
        mine = [t for t, slot in enumerate(token_slots) if slot is not None and slot.kind is kind]
        by_slot = sorted(mine, key=lambda t: token_slots[t].slot)  # stable
        kind_rows = batch.rows(kind)
        assert_rows_match(kind_rows, by_slot, [token_slots[t].slot for t in by_slot], len(token_slots))
        every_token, in_order = len(mine) == len(token_slots), by_slot == list(range(len(token_slots)))
        if every_token and not in_order:
            assert kind_rows.token_order is not None
            assert_rows_match(kind_rows.token_order, mine, [token_slots[t].slot for t in mine], len(token_slots))
        else:
            assert kind_rows.token_order is None
    non_flora = [t for t, slot in enumerate(token_slots) if slot is None or slot.kind is not AdapterKind.FLORA]
    assert batch.non_flora_index.tolist() == non_flora


def test_decode_rows_sorted_by_slot_keep_each_row_its_own_slot():
    """Six decode rows, slots out of order and repeated: each token keeps its row's slot."""
    lora = [AdapterSlot(AdapterKind.LORA, slot) for slot in (3, 1, 3, 0, 1, 2)]
    rows = AdapterBatch.from_rows(lora, 1).lora
    assert rows.token_index.tolist() == [3, 1, 4, 5, 0, 2]
    assert rows.slots.tolist() == [0, 1, 1, 2, 3, 3]
    assert rows.token_order.slots.tolist() == [3, 1, 3, 0, 1, 2]


@pytest.mark.parametrize("tokens_per_row, message", [([1, 2], "one token count per row"), ([1, -1, 1], "negative")])
def test_from_rows_refuses_counts_that_do_not_fit_the_rows(tokens_per_row, message):
    with pytest.raises(ValueError, match=message):
        AdapterBatch.from_rows([None, AdapterSlot(AdapterKind.LORA, 0), None], tokens_per_row)


@pytest.mark.parametrize("slot, message", [
    (AdapterSlot(AdapterKind.LORA, -1), "int >= 0"),  # Python's indexing would take the last slot
    (AdapterSlot(AdapterKind.LORA, True), "int >= 0"),
    (AdapterSlot("lora-ish", 0), "pass an AdapterKind"),
])
def test_from_rows_refuses_slots_no_pool_makes(slot, message):
    with pytest.raises(ValueError, match=message):
        AdapterBatch.from_rows([None, slot], 1)


def test_a_kind_given_as_its_string_keeps_its_adapter():
    """AdapterKind is a str enum: "flora" must make a FLoRA row, never also a base row."""
    batch = AdapterBatch.from_rows([AdapterSlot("flora", 0), None], 1)
    assert batch.flora.token_index.tolist() == [0]
    assert batch.non_flora_index.tolist() == [1]
