"""In-memory adapters: what a loaded adapter directory becomes, per kind and per target module.

Module names are paths inside the causal LM, as `model.named_modules()` gives them
(for example "model.layers.0.self_attn.q_proj"); PEFT's "base_model.model." prefix is stripped
on load and added back on save.

Every weight is stored in the `nn.Linear` orientation: `d_in` is the layer's input width and
`d_out` its output width, whatever the layer's own weight layout (GPT-2's Conv1D stores
[d_in, d_out]; the adapter tensors here do not care).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Union

import torch


class AdapterKind(str, enum.Enum):
    """The three adapter kinds served in one batch."""

    LORA = "lora"  # y = W0 x + s * B (A x); DoRA rescales each output of W0 x + s * B (A x)
    FLORA = "flora"  # y = (W0 o (out^T in / r)) x, o element-wise
    IA3 = "ia3"  # y = (W0 x) o l, or W0 (x o l) for feed-forward modules


@dataclass(frozen=True, eq=False)  # tensors: compare by identity, never by value
class LoraModule:
    """One LoRA target: delta W = scale * b @ a; with DoRA's magnitude m, W = m / ||W0 + delta W|| o (W0 + delta W).

    a: [r, d_in]; b: [d_out, r]; scale: alpha / r (alpha / sqrt(r) with rsLoRA). magnitude:
    [d_out] for DoRA (PEFT's use_dora; ||.|| is each output row's L2 norm, the bias is not
    scaled), None for plain LoRA.
    """

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    magnitude: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True, eq=False)
class FloraModule:
    """One FLoRA target: W = W0 o (flora_out^T @ flora_in / r), the mean over rank j of rank-1 masks.

    flora_in: [r, d_in], row j scales the layer's input; flora_out: [r, d_out], row j scales its
    output. All-ones factors give W = W0 (the base model). The layer's bias is not scaled.
    """

    flora_in: torch.Tensor
    flora_out: torch.Tensor

    @property
    def rank(self) -> int:
        return self.flora_in.shape[0]


@dataclass(frozen=True, eq=False)
class Ia3Module:
    """One IA3 target, as PEFT defines it.

    scale: [d_out] multiplies the layer's output (bias included) when on_input is False;
    [d_in] multiplies its input when on_input is True (PEFT's feedforward_modules).
    """

    scale: torch.Tensor
    on_input: bool


ModuleWeights = Union[LoraModule, FloraModule, Ia3Module]


@dataclass(frozen=True, eq=False)
class AdapterWeights:
    """A whole adapter: its kind and the weights of each module it targets.

    modules: module name (as in `model.named_modules()`) -> weights of that module.
    config: the adapter_config.json contents it came from (kept for save and for listings).
    """

    kind: AdapterKind
    modules: Mapping[str, ModuleWeights]
    config: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules", MappingProxyType(dict(self.modules)))

    @property
    def rank(self) -> int:
        """The largest rank over modules (1 for IA3, which has no rank)."""
        if self.kind is AdapterKind.IA3:
            return 1
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def num_bytes(self) -> int:
        total = 0
        for module in self.modules.values():
            for value in vars(module).values():
                if isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
        return total
