"""What the engine hands back: one `RequestOutput` per request per step that changed it, and stats.

Snapshots: every field is immutable and nothing changes after an output is returned. Each
output carries the increment of its step (`delta_*`) and the whole request so far, so a
streaming consumer uses the deltas and a blocking one keeps the last output only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Sequence

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log probability under the model (given the tokens before it), and the most likely alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first; as many as the params ask
    rank: int | None = None  # the token's place in the vocabulary by logprob, 1 = most likely (prompt tokens only)


@dataclass(frozen=True)
class Usage:
    """Token counts, as OpenAI's `usage` object."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class RequestTimings:
    """Seconds (time.perf_counter) measured by the engine for one request."""

    time_to_first_token: float | None  # from add_request to its first token; None before it
    inter_token_latencies: tuple[float, ...]  # between consecutive generated tokens
    queued: float | None  # from add_request to admission into the running batch; None while waiting


@dataclass(frozen=True)
class RequestOutput:
    """The state of one request after a step; `finished` marks its last output."""

    request_id: str
    adapter: str | None
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]  # every generated token so far (a stop token id included)
    text: str  # released so far: whole characters (a split one only at the end, as U+FFFD), no stop string
    logprobs: tuple[TokenLogprob, ...] | None  # one per generated token; None unless asked for
    delta_token_ids: tuple[int, ...]  # this step's new tokens
    delta_text: str  # this step's new text: concatenating every delta_text gives text
    delta_logprobs: tuple[TokenLogprob, ...] | None
    finished: bool
    finish_reason: FinishReason | None  # None until finished
    stop_reason: str | int | None  # the stop string or token id that ended it, if one did
    usage: Usage
    timings: RequestTimings
    error: BaseException | None = None  # set with finish_reason "error" (e.g. an adapter that failed to load)
    # One per prompt token, the first None (nothing precedes it); None unless asked for
    # (SamplingParams.prompt_logprobs). Set from the output of the request's first token on.
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


@dataclass(frozen=True)
class EngineStats:
    """The engine's occupancy now, and its counters since it was built."""

    running: int  # requests with a row in the running batch
    waiting: int  # requests added but not admitted (their adapter loading, or no room yet)
    loading_adapters: int  # adapter reads in flight on the loader thread
    finished: int  # requests that ended with "stop" or "length"
    aborted: int  # requests aborted (by abort(), or a cancelled stream)
    failed: int  # requests that ended with "error"
    kv_tokens: int  # rows x columns of the running batch's KV cache, left padding included
    pinned_adapters: int  # distinct adapters pinned in the pool (AdapterPool.stats().pinned)


def merge_outputs(outputs: Sequence[RequestOutput]) -> RequestOutput:
    """One output standing for consecutive outputs of one request (a stream that fell behind).

    The result is the last output (its whole-request state, `finished` and timings) with the
    deltas of all of them joined, so a consumer of deltas sees the same text, token ids and
    logprobs as it would have from each output in turn.
    """
    if not outputs:
        raise ValueError("merge_outputs needs at least one output")
    last = outputs[-1]
    if len(outputs) == 1:
        return last
    if any(o.request_id != last.request_id for o in outputs):
        raise ValueError("merge_outputs takes outputs of one request; group them by request_id first")
    logprobs = None
    if last.delta_logprobs is not None:
        logprobs = tuple(item for o in outputs for item in (o.delta_logprobs or ()))
    return replace(last, delta_token_ids=tuple(t for o in outputs for t in o.delta_token_ids),
                   delta_text="".join(o.delta_text for o in outputs), delta_logprobs=logprobs)


def as_whole_answer(output: RequestOutput) -> RequestOutput:
    """`output` with everything so far as its deltas: what merge_outputs of the request's every output up to
    it gives, for a consumer that takes only the finished answer (no earlier output is kept to join)."""
    return replace(output, delta_token_ids=output.token_ids, delta_text=output.text, delta_logprobs=output.logprobs)
