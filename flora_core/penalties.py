"""Repetition, frequency and presence penalties: each row's logits pushed from the tokens it has seen.

Applied as vLLM applies them, to the raw logits before temperature, top-k and top-p, and to
greedy rows too (their argmax is taken after):
- repetition (transformers' RepetitionPenaltyLogitsProcessor, 1 = off): the logit of a token in
  the row's prompt or output so far is divided by the penalty when positive, multiplied otherwise;
- frequency (OpenAI's, 0 = off): minus the penalty times the token's count in the output so far;
- presence (OpenAI's, 0 = off): minus the penalty once for each token in the output so far.
Rows with no penalty are left bit-for-bit as they were; a batch without any costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from flora_core.sampling_params import SamplingParams

FLOAT32_MAX, FLOAT32_TINY = torch.finfo(torch.float32).max, torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class PenaltyBatch:
    """One step's penalties as (row, token) pairs: only the logits of tokens a row has seen change.

    The work is proportional to the penalized rows' histories, not to rows x vocabulary.
    """

    seen_rows: torch.Tensor  # [N] long: (row, token) pairs of prompt and output, rows with repetition; a pair
    seen_tokens: torch.Tensor  # [N] long   may repeat (every copy writes the same value, so none is removed)
    repetition: torch.Tensor  # [N] float32: the row's repetition penalty
    output_rows: torch.Tensor  # [M] long: distinct (row, token) pairs of the output, rows with frequency/presence
    output_tokens: torch.Tensor  # [M] long
    frequency_times_count: torch.Tensor  # [M] float32: the row's frequency penalty times the token's count
    presence: torch.Tensor  # [M] float32: the row's presence penalty

    @staticmethod
    def from_rows(
        params: Sequence[SamplingParams],
        prompts: Sequence[Sequence[int] | torch.Tensor],
        outputs: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device,
    ) -> "PenaltyBatch | None":
        """The batch's penalties, or None when no row has one (nothing to apply).

        params, prompts, outputs: one entry per row; ids < vocab_size. A prompt given as a [P] long
        CPU tensor (RequestState.prompt_tensor, made once) is not copied again. Only the histories of
        penalized rows are read.
        """
        if not any(p.penalized for p in params):
            return None
        none = torch.empty(0, dtype=torch.long)
        repeated = [torch.cat((torch.as_tensor(prompt, dtype=torch.long), torch.tensor(out, dtype=torch.long)))
                    if p.repetition_penalty != 1 else none for p, prompt, out in zip(params, prompts, outputs)]
        counted = [out if p.frequency_penalty or p.presence_penalty else () for p, out in zip(params, outputs)]
        seen_rows = torch.repeat_interleave(torch.arange(len(repeated)), torch.tensor([h.numel() for h in repeated]))
        seen_tokens = torch.cat(repeated)
        output_rows, output_tokens, counts = token_pairs(counted, vocab_size)
        repetition, frequency, presence = (
            torch.tensor([getattr(p, name) for p in params], dtype=torch.float32)
            for name in ("repetition_penalty", "frequency_penalty", "presence_penalty"))
        # a penalty beyond float32's range (1e-300, 1e300) is held inside it, so 0 * penalty is never NaN
        repetition = repetition.clamp(FLOAT32_TINY, FLOAT32_MAX)
        return PenaltyBatch(
            seen_rows=seen_rows.to(device), seen_tokens=seen_tokens.to(device),
            repetition=repetition[seen_rows].to(device),
            output_rows=output_rows.to(device), output_tokens=output_tokens.to(device),
            frequency_times_count=(frequency[output_rows] * counts).to(device),
            presence=presence[output_rows].to(device),
        )


def apply_penalties(logits: torch.Tensor, batch: PenaltyBatch) -> torch.Tensor:
    """The penalized logits, a new tensor. logits: [B, V] float32. Returns [B, V]."""
    logits = logits.clone()
    seen = (batch.seen_rows, batch.seen_tokens)
    values = logits[seen]
    penalized = torch.where(values > 0, values / batch.repetition, values * batch.repetition)
    logits[seen] = penalized.clamp(-FLOAT32_MAX, FLOAT32_MAX)  # an extreme penalty saturates: never inf, never NaN
    output = (batch.output_rows, batch.output_tokens)
    logits[output] = logits[output] - batch.frequency_times_count - batch.presence
    return logits


def token_pairs(histories: Sequence[Sequence[int]], vocab_size: int) -> tuple[torch.Tensor, ...]:
    """The distinct (row, token) pairs of histories (one per row) and each pair's count.

    Returns rows [P] long, tokens [P] long and counts [P] float32, on the CPU, sorted by row then token.
    """
    lengths = torch.tensor([len(history) for history in histories], dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(histories)), lengths)
    tokens = torch.tensor([token for history in histories for token in history], dtype=torch.long)
    keys, counts = torch.unique(rows * vocab_size + tokens, return_counts=True)
    return keys // vocab_size, keys % vocab_size, counts.to(torch.float32)
