"""Log probabilities of a prompt's own tokens (vLLM's `prompt_logprobs`): scoring a text with an adapter.

A left-padded prefill of width S holds a prompt of L tokens at positions S-L .. S-1, and the
logits at position p predict the token at p+1; so prompt token i >= 1 has log probability
log_softmax(logits[S-L+i-1])[prompt[i]]. The first token has none: nothing precedes it.
"""

from __future__ import annotations

from typing import Sequence

import torch

from flora_core.request_output import TokenLogprob
from flora_core.sampler import token_logprobs


def prompt_logprobs(logits: torch.Tensor, prompt_ids: Sequence[int], k: int) -> tuple[TokenLogprob | None, ...]:
    """Each prompt token's log probability and the k most likely alternatives at its position.

    logits: [S, V], one row of a left-padded prefill with every position kept; prompt_ids: the
    row's L <= S tokens; k: alternatives per token. Returns L entries, the first None.
    """
    width, length = logits.shape[0], len(prompt_ids)
    predicting = logits[width - length : width - 1].float()  # [L-1, V]
    targets = torch.tensor(prompt_ids[1:], dtype=torch.long, device=logits.device)  # [L-1]
    chosen, top_values, top_ids = token_logprobs(predicting, targets, k)
    # vLLM's rank: how many tokens are at least as likely (log_softmax keeps each row's order of logits)
    ranks = (predicting >= predicting.gather(1, targets[:, None])).sum(dim=1)  # [L-1]
    entries = [TokenLogprob(token_id=token, logprob=logprob, top=tuple(zip(ids, values)), rank=rank)
               for token, logprob, ids, values, rank in zip(prompt_ids[1:], chosen.tolist(), top_ids.tolist(),
                                                            top_values.tolist(), ranks.tolist())]
    return (None, *entries)
