"""Batched multi-adapter training: one optimizer step over rows of many adapters, the base frozen.

Each adapter gets a pool slot, and the slot tensors of every MultiAdapterLinear become the trained
parameters: a row's loss reaches only its own slot (the batched ops gather by slot), and gradient
masks keep every slot's padding, untargeted layers and unused IA3 direction exactly as they are.
A slot with no rows in a minibatch gets an exactly-zero gradient. Initialization preserves the
base model's function at step 0: LoRA B = 0, IA3 all ones, and FLoRA all-ones factors (flora_out
gets rank-wise noise with zero mean over rank for r > 1, which breaks the symmetry between ranks
and leaves the mean mask M = 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from flora_core.adapter_batch import AdapterSlot
from flora_core.adapter_weights import AdapterKind, AdapterWeights, FloraModule, Ia3Module, LoraModule
from flora_core.multi_adapter_linear import MultiAdapterLinear
from flora_core.multi_adapter_model import MultiAdapterModel
from flora_core.patching import TargetModules, matches_target

DEFAULT_FEEDFORWARD = ("down_proj", "mlp.c_proj", "fc2")
SLOT_BUFFER_KIND = {"lora_a": AdapterKind.LORA, "lora_b": AdapterKind.LORA, "flora_in": AdapterKind.FLORA,
                    "flora_out": AdapterKind.FLORA, "ia3_in": AdapterKind.IA3, "ia3_out": AdapterKind.IA3}


@dataclass(frozen=True)
class AdapterSpec:
    """A new adapter to train: its kind, rank, alpha (LoRA) and the layers it targets."""

    kind: AdapterKind
    rank: int = 1
    lora_alpha: float | None = None  # LoRA only; default 2 * rank
    target_modules: TargetModules = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj")
    feedforward_modules: tuple[str, ...] = DEFAULT_FEEDFORWARD  # IA3: these scale their input

    @property
    def lora_scale(self) -> float:
        return (self.lora_alpha if self.lora_alpha is not None else 2.0 * self.rank) / self.rank


def init_adapter(spec: AdapterSpec, layers: Mapping[str, MultiAdapterLinear],
                 generator: torch.Generator) -> AdapterWeights:
    """Fresh weights for spec on the matching layers; the model's function is unchanged at step 0."""
    modules = {}
    for name, layer in layers.items():
        if not matches_target(name, spec.target_modules):
            continue
        r, d_in, d_out = spec.rank, layer.d_in, layer.d_out
        if spec.kind is AdapterKind.LORA:  # PEFT's default: kaiming-uniform A, zero B
            bound = 1.0 / math.sqrt(d_in)
            a = (torch.rand(r, d_in, generator=generator) * 2 - 1) * bound
            modules[name] = LoraModule(a=a, b=torch.zeros(d_out, r), scale=spec.lora_scale)
        elif spec.kind is AdapterKind.FLORA:
            noise = 0.1 * torch.randn(r, d_out, generator=generator)
            modules[name] = FloraModule(flora_in=torch.ones(r, d_in), flora_out=1 + noise - noise.mean(0))
        else:
            on_input = name.endswith(spec.feedforward_modules)
            modules[name] = Ia3Module(scale=torch.ones(d_in if on_input else d_out), on_input=on_input)
    if not modules:
        raise ValueError(f"target_modules={spec.target_modules!r} matches no patched layer; "
                         f"use names such as {sorted({n.rsplit('.', 1)[-1] for n in layers})}")
    return AdapterWeights(kind=spec.kind, modules=modules)


def _learning_rates(lr: float | Mapping[AdapterKind, float], kinds: set[AdapterKind]) -> dict[AdapterKind, float]:
    """The learning rate of each kind trained; ValueError naming what is missing or invalid."""
    rates = dict(lr) if isinstance(lr, Mapping) else {kind: lr for kind in kinds}
    missing = sorted(kind.value for kind in kinds - set(rates))
    if missing:
        raise ValueError(f"lr has no rate for {missing}, which the specs train; add them to the lr mapping "
                         "or pass one float for every kind")
    for kind, rate in rates.items():
        if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate >= 0):
            raise ValueError(f"lr[{kind.value if isinstance(kind, AdapterKind) else kind!r}]={rate!r}: "
                             "use a finite number >= 0")
    return rates


