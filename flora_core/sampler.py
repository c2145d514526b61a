"""Next-token selection for a batch of rows, each row with its own parameters: pure functions.

Every function takes logits [B, V] (float32) and per-row parameters; rows never mix, so a row's
token depends only on its own logits and its own generator, whatever else is in the batch.
The order is vLLM's and transformers': min_tokens and logit_bias first (flora_core/token_bias.py),
then the penalties (flora_core/penalties.py), then temperature, top-k, top-p and min-p; greedy
rows take the argmax after the first two, as `generate(do_sample=False, repetition_penalty=...)` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from flora_core.penalties import PenaltyBatch, apply_penalties
from flora_core.sampling_params import SamplingParams
from flora_core.token_bias import TokenBiasBatch, apply_token_bias


@dataclass(frozen=True)
class SamplingBatch:
    """The sampling parameters of one step's rows, built once per step."""

    temperature: torch.Tensor  # [B] float32: 0 for a greedy row
    top_k: torch.Tensor  # [B] long: 0 = off
    top_p: torch.Tensor  # [B] float32: 1 = off
    min_p: torch.Tensor  # [B] float32: 0 = off
    generators: tuple[torch.Generator | None, ...]  # B entries: each sampled row's own generator
    token_bias: TokenBiasBatch | None = None  # None: no row has a logit_bias or a min_tokens to wait for
    penalties: PenaltyBatch | None = None  # None: no row has a penalty

    @staticmethod
    def from_params(
        params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None], device: torch.device,
        token_bias: TokenBiasBatch | None = None, penalties: PenaltyBatch | None = None,
    ) -> "SamplingBatch":
        return SamplingBatch(
            temperature=torch.tensor([0.0 if p.greedy else p.temperature for p in params], dtype=torch.float32,
                                     device=device),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.long, device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            min_p=torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device),
            generators=tuple(generators),
            token_bias=token_bias,
            penalties=penalties,
        )


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """logits / temperature[:, None].

    logits: [B, V] float; temperature: [B] float, every entry > 0.
    """
    return logits / temperature[:, None]


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """logits.masked_fill(logits < kth_largest[:, None], -inf); ties with the k-th largest are kept.

    logits: [B, V] float; top_k: [B] long, 0 = off for that row.
    """
    if not bool((top_k > 0).any()):
        return logits
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
    kth_largest = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])  # [B, 1]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the most likely tokens whose probabilities first add up to top_p; the rest get -inf.

    As transformers' TopPLogitsWarper: in ascending order, drop every token whose cumulative
    probability is <= 1 - top_p, always keeping the most likely one.
    logits: [B, V] float; top_p: [B] float in (0, 1], 1 = off for that row.
    """
    if not bool((top_p < 1).any()):
        return logits
    ascending, order = logits.sort(dim=-1)  # [B, V] each
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - top_p)[:, None]
    drop_sorted[:, -1] = False
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Keep the tokens whose probability is at least min_p times the row's largest; the rest get -inf.

    As transformers' MinPLogitsWarper (the most likely token always stays).
    logits: [B, V] float; min_p: [B] float in [0, 1], 0 = off for that row.
    """
    if not bool((min_p > 0).any()):
        return logits
    probs = logits.softmax(dim=-1)
    drop = probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(drop, float("-inf"))


def sample_rows(logits: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """torch.multinomial(softmax(logits[i]), 1, generator=generators[i]) for each row i.

    logits: [B, V] float; generators: B generators on logits' device (None: the global one).
    Returns [B] long. One call per row keeps each row's random stream its own.
    """
    probs = logits.softmax(dim=-1)
    picks = [torch.multinomial(row, 1, generator=gen) for row, gen in zip(probs, generators)]
    return torch.cat(picks) if picks else torch.empty(0, dtype=torch.long, device=logits.device)


def next_tokens(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Each row's next token after its logit bias and penalties: argmax for greedy rows, else
    sampled after temperature, top-k, top-p and min-p.

    logits: [B, V] float32. Returns [B] long.
    """
    if batch.token_bias is not None:
        logits = apply_token_bias(logits, batch.token_bias)
    if batch.penalties is not None:
        logits = apply_penalties(logits, batch.penalties)
    tokens = logits.argmax(dim=-1)
    sampled = torch.nonzero(batch.temperature > 0).flatten()
    if sampled.numel() == 0:
        return tokens
    rows = apply_temperature(logits[sampled], batch.temperature[sampled])
    rows = apply_top_k(rows, batch.top_k[sampled])
    rows = apply_top_p(rows, batch.top_p[sampled])
    rows = apply_min_p(rows, batch.min_p[sampled])
    tokens[sampled] = sample_rows(rows, [batch.generators[i] for i in sampled.tolist()])
    return tokens


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log_softmax(logits) at the chosen tokens, and its k largest entries per row.

    Log probabilities of the model's own distribution (before temperature, top-k and top-p),
    as vLLM returns by default. logits: [B, V] float; tokens: [B] long; 0 <= k <= V.
    Returns chosen [B], top_values [B, k] (descending) and top_ids [B, k].
    """
    logprobs = logits.log_softmax(dim=-1)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0]
    top_values, top_ids = logprobs.topk(k, dim=-1)
    return chosen, top_values, top_ids
