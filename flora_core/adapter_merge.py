"""Weighted merges of adapters of one kind into one adapter, exact, served like any other.

    LoRA:        delta W = sum_k w_k * s_k * B_k A_k   (PEFT's add_weighted_adapter, combination_type="cat")
    FLoRA, IA3:  mask    = sum_k w_k * mask_k         (PEFT's IA3 add_weighted_adapter)

LoRA deltas add, so a merged LoRA stacks the components' factors: rank sum_k r_k, scale 1, each
component's weight and scale folded into its rows of A. The multiplicative kinds combine their
masks (W = W0 o mask): FLoRA's mask is the mean over rank of outer(flora_out_j, flora_in_j), so
stacking the components' rows with flora_out scaled by w_k * R / r_k (R = sum_k r_k) gives
exactly sum_k w_k mask_k; IA3's vectors add. Weights summing to 1 interpolate between them.

In each module only the components that target it take part, as in PEFT: a module that one of
two adapters targets gets that adapter's weight alone. DoRA does not merge (its magnitude
rescales the merged weight's row norms, which do not add).
"""

from __future__ import annotations

import math
import pathlib
from dataclasses import dataclass
from typing import Sequence

import torch

from flora_core.adapter_weights import AdapterKind, AdapterWeights, FloraModule, Ia3Module, LoraModule

MAX_MERGE_COMPONENTS = 16


@dataclass(frozen=True)
class MergedSource:
    """An `AdapterPool` source: the merge of adapter directories, read and merged when first needed.

    paths: the components' directories; weights: one per path (see `merge_adapters`).
    """

    paths: tuple[pathlib.Path, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "paths", tuple(pathlib.Path(p) for p in self.paths))
        object.__setattr__(self, "weights", tuple(self.weights))
        _check_weights(len(self.paths), self.weights)


def merge_adapters(adapters: Sequence[AdapterWeights], weights: Sequence[float]) -> AdapterWeights:
    """One adapter equal to the weighted combination of `adapters` (module docstring).

    adapters: 1 to 16 adapters of one kind (LoRA, FLoRA or IA3; no DoRA); weights: one finite
    float per adapter, negative ones allowed (task-vector subtraction). The result's config is
    empty, so `save_adapter` writes one that describes it exactly (PEFT reads merged LoRA and IA3).
    """
    _check_merge(adapters, weights)
    kind = adapters[0].kind
    names = sorted({name for adapter in adapters for name in adapter.modules})
    merged = {}
    for name in names:
        parts = [(a.modules[name], float(w)) for a, w in zip(adapters, weights) if name in a.modules]
        if kind is AdapterKind.LORA:
            merged[name] = _merge_lora(parts)
        elif kind is AdapterKind.FLORA:
            merged[name] = _merge_flora(parts)
        else:
            merged[name] = _merge_ia3(name, parts)
    return AdapterWeights(kind=kind, modules=merged)


def _merge_lora(parts: list[tuple[LoraModule, float]]) -> LoraModule:
    """a: [sum r_k, d_in], rows k scaled by w_k * s_k; b: [d_out, sum r_k]; scale 1."""
    a = torch.cat([m.a.float() * (w * m.scale) for m, w in parts], dim=0)
    b = torch.cat([m.b.float() for m, _ in parts], dim=1)
    return LoraModule(a=a, b=b, scale=1.0)


def _merge_flora(parts: list[tuple[FloraModule, float]]) -> FloraModule:
    """flora_in: [R, d_in]; flora_out: [R, d_out], component k's rows times w_k * R / r_k (R = sum r_k)."""
    total_rank = sum(m.rank for m, _ in parts)
    flora_in = torch.cat([m.flora_in.float() for m, _ in parts], dim=0)
    flora_out = torch.cat([m.flora_out.float() * (w * total_rank / m.rank) for m, w in parts], dim=0)
    return FloraModule(flora_in=flora_in, flora_out=flora_out)


def _merge_ia3(name: str, parts: list[tuple[Ia3Module, float]]) -> Ia3Module:
    """scale: sum_k w_k l_k, on the side every component scales."""
    sides = {m.on_input for m, _ in parts}
    if len(sides) > 1:
        raise ValueError(
            f"IA3 module {name!r} scales its input in one adapter (feedforward_modules) and its output in "
            "another; merge adapters that agree on feedforward_modules"
        )
    scale = sum(m.scale.float() * w for m, w in parts)
    return Ia3Module(scale=scale, on_input=sides.pop())


def _check_weights(count: int, weights: Sequence[float]) -> None:
    if not 1 <= count <= MAX_MERGE_COMPONENTS:
        raise ValueError(f"adapters has {count} entries; merge 1 to {MAX_MERGE_COMPONENTS} adapters")
    if len(weights) != count:
        raise ValueError(f"weights has {len(weights)} entries for {count} adapters; pass one weight each")
    for i, weight in enumerate(weights):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"weights[{i}]={weight!r}; pass a finite number")


def _check_merge(adapters: Sequence[AdapterWeights], weights: Sequence[float]) -> None:
    _check_weights(len(adapters), weights)
    kinds = {adapter.kind for adapter in adapters}
    if len(kinds) > 1:
        raise ValueError(
            f"adapters mix kinds {sorted(k.value for k in kinds)}; merge adapters of one kind "
            "(LoRA deltas add, FLoRA and IA3 masks combine: they have no common form)"
        )
    for i, adapter in enumerate(adapters):
        if any(isinstance(m, LoraModule) and m.magnitude is not None for m in adapter.modules.values()):
            raise ValueError(
                f"adapters[{i}] is DoRA, which does not merge (its magnitude rescales row norms, which do not "
                "add); serve it on its own"
            )
        if not adapter.modules:
            raise ValueError(f"adapters[{i}] has no modules; there is nothing to merge")
