"""Batch metadata: which adapter slot each token uses, built once per forward pass.

A forward pass sees its activations flattened to [T, d] tokens. Every token belongs to one row
(one request) and uses at most one adapter: a slot of one kind (LoRA, FLoRA or IA3), or none.
`AdapterBatch` holds, for each kind, the tokens that use it sorted by slot, so that every layer
can gather them (bmm), walk them segment by segment (grouped), or scatter results back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch

from flora_core.adapter_weights import AdapterKind


class AdapterSlot(NamedTuple):
    """Where an adapter lives in the pool: its kind and its slot index in that kind's tensors."""

    kind: AdapterKind
    slot: int


@dataclass(frozen=True)
class Segment:
    """A run of consecutive sorted tokens sharing one slot."""

    slot: int
    start: int
    length: int


@dataclass(frozen=True)
class SlotRows:
    """The tokens of one adapter kind, sorted by slot (stable, so token order within a slot holds).

    A `token_order` view holds them in batch order instead; only per-token work takes it (LoRA's bmm,
    FLoRA's single rank group, IA3's scales, DoRA's rescale; its segments are runs, so a slot can have
    several), and it is never subset.
    """

    token_index: torch.Tensor  # [n] long: positions in the flattened [T] batch
    slots: torch.Tensor  # [n] long: the slot of each of those tokens
    segments: tuple[Segment, ...]  # host-side runs over token_index, one per distinct slot
    covers_all_tokens: bool  # n == T and token_index == arange(T): gathers can be skipped
    distinct_slots: tuple[int, ...]  # the slots of the segments, in order (read by every layer)
    chunk_length: int  # L: the largest length that divides every segment's (1 if none)
    chunk_slots: torch.Tensor  # [n / L] long: the slot of each run of L sorted tokens (one slot each)
    # The same tokens in the batch's own order, where they are all T tokens but their sorted order is not
    # the batch's: per-token work over them needs no gather of the activations and no scatter of its
    # result. Its segments are runs in batch order (a slot may have several); None where it would not differ.
    token_order: "SlotRows | None" = None
    _subsets: dict = field(default_factory=dict, compare=False, repr=False)  # memo of subset()

    @property
    def num_tokens(self) -> int:
        return self.token_index.shape[0]

    @property
    def in_batch_order(self) -> "SlotRows":
        """token_order where there is one (these are every token of the batch, sorted otherwise), else self."""
        return self if self.token_order is None else self.token_order

    @property
    def num_chunks(self) -> int:
        """n / L: how many runs of chunk_length tokens the sorted tokens cut into."""
        return self.num_tokens // self.chunk_length

    def subset(self, slots: tuple[int, ...]) -> "SlotRows":
        """The tokens of `slots` only (some of distinct_slots, in their order), still sorted by slot.

        Memoized: every layer whose adapters split the same way reuses one subset per forward pass.
        """
        rows = self._subsets.get(slots)
        if rows is None:
            wanted = set(slots)
            kept = [segment for segment in self.segments if segment.slot in wanted]
            positions = torch.cat([torch.arange(s.start, s.start + s.length) for s in kept]).to(self.slots.device)
            segments, start = [], 0
            for segment in kept:
                segments.append(Segment(slot=segment.slot, start=start, length=segment.length))
                start += segment.length
            kept_slots = self.slots.index_select(0, positions)
            rows = SlotRows(token_index=self.token_index.index_select(0, positions), slots=kept_slots,
                            segments=tuple(segments),
                            covers_all_tokens=start == self.num_tokens and self.covers_all_tokens,
                            distinct_slots=tuple(s.slot for s in segments), **_chunks(segments, kept_slots))
            # no token_order: a subset leaves out some tokens, so it is never all T of them
            self._subsets[slots] = rows
        return rows