def _gradient_masks(layer: MultiAdapterLinear) -> dict[str, torch.Tensor]:
    """Per slot tensor, 1 where training may change it: real ranks of targeted slots, active IA3."""
    def rank_mask(ranks: tuple[int, ...], width: int) -> torch.Tensor:  # [S, R]
        return (torch.arange(width)[None, :] < torch.tensor(ranks)[:, None]).to(layer.lora_a.dtype)

    table = layer.slot_table
    lora = rank_mask(table.lora_rank, layer.lora_a.shape[1])
    flora = rank_mask(table.flora_rank, layer.flora_in.shape[1])
    to = {"device": layer.lora_a.device, "dtype": layer.lora_a.dtype}
    return {
        "lora_a": lora[:, :, None].to(**to), "lora_b": lora[:, :, None].to(**to),
        "flora_in": flora[:, :, None].to(**to), "flora_out": flora[:, :, None].to(**to),
        "ia3_in": torch.tensor(table.ia3_in, **to)[:, None],
        "ia3_out": torch.tensor(table.ia3_out, **to)[:, None],
    }


class MultiAdapterTrainer:
    """Trains several new adapters at once on minibatches that mix their rows.

    lr: one learning rate, or one per adapter kind (FLoRA's multiplicative factors often want a
    different rate than LoRA's), e.g. {AdapterKind.LORA: 1e-4, AdapterKind.FLORA: 1e-3}.
    """

    def __init__(self, model: MultiAdapterModel, specs: Mapping[str, AdapterSpec],
                 lr: float | Mapping[AdapterKind, float] = 1e-3, seed: int = 0):
        self.model = model
        self.specs = dict(specs)
        rates = _learning_rates(lr, {spec.kind for spec in self.specs.values()})
        model.model.requires_grad_(False)
        generator = torch.Generator().manual_seed(seed)
        for name, spec in self.specs.items():
            model.add_adapter(name, init_adapter(spec, model.layers, generator))
        names = list(self.specs)
        self.slots: dict[str, AdapterSlot] = dict(zip(names, model.pool.acquire(names)))  # pinned while training
        params: dict[AdapterKind, list[torch.Tensor]] = {}
        for layer in model.layers.values():
            for buffer_name, mask in _gradient_masks(layer).items():
                tensor = getattr(layer, buffer_name)
                if tensor.numel() and mask.any():
                    tensor.requires_grad_(True)
                    tensor.register_hook(lambda grad, mask=mask: grad * mask)
                    params.setdefault(SLOT_BUFFER_KIND[buffer_name], []).append(tensor)
        self.optimizer = torch.optim.Adam([{"params": tensors, "lr": rates[kind]} for kind, tensors in params.items()])

    def step(self, input_ids: torch.Tensor, labels: torch.Tensor, adapter_names: Sequence[str],
             attention_mask: torch.Tensor | None = None) -> float:
        """One optimizer step; row i trains adapter_names[i]. labels: [B, S] with -100 where ignored."""
        unknown = sorted(set(adapter_names) - set(self.slots))
        if unknown:
            raise ValueError(f"adapter_names has {unknown}, not trained here; use names from {sorted(self.slots)}")
        self.optimizer.zero_grad(set_to_none=True)
        row_slots = [self.slots[name] for name in adapter_names]
        with self.model.adapter_scope(row_slots, input_ids.shape[1]):
            loss = self.model.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        self.optimizer.step()
        return loss.item()

    @torch.no_grad()
    def export(self, name: str) -> AdapterWeights:
        """The trained adapter `name` read back from its slot, in the file formats' conventions."""
        slot, spec = self.slots[name].slot, self.specs[name]
        modules = {}
        for layer_name, layer in self.model.layers.items():
            table = layer.slot_table
            if spec.kind is AdapterKind.LORA and (r := table.lora_rank[slot]):
                modules[layer_name] = LoraModule(a=layer.lora_a[slot, :r].clone(), scale=spec.lora_scale,
                                                 b=layer.lora_b[slot, :r].t() / spec.lora_scale)
            elif spec.kind is AdapterKind.FLORA and (r := table.flora_rank[slot]):
                modules[layer_name] = FloraModule(flora_in=layer.flora_in[slot, :r].clone(),
                                                  flora_out=layer.flora_out[slot, :r] * r)
            elif spec.kind is AdapterKind.IA3 and (table.ia3_in[slot] or table.ia3_out[slot]):
                on_input = table.ia3_in[slot]
                scale = (layer.ia3_in if on_input else layer.ia3_out)[slot].clone()
                modules[layer_name] = Ia3Module(scale=scale, on_input=on_input)
        return AdapterWeights(kind=spec.kind, modules=modules)
