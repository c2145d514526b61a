"""A causal LM that runs every row of a batch with its own adapter, plus the pool that holds them.

    model = MultiAdapterModel.from_pretrained("path/to/base")
    model.add_adapter("sql-lora", "adapters/sql-lora")        # a PEFT LoRA directory
    model.add_adapter("tone-flora", "adapters/tone-flora")    # a FLoRA directory
    out = model(input_ids, adapter_names=["sql-lora", "tone-flora", None])   # None: the base model
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from flora_core.adapter_batch import AdapterBatch, AdapterSlot
from flora_core.adapter_merge import MergedSource
from flora_core.adapter_pool import AdapterPool, PoolLimits
from flora_core.adapter_weights import AdapterWeights
from flora_core.multi_adapter_linear import SlotCapacity
from flora_core.patching import ALL_LINEAR, TargetModules, adapter_batch_scope, patch_model


class MultiAdapterModel:
    """A patched causal LM and its AdapterPool; see the module docstring."""

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        target_modules: TargetModules = ALL_LINEAR,
        capacity: SlotCapacity = SlotCapacity(),
        limits: PoolLimits = PoolLimits(),
    ) -> None:
        self.model = model
        self.layers = patch_model(model, target_modules, capacity)
        self.pool = AdapterPool(self.layers, capacity, limits)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        **kwargs,
    ) -> "MultiAdapterModel":
        """Load a local Hugging Face model directory (never downloads) and patch it."""
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        return cls(model.to(device).eval(), **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def add_adapter(self, name: str, source: str | os.PathLike | MergedSource | AdapterWeights, *,
                    replace: bool = False) -> None:
        """Register an adapter by name: a directory or a weighted merge of directories (read lazily, on first
        use), or loaded weights."""
        self.pool.register(name, source, replace=replace)

    @contextmanager
    def adapter_scope(
        self, row_slots: Sequence[AdapterSlot | None], tokens_per_row: int | Sequence[int]
    ) -> Iterator[AdapterBatch]:
        """Within the block, forward passes use these per-row slots (rows laid out one after another)."""
        batch = AdapterBatch.from_rows(row_slots, tokens_per_row, self.device)
        with adapter_batch_scope(self.layers.values(), batch):
            yield batch

    def __call__(
        self,
        input_ids: torch.Tensor,
        adapter_names: Sequence[str | None],
        attention_mask: torch.Tensor | None = None,
        **model_kwargs,
    ):
        """One forward pass, row i with adapter_names[i] (None: the base model).

        input_ids: [B, S]; attention_mask: [B, S] or None. Returns the model's output (logits [B, S, V]).
        """
        if input_ids.dim() != 2 or input_ids.shape[0] != len(adapter_names):
            raise ValueError(
                f"adapter_names has {len(adapter_names)} entries for input_ids of shape {tuple(input_ids.shape)}; "
                "pass input_ids as [batch, seq] and one adapter name (or None) per row"
            )
        with self.pool.pinned(adapter_names) as slots, self.adapter_scope(slots, input_ids.shape[1]):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
