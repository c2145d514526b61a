"""A base linear layer plus preallocated adapter slots of every kind, applied per token.

The wrapper is swapped in for a model's nn.Linear (or GPT-2's Conv1D) and computes, for each
token t of a batch, the layer with that token's own adapter:

    LoRA:  y_t = W0 x_t + b0 + s B (A x_t)
    DoRA:  y_t = g o (W0 x_t + s B (A x_t)) + b0,  g = m / ||W0 + s B A|| per output row (PEFT)
    FLoRA: y_t = (W0 o M) x_t + b0,  M = flora_out^T flora_in / r   (bias untouched, as in the paper)
    IA3:   y_t = (W0 x_t + b0) o l,  or  W0 (x_t o l) + b0 for feed-forward modules (PEFT)
    none:  y_t = W0 x_t + b0          (the base layer itself)

The per-call `AdapterBatch` is the `batch` keyword argument of forward, or else the batch that
patching's `adapter_batch_scope` set for the pass in progress; without one the layer is exactly the
base layer.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from flora_core.adapter_batch import AdapterBatch, SlotRows
from flora_core.adapter_weights import AdapterKind, FloraModule, Ia3Module, LoraModule, ModuleWeights
from flora_core.batched_ops import flora_matmul_named, ia3_scale, lora_strategy
from flora_core.layer_plan import LayerPlan, SlotTable, layer_plan


@dataclass(frozen=True)
class SlotCapacity:
    """How many adapters of each kind the device holds at once, and their largest rank."""

    lora_slots: int = 8
    lora_max_rank: int = 64
    flora_slots: int = 8
    flora_max_rank: int = 8
    ia3_slots: int = 8

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value < 0 or (name.endswith("max_rank") and value < 1):
                raise ValueError(f"SlotCapacity.{name}={value} is out of range; use a positive count")

    def num_slots(self, kind: AdapterKind) -> int:
        return {AdapterKind.LORA: self.lora_slots, AdapterKind.FLORA: self.flora_slots,
                AdapterKind.IA3: self.ia3_slots}[kind]

    def max_rank(self, kind: AdapterKind) -> int:
        return {AdapterKind.LORA: self.lora_max_rank, AdapterKind.FLORA: self.flora_max_rank,
                AdapterKind.IA3: 1}[kind]

    @property
    def largest_rank(self) -> int:
        """The largest rank any adapter read for these slots may have (the bound passed to load_adapter)."""
        return max(self.lora_max_rank, self.flora_max_rank)


def linear_shape(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear or a transformers Conv1D (whose weight is [d_in, d_out])."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.nf
    raise TypeError(f"{type(layer).__name__} is not a linear layer (nn.Linear or Conv1D)")


class MultiAdapterLinear(nn.Module):
    """A linear layer that applies each token's own adapter slot; see the module docstring."""

    def __init__(self, base_layer: nn.Module, capacity: SlotCapacity) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.d_in, self.d_out = linear_shape(base_layer)
        self.capacity = capacity
        weight = base_layer.weight
        like = {"dtype": weight.dtype, "device": weight.device}
        n_lora, r_lora = capacity.lora_slots, capacity.lora_max_rank
        n_flora, r_flora = capacity.flora_slots, capacity.flora_max_rank
        # Slot layout: dim 0 is the slot, dim 1 the rank (zero-padded to the pool's maximum, so
        # that adapters of different ranks share one tensor and a batch's rank prefix is
        # contiguous); LoRA's B is stored transposed, [rank, d_out]. LoRA's scale is folded into
        # lora_b and FLoRA's 1/r into flora_out. Free FLoRA slots hold the identity (rank 0 all-ones) and
        # free IA3 slots hold ones, so a slot that does not target this layer leaves it unchanged.
        self.register_buffer("lora_a", torch.zeros(n_lora, r_lora, self.d_in, **like), persistent=False)
        self.register_buffer("lora_b", torch.zeros(n_lora, r_lora, self.d_out, **like), persistent=False)
        self.register_buffer("flora_in", torch.zeros(n_flora, r_flora, self.d_in, **like), persistent=False)
        self.register_buffer("flora_out", torch.zeros(n_flora, r_flora, self.d_out, **like), persistent=False)
        # DoRA's per-output scale g = m / ||W0 + s B A|| of each LoRA slot (ones for plain LoRA),
        # computed when the slot is written: it depends on this layer's W0, not only on the adapter.
        self.register_buffer("dora_scale", torch.ones(n_lora, self.d_out, **like), persistent=False)
        # g of every DoRA module written here, in host memory, for as long as the adapter itself is
        # held (keyed by the module object): an adapter that returns to a slot skips the pass over W0.
        self._dora_scales: weakref.WeakKeyDictionary[LoraModule, torch.Tensor] = weakref.WeakKeyDictionary()
        self.register_buffer("ia3_in", torch.ones(n_ia3 := capacity.ia3_slots, self.d_in, **like), persistent=False)
        self.register_buffer("ia3_out", torch.ones(n_ia3, self.d_out, **like), persistent=False)
        # Host-side mirror, read on every forward without a device sync: the rank each slot has
        # in this layer (0 = the slot's adapter does not target it) and IA3's direction.
        self.slot_table = SlotTable(lora_rank=(0,) * n_lora, lora_dora=(False,) * n_lora, flora_rank=(0,) * n_flora,
                                    ia3_in=(False,) * n_ia3, ia3_out=(False,) * n_ia3, width=self.d_in + self.d_out)
        for slot in range(n_flora):
            self._write_flora(slot, None)
        self.scoped_batch: AdapterBatch | None = None  # set only inside patching.adapter_batch_scope

    def set_scoped_batch(self, batch: AdapterBatch | None) -> None:
        """The batch forward uses when it is not passed one (adapter_batch_scope sets it and restores it)."""
        # object.__setattr__: nn.Module.__setattr__ looks through parameters, buffers and submodules first,
        # ~1 us, twice per layer and forward pass (224 layers in a 7B model); the value is never one of those.
        object.__setattr__(self, "scoped_batch", batch)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, capacity={self.capacity}"

    # ---------------------------------------------------------------- slot writes

    @torch.no_grad()
    def write_slot(self, kind: AdapterKind, slot: int, weights: ModuleWeights | None) -> None:
        """Copy one module's adapter weights into a slot; None writes the neutral value."""
        if not 0 <= slot < self.capacity.num_slots(kind):
            raise ValueError(f"{kind.value} slot {slot} is out of range [0, {self.capacity.num_slots(kind)})")
        expected = {AdapterKind.LORA: LoraModule, AdapterKind.FLORA: FloraModule, AdapterKind.IA3: Ia3Module}[kind]
        if weights is not None and not isinstance(weights, expected):
            raise ValueError(f"a {kind.value} slot takes {expected.__name__}, got {type(weights).__name__}")
        {AdapterKind.LORA: self._write_lora, AdapterKind.FLORA: self._write_flora,
         AdapterKind.IA3: self._write_ia3}[kind](slot, weights)

    def clear_slot(self, kind: AdapterKind, slot: int) -> None:
        self.write_slot(kind, slot, None)

    def _check_rank(self, kind: AdapterKind, rank: int) -> None:
        if not 1 <= rank <= self.capacity.max_rank(kind):
            raise ValueError(
                f"{kind.value} rank {rank} exceeds the pool's maximum {self.capacity.max_rank(kind)}; "
                f"raise {kind.value}_max_rank in the pool's capacity"
            )

    def _check_shape(self, name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, this layer needs {shape}")

    def _set_table(self, slot: int, **values: int | bool) -> None:
        """Entry `slot` of these SlotTable fields set: a new table, hence new layer plans (see layer_plan)."""
        # object.__setattr__: nn.Module.__setattr__ costs ~2 us, and a slot write sets the table twice
        # in each of a model's layers (28 in the embedded model, 224 at 7B) whenever an adapter is loaded.
        object.__setattr__(self, "slot_table", self.slot_table.replace_at(slot, **values))

    def _write_lora(self, slot: int, weights: LoraModule | None) -> None:
        a, b = self.lora_a[slot], self.lora_b[slot]  # [R, d_in], [R, d_out]
        a.zero_()
        b.zero_()
        self.dora_scale[slot].fill_(1.0)
        self._set_table(slot, lora_rank=0, lora_dora=False)
        if weights is None:
            return
        r = weights.rank
        self._check_rank(AdapterKind.LORA, r)
        self._check_shape("lora A", weights.a, (r, self.d_in))
        self._check_shape("lora B", weights.b, (self.d_out, r))
        a[:r].copy_(weights.a)
        b[:r].copy_(weights.b.to(torch.float32).t() * weights.scale)
        dora = weights.magnitude is not None
        if dora:
            self._check_shape("DoRA magnitude", weights.magnitude, (self.d_out,))
            scale = self._dora_scales.get(weights)
            if scale is None:
                scale = self._dora_scales[weights] = (weights.magnitude.to(torch.float32).cpu()
                                                      / self._merged_row_norms(weights).cpu())
            self.dora_scale[slot].copy_(scale)
        self._set_table(slot, lora_rank=r, lora_dora=dora)

    def _merged_row_norms(self, weights: LoraModule, rows_per_chunk: int = 1024) -> torch.Tensor:
        """||W0 + s B A|| of each output row ([d_out] float32), as PEFT's DoRA computes it, in chunks of rows."""
        weight, a = self._weight_out_in(), weights.a.to(device=self.dora_scale.device, dtype=torch.float32)
        b = weights.b.to(device=self.dora_scale.device, dtype=torch.float32) * weights.scale
        norms = []
        for start in range(0, self.d_out, rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            norms.append(torch.linalg.norm(weight[rows].float() + b[rows] @ a, dim=1))
        return torch.cat(norms)

    def _write_flora(self, slot: int, weights: FloraModule | None) -> None:
        self.flora_in[slot].zero_()
        self.flora_out[slot].zero_()
        self._set_table(slot, flora_rank=0)
        if weights is None:
            self.flora_in[slot, 0].fill_(1.0)
            self.flora_out[slot, 0].fill_(1.0)
            return
        r = weights.rank
        self._check_rank(AdapterKind.FLORA, r)
        self._check_shape("flora_in", weights.flora_in, (r, self.d_in))
        self._check_shape("flora_out", weights.flora_out, (r, self.d_out))
        self.flora_in[slot, :r].copy_(weights.flora_in)
        self.flora_out[slot, :r].copy_(weights.flora_out.to(torch.float32) / r)
        self._set_table(slot, flora_rank=r)

    def _write_ia3(self, slot: int, weights: Ia3Module | None) -> None:
        self.ia3_in[slot].fill_(1.0)
        self.ia3_out[slot].fill_(1.0)
        self._set_table(slot, ia3_in=False, ia3_out=False)
        if weights is None:
            return
        target, direction = (self.ia3_in, "ia3_in") if weights.on_input else (self.ia3_out, "ia3_out")
        self._check_shape("ia3 scale", weights.scale, (target.shape[1],))
        target[slot].copy_(weights.scale)
        self._set_table(slot, **{direction: True})

    # ---------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor, batch: AdapterBatch | None = None) -> torch.Tensor:
        """x: [..., d_in] whose leading dims flatten to batch.num_tokens tokens. Returns [..., d_out].

        batch: this pass's AdapterBatch; None takes the scoped one (adapter_batch_scope), if any.
        """
        batch = self.scoped_batch if batch is None else batch
        if batch is None:
            return self.base_layer(x)
        tokens = x.reshape(-1, self.d_in)  # [T, d_in]
        if tokens.shape[0] != batch.num_tokens:
            raise ValueError(
                f"the layer got {tokens.shape[0]} tokens but the AdapterBatch describes {batch.num_tokens}; "
                "build the AdapterBatch from the same input shape"
            )
        plan = layer_plan(self.slot_table, batch)
        if plan.ia3_in:
            tokens = ia3_scale(tokens, self.ia3_in, plan.ia3_rows)
        y = self._base_or_flora(tokens, batch, plan)
        if plan.lora_rows is not None:
            rows = plan.lora_rows
            delta = lora_strategy(plan.lora_strategy)(tokens, self.lora_a, self.lora_b, rows, plan.lora_rank)
            y = y + delta if rows.covers_all_tokens else y.index_add(0, rows.token_index, delta)
        if plan.dora_rows is not None:
            y = self._dora_rescale(y, plan.dora_rows)
        if plan.ia3_out:
            y = ia3_scale(y, self.ia3_out, plan.ia3_rows)
        return y.view(*x.shape[:-1], self.d_out)

    def _dora_rescale(self, y: torch.Tensor, rows: SlotRows) -> torch.Tensor:
        """DoRA tokens' outputs W0 x + b + s B A x -> g o (W0 x + s B A x) + b, the bias unscaled.

        y: [T, d_out]; rows: the SlotRows of the tokens whose LoRA slot holds a DoRA adapter.
        """
        bias = self.base_layer.bias
        scale = self.dora_scale.index_select(0, rows.slots)  # [n, d_out]
        picked = y if rows.covers_all_tokens else y.index_select(0, rows.token_index)
        rescaled = picked * scale if bias is None else (picked - bias) * scale + bias
        return rescaled if rows.covers_all_tokens else y.index_copy(0, rows.token_index, rescaled)

    def _weight_out_in(self) -> torch.Tensor:
        """W0 as [d_out, d_in] (a view for Conv1D, whose weight is stored [d_in, d_out])."""
        weight = self.base_layer.weight
        return weight.t() if isinstance(self.base_layer, Conv1D) else weight

    def _base_or_flora(self, tokens: torch.Tensor, batch: AdapterBatch, plan: LayerPlan) -> torch.Tensor:
        """FLoRA tokens through W0 o M_s (one pass per rank group), every other token through the base layer.

        tokens: [T, d_in]. Returns [T, d_out].
        """
        if not plan.flora_groups:
            return self.base_layer(tokens)
        flora_matmul = flora_matmul_named(plan.flora_matmul)
        y = None
        for rank, rows in plan.flora_groups:
            flora_y = flora_matmul(tokens, self._weight_out_in(), self.flora_in, self.flora_out, rows, rank)
            if self.base_layer.bias is not None:
                flora_y = flora_y + self.base_layer.bias
            if rows.covers_all_tokens:  # one rank group holding every token, in order
                return flora_y
            y = tokens.new_empty(tokens.shape[0], self.d_out) if y is None else y
            y = y.index_copy(0, rows.token_index, flora_y)
        if batch.flora.num_tokens == tokens.shape[0]:
            return y
        base_y = self.base_layer(tokens.index_select(0, batch.non_flora_index))
        return y.index_copy(0, batch.non_flora_index, base_y)
