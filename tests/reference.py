"""The per-row reference: an adapter merged into a copy of the base model's weights.

Every batched path is compared with this: merge one adapter into the weights, run one example
at a time through the plain (unpatched) model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from flora_core.adapter_weights import AdapterWeights, FloraModule, Ia3Module, LoraModule


def merged_delta_weight(module: LoraModule | FloraModule | Ia3Module, weight: torch.Tensor) -> torch.Tensor:
    """The merged weight [d_out, d_in] for base weight [d_out, d_in], computed in float64."""
    w = weight.double()
    if isinstance(module, LoraModule):
        merged = w + module.scale * module.b.double() @ module.a.double()
        if module.magnitude is None:
            return merged
        return (module.magnitude.double() / torch.linalg.norm(merged, dim=1))[:, None] * merged  # DoRA
    if isinstance(module, FloraModule):
        mask = module.flora_out.double().t() @ module.flora_in.double() / module.rank
        return w * mask
    if module.on_input:
        return w * module.scale.double()[None, :]
    return w * module.scale.double()[:, None]


def merge_adapter(base_model: nn.Module, adapter: AdapterWeights | None) -> nn.Module:
    """A deep copy of base_model with the adapter merged into its weights (None: a plain copy)."""
    model = copy.deepcopy(base_model)
    if adapter is None:
        return model
    for name, module in adapter.modules.items():
        layer = model.get_submodule(name)
        transposed = isinstance(layer, Conv1D)
        weight = layer.weight.t() if transposed else layer.weight
        merged = merged_delta_weight(module, weight)
        with torch.no_grad():
            layer.weight.copy_((merged.t() if transposed else merged).to(layer.weight.dtype))
            if isinstance(module, Ia3Module) and not module.on_input and layer.bias is not None:
                layer.bias.mul_(module.scale.to(layer.bias.dtype))
    return model


@torch.no_grad()
def per_row_logits(base_model: nn.Module, adapters: list[AdapterWeights | None], input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [B, S, V]: row i run alone through base_model with adapters[i] merged."""
    rows = []
    merged_cache: dict[int, nn.Module] = {}
    for i, adapter in enumerate(adapters):
        key = id(adapter)
        if key not in merged_cache:
            merged_cache[key] = merge_adapter(base_model, adapter)
        mask = None if attention_mask is None else attention_mask[i : i + 1]
        rows.append(merged_cache[key](input_ids=input_ids[i : i + 1], attention_mask=mask).logits)
    return torch.cat(rows)


@torch.no_grad()
def penalized_greedy(model: nn.Module, prompt: list[int], max_tokens: int, *, presence: float = 0.0,
                     frequency: float = 0.0, repetition: float = 1.0, eos_token_id: int | None = None) -> list[int]:
    """Greedy tokens with the penalties applied token by token, as their definitions read.

    Full forward for every token (no cache); one token's logit at a time: the repetition penalty
    over prompt and output so far (transformers' RepetitionPenaltyLogitsProcessor), then
    frequency (times the token's count in the output) and presence (once per token in the output).
    """
    ids, output = list(prompt), []
    for _ in range(max_tokens):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float().clone()  # [V]
        for token in set(ids):
            if repetition != 1:
                logits[token] = logits[token] / repetition if logits[token] > 0 else logits[token] * repetition
        for token in set(output):
            count = output.count(token)
            logits[token] = logits[token] - frequency * count - presence
        token = int(logits.argmax())
        ids.append(token)
        output.append(token)
        if token == eos_token_id:
            break
    return output


@torch.no_grad()
def grammar_greedy(model: nn.Module, tokenizer, prompt: list[int], spec, max_tokens: int) -> list[int]:
    """Greedy tokens under xgrammar's own mask for a StructuredOutput spec (None: unmasked), one row.

    Full forward for every token (no cache), on the model's device; stops at EOS or when the grammar is
    complete.
    """
    import xgrammar as xgr

    vocab, eos, device = model.config.vocab_size, tokenizer.eos_token_id, model.device
    matcher = None
    if spec is not None:
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=[eos])
        matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_grammar(spec.grammar()))
    ids, output = list(prompt), []
    for _ in range(max_tokens):
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[:, -1].float()  # [1, V]
        if matcher is not None:
            bitmask = xgr.allocate_token_bitmask(1, vocab)
            matcher.fill_next_token_bitmask(bitmask)
            xgr.apply_token_bitmask_inplace(logits, bitmask.to(device))
        token = int(logits.argmax())
        ids.append(token)
        output.append(token)
        if token == eos or (matcher is not None and matcher.accept_token(token) and matcher.is_terminated()):
            break
    return output
