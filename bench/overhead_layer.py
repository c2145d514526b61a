"""Layer-level adapter overhead: one linear layer, a heterogeneous batch, every implementation.

Each implementation computes, for a batch of B rows of T tokens where row i uses adapter i % D,
the layer's output with each row's adapter:

- `base`: the bare nn.Linear (no adapters): the denominator of every ratio.
- `ours`: MultiAdapterLinear with its own choice of LoRA strategy (pick_lora_strategy).
- `grouped`, `bmm`: MultiAdapterLinear with that strategy forced (bmm gathers A and B per chunk:
  per token at decode, per row or per run of rows of one adapter at prefill).
- `bgmv`: the Triton kernels forced (CUDA with Triton only; added there by bench.adapter_overhead).
- `fused`: for FLoRA, its one-kernel Triton GEMM forced (likewise CUDA with Triton only).
- `paper_bmm`: the paper's baseline (App. B.1), A and B gathered per ROW and bmm over its tokens.
- `peft`: PEFT's LoRA layer with D adapters loaded, called with `adapter_names=` (its mixed batch).
- `loop`: one MultiAdapterLinear call per adapter group (the rows of one adapter at a time).

FLoRA rows run `ours`, `loop` and `fused` only (PEFT has no FLoRA; bmm strategies are LoRA's).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator
from unittest import mock

import torch
from torch import nn

from bench.bytes_floor import adapter_bytes, bytes_floor
from bench.timing import Timer
from flora_core import layer_plan
from flora_core.adapter_batch import AdapterBatch, AdapterSlot
from flora_core.adapter_weights import AdapterKind, FloraModule, LoraModule
from flora_core.batched_ops import FLORA_MATMULS, LORA_STRATEGIES, gpu_flora_matmuls, gpu_lora_strategies
from flora_core.multi_adapter_linear import MultiAdapterLinear, SlotCapacity

LORA_IMPLS = ("ours", "grouped", "bmm", "paper_bmm", "peft", "loop")
FLORA_IMPLS = ("ours", "loop")
FORCED_IMPLS = ("grouped", "bmm", "bgmv", "fused")  # our layer with the strategy switch set to that name


@dataclass(frozen=True)
class OverheadCase:
    """One batch shape: B rows of T tokens, row i with adapter i % D, all of one kind and rank.

    T = 1 is decode (at model level, over a KV cache); more is prefill. Layer and model benches share it.
    """

    batch: int
    tokens_per_row: int
    distinct: int
    kind: AdapterKind
    rank: int
    impls: tuple[str, ...]
    pool_rank: int = 16  # the LoRA slots' rank (zero-padded past `rank`), as SlotCapacity.lora_max_rank

    @property
    def phase(self) -> str:
        return "decode" if self.tokens_per_row == 1 else "prefill"


class StrategySwitch:
    """Which LoRA strategy or FLoRA implementation MultiAdapterLinear uses inside `strategy_switch`: a name
    of either kind forces that kind's choice, None keeps both rules."""

    def __init__(self) -> None:
        self.name: str | None = None

    def calling(self, name: str | None, fn: Callable[[], object]) -> Callable[[], object]:
        """fn, run with strategy `name` (setting it costs one attribute write, not a patch per call)."""

        def call() -> object:
            self.name = name
            return fn()

        return call


@contextlib.contextmanager
def strategy_switch() -> Iterator[StrategySwitch]:
    """Within the block pick_lora_strategy and pick_flora_matmul obey the yielded switch (a bench-only
    patch, undone after)."""
    switch = StrategySwitch()
    lora_rule, flora_rule = layer_plan.pick_lora_strategy, layer_plan.pick_flora_matmul
    lora_names = {*LORA_STRATEGIES, *gpu_lora_strategies()}
    flora_names = {*FLORA_MATMULS, *gpu_flora_matmuls()}

    def pick_lora(rows, rank: int, width: int) -> str:
        return switch.name if switch.name in lora_names else lora_rule(rows, rank, width)

    def pick_flora(rows, rank: int) -> str:
        return switch.name if switch.name in flora_names else flora_rule(rows, rank)

    with mock.patch.object(layer_plan, "pick_lora_strategy", pick_lora), \
            mock.patch.object(layer_plan, "pick_flora_matmul", pick_flora):
        yield switch


