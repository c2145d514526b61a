"""The running batch's KV cache: left-padded rows that new rows join and finished rows leave.

TGI's non-flash `CausalLMBatch`, on transformers' `DynamicCache`. Every row is right-aligned:
its tokens end in the last column and the columns left of them are padding, masked out. So
one decode step appends one column for every row, whatever their lengths.

- `prefill_inputs`: new prompts as one left-padded [B, S] batch (its own forward pass).
- `concat`: the prefilled batch joins the running one; the shorter cache is left-padded.
- `select`: keep some rows (finished and aborted ones leave), then drop the left columns
  that are padding in every remaining row, so the cache shrinks when long rows go.

The model's forward appends each step's keys and values to `cache` in place; `advance` then
returns the batch with the mask and positions of that new column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import DynamicCache


@dataclass(frozen=True)
class RunningBatch:
    """Rows decoding together: their KV cache, padding mask and next positions."""

    cache: DynamicCache  # per layer keys / values [B, H, L, D]; row b's real tokens are its last columns
    attention_mask: torch.Tensor  # [B, L] long: 1 for a cached token, 0 for left padding
    next_positions: torch.Tensor  # [B] long: the position id of each row's next token (= its real tokens)

    @property
    def num_rows(self) -> int:
        return self.attention_mask.shape[0]

    @property
    def num_columns(self) -> int:
        return self.attention_mask.shape[1]

    @property
    def kv_tokens(self) -> int:
        """Rows x columns held in the cache, padding included: what its memory is sized by."""
        return self.num_rows * self.num_columns


@dataclass(frozen=True)
class PrefillInputs:
    """New prompts left-padded into one batch."""

    input_ids: torch.Tensor  # [B, S] long: pad_id in front of the shorter prompts
    attention_mask: torch.Tensor  # [B, S] long: 1 for a prompt token, 0 for padding
    position_ids: torch.Tensor  # [B, S] long: 0, 1, ... over each prompt; 0 on padding


def prefill_inputs(prompts: Sequence[Sequence[int]], device: torch.device, pad_id: int = 0) -> PrefillInputs:
    """Left-pad `prompts` (non-empty token id lists) to the longest one."""
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return PrefillInputs(input_ids.to(device), mask.to(device), positions.to(device))


def after_prefill(cache: DynamicCache, inputs: PrefillInputs) -> RunningBatch:
    """The batch a prefill forward pass over `inputs` left behind in `cache`."""
    batch = RunningBatch(cache, inputs.attention_mask, inputs.attention_mask.sum(dim=1))
    _check(batch)
    return batch


def decode_inputs(batch: RunningBatch, tokens: torch.Tensor) -> dict[str, torch.Tensor | DynamicCache]:
    """Forward kwargs for one decode step: tokens [B] long, each row's last sampled token."""
    ones = batch.attention_mask.new_ones(batch.num_rows, 1)
    return {
        "input_ids": tokens[:, None],
        "attention_mask": torch.cat([batch.attention_mask, ones], dim=1),
        "position_ids": batch.next_positions[:, None],
        "past_key_values": batch.cache,
    }


def advance(batch: RunningBatch) -> RunningBatch:
    """The batch after a decode forward pass appended one column to its cache."""
    ones = batch.attention_mask.new_ones(batch.num_rows, 1)
    advanced = RunningBatch(batch.cache, torch.cat([batch.attention_mask, ones], dim=1), batch.next_positions + 1)
    _check(advanced)
    return advanced


def concat(first: RunningBatch, second: RunningBatch) -> RunningBatch:
    """Rows of `first` then rows of `second`; the one with fewer columns is padded on the left."""
    width = max(first.num_columns, second.num_columns)
    layers = [
        (_right_aligned([k1, k2], width, dim=2), _right_aligned([v1, v2], width, dim=2))
        for (k1, v1), (k2, v2) in zip(_layers(first.cache), _layers(second.cache), strict=True)
    ]
    mask = _right_aligned([first.attention_mask, second.attention_mask], width, dim=1)
    batch = RunningBatch(_cache_holding(layers), mask, torch.cat([first.next_positions, second.next_positions]))
    _check(batch)
    return batch


def select(batch: RunningBatch, rows: Sequence[int]) -> RunningBatch | None:
    """Keep `rows` (indices, in the new order); None if none is kept.

    Left columns that are padding in every kept row are dropped.
    """
    if not rows:
        return None
    index = torch.tensor(list(rows), dtype=torch.long, device=batch.attention_mask.device)
    mask = batch.attention_mask.index_select(0, index)
    first = int(torch.nonzero(mask.any(dim=0)).min())  # every row holds at least its prompt
    layers = [  # the kept columns only are copied
        (keys[:, :, first:].index_select(0, index), values[:, :, first:].index_select(0, index))
        for keys, values in _layers(batch.cache)
    ]
    kept = RunningBatch(_cache_holding(layers), mask[:, first:], batch.next_positions.index_select(0, index))
    _check(kept)
    return kept


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache_holding(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A DynamicCache whose layers hold these keys and values themselves ([B, H, L, D] each).

    DynamicCache(layers) would copy every tensor (its layers start empty and concatenate what they
    are given); here they start from zero columns of each, which copies nothing, and then hold it.
    """
    cache = DynamicCache([(keys[:, :, :0], values[:, :, :0]) for keys, values in layers])
    for layer, (keys, values) in zip(cache.layers, layers, strict=True):
        layer.keys, layer.values = keys, values
    return cache


def _right_aligned(tensors: list[torch.Tensor], width: int, dim: int) -> torch.Tensor:
    """The tensors' rows stacked (dim 0), each zero-padded on the left of `dim` up to `width` entries.

    One copy of each tensor (padding first and concatenating after would copy twice).
    """
    shape = list(tensors[0].shape)
    shape[0], shape[dim] = sum(tensor.shape[0] for tensor in tensors), width
    out = tensors[0].new_empty(shape)
    start = 0
    for tensor in tensors:
        rows, padding = out.narrow(0, start, tensor.shape[0]), width - tensor.shape[dim]
        rows.narrow(dim, 0, padding).zero_()
        rows.narrow(dim, padding, tensor.shape[dim]).copy_(tensor)
        start += tensor.shape[0]
    return out


def _check(batch: RunningBatch) -> None:
    for keys, values in _layers(batch.cache):
        assert keys.shape[0] == batch.num_rows and keys.shape[2] == batch.num_columns, (
            f"cache layer {tuple(keys.shape)} does not match the mask {tuple(batch.attention_mask.shape)}"
        )
        assert values.shape[:3] == keys.shape[:3]
