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


@dataclass(frozen=True)
class PenaltyBatch:
    """One step's penalties and token histories, for the rows of a batch."""

    repetition: torch.Tensor  # [B] float32: 1 = off
    frequency: torch.Tensor  # [B] float32: 0 = off
    presence: torch.Tensor  # [B] float32: 0 = off
    output_counts: torch.Tensor  # [B, V] float32: each token's count in the row's output so far
    seen: torch.Tensor  # [B, V] bool: the tokens of the row's prompt and output (for repetition)

    @staticmethod
    def from_rows(
        params: Sequence[SamplingParams],
        prompts: Sequence[Sequence[int]],
        outputs: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device,
    ) -> "PenaltyBatch | None":
        """The batch's penalties, or None when no row has one (nothing to apply).

        params, prompts, outputs: one entry per row; ids < vocab_size. Only the histories of
        penalized rows are read.
        """
        if not any(p.penalized for p in params):
            return None
        counted = [out if p.frequency_penalty or p.presence_penalty else () for p, out in zip(params, outputs)]
        repeated = [(*prompt, *out) if p.repetition_penalty != 1 else ()
                    for p, prompt, out in zip(params, prompts, outputs)]
        return PenaltyBatch(
            repetition=_per_row([p.repetition_penalty for p in params], device),
            frequency=_per_row([p.frequency_penalty for p in params], device),
            presence=_per_row([p.presence_penalty for p in params], device),
            output_counts=token_counts(counted, vocab_size, device),
            seen=token_counts(repeated, vocab_size, device) > 0,
        )


def apply_penalties(logits: torch.Tensor, batch: PenaltyBatch) -> torch.Tensor:
    """The penalized logits, a new tensor. logits: [B, V] float32. Returns [B, V]."""
    repetition = torch.where(batch.seen, batch.repetition[:, None], 1.0)  # [B, V]
    logits = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = logits - batch.frequency[:, None] * batch.output_counts
    return logits - batch.presence[:, None] * (batch.output_counts > 0)


def token_counts(histories: Sequence[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """counts[i, t] = how many times token t occurs in histories[i]. Returns [len(histories), V] float32."""
    counts = torch.zeros(len(histories), vocab_size, dtype=torch.float32, device=device)
    lengths = torch.tensor([len(history) for history in histories], dtype=torch.long)
    if int(lengths.sum()) == 0:
        return counts
    rows = torch.repeat_interleave(torch.arange(len(histories)), lengths).to(device)
    ids = torch.tensor([token for history in histories for token in history], dtype=torch.long, device=device)
    return counts.index_put_((rows, ids), torch.ones_like(ids, dtype=torch.float32), accumulate=True)


def _per_row(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)