def paper_bmm_lora(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, row_slots: torch.Tensor,
                   rank: int) -> torch.Tensor:
    """delta[i] = x[i] @ A[s_i].T @ B[s_i].T, one gathered adapter per ROW (the paper's bmm-LoRA).

    x: [B, T, d_in]; lora_a: [S, R, d_in]; lora_b: [S, R, d_out]; row_slots: [B] long. Returns [B, T, d_out].
    """
    a = lora_a[:, :rank].index_select(0, row_slots)  # [B, r, d_in]
    b = lora_b[:, :rank].index_select(0, row_slots)  # [B, r, d_out]
    return torch.bmm(torch.bmm(x, a.transpose(1, 2)), b)


class LayerBench:
    """One layer shape on one device: the base linear, our wrapper with slots, PEFT models on demand."""

    def __init__(self, d_in: int, d_out: int, device: torch.device, dtype: torch.dtype, max_distinct: int,
                 max_lora_rank: int, max_flora_rank: int, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.d_in, self.d_out, self.device, self.dtype = d_in, d_out, device, dtype
        self.base = nn.Linear(d_in, d_out, bias=False).to(device=device, dtype=dtype).eval()
        capacity = SlotCapacity(lora_slots=max_distinct, lora_max_rank=max_lora_rank, flora_slots=max_distinct,
                                flora_max_rank=max_flora_rank, ia3_slots=0)
        self.layer = MultiAdapterLinear(self.base, capacity)
        self._written: dict[AdapterKind, int] = {}  # kind -> the rank its slots hold now
        self._peft: tuple[int, nn.Module] | None = None  # (rank, PEFT LoRA layer with max_distinct adapters)

    def decode_floor(self, case: OverheadCase) -> float | None:
        """The lowest ratio a decode case can have where it is bound by bytes (bench.bytes_floor); None at prefill."""
        if case.phase != "decode":
            return None
        element = self.base.weight.element_size()
        adapters = adapter_bytes({"layer": (self.d_in, self.d_out)}, case.rank, element) * case.distinct
        return bytes_floor(self.d_in * self.d_out * element, adapters)

    def measure(self, case: OverheadCase, timer: Timer) -> dict[str, float]:
        """ms per implementation, plus "base"."""
        self._write_slots(case.kind, case.rank)
        x = torch.randn(case.batch, case.tokens_per_row, self.d_in, device=self.device, dtype=self.dtype)
        with torch.inference_mode(), strategy_switch() as switch:
            calls = {impl: (switch.calling(strategy, fn), None)
                     for impl, (fn, strategy) in self._calls(case, x).items()}
            return timer.compare(calls)

    def _calls(self, case: OverheadCase, x: torch.Tensor) -> dict[str, tuple[Callable[[], object], str | None]]:
        flat = x.reshape(-1, self.d_in)
        row_slots = [AdapterSlot(case.kind, i % case.distinct) for i in range(case.batch)]
        batch = AdapterBatch.from_rows(row_slots, case.tokens_per_row, self.device)
        calls = {"base": (lambda: self.base(flat), None)}
        for impl in case.impls:
            if impl == "ours" or impl in FORCED_IMPLS:
                calls[impl] = (lambda: self._layer_step(flat, batch), None if impl == "ours" else impl)
            elif impl == "paper_bmm":
                slots = torch.tensor([s.slot for s in row_slots], device=self.device)
                calls[impl] = (lambda: self.base(x) + paper_bmm_lora(x, self.layer.lora_a, self.layer.lora_b, slots,
                                                                     case.rank), None)
            elif impl == "peft":
                peft_layer = self._peft_layer(case.rank, case.distinct)
                names = [f"a{i % case.distinct}" for i in range(case.batch)]
                calls[impl] = (lambda: peft_layer(x, adapter_names=names), None)
            elif impl == "loop":
                calls[impl] = (self._loop_call(case, flat), None)
            else:
                raise ValueError(f"unknown implementation {impl!r}; use one of {LORA_IMPLS}")
        return calls

    def _layer_step(self, flat: torch.Tensor, batch: AdapterBatch) -> torch.Tensor:
        """The layer as in a fresh step: its plan for the batch is made anew (and obeys the strategy switch)."""
        batch.layer_plans.clear()
        return self.layer(flat, batch=batch)

    def _loop_call(self, case: OverheadCase, flat: torch.Tensor) -> Callable[[], torch.Tensor]:
        """One layer call per adapter: gather its rows' tokens, run them, scatter the results back."""
        groups = []
        for slot in range(case.distinct):
            rows = list(range(slot, case.batch, case.distinct))
            tokens = torch.tensor([r * case.tokens_per_row + t for r in rows for t in range(case.tokens_per_row)],
                                  device=self.device)
            groups.append((tokens, AdapterBatch.from_rows([AdapterSlot(case.kind, slot)] * len(rows),
                                                          case.tokens_per_row, self.device)))

        def loop() -> torch.Tensor:
            out = flat.new_empty(flat.shape[0], self.d_out)
            for tokens, batch in groups:
                out.index_copy_(0, tokens, self._layer_step(flat.index_select(0, tokens), batch))
            return out

        return loop

    @torch.no_grad()
    def _write_slots(self, kind: AdapterKind, rank: int) -> None:
        """Fill every slot of `kind` with a random adapter of `rank` (once per kind and rank)."""
        if self._written.get(kind) == rank:
            return
        gen = torch.Generator().manual_seed(rank)
        for slot in range(self.layer.capacity.num_slots(kind)):
            if kind is AdapterKind.LORA:
                weights = LoraModule(a=torch.randn(rank, self.d_in, generator=gen) / self.d_in**0.5,
                                     b=torch.randn(self.d_out, rank, generator=gen) * 0.01, scale=2.0 / rank)
            else:
                weights = FloraModule(flora_in=1 + 0.1 * torch.randn(rank, self.d_in, generator=gen),
                                      flora_out=1 + 0.1 * torch.randn(rank, self.d_out, generator=gen))
            self.layer.write_slot(kind, slot, _to(weights, self.device, self.dtype))
        self._written[kind] = rank

    def _peft_layer(self, rank: int, distinct: int) -> nn.Module:
        """PEFT's LoRA Linear around the same base weights, holding every slot's worth of adapters."""
        slots = self.layer.capacity.lora_slots
        if self._peft is None or self._peft[0] != rank:
            self._peft = None  # free the previous rank's adapters first
            self._peft = (rank, peft_lora_layer(self.base, rank, slots, self.device, self.dtype))
        assert distinct <= slots
        return self._peft[1]


class _Holder(nn.Module):
    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj


def peft_lora_layer(base: nn.Linear, rank: int, count: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A PEFT lora.Linear over a copy of `base` with adapters a0..a{count-1} (random, rank `rank`)."""
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415 - a bench extra, not a core dependency

    holder = _Holder(nn.Linear(base.in_features, base.out_features, bias=False))
    holder.proj.weight = base.weight  # shared, not copied
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"], init_lora_weights=False)
    model = get_peft_model(holder, config, adapter_name="a0")
    for i in range(1, count):
        model.add_adapter(f"a{i}", config)
    return model.base_model.model.proj.to(device=device, dtype=dtype).eval()


def _to(weights, device: torch.device, dtype: torch.dtype):
    if isinstance(weights, LoraModule):
        return LoraModule(a=weights.a.to(device, dtype), b=weights.b.to(device, dtype), scale=weights.scale)
    return FloraModule(flora_in=weights.flora_in.to(device, dtype), flora_out=weights.flora_out.to(device, dtype))
