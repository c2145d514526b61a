"""The running batch's cache moves: rows leaving and joining (regroup), checked value by value.

The engine tests check whole generations through these; here each row's keys and values, its
padding and its mask are compared with the row as it was, for batches of different widths.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from flora_core.running_batch import RunningBatch, regroup

LAYERS, HEADS, HEAD_DIM = 2, 3, 4


def batch_of(lengths: list[int], width: int, seed: int) -> RunningBatch:
    """Rows of `lengths` real tokens, right-aligned in `width` columns, random keys and values."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, width - length :] = 1
    layers = []
    for _ in range(LAYERS):
        keys, values = (torch.randn(len(lengths), HEADS, width, HEAD_DIM, generator=gen) for _ in range(2))
        layers.append((keys * mask[:, None, :, None], values * mask[:, None, :, None]))  # padding holds zeros
    return RunningBatch(DynamicCache(layers), mask, mask.sum(dim=1))


def real_tokens(batch: RunningBatch, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Row `row`'s keys and values per layer, its padding left out: [H, length, D] each."""
    length = int(batch.attention_mask[row].sum())
    return [(layer.keys[row, :, -length:], layer.values[row, :, -length:]) for layer in batch.cache.layers]


def assert_rows_equal(got: RunningBatch, got_row: int, expected: RunningBatch, expected_row: int) -> None:
    assert int(got.next_positions[got_row]) == int(expected.next_positions[expected_row])
    for (k, v), (k_ref, v_ref) in zip(real_tokens(got, got_row), real_tokens(expected, expected_row), strict=True):
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    padding = got.num_columns - int(got.attention_mask[got_row].sum())
    assert not got.attention_mask[got_row, :padding].any()
    for layer in got.cache.layers:  # padding columns hold zeros, masked out
        assert not layer.keys[got_row, :, :padding].any() and not layer.values[got_row, :, :padding].any()


def every_row(batch: RunningBatch) -> range:
    return range(batch.num_rows)


def test_joining_right_aligns_both_batches_in_the_wider_width():
    running, joining = batch_of([5, 2], width=5, seed=0), batch_of([3, 7, 1], width=7, seed=1)
    joined = regroup([(running, every_row(running)), (joining, every_row(joining))])
    assert (joined.num_rows, joined.num_columns) == (5, 7)
    for row in range(2):
        assert_rows_equal(joined, row, running, row)
    for row in range(3):
        assert_rows_equal(joined, 2 + row, joining, row)
    assert joined.cache.get_seq_length() == 7


def test_leaving_keeps_rows_in_the_new_order_and_drops_columns_padding_in_all_of_them():
    batch = batch_of([2, 6, 3, 1], width=6, seed=2)
    kept = regroup([(batch, [3, 2, 0])])  # the longest row leaves: 3 columns are enough
    assert (kept.num_rows, kept.num_columns) == (3, 3)
    for new_row, old_row in enumerate([3, 2, 0]):
        assert_rows_equal(kept, new_row, batch, old_row)
    assert regroup([(batch, [])]) is None and regroup([]) is None


def test_rows_leave_and_join_in_one_regroup():
    """Three parts: the widest loses rows (gathered straight into the result), a narrower one loses rows
    (gathered, then padded), one keeps every row; a part that keeps none adds nothing."""
    running = batch_of([6, 2, 5, 3], width=6, seed=5)
    narrow = batch_of([2, 4, 1], width=4, seed=6)
    whole = batch_of([3, 1], width=3, seed=7)
    gone = batch_of([2], width=2, seed=8)
    got = regroup([(running, [2, 0]), (narrow, [2, 0]), (gone, []), (whole, every_row(whole))])
    assert (got.num_rows, got.num_columns) == (6, 6)
    expected = [(running, 2), (running, 0), (narrow, 2), (narrow, 0), (whole, 0), (whole, 1)]
    for row, (batch, old_row) in enumerate(expected):
        assert_rows_equal(got, row, batch, old_row)
    assert got.attention_mask.sum(dim=1).tolist() == [5, 6, 1, 2, 3, 1]


def test_the_cache_holds_the_joined_tensors_and_a_decode_step_appends_to_them():
    first, second = batch_of([4], width=4, seed=3), batch_of([2, 3], width=3, seed=4)
    joined = regroup([(first, every_row(first)), (second, every_row(second))])
    before = [(layer.keys.clone(), layer.values.clone()) for layer in joined.cache.layers]
    new = torch.randn(3, HEADS, 1, HEAD_DIM)
    for index, (keys, values) in enumerate(before):
        got_keys, got_values = joined.cache.update(new, -new, index)
        assert torch.equal(got_keys, torch.cat([keys, new], dim=2))
        assert torch.equal(got_values, torch.cat([values, -new], dim=2))
    assert joined.cache.get_seq_length() == 5
