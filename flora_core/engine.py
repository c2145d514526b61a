"""The generation engine: continuous batching across adapters, one step at a time.

    engine = Engine(model, EngineConfig(max_model_len=2048), tokenizer=tokenizer)
    engine.add_request("Translate: ...", SamplingParams(max_tokens=64), adapter="fr-lora")
    while engine.has_unfinished():
        for output in engine.step(): ...

A step: take new requests and aborts; admit waiting requests whose adapter is in host memory
(pinning it in a device slot); decode one token for every running row in one forward pass;
prefill the admitted prompts as one left-padded batch, each row with its own adapter (prompts
that ask for prompt_logprobs in a second batch, which keeps every position's logits); retire
finished rows (unpinning their adapters) and concatenate the prefilled rows into the running
batch (`running_batch`). Adapters mix freely in every forward pass (`model.adapter_scope`).

Why a loop of our own and not transformers' continuous batching (`generation/continuous_batching`,
`ContinuousBatchingManager`, read in 5.23): it packs every request of a step into one ragged
[1, T] row over a paged cache, which our per-row AdapterBatch could describe, but
- its scheduler and model runner are private, change between releases, and run the forward
  pass inside their own thread: handing each step's per-request adapter slots to the forward
  pass would mean reading private state (`requests_in_batch`, `query_length`) from a hook;
- it swaps the model's attention for a paged implementation (`switch_to_cb_friendly_attn`),
  so our outputs would no longer come from the attention that `generate()` and our
  references use;
- sampling is one `do_sample` for the whole manager with the global RNG (no per-request
  seed), logprobs are the chosen token's only, and there are no stop strings or text at all;
- admission knows nothing of adapters: no waiting for a disk read or for a free slot of a
  kind, and no pin held from admission to retirement.
TGI's CausalLMBatch design (left-padded DynamicCache, concatenate and filter) gives all of
that in a few hundred lines of plain PyTorch with the stock attention: one decode pass for
all running rows per step, plus one prefill pass when requests join. Its costs: padding (rows
of very different lengths waste attention work and cache memory, which a paged cache avoids)
and copies of the cache when rows join or leave.
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import DynamicCache

from flora_core.adapter_loader import AdapterLoader
from flora_core.adapter_pool import PoolExhaustedError, UnknownAdapterError
from flora_core.cache_argument import cache_kwargs
from flora_core.detokenizer import TextCodec
from flora_core.multi_adapter_model import MultiAdapterModel
from flora_core.penalties import PenaltyBatch
from flora_core.prompt_logprobs import prompt_logprobs
from flora_core.request_output import EngineStats, RequestOutput, TokenLogprob
from flora_core.request_state import RequestState
from flora_core.request_validation import (
    check_full_attention, check_max_model_len, check_request, eos_token_ids, prompt_token_ids,
)
from flora_core.running_batch import RunningBatch, advance, after_prefill, decode_inputs, prefill_inputs, regroup
from flora_core.sampler import SamplingBatch, next_tokens, token_logprobs
from flora_core.sampling_params import SamplingParams
from flora_core.structured_output import GrammarCompiler, StructuredOutput
from flora_core.token_bias import TokenBiasBatch


@dataclass(frozen=True)
class EngineConfig:
    """Limits of one engine.

    max_model_len: prompt + generated tokens of one request, at most.
    max_running: requests decoding at once (rows of the running batch).
    max_batched_tokens: prefill budget per step, counted as rows x longest prompt (padding
        included); at least max_model_len, so that every valid prompt fits in one step.
    max_adapters_per_step: distinct adapters (the base model counting as one) the running
        batch may hold at once; None: unlimited. 1 runs one adapter at a time, as a server
        that multiplexes adapters per batch would (Ray Serve's model multiplexing): a baseline.
    """

    max_model_len: int = 2048
    max_running: int = 64
    max_batched_tokens: int = 8192
    max_adapters_per_step: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_model_len", "max_running", "max_batched_tokens", "max_adapters_per_step"):
            value = getattr(self, name)
            if value is None and name == "max_adapters_per_step":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineConfig.{name}={value!r}; pass an int >= 1")
        if self.max_batched_tokens < self.max_model_len:
            raise ValueError(
                f"EngineConfig.max_batched_tokens={self.max_batched_tokens} is below max_model_len="
                f"{self.max_model_len}, so a long prompt could never be prefilled; raise max_batched_tokens"
            )


class Engine:
    """Owns a MultiAdapterModel's forward passes, a running batch and its KV cache.

    `add_request`, `abort`, `stats` and `has_unfinished` may be called from any thread; `step`
    from one thread at a time (AsyncEngine's loop thread).
    """

    def __init__(self, model: MultiAdapterModel, config: EngineConfig = EngineConfig(), tokenizer=None) -> None:
        self._model = model
        self._config = config
        self._codec = None if tokenizer is None else TextCodec(tokenizer)
        text_config = model.model.config.get_text_config()
        self._vocab_size = text_config.vocab_size
        self._eos_ids = eos_token_ids(model.model, self._vocab_size)
        check_max_model_len(text_config, config.max_model_len)
        check_full_attention(text_config)
        self._lock = threading.Lock()  # guards the fields below up to _snapshot
        self._work = threading.Event()  # set whenever step() may have something new to do
        self._inbox: list[RequestState] = []
        self._abort_ids: set[str] = set()
        self._unfinished_ids: set[str] = set()
        self._counts: Counter[str] = Counter()  # finished, aborted, failed
        self._snapshot = (0, 0, 0)  # running, waiting, kv_tokens after the last step
        self._loader = AdapterLoader(model.pool, on_done=self._work.set)
        # Owned by the stepping thread: rows of the running batch, in batch order.
        self._waiting: list[RequestState] = []
        self._rows: list[RequestState] = []
        self._prefilling: list[RequestState] = []  # admitted this step, pinned, not yet in the batch
        self._step_outputs: list[RequestOutput] = []  # the running step's outputs so far (for fail_all)
        self._batch: RunningBatch | None = None
        self._next_input: torch.Tensor | None = None  # [rows] long: each row's last sampled token
        self._grammars: GrammarCompiler | None = None  # made by the first structured-output request

    # ----- any thread -----

    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        adapter: str | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a request; returns its id. ValueError (or UnknownAdapterError) if it cannot run."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params is a {type(params).__name__}; pass a SamplingParams")
        prompt_ids = prompt_token_ids(prompt, self._codec, self._vocab_size)
        check_request(prompt_ids, params, max_model_len=self._config.max_model_len, vocab_size=self._vocab_size,
                      has_tokenizer=self._codec is not None)
        if adapter is not None and not self._model.pool.is_registered(adapter):
            raise UnknownAdapterError(adapter)
        request_id = uuid.uuid4().hex if request_id is None else request_id
        state = RequestState(
            request_id, adapter, prompt_ids, params,
            codec=self._codec, eos_token_ids=self._eos_ids, generator=self._generator(params),
        )
        if params.structured_output is not None:
            state.grammar = self._grammar_compiler().matcher(params.structured_output)
        with self._lock:
            if request_id in self._unfinished_ids:
                raise ValueError(f"request_id {request_id!r} is already in use; pass a unique id, or None")
            self._unfinished_ids.add(request_id)
            self._inbox.append(state)
        self._work.set()
        return request_id

    def compile_grammar(self, spec: StructuredOutput) -> None:
        """Compile a structured output now (cached), e.g. on a worker thread before add_request:
        a large schema over a large vocabulary can take a second, which add_request would then not wait for."""
        self._grammar_compiler().compile(spec)

    def _grammar_compiler(self) -> GrammarCompiler:
        with self._lock:
            if self._grammars is None:
                if self._codec is None:
                    raise ValueError("SamplingParams.structured_output needs text, but the engine has no tokenizer; "
                                     "pass one to Engine(...)")
                self._grammars = GrammarCompiler(self._codec.tokenizer, self._vocab_size, self._eos_ids)
            return self._grammars

    def abort(self, request_id: str) -> bool:
        """Ask the next step to end this request ("abort"); False if it is unknown or already finished."""
        with self._lock:
            if request_id not in self._unfinished_ids:
                return False
            self._abort_ids.add(request_id)
        self._work.set()
        return True

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._unfinished_ids)

    def wake(self) -> None:
        """Make a pending or the next wait_for_work return at once."""
        self._work.set()

    def wait_for_work(self, timeout: float | None = None) -> bool:
        """Block until a request, an abort or a finished adapter read arrives (or timeout); clears the flag."""
        arrived = self._work.wait(timeout)
        self._work.clear()
        return arrived

    def stats(self) -> EngineStats:
        pinned = self._model.pool.stats().pinned
        with self._lock:
            running, waiting, kv_tokens = self._snapshot
            return EngineStats(
                running=running, waiting=waiting + len(self._inbox), loading_adapters=self._loader.in_flight(),
                finished=self._counts["finished"], aborted=self._counts["aborted"], failed=self._counts["failed"],
                kv_tokens=kv_tokens, pinned_adapters=pinned,
            )

    def close(self) -> list[RequestOutput]:
        """End every unfinished request ("abort"), unpinning its adapter, and stop the adapter loader
        thread; returns their last outputs. Call it where step() would be called, or once no step runs."""
        outputs = self._end_all(RequestState.abort)
        self._loader.close()
        return outputs

    # ----- the stepping thread -----

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one step; returns an output for every request that changed in it."""
        outputs: list[RequestOutput] = []
        self._step_outputs = outputs  # fail_all's, should this step raise: requests it already ended
        self._take_inbox(outputs)
        self._prefilling = self._admit(outputs)
        if self._batch is not None:
            outputs += self._decode()
        joining = []
        if self._prefilling:
            joining, prefill_outputs = self._prefill(self._prefilling)
            outputs += prefill_outputs
        self._regroup([(self._batch, self._rows, self._next_input), *joining])
        self._prefilling = []
        self._step_outputs = []
        self._finish_bookkeeping(outputs)
        return outputs

    def fail_all(self, error: BaseException) -> list[RequestOutput]:
        """End every request with finish_reason "error" (after a step raised); the engine starts empty.

        The outputs the failed step had already made come first: a request it aborted or finished (before
        the part that raised) gets its last output, and its id is freed, instead of a stream left waiting.
        """
        earlier, self._step_outputs = self._step_outputs, []
        return self._end_all(lambda state: state.fail(error), earlier)

    def _end_all(self, end: Callable[[RequestState], RequestOutput],
                 earlier: list[RequestOutput] = ()) -> list[RequestOutput]:
        """End every unfinished request with `end`, unpin every adapter, and empty the engine; returns
        `earlier` (outputs already made) followed by those ends."""
        with self._lock:
            self._waiting += self._inbox
            self._inbox, self._abort_ids = [], set()
        states = self._rows + self._prefilling + self._waiting
        outputs = [*earlier, *(end(state) for state in states if not state.finished)]
        for state in states:
            self._unpin(state)
        self._rows, self._prefilling, self._waiting, self._batch, self._next_input = [], [], [], None, None
        with self._lock:  # requests that finished in the failed step lost their last output: forget them too
            self._unfinished_ids.difference_update(state.request_id for state in states)
        self._finish_bookkeeping(outputs)
        return outputs

    def _take_inbox(self, outputs: list[RequestOutput]) -> None:
        with self._lock:
            self._waiting += self._inbox
            self._inbox, aborts, self._abort_ids = [], self._abort_ids, set()
        if not aborts:
            return
        for state in self._waiting + self._rows:
            if state.request_id in aborts and not state.finished:
                outputs.append(state.abort())
        self._waiting = [state for state in self._waiting if not state.finished]
        self._regroup([(self._batch, self._rows, self._next_input)])

    def _admit(self, outputs: list[RequestOutput]) -> list[RequestState]:
        """Waiting requests that fit this step, in arrival order, each with its adapter pinned.

        With max_adapters_per_step set, a request whose adapter is not among the running (and
        just admitted) rows' adapters waits once that many distinct adapters are running.
        """
        admitted: list[RequestState] = []
        waiting: list[RequestState] = []
        width = 0  # longest admitted prompt: the prefill batch is admitted x width tokens
        resident = self._model.pool.resident()
        adapters = {state.adapter for state in self._rows}  # None (the base model) counts as one
        max_adapters = self._config.max_adapters_per_step
        for state in self._waiting:
            new_width = max(width, len(state.prompt_ids))
            fits = (len(self._rows) + len(admitted) < self._config.max_running
                    and (len(admitted) + 1) * new_width <= self._config.max_batched_tokens
                    and (max_adapters is None or state.adapter in adapters or len(adapters) < max_adapters))
            try:
                if fits and self._pin(state, resident):
                    admitted.append(state)
                    adapters.add(state.adapter)
                    width = new_width
                    continue
            except Exception as error:  # an adapter that failed to read or load fails its request only
                outputs.append(state.fail(error))
                continue
            waiting.append(state)
        self._waiting = waiting
        return admitted

    def _pin(self, state: RequestState, resident: dict) -> bool:
        """Pin the request's adapter in a device slot; False while its read runs or its kind is full."""
        name = state.adapter
        if name is not None:
            if name not in resident and not self._model.pool.in_host_memory(name) and not self._loader.ready(name):
                return False
            try:
                state.slot = self._model.pool.acquire([name])[0]
            except PoolExhaustedError:  # every slot of its kind is pinned: wait for a retirement
                return False
            state.pinned = True
            self._loader.discard(name)
        state.admitted_at = time.perf_counter()
        return True

    def _unpin(self, state: RequestState) -> None:
        if state.pinned:
            self._model.pool.release([state.adapter])
            state.pinned = False

    def _decode(self) -> list[RequestOutput]:
        """One token for every running row, in one forward pass."""
        inputs = decode_inputs(self._batch, self._next_input)
        with self._model.adapter_scope([state.slot for state in self._rows], 1):
            logits = self._model.model(**inputs, **cache_kwargs(self._model.model, self._batch.cache),
                                       use_cache=True).logits[:, -1]
        self._batch = advance(self._batch)
        self._next_input, outputs = self._sample(self._rows, logits)
        return outputs

    def _prefill(self, states: list[RequestState]) -> tuple[list[tuple], list[RequestOutput]]:
        """The admitted prompts, prefilled: a (batch, rows, next input) to join per pass, and first tokens.

        Prompts that ask for prompt_logprobs prefill in a pass of their own, which keeps the logits
        of every position ([rows, S, V]); the others keep the last position's only.
        """
        joining, outputs = [], []
        for every_position in (False, True):
            group = [state for state in states if (state.params.prompt_logprobs is not None) == every_position]
            if group:
                prefilled, group_outputs = self._prefill_pass(group, every_position)
                joining.append(prefilled)
                outputs += group_outputs
        return joining, outputs

    def _prefill_pass(self, states: list[RequestState], every_position: bool) -> tuple[tuple, list[RequestOutput]]:
        """The prompts of `states` as one left-padded batch: (batch, rows, next input) and first tokens."""
        inputs = prefill_inputs([state.prompt_ids for state in states], self._model.device)
        cache = DynamicCache()
        with self._model.adapter_scope([state.slot for state in states], inputs.input_ids.shape[1]):
            logits = self._model.model(
                input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids,
                **cache_kwargs(self._model.model, cache), use_cache=True, logits_to_keep=0 if every_position else 1,
            ).logits  # [rows, S or 1, V]
        if every_position:
            for row, state in enumerate(states):
                state.prompt_logprobs = prompt_logprobs(logits[row], state.prompt_ids, state.params.prompt_logprobs)
        tokens, outputs = self._sample(states, logits[:, -1])
        return (after_prefill(cache, inputs), states, tokens), outputs

    def _sample(self, states: list[RequestState], logits: torch.Tensor) -> tuple[torch.Tensor, list[RequestOutput]]:
        """Pick each row's token ([rows] long) and record it in its request."""
        logits = logits.float()
        params = [state.params for state in states]
        token_bias = TokenBiasBatch.from_rows(params, [state.stop_ids for state in states],
                                              [len(state.output_ids) for state in states], logits.device)
        penalties = PenaltyBatch.from_rows(params, [state.prompt_tensor for state in states],
                                           [state.output_ids for state in states], logits.shape[1], logits.device)
        batch = SamplingBatch.from_params(params, [state.generator for state in states], logits.device, token_bias,
                                          penalties)
        allowed = logits if self._grammars is None else self._grammars.mask(logits, [s.grammar for s in states])
        tokens = next_tokens(allowed, batch)
        logprobs = _logprobs(states, logits, tokens)
        outputs = [state.append(token, logprobs.get(row)) for row, (state, token) in
                   enumerate(zip(states, tokens.tolist()))]
        return tokens, outputs

    def _regroup(self, parts: list[tuple[RunningBatch | None, list[RequestState], torch.Tensor | None]]) -> None:
        """Make the running batch of the unfinished rows of `parts`, each a (batch, rows, next input):
        the running batch first, then those prefilled this step. Finished rows' adapters are unpinned;
        the cache is copied (once) only where a row leaves or joins."""
        parts = [part for part in parts if part[0] is not None]
        keeps = []
        for _, rows, _ in parts:
            for state in rows:
                if state.finished:
                    self._unpin(state)
            keeps.append([i for i, state in enumerate(rows) if not state.finished])
        if len(parts) == 1 and len(keeps[0]) == len(parts[0][1]):  # no row leaves, none joins
            self._batch, self._rows, self._next_input = parts[0]
            return
        self._batch = regroup([(batch, keep) for (batch, _, _), keep in zip(parts, keeps, strict=True)])
        self._rows = [rows[i] for (_, rows, _), keep in zip(parts, keeps, strict=True) for i in keep]
        self._next_input = None if self._batch is None else torch.cat([
            next_input.index_select(0, torch.tensor(keep, dtype=torch.long, device=next_input.device))
            for (_, _, next_input), keep in zip(parts, keeps, strict=True)])

    def _finish_bookkeeping(self, outputs: list[RequestOutput]) -> None:
        """Count the requests that ended, forget their ids, and publish the occupancy."""
        with self._lock:
            for output in outputs:
                if output.finished:
                    self._unfinished_ids.discard(output.request_id)
                    self._abort_ids.discard(output.request_id)  # an abort that came as it ended: not its id's next use
                    self._counts[{"abort": "aborted", "error": "failed"}.get(output.finish_reason, "finished")] += 1
            kv_tokens = 0 if self._batch is None else self._batch.kv_tokens
            self._snapshot = (len(self._rows), len(self._waiting), kv_tokens)

    def _generator(self, params: SamplingParams) -> torch.Generator | None:
        if params.greedy:
            return None
        seed = secrets.randbits(63) if params.seed is None else params.seed
        return torch.Generator(device=self._model.device).manual_seed(seed)


def _logprobs(states: list[RequestState], logits: torch.Tensor, tokens: torch.Tensor) -> dict[int, TokenLogprob]:
    """Row index -> the chosen token's logprob and top alternatives, for the rows that asked."""
    rows = [i for i, state in enumerate(states) if state.params.logprobs is not None]
    if not rows:
        return {}
    k = max(states[i].params.logprobs for i in rows)
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    chosen, top_values, top_ids = token_logprobs(logits[index], tokens[index], k)
    chosen, top_values, top_ids = chosen.tolist(), top_values.tolist(), top_ids.tolist()
    token_ids = tokens[index].tolist()
    result = {}
    for j, row in enumerate(rows):
        wanted = states[row].params.logprobs
        top = tuple(zip(top_ids[j][:wanted], top_values[j][:wanted]))
        result[row] = TokenLogprob(token_id=token_ids[j], logprob=chosen[j], top=top)
    return result
