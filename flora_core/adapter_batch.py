"""Batch metadata: which adapter slot each token uses, built once per forward pass.

A forward pass sees its activations flattened to [T, d] tokens. Every token belongs to one row
(one request) and uses at most one adapter: a slot of one kind (LoRA, FLoRA or IA3), or none.
`AdapterBatch` holds, for each kind, the tokens that use it sorted by slot, so that every layer
can gather them (bmm), walk them segment by segment (grouped), or scatter results back.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch

from flora_core.adapter_weights import AdapterKind


class AdapterSlot(NamedTuple):
    """Where an adapter lives in the pool: its kind and its slot index in that kind's tensors."""

    kind: AdapterKind
    slot: int


class Segment(NamedTuple):
    """A run of consecutive sorted tokens sharing one slot (a NamedTuple: made by the dozen every pass)."""

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
        as in a [B, S] batch flattened to [B*S] (tokens_per_row = S) or a packed batch. The work is
        done per row on the host (a few tensors made at the end), since it runs once per forward pass.
        """
        counts = [tokens_per_row] * len(row_slots) if isinstance(tokens_per_row, int) else list(tokens_per_row)
        if len(counts) != len(row_slots):
            raise ValueError(
                f"tokens_per_row has {len(counts)} entries but row_slots has {len(row_slots)}; "
                "pass one token count per row"
            )
        if any(count < 0 for count in counts):
            raise ValueError(f"tokens_per_row has a negative count ({min(counts)}); pass 0 or more tokens per row")
        layout = _RowLayout(counts, torch.device(device))
        row_slots = list(row_slots)
        rows_of = {kind: [] for kind in AdapterKind}
        non_flora = []
        for row, slot in enumerate(row_slots):
            if slot is not None and (type(slot.kind) is not AdapterKind or type(slot.slot) is not int or slot.slot < 0):
                slot = row_slots[row] = _checked_slot(slot)
            if counts[row]:
                if slot is not None:
                    rows_of[slot.kind].append(row)
                if slot is None or slot.kind is not AdapterKind.FLORA:
                    non_flora.append(row)
        return AdapterBatch(
            num_tokens=layout.num_tokens,
            lora=_slot_rows(rows_of[AdapterKind.LORA], row_slots, layout),
            flora=_slot_rows(rows_of[AdapterKind.FLORA], row_slots, layout),
            ia3=_slot_rows(rows_of[AdapterKind.IA3], row_slots, layout),
            non_flora_index=layout.positions(non_flora),
        )


def _checked_slot(slot: AdapterSlot) -> AdapterSlot:
    """`slot` with its kind an AdapterKind; ValueError for an unknown kind or a slot index below 0."""
    kind, index = slot
    if type(kind) is not AdapterKind:
        try:
            kind = AdapterKind(kind)
        except ValueError:
            raise ValueError(
                f"AdapterSlot kind {kind!r} is not one of {[k.value for k in AdapterKind]}; pass an AdapterKind"
            ) from None
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"AdapterSlot slot {index!r} is not an int >= 0; pass None for a row without an adapter")
    return AdapterSlot(kind, index)


class _RowLayout:
    """Where each row's tokens lie in the flattened batch, and the tensors built from lists of rows."""

    def __init__(self, counts: list[int], device: torch.device) -> None:
        self.counts, self.device = counts, device
        self.starts = list(itertools.accumulate(counts, initial=0))  # [B + 1]: row i owns [starts[i], starts[i+1])
        self.num_tokens = self.starts[-1]

    def positions(self, rows: list[int]) -> torch.Tensor:
        """The token positions of these rows (each with a token or more), row after row: [their token count] long."""
        row_start = self.per_token([self.starts[row] for row in rows], rows)  # each token's row's start
        if row_start.shape[0] == len(rows):  # a token per row (decode): the starts are the positions
            return row_start
        first = list(itertools.accumulate((self.counts[row] for row in rows), initial=0))[:-1]  # in the result
        place = torch.arange(row_start.shape[0], device=self.device)  # each token's place in the result
        return row_start + place - self.per_token(first, rows)

    def per_token(self, values: list[int], rows: list[int]) -> torch.Tensor:
        """values[i] repeated for each token of rows[i]: [their token count] long."""
        if all(self.counts[row] == 1 for row in rows):
            return torch.tensor(values, dtype=torch.long, device=self.device)
        counts = torch.tensor([self.counts[row] for row in rows], dtype=torch.long)
        return torch.repeat_interleave(torch.tensor(values, dtype=torch.long), counts).to(self.device)

    def runs(self, slots: list[int], rows: list[int]) -> tuple[Segment, ...]:
        """The runs of equal consecutive slots over these rows' tokens (rows of one slot merged), as Segments."""
        runs, start = [], 0  # [slot, start, length] each
        for slot, row in zip(slots, rows):
            length = self.counts[row]
            if runs and runs[-1][0] == slot:
                runs[-1][2] += length
            else:
                runs.append([slot, start, length])
            start += length
        return tuple(Segment(slot, start, length) for slot, start, length in runs)


def _slot_rows(rows: list[int], row_slots: Sequence[AdapterSlot | None], layout: _RowLayout) -> SlotRows:
    """These rows' tokens (rows with tokens, in batch order) sorted by slot, stably, and cut into segments."""
    order = sorted(rows, key=lambda row: row_slots[row].slot)
    order_slots = [row_slots[row].slot for row in order]
    segments = layout.runs(order_slots, order)
    slots = layout.per_token(order_slots, order)
    every_token = slots.shape[0] == layout.num_tokens
    covers_all = every_token and order == rows  # sorting moved no row: token_index is arange(T)
    return SlotRows(
        token_index=layout.positions(order),
        slots=slots,
        segments=segments,
        covers_all_tokens=covers_all,
        distinct_slots=tuple(segment.slot for segment in segments),
        token_order=_in_token_order(rows, row_slots, layout) if every_token and not covers_all else None,
        **_chunks(segments, slots),
    )


def _in_token_order(rows: list[int], row_slots: Sequence[AdapterSlot | None], layout: _RowLayout) -> SlotRows:
    """Every token (rows holding all T of them) in batch order, cut into runs of one slot: SlotRows.token_order."""
    row_slot = [row_slots[row].slot for row in rows]
    segments = layout.runs(row_slot, rows)
    slots = layout.per_token(row_slot, rows)
    return SlotRows(token_index=torch.arange(layout.num_tokens, device=layout.device), slots=slots,
                    segments=segments, covers_all_tokens=True,
                    distinct_slots=tuple(segment.slot for segment in segments), **_chunks(segments, slots))


def _chunks(segments: Sequence[Segment], slots: torch.Tensor) -> dict:
    """chunk_length (gcd of the segments' lengths) and chunk_slots for SlotRows.

    Every segment starts at a multiple of the gcd, so each run of L tokens lies in one segment:
    a [B, S] batch cuts into (at least) one chunk per row, a decode batch into one per token or more.
    """
    length = math.gcd(*(segment.length for segment in segments)) or 1
    if length == 1:
        return {"chunk_length": 1, "chunk_slots": slots}
    chunk_slots = [segment.slot for segment in segments for _ in range(segment.length // length)]
    return {"chunk_length": length, "chunk_slots": torch.tensor(chunk_slots, dtype=torch.long, device=slots.device)}
