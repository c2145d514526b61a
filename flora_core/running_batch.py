"""The running batch's KV cache: left-padded rows that new rows join and finished rows leave.

TGI's non-flash `CausalLMBatch`, on transformers' `DynamicCache`. Every row is right-aligned:
its tokens end in the last column and the columns left of them are padding, masked out. So
one decode step appends one column for every row, whatever their lengths.

- `prefill_inputs`: new prompts as one left-padded [B, S] batch (its own forward pass).
- `regroup`: the rows kept of the running batch (finished and aborted ones leave) and of the
  batches prefilled this step (which join), in one batch: each drops the left columns that are
  padding in all its kept rows, so the cache shrinks when long rows go, and the narrower are
  left-padded to the widest. One copy of each kept row.

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


def decode_inputs(batch: RunningBatch, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward kwargs for one decode step, tokens [B] long (each row's last sampled token); the caller adds
    batch.cache under the name its model takes it by (cache_argument)."""
    ones = batch.attention_mask.new_ones(batch.num_rows, 1)
    return {
        "input_ids": tokens[:, None],
        "attention_mask": torch.cat([batch.attention_mask, ones], dim=1),
        "position_ids": batch.next_positions[:, None],
    }


def advance(batch: RunningBatch) -> RunningBatch:
    """The batch after a decode forward pass appended one column to its cache."""
    ones = batch.attention_mask.new_ones(batch.num_rows, 1)
    advanced = RunningBatch(batch.cache, torch.cat([batch.attention_mask, ones], dim=1), batch.next_positions + 1)
    _check(advanced)
    return advanced


def regroup(parts: Sequence[tuple[RunningBatch, Sequence[int]]]) -> RunningBatch | None:
    """One batch of the kept rows of every part: part by part, each part's `rows` (indices) in that order.

    None if no row is kept. A part first drops the left columns that are padding in all its kept rows;
    the narrower parts are then padded on the left to the widest. Every kept row is copied once, so
    rows leaving and joining in one step cost one copy of the cache, not two. parts: (batch, rows)
    each; a batch's keys and values are [B, H, L, D] per layer.
    """
    pieces = [_Piece.of(batch, rows) for batch, rows in parts if rows]
    if not pieces:
        return None
    width = max(piece.width for piece in pieces)
    caches = [_layers(piece.batch.cache) for piece in pieces]  # [piece][layer] = (keys, values)
    layers = [
        (_gathered([cache[layer][0] for cache in caches], pieces, width, dim=2),
         _gathered([cache[layer][1] for cache in caches], pieces, width, dim=2))
        for layer in range(len(caches[0]))
    ]
    mask = _gathered([piece.batch.attention_mask for piece in pieces], pieces, width, dim=1)
    positions = torch.cat([piece.kept(piece.batch.next_positions) for piece in pieces])
    batch = RunningBatch(_cache_holding(layers), mask, positions)
    _check(batch)
    return batch


@dataclass(frozen=True)
class _Piece:
    """The rows kept of one batch: their indices (None: every row, in order) and first real column."""

    batch: RunningBatch
    index: torch.Tensor | None  # [n] long
    num_rows: int
    first: int  # columns left of it are padding in every kept row

    @classmethod
    def of(cls, batch: RunningBatch, rows: Sequence[int]) -> "_Piece":
        rows = list(rows)
        if rows == list(range(batch.num_rows)):
            index, mask = None, batch.attention_mask
        else:
            index = torch.tensor(rows, dtype=torch.long, device=batch.attention_mask.device)
            mask = batch.attention_mask.index_select(0, index)
        first = int(torch.nonzero(mask.any(dim=0)).min())  # every row holds at least its prompt
        return cls(batch, index, len(rows), first)

    @property
    def width(self) -> int:
        return self.batch.num_columns - self.first

    def kept(self, tensor: torch.Tensor) -> torch.Tensor:
        """The kept rows (dim 0) of one of the batch's tensors."""
        return tensor if self.index is None else tensor.index_select(0, self.index)


def _gathered(tensors: list[torch.Tensor], pieces: list[_Piece], width: int, dim: int) -> torch.Tensor:
    """Each piece's kept rows of its tensor, from its first column along `dim`, stacked (dim 0) and
    zero-padded on the left of `dim` up to `width` entries: one copy of each kept row.
    """
    shape = list(tensors[0].shape)
    shape[0], shape[dim] = sum(piece.num_rows for piece in pieces), width
    out = tensors[0].new_empty(shape)
    start = 0
    for tensor, piece in zip(tensors, pieces, strict=True):
        source = tensor.narrow(dim, piece.first, piece.width)
        rows, padding = out.narrow(0, start, piece.num_rows), width - piece.width
        rows.narrow(dim, 0, padding).zero_()
        target = rows.narrow(dim, padding, piece.width)
        if piece.index is None:
            target.copy_(source)
        else:  # gathered straight into place (a strided `out` is written, not replaced)
            torch.index_select(source, 0, piece.index, out=target)
        start += piece.num_rows
    return out


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


def _check(batch: RunningBatch) -> None:
    for keys, values in _layers(batch.cache):
        assert keys.shape[0] == batch.num_rows and keys.shape[2] == batch.num_columns, (
            f"cache layer {tuple(keys.shape)} does not match the mask {tuple(batch.attention_mask.shape)}"
        )
        assert values.shape[:3] == keys.shape[:3]
