"""One request's progress inside the engine: its tokens, text, stop checks, pin and timings.

Owned by the thread that runs `Engine.step`; what leaves it is a `RequestOutput` snapshot.
The end-of-generation rules, as OpenAI's completions:
- a stop token (the model's EOS unless ignore_eos, or one of stop_token_ids) ends with "stop";
  the token stays in token_ids and adds no text;
- a stop string ends with "stop"; the text ends right before it;
- max_tokens reached ends with "length" (a stop string completed by the same token wins);
- a structured output ends with "stop" when its grammar is complete (even with ignore_eos).
"""

from __future__ import annotations

import functools
import time
from typing import Collection

import torch

from flora_core.adapter_batch import AdapterSlot
from flora_core.detokenizer import IncrementalDetokenizer, StopStringMatcher, TextCodec
from flora_core.request_output import FinishReason, RequestOutput, RequestTimings, TokenLogprob, Usage
from flora_core.sampling_params import SamplingParams
from flora_core.structured_output import GrammarDeadEnd, GrammarMatcher


class RequestState:
    """A request from add_request to its last output; see the module docstring."""

    def __init__(
        self,
        request_id: str,
        adapter: str | None,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        codec: TextCodec | None,
        eos_token_ids: Collection[int],
        generator: torch.Generator | None,
    ) -> None:
        self.request_id = request_id
        self.adapter = adapter
        self.prompt_ids = tuple(prompt_ids)
        self.params = params
        self.generator = generator  # None for greedy requests
        self.slot: AdapterSlot | None = None  # set at admission; the pool pin is held while `pinned`
        self.pinned = False
        self.grammar: GrammarMatcher | None = None  # set by add_request for a structured output
        self.output_ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = None if params.logprobs is None else []
        self.prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # set by the prefill that asked
        self.text = ""
        self.finish_reason: FinishReason | None = None
        self.stop_reason: str | int | None = None
        self.error: BaseException | None = None
        eos = frozenset() if params.ignore_eos else frozenset(eos_token_ids)
        self.stop_ids = frozenset(params.stop_token_ids) | eos  # tokens that end it (banned before min_tokens)
        self._detokenizer = None if codec is None else IncrementalDetokenizer(codec, prompt_ids)
        self._stops = StopStringMatcher(params.stop)
        self.arrival = time.perf_counter()
        self.admitted_at: float | None = None
        self._token_times: list[float] = []

    @functools.cached_property
    def prompt_tensor(self) -> torch.Tensor:
        """[P] long, CPU: the prompt's ids, made once (the repetition penalty reads them every step)."""
        return torch.tensor(self.prompt_ids, dtype=torch.long)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token_id: int, logprob: TokenLogprob | None) -> RequestOutput:
        """Record one generated token, apply the stop rules; returns this step's output."""
        assert not self.finished, f"request {self.request_id} got a token after it finished"
        try:
            grammar_complete = self.grammar is not None and self.grammar.accept(token_id)
        except GrammarDeadEnd as error:
            return self.fail(error)
        self.output_ids.append(token_id)
        self._token_times.append(time.perf_counter())
        if self.logprobs is not None:
            self.logprobs.append(logprob)
        if token_id in self.stop_ids or grammar_complete:
            self._finish("stop", token_id if token_id in self.params.stop_token_ids else None)
            delta = self._release(self._flush(), final=True)
        else:
            delta = self._release(self._decode(token_id), final=False)
            if not self.finished and len(self.output_ids) >= self.params.max_tokens:
                self._finish("length", None)
                delta += self._release(self._flush(), final=True)
        self.text += delta
        return self.output((token_id,), delta, None if logprob is None else (logprob,))

    def abort(self) -> RequestOutput:
        self._finish("abort", None)
        return self.output((), "", None)

    def fail(self, error: BaseException) -> RequestOutput:
        self._finish("error", None)
        self.error = error
        return self.output((), "", None)

    def output(
        self, delta_ids: tuple[int, ...], delta_text: str, delta_logprobs: tuple[TokenLogprob, ...] | None
    ) -> RequestOutput:
        wants_logprobs = self.logprobs is not None
        return RequestOutput(
            request_id=self.request_id,
            adapter=self.adapter,
            prompt_token_ids=self.prompt_ids,
            token_ids=tuple(self.output_ids),
            text=self.text,
            logprobs=tuple(self.logprobs) if wants_logprobs else None,
            delta_token_ids=delta_ids,
            delta_text=delta_text,
            delta_logprobs=(delta_logprobs or ()) if wants_logprobs else None,
            finished=self.finished,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            usage=Usage(prompt_tokens=len(self.prompt_ids), completion_tokens=len(self.output_ids)),
            timings=self._timings(),
            error=self.error,
            prompt_logprobs=self.prompt_logprobs,
        )

    def _finish(self, reason: FinishReason, stop_reason: str | int | None) -> None:
        self.finish_reason, self.stop_reason = reason, stop_reason

    def _decode(self, token_id: int) -> str:
        return "" if self._detokenizer is None else self._detokenizer.add(token_id)

    def _flush(self) -> str:
        return "" if self._detokenizer is None else self._detokenizer.flush()

    def _release(self, new_text: str, *, final: bool) -> str:
        """Pass new text through the stop strings; at the end, release what they held back."""
        released, stop = self._stops.feed(new_text)
        if stop is not None:
            self._finish("stop", stop)
        elif final:
            released += self._stops.finish()
        return released

    def _timings(self) -> RequestTimings:
        times = self._token_times
        return RequestTimings(
            time_to_first_token=times[0] - self.arrival if times else None,
            inter_token_latencies=tuple(later - earlier for earlier, later in zip(times, times[1:])),
            queued=None if self.admitted_at is None else self.admitted_at - self.arrival,
        )