@dataclass(frozen=True)
class AdapterBatch:
    """Per-token adapter selection for one forward pass, shared by every wrapped layer."""

    num_tokens: int  # T: tokens in the flattened batch
    lora: SlotRows
    flora: SlotRows
    ia3: SlotRows
    non_flora_index: torch.Tensor  # [T - n_flora] long: tokens that take the base layer's path
    layer_plans: dict = field(default_factory=dict, compare=False, repr=False)  # layer_plan's memo

    @property
    def has_adapter_tokens(self) -> bool:
        return bool(self.lora.num_tokens or self.flora.num_tokens or self.ia3.num_tokens)

    def rows(self, kind: AdapterKind) -> SlotRows:
        return {AdapterKind.LORA: self.lora, AdapterKind.FLORA: self.flora, AdapterKind.IA3: self.ia3}[kind]

    @staticmethod
    def from_rows(
        row_slots: Sequence[AdapterSlot | None],
        tokens_per_row: int | Sequence[int],
        device: torch.device | str = "cpu",
    ) -> "AdapterBatch":
        """Build from one entry per row (None = base model) and each row's token count.

        Rows are laid out one after another: row i owns tokens [offset_i, offset_i + tokens_i),
        as in a [B, S] batch flattened to [B*S] (tokens_per_row = S) or a packed batch.
        """
        if isinstance(tokens_per_row, int):
            tokens_per_row = [tokens_per_row] * len(row_slots)
        if len(tokens_per_row) != len(row_slots):
            raise ValueError(
                f"tokens_per_row has {len(tokens_per_row)} entries but row_slots has {len(row_slots)}; "
                "pass one token count per row"
            )
        kind_codes = {None: -1, AdapterKind.LORA: 0, AdapterKind.FLORA: 1, AdapterKind.IA3: 2}
        row_kind = torch.tensor([kind_codes[s.kind if s else None] for s in row_slots], dtype=torch.long)
        row_slot = torch.tensor([s.slot if s else -1 for s in row_slots], dtype=torch.long)
        counts = torch.tensor(list(tokens_per_row), dtype=torch.long)
        token_kind = torch.repeat_interleave(row_kind, counts)  # [T]
        token_slot = torch.repeat_interleave(row_slot, counts)  # [T]
        num_tokens = int(counts.sum())
        device = torch.device(device)
        flora_mask = token_kind == 1
        return AdapterBatch(
            num_tokens=num_tokens,
            lora=_slot_rows(token_kind == 0, token_slot, device),
            flora=_slot_rows(flora_mask, token_slot, device),
            ia3=_slot_rows(token_kind == 2, token_slot, device),
            non_flora_index=torch.nonzero(~flora_mask).flatten().to(device),
        )


def _slot_rows(mask: torch.Tensor, token_slot: torch.Tensor, device: torch.device) -> SlotRows:
    """Select the tokens in mask ([T] bool), sort them by slot, and cut them into segments."""
    token_index = torch.nonzero(mask).flatten()
    slots = token_slot[token_index]
    order = torch.argsort(slots, stable=True)
    token_index, slots = token_index[order], slots[order]
    segments = _runs(slots)
    every_token = token_index.shape[0] == mask.shape[0]
    covers_all = every_token and bool(torch.equal(token_index, torch.arange(mask.shape[0])))
    slots = slots.to(device)
    return SlotRows(
        token_index=token_index.to(device),
        slots=slots,
        segments=tuple(segments),
        covers_all_tokens=covers_all,
        distinct_slots=tuple(segment.slot for segment in segments),
        token_order=_in_token_order(token_slot, device) if every_token and not covers_all else None,
        **_chunks(segments, slots),
    )


def _in_token_order(token_slot: torch.Tensor, device: torch.device) -> SlotRows:
    """Every token ([T] slots, none -1) in batch order, cut into runs of one slot: SlotRows.token_order."""
    segments = _runs(token_slot)
    slots = token_slot.to(device)
    return SlotRows(token_index=torch.arange(token_slot.shape[0], device=device), slots=slots, segments=tuple(segments),
                    covers_all_tokens=True, distinct_slots=tuple(segment.slot for segment in segments),
                    **_chunks(segments, slots))


def _runs(slots: torch.Tensor) -> tuple[Segment, ...]:
    """The runs of equal consecutive entries of slots ([n] long, on the host) as Segments."""
    values, counts = torch.unique_consecutive(slots, return_counts=True)
    segments, start = [], 0
    for slot, length in zip(values.tolist(), counts.tolist()):
        segments.append(Segment(slot=slot, start=start, length=length))
        start += length
    return tuple(segments)


def _chunks(segments: Sequence[Segment], slots: torch.Tensor) -> dict:
    """chunk_length (gcd of the segments' lengths) and chunk_slots for SlotRows.

    Every segment starts at a multiple of the gcd, so each run of L tokens lies in one segment:
    a [B, S] batch cuts into (at least) one chunk per row, a decode batch into one per token or more.
    """
    length = math.gcd(*(segment.length for segment in segments)) or 1
    return {"chunk_length": length, "chunk_slots": slots if length == 1 else slots[::length].contiguous()}
