"""Model-level adapter overhead: one forward pass of a whole causal LM over a heterogeneous batch.

Decode is one token per row over a KV cache of `context` tokens (the cache is cropped back
after every call, outside the timed region); prefill is T tokens per row with no cache, keeping
only the last position's logits, as the engine does. Implementations, for row i with adapter i % D:

- `base`: the model with its wrappers swapped back for the original layers (no adapter code at all).
- `ours_no_adapter`: our patched model, every row without an adapter (the fixed cost of the machinery).
- `ours`, `grouped`, `bmm`: our MultiAdapterModel (AdapterBatch built inside the timed region, as
  the engine does per step; slots pinned beforehand, as the engine pins at admission), with
  pick_lora_strategy's choice or a forced LoRA strategy. At decode `bmm` is the paper's baseline.
- `peft`: a PeftModel with the same adapters loaded, called with `adapter_names=`.
- `loop`: one forward pass of our model per adapter group, each over its own KV cache.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Iterator

import torch
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from bench.bytes_floor import adapter_bytes, bytes_floor, decode_bytes
from bench.overhead_layer import FORCED_IMPLS, OverheadCase, StrategySwitch, strategy_switch
from bench.timing import Timer
from flora_core.adapter_weights import AdapterKind, AdapterWeights, FloraModule, LoraModule
from flora_core.cache_argument import cache_kwargs
from flora_core.default_model import default_model_dir
from flora_core.multi_adapter_linear import SlotCapacity
from flora_core.multi_adapter_model import MultiAdapterModel

LORA_IMPLS = ("ours", "grouped", "bmm", "peft", "loop")
FLORA_IMPLS = ("ours", "loop")

# TinyLlama-1.1B's layer shapes (hidden 2048, FFN 5632, 32 heads / 4 KV heads of 64), 4 of its 22
# layers, the vocabulary cut to 8192 so that the output head keeps about its share of the work.
MODERATE_LLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4, num_attention_heads=32,
                      num_key_value_heads=4, head_dim=64, vocab_size=8192, max_position_embeddings=2048,
                      tie_word_embeddings=False)
# Llama-2-7B's shapes (hidden 4096, FFN 11008, 32 layers, 32 heads of 128), random weights: for a GPU,
# where a decode step of the 4-layer model above is bound by kernel launches, not by its weights.
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, head_dim=128, vocab_size=32000, max_position_embeddings=4096,
                tie_word_embeddings=False)
MODEL_NAMES = ("flora-tiny-llama", "llama-moderate", "llama-7b")


def build_base(name: str, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    """'flora-tiny-llama' (the embedded default model), or random weights: 'llama-moderate'
    (MODERATE_LLAMA) or 'llama-7b' (LLAMA_7B, initialised on `device`: 27 GB in float32)."""
    torch.manual_seed(0)
    if name == "flora-tiny-llama":
        model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=dtype, local_files_only=True)
    elif name == "llama-moderate":
        model = LlamaForCausalLM(LlamaConfig(**MODERATE_LLAMA)).to(dtype)
    elif name == "llama-7b":
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**LLAMA_7B)).to(dtype)
    else:
        raise ValueError(f"unknown model {name!r}; use one of {', '.join(MODEL_NAMES)}")
    return model.to(device).eval()


class LayerSwap:
    """Puts a MultiAdapterModel's original linear layers back in place of its wrappers, and undoes it.

    Both are idempotent, so every timed call's untimed setup can name the state it needs.
    """

    def __init__(self, model: MultiAdapterModel) -> None:
        self._slots = []  # (parent module, attribute name, wrapper)
        for name, wrapper in model.layers.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.model.get_submodule(parent_name) if parent_name else model.model
            self._slots.append((parent, child, wrapper))
        self._wrapped = True

    def original(self) -> None:
        if self._wrapped:
            for parent, child, wrapper in self._slots:
                setattr(parent, child, wrapper.base_layer)
            self._wrapped = False

    def wrapped(self) -> None:
        if not self._wrapped:
            for parent, child, wrapper in self._slots:
                setattr(parent, child, wrapper)
            self._wrapped = True

    @contextlib.contextmanager
    def originals(self) -> Iterator[None]:
        self.original()
        try:
            yield
        finally:
            self.wrapped()


class ModelBench:
    """A patched model with random adapters of every rank asked for, a PEFT copy, and KV caches."""

    def __init__(self, name: str, base: PreTrainedModel, max_distinct: int, max_lora_rank: int,
                 max_flora_rank: int, context: int, with_peft: bool) -> None:
        """base: an unpatched model; it is copied, never modified."""
        device = base.device
        self.peft_source = base if with_peft else None
        base = copy.deepcopy(base)
        self.name, self.device, self.context, self.max_distinct = name, device, context, max_distinct
        self.model = MultiAdapterModel(base, capacity=SlotCapacity(
            lora_slots=max_distinct, lora_max_rank=max_lora_rank, flora_slots=max_distinct,
            flora_max_rank=max_flora_rank, ia3_slots=0))
        self.vocab = base.config.get_text_config().vocab_size
        self.shapes = {n: (layer.d_in, layer.d_out) for n, layer in self.model.layers.items()}
        self._adapters: dict[tuple[AdapterKind, int], list[str]] = {}
        self._weights: dict[str, AdapterWeights] = {}  # name -> the weights registered under it
        self._peft: tuple[int, nn.Module] | None = None
        self._caches: dict[int, DynamicCache] = {}
        self.swap = LayerSwap(self.model)

    def decode_floor(self, case: OverheadCase) -> float | None:
        """The lowest ratio a decode case can have where it is bound by bytes (bench.bytes_floor); None at prefill."""
        if case.phase != "decode":
            return None
        element = next(self.model.model.parameters()).element_size()
        adapters = adapter_bytes(self.shapes, case.rank, element) * case.distinct
        return bytes_floor(decode_bytes(self.model.model, case.batch, self.context), adapters)  # slots are buffers

    def measure(self, case: OverheadCase, timer: Timer) -> dict[str, float]:
        """ms per implementation, plus "base"."""
        names = self._adapter_names(case.kind, case.rank, case.distinct)
        row_names = [names[i % case.distinct] for i in range(case.batch)]
        gen = torch.Generator().manual_seed(case.batch)
        ids = torch.randint(3, self.vocab, (case.batch, case.tokens_per_row), generator=gen).to(self.device)
        with self.model.pool.pinned(names) as slots, torch.inference_mode(), strategy_switch() as switch:
            slot_of = dict(zip(names, slots))
            row_slots = [slot_of[n] for n in row_names]
            calls = {"base": self._call(case, ids, lambda kw: self.model.model(**kw), wrapped=False)}
            for impl in case.impls:
                calls[impl] = self._impl_call(impl, case, ids, row_names, row_slots, switch)
            try:
                return timer.compare(calls)
            finally:
                self.swap.wrapped()

    def _impl_call(self, impl, case, ids, row_names, row_slots, switch: StrategySwitch):
        if impl in ("ours", "ours_no_adapter") or impl in FORCED_IMPLS:
            slots = [None] * case.batch if impl == "ours_no_adapter" else row_slots
            fn, before = self._call(case, ids, self._ours_forward(slots, case.tokens_per_row))
            return switch.calling(impl if impl in FORCED_IMPLS else None, fn), before
        if impl == "peft":
            peft_model = self._peft_model(case)
            return self._call(case, ids, lambda kw: peft_model(**kw, adapter_names=row_names), wrapped=False)
        if impl == "loop":
            return self._loop_call(case, ids, row_slots)
        raise ValueError(f"unknown implementation {impl!r}; use one of {LORA_IMPLS}")

    def _ours_forward(self, slots, tokens_per_row) -> Callable[[dict], object]:
        def forward(kwargs: dict):
            with self.model.adapter_scope(slots, tokens_per_row):
                return self.model.model(**kwargs)

        return forward

    def _call(self, case: OverheadCase, ids: torch.Tensor, forward: Callable[[dict], object], wrapped: bool = True):
        """(timed call, untimed setup) running `forward` on this case's inputs; the setup swaps the
        model's layers to the state the call needs (wrappers, or the originals for `base`) and
        resets the KV cache."""
        swap = self.swap.wrapped if wrapped else self.swap.original
        if case.phase == "prefill":
            return lambda: forward({"input_ids": ids, "use_cache": False, "logits_to_keep": 1}), swap
        cache = self._cache(case.batch)

        def setup() -> None:
            swap()
            reset_cache(cache, self.context)

        return lambda: forward({"input_ids": ids, **cache_kwargs(self.model.model, cache), "use_cache": True}), setup

    def _loop_call(self, case: OverheadCase, ids: torch.Tensor, row_slots):
        """One forward per adapter group (rows i with i % D == g), each over a cache of its own."""
        groups = []
        for g in range(case.distinct):
            rows = list(range(g, case.batch, case.distinct))
            index = torch.tensor(rows, device=self.device)
            cache = None if case.phase == "prefill" else self._cache(len(rows), key=("loop", g, len(rows)))
            groups.append((ids.index_select(0, index), [row_slots[r] for r in rows], cache))

        def loop():
            for group_ids, slots, cache in groups:
                kwargs = ({"input_ids": group_ids, "use_cache": False, "logits_to_keep": 1} if cache is None else
                          {"input_ids": group_ids, **cache_kwargs(self.model.model, cache), "use_cache": True})
                with self.model.adapter_scope(slots, case.tokens_per_row):
                    self.model.model(**kwargs)

        def reset():
            self.swap.wrapped()
            for _, _, cache in groups:
                if cache is not None:
                    reset_cache(cache, self.context)

        return loop, reset

    def _cache(self, rows: int, key: object = None) -> DynamicCache:
        """A KV cache of `context` tokens for `rows` rows (filled once by the base model)."""
        key = rows if key is None else key
        if key not in self._caches:
            cache = DynamicCache()
            ids = torch.randint(3, self.vocab, (rows, self.context), generator=torch.Generator().manual_seed(rows))
            with torch.inference_mode(), self.swap.originals():
                self.model.model(input_ids=ids.to(self.device), **cache_kwargs(self.model.model, cache), use_cache=True)
            self._caches[key] = cache
        return self._caches[key]

    def drop_caches(self) -> None:
        self._caches.clear()

    # ----- adapters -----

    def _adapter_names(self, kind: AdapterKind, rank: int, count: int) -> list[str]:
        """count registered adapters of kind and rank (LoRA rank 16 comes from the PEFT model, if any)."""
        key = (kind, rank)
        have = self._adapters.setdefault(key, [])
        for i in range(len(have), count):
            name = f"{kind.value}-r{rank}-{i}"
            self._weights[name] = self._random_adapter(kind, rank, seed=1000 * rank + i)
            self.model.add_adapter(name, self._weights[name])
            have.append(name)
        return have[:count]

    def _random_adapter(self, kind: AdapterKind, rank: int, seed: int) -> AdapterWeights:
        gen = torch.Generator().manual_seed(seed)
        modules = {}
        for name, (d_in, d_out) in self.shapes.items():
            if kind is AdapterKind.LORA:
                modules[name] = LoraModule(a=torch.randn(rank, d_in, generator=gen) / d_in**0.5,
                                           b=torch.randn(d_out, rank, generator=gen) * 0.01, scale=2.0 / rank)
            else:
                modules[name] = FloraModule(flora_in=1 + 0.1 * torch.randn(rank, d_in, generator=gen),
                                            flora_out=1 + 0.1 * torch.randn(rank, d_out, generator=gen))
        return AdapterWeights(kind, modules)

    def _peft_model(self, case: OverheadCase) -> nn.Module:
        """A PeftModel over the base copy holding adapters with the same weights as ours (by name)."""
        if case.kind is not AdapterKind.LORA:
            raise ValueError("PEFT's mixed batch is LoRA only here")
        if self.peft_source is None:
            raise ValueError(f"{self.name}: built without PEFT; pass with_peft=True")
        names = self._adapter_names(case.kind, case.rank, self.max_distinct)
        if self._peft is None or self._peft[0] != case.rank:
            self._peft = None
            self._peft = (case.rank, peft_model_with(self.peft_source, case.rank, names, self._weights))
        return self._peft[1]


def reset_cache(cache: DynamicCache, context: int) -> None:
    """Drop the tokens a timed decode call appended, back to `context`."""
    extra = cache.get_seq_length() - context
    if extra > 0:
        cache.crop(-extra)


def peft_model_with(base: PreTrainedModel, rank: int, names: list[str],
                    adapters: dict[str, AdapterWeights]) -> nn.Module:
    """A PeftModel over a copy of `base` with each of our LoRA adapters copied into PEFT's layers."""
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415 - a bench extra, not a core dependency

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(base), config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    with torch.no_grad():
        for module_name, module in model.base_model.model.named_modules():
            if not hasattr(module, "lora_A"):
                continue
            for name in names:
                weights = adapters[name].modules[module_name]
                module.lora_A[name].weight.copy_(weights.a)
                module.lora_B[name].weight.copy_(weights.b)
                module.scaling[name] = weights.scale
    return model.eval()
