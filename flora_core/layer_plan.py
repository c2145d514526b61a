"""What one wrapped layer computes for one batch, decided once per forward pass and shared.

Which of the batch's slots target a layer, at which rank, with which LoRA strategy and FLoRA
implementation, and on which side IA3 scales depend only on the layer's per-slot table (each
slot's rank in this layer, IA3's side, the layer's width) and on the batch. `layer_plan` makes
that `LayerPlan` on a layer's first call and memoizes it in the batch under the table, so layers
with equal tables (most of a model's layers) share one. A slot write builds a new table, hence a
new key: a plan can never outlive the weights it was made for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from flora_core.adapter_batch import AdapterBatch, SlotRows
from flora_core.batched_ops import pick_flora_matmul, pick_lora_strategy


class SlotTable(NamedTuple):
    """A layer's per-slot state, read on every forward; rebuilt (never mutated) by every slot write."""

    lora_rank: tuple[int, ...]  # [lora slots]: the slot's rank in this layer, 0 = not targeted
    lora_dora: tuple[bool, ...]  # [lora slots]: the slot's adapter is DoRA here (its outputs are rescaled)
    flora_rank: tuple[int, ...]  # [flora slots]: likewise
    ia3_in: tuple[bool, ...]  # [ia3 slots]: scales this layer's input (PEFT's feed-forward modules)
    ia3_out: tuple[bool, ...]  # [ia3 slots]: scales this layer's output
    width: int  # d_in + d_out, read by the LoRA strategy rule

    def replace_at(self, slot: int, **values: int | bool) -> "SlotTable":
        """A copy with entry `slot` of each field named in `values` set to its value."""
        fields = {}
        for field, value in values.items():
            entries = getattr(self, field)
            fields[field] = entries[:slot] + (value,) + entries[slot + 1:]
        return self._replace(**fields)


@dataclass(frozen=True)
class LayerPlan:
    """One layer's work for one batch: IA3 on input/output, LoRA's rank and strategy, DoRA's tokens, FLoRA's
    rank groups and implementation."""

    ia3_in: bool  # some IA3 token scales this layer's input
    ia3_out: bool  # ... or its output
    ia3_rows: SlotRows  # IA3's tokens, in batch order where they are every token (a scale needs no gather then)
    lora_rank: int  # largest rank among the batch's LoRA slots in this layer; 0 = no LoRA work
    lora_strategy: str | None  # a name in batched_ops.LORA_STRATEGIES when lora_rank > 0
    lora_rows: SlotRows | None  # the LoRA tokens the strategy runs over: sorted, or in batch order for bmm
    flora_groups: tuple[tuple[int, SlotRows], ...]  # (rank, its tokens); () = no FLoRA slot targets it
    flora_matmul: str | None  # a name in batched_ops.FLORA_MATMULS when flora_groups is not empty
    dora_rows: SlotRows | None = None  # the LoRA tokens whose slot is DoRA in this layer; None = none


def layer_plan(table: SlotTable, batch: AdapterBatch) -> LayerPlan:
    """The plan of a layer with this table for this batch, built on first use and memoized in the batch."""
    plan = batch.layer_plans.get(table)
    if plan is None:
        plan = batch.layer_plans[table] = _build_plan(table, batch)
    return plan


def _build_plan(table: SlotTable, batch: AdapterBatch) -> LayerPlan:
    _check_slots_exist(table, batch)
    lora_rank = max((table.lora_rank[slot] for slot in batch.lora.distinct_slots), default=0)
    strategy = pick_lora_strategy(batch.lora, lora_rank, table.width) if lora_rank else None
    flora_groups = _flora_rank_groups(table.flora_rank, batch.flora)
    flora_rank = max((rank for rank, _ in flora_groups), default=0)
    return LayerPlan(
        ia3_in=any(table.ia3_in[slot] for slot in batch.ia3.distinct_slots),
        ia3_out=any(table.ia3_out[slot] for slot in batch.ia3.distinct_slots),
        ia3_rows=batch.ia3.in_batch_order,
        lora_rank=lora_rank,
        lora_strategy=strategy,
        lora_rows=_lora_rows(batch.lora, strategy),
        flora_groups=flora_groups,
        flora_matmul=pick_flora_matmul(batch.flora, flora_rank) if flora_groups else None,
        dora_rows=_dora_rows(table.lora_dora, batch.lora),
    )


def _check_slots_exist(table: SlotTable, batch: AdapterBatch) -> None:
    """ValueError if the batch names a slot this layer does not have (an AdapterSlot made by hand)."""
    for name, rows, count in (("lora", batch.lora, len(table.lora_rank)), ("flora", batch.flora, len(table.flora_rank)),
                              ("ia3", batch.ia3, len(table.ia3_in))):
        if rows.distinct_slots and max(rows.distinct_slots) >= count:
            raise ValueError(
                f"the batch uses {name} slot {max(rows.distinct_slots)} but the layer has {count} {name} slots; "
                "pass slots from AdapterPool.acquire"
            )


def _lora_rows(rows: SlotRows, strategy: str | None) -> SlotRows | None:
    """The LoRA tokens in batch order where bmm runs on no more chunks that way (decode, a [B, S] prefill
    of every row's own adapter): no gather, no scatter. Sorted otherwise; None with no LoRA work."""
    if strategy is None:
        return None
    in_order = rows.token_order
    if strategy == "bmm" and in_order is not None and in_order.num_chunks <= rows.num_chunks:
        return in_order
    return rows


def _dora_rows(slot_is_dora: tuple[bool, ...], rows: SlotRows) -> SlotRows | None:
    """The batch's LoRA tokens whose slot holds a DoRA adapter in this layer (all of them, or a subset)."""
    dora = tuple(slot for slot in rows.distinct_slots if slot_is_dora[slot])
    if not dora:
        return None
    return rows.in_batch_order if len(dora) == len(rows.distinct_slots) else rows.subset(dora)


def _flora_rank_groups(slot_ranks: tuple[int, ...], rows: SlotRows) -> tuple[tuple[int, SlotRows], ...]:
    """The batch's FLoRA tokens by the rank to compute them with in this layer; () if none targets it.

    FLoRA costs one GEMM row per token and rank, so a rank-1 adapter beside a rank-8 one is not
    computed at rank 8. A slot whose adapter does not target this layer (rank 0) holds the identity
    at rank index 0, so it joins the rank-1 group and gets exactly W0 x.
    """
    ranks = [slot_ranks[slot] for slot in rows.distinct_slots]
    if not any(ranks):
        return ()
    groups: dict[int, list[int]] = {}
    for slot, rank in zip(rows.distinct_slots, ranks):
        groups.setdefault(max(rank, 1), []).append(slot)
    if len(groups) == 1:  # every FLoRA token at one rank: in batch order if they are all the tokens (no gather)
        return ((next(iter(groups)), rows.in_batch_order),)
    return tuple((rank, rows.subset(tuple(slots))) for rank, slots in groups.items())
