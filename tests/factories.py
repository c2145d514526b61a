"""Tiny models built from configs and random adapters for them: the tests' raw material."""

from __future__ import annotations

from typing import Mapping

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from flora_core.adapter_weights import AdapterKind, AdapterWeights, FloraModule, Ia3Module, LoraModule

VOCAB = 128


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    return Qwen2ForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)
    return GPT2LMHeadModel(config).eval()


TINY_MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2}

FEEDFORWARD_SUFFIXES = ("down_proj", "mlp.c_proj")


def random_adapter(
    kind: AdapterKind,
    shapes: Mapping[str, tuple[int, int]],
    rank: int = 4,
    seed: int = 0,
    strength: float = 0.5,
) -> AdapterWeights:
    """An adapter of `kind` on every module in shapes (name -> (d_in, d_out)) with visible effect."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    modules = {}
    for name, (d_in, d_out) in shapes.items():
        if kind is AdapterKind.LORA:
            modules[name] = LoraModule(a=randn(rank, d_in) * strength, b=randn(d_out, rank) * strength,
                                       scale=2.0 / rank)
        elif kind is AdapterKind.FLORA:
            spread = strength * rank**0.5  # the mean over rank shrinks the mask's spread by sqrt(r)
            modules[name] = FloraModule(flora_in=1 + spread * randn(rank, d_in),
                                        flora_out=1 + spread * randn(rank, d_out))
        else:
            on_input = name.endswith(FEEDFORWARD_SUFFIXES)
            modules[name] = Ia3Module(scale=1 + strength * randn(d_in if on_input else d_out), on_input=on_input)
    return AdapterWeights(kind=kind, modules=modules)
