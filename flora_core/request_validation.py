"""Checks on a request at add time, against the model's vocabulary and the engine's limits.

Every refusal is a ValueError that names the bad value and the fix, raised to the caller of
`Engine.add_request` before anything is queued, so the engine itself never sees a bad request.
"""

from __future__ import annotations

from typing import Sequence

from flora_core.detokenizer import TextCodec
from flora_core.sampling_params import SamplingParams


def prompt_token_ids(prompt: str | Sequence[int], codec: TextCodec | None, vocab_size: int) -> list[int]:
    """The prompt as token ids: text is encoded (special tokens included), ids are checked."""
    if isinstance(prompt, str):
        if codec is None:
            raise ValueError("the prompt is text but the engine has no tokenizer; pass token ids, or a tokenizer")
        ids = codec.encode(prompt)
    else:
        ids = list(prompt)
    if not ids:
        raise ValueError("the prompt is empty; pass at least one token (or non-empty text)")
    for token_id in ids:
        if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < vocab_size:
            raise ValueError(
                f"prompt token {token_id!r} is not a token id of this model; pass ints in [0, {vocab_size})"
            )
    return ids


def check_request(
    prompt_ids: list[int], params: SamplingParams, *, max_model_len: int, vocab_size: int, has_tokenizer: bool
) -> None:
    """The request fits the context, and its stop conditions make sense for this model."""
    n = len(prompt_ids)
    if n > max_model_len:
        raise ValueError(
            f"the prompt has {n} tokens, over this engine's max_model_len of {max_model_len}; shorten the prompt"
        )
    if n + params.max_tokens > max_model_len:
        raise ValueError(
            f"the prompt ({n} tokens) plus max_tokens ({params.max_tokens}) is {n + params.max_tokens} tokens, "
            f"over this engine's max_model_len of {max_model_len}; lower max_tokens to at most {max_model_len - n}"
        )
    if params.stop and not has_tokenizer:
        raise ValueError("SamplingParams.stop needs text but the engine has no tokenizer; use stop_token_ids")
    for field, token_ids in (("stop_token_ids", params.stop_token_ids),
                             ("logit_bias", [token_id for token_id, _ in params.logit_bias])):
        for token_id in token_ids:
            if token_id >= vocab_size:
                raise ValueError(
                    f"SamplingParams.{field} has {token_id}, not a token id of this model; "
                    f"pass ids in [0, {vocab_size})"
                )


def eos_token_ids(model, vocab_size: int) -> frozenset[int]:
    """The model's end-of-sequence ids (generation config first, as generate() does) within its vocabulary."""
    generation_config = getattr(model, "generation_config", None)
    eos = None if generation_config is None else generation_config.eos_token_id
    if eos is None:
        eos = model.config.get_text_config().eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return frozenset(token_id for token_id in eos if 0 <= token_id < vocab_size)


def check_full_attention(text_config) -> None:
    """The running batch keeps one full-attention DynamicLayer per layer: refuse sliding-window or
    linear-attention layers, which it would silently run as full attention."""
    others = sorted(set(getattr(text_config, "layer_types", None) or ()) - {"full_attention"})
    if others:
        raise ValueError(
            f"the model has {others} layers; the engine supports full attention only (a model whose config "
            "layer_types are all 'full_attention', e.g. Qwen2 with use_sliding_window=False)"
        )


def check_max_model_len(text_config, max_model_len: int) -> None:
    """max_model_len must not pass the model's position embeddings (when its config names them)."""
    positions = getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)
    if positions is not None and max_model_len > positions:
        raise ValueError(
            f"EngineConfig.max_model_len={max_model_len} is over the model's {positions} positions; "
            f"lower max_model_len to at most {positions}"
        )
