"""logit_bias and min_tokens: per-row changes to the logits of the tokens they name.

Applied as vLLM applies them, to the raw logits before the penalties (flora_core/penalties.py):
- min_tokens: while a row has fewer outputs than its min_tokens, its stop tokens (EOS unless
  ignore_eos, and stop_token_ids) get -inf, so it cannot stop yet (transformers' min_new_tokens);
- logit_bias: each row's {token id: bias} is added to those logits (OpenAI's).
Only the named (row, token) entries are touched; a batch where no row asks costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Sequence

import torch

from flora_core.sampling_params import SamplingParams


@dataclass(frozen=True)
class TokenBiasBatch:
    """One step's banned and biased (row, token) entries."""

    banned_rows: torch.Tensor  # [N] long: rows still under their min_tokens ...
    banned_tokens: torch.Tensor  # [N] long: ... and their stop tokens
    bias_rows: torch.Tensor  # [M] long
    bias_tokens: torch.Tensor  # [M] long
    bias_values: torch.Tensor  # [M] float32

    @staticmethod
    def from_rows(
        params: Sequence[SamplingParams],
        stop_ids: Sequence[Collection[int]],
        output_lengths: Sequence[int],
        device: torch.device,
    ) -> "TokenBiasBatch | None":
        """The batch's entries, or None when no row has any. One entry per row in each argument."""
        banned = [(row, token) for row, (p, ids, length) in enumerate(zip(params, stop_ids, output_lengths))
                  if length < p.min_tokens for token in sorted(ids)]
        biased = [(row, token, value) for row, p in enumerate(params) for token, value in p.logit_bias]
        if not banned and not biased:
            return None
        banned_rows, banned_tokens = _rows_and_tokens(banned, device)
        bias_rows, bias_tokens = _rows_and_tokens([entry[:2] for entry in biased], device)
        return TokenBiasBatch(banned_rows=banned_rows, banned_tokens=banned_tokens, bias_rows=bias_rows,
                              bias_tokens=bias_tokens,
                              bias_values=torch.tensor([value for *_, value in biased], dtype=torch.float32,
                                                       device=device))


def apply_token_bias(logits: torch.Tensor, batch: TokenBiasBatch) -> torch.Tensor:
    """The logits with the banned entries at -inf and the biases added: a new tensor. logits: [B, V]."""
    logits = logits.index_put((batch.banned_rows, batch.banned_tokens),
                              torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device))
    biased = (batch.bias_rows, batch.bias_tokens)
    logits[biased] = logits[biased] + batch.bias_values
    return logits


def _rows_and_tokens(pairs: list[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) pairs as a rows tensor and a tokens tensor, [len(pairs)] long each."""
    table = torch.tensor(pairs, dtype=torch.long).reshape(len(pairs), 2).to(device)
    return table[:, 0], table[:, 1]
