"""What one completion request asks of the engine: OpenAI's completions parameters, validated once.

    params = SamplingParams(max_tokens=32, temperature=0.7, top_p=0.9, seed=42, stop=["\\n\\n"])
    params = SamplingParams(max_tokens=32, frequency_penalty=0.5, repetition_penalty=1.2)

The prompt travels beside the parameters (`Engine.add_request(prompt, params, adapter=...)`), as
in vLLM: it is checked against the model's vocabulary and the engine's limits there. `n > 1`
is one level up (n requests, seeds seed, seed + 1, ...), and so is `echo` (the router returns the
prompt, with `prompt_logprobs` as its log probabilities).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from flora_core.structured_output import StructuredOutput

MAX_LOGPROBS = 20  # most alternatives per generated token, as OpenAI's chat API allows
# Below this temperature sampling is greedy: logits / t would overflow float32 to inf and the
# softmax to NaN (vLLM uses the same threshold).
MIN_SAMPLING_TEMPERATURE = 1e-5
MAX_INT64 = 2**63 - 1  # seeds and top_k must fit a torch int64
MAX_PRESENCE_OR_FREQUENCY_PENALTY = 2.0  # OpenAI's range for both is [-2, 2]
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a bias is [-100, 100]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    max_tokens: tokens to generate at most (finish_reason "length" when reached).
    temperature: 0 picks the most likely token (greedy); above 0 samples from softmax(logits / t).
        Temperatures below MIN_SAMPLING_TEMPERATURE are greedy too.
    top_p: sample only from the smallest set of tokens whose probability adds up to top_p, in (0, 1].
    top_k: sample only from the k most likely tokens; 0 or -1 turns it off (stored as 0).
    seed: seeds this request's own generator, so its samples do not depend on its batch.
    stop: strings that end generation; the matched string is not part of the text.
    stop_token_ids: token ids that end generation (the token is kept in token_ids, not in text).
    ignore_eos: keep generating past the model's end-of-sequence token.
    logprobs: also return, per generated token, its log probability and the top `logprobs`
        alternatives (0: the chosen token's only); None: no log probabilities.
    prompt_logprobs: also return, per prompt token after the first, its log probability given
        the tokens before it and the top `prompt_logprobs` alternatives (scoring a text, as
        vLLM's prompt_logprobs); None: not computed. Such prompts prefill in a pass of their own
        that keeps the logits of every position.
    presence_penalty: OpenAI's, in [-2, 2]: subtracted once from the logit of every token the
        output has so far; 0 turns it off.
    frequency_penalty: OpenAI's, in [-2, 2]: subtracted from a token's logit once per time the
        output has it so far; 0 turns it off.
    repetition_penalty: transformers' and vLLM's, > 0: the logit of a token in the prompt or the
        output so far is divided by it when positive and multiplied by it otherwise; 1 turns it off.
    The penalties apply before temperature, top-k and top-p, to greedy requests too (as vLLM);
    logprobs stay the model's own (flora_core/penalties.py).
    logit_bias: OpenAI's, {token id: bias in [-100, 100]} added to those logits before the
        penalties (-100 all but bans a token, 100 all but forces it); stored as sorted pairs.
    min_tokens: vLLM's: the stop tokens (EOS unless ignore_eos, and stop_token_ids) cannot be
        generated before this many tokens; stop strings still end generation. At most max_tokens.
    min_p: vLLM's and transformers': sample only tokens whose probability is at least min_p times
        the most likely token's (after temperature, top-k and top-p), in [0, 1]; 0 turns it off.
    structured_output: the output must match this JSON schema, regex, choice or any JSON
        (flora_core/structured_output.py; needs the engine's tokenizer); None: free text.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    min_p: float = 0.0
    structured_output: StructuredOutput | None = None

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, 1, math.inf, "pass max_tokens >= 1")
        _check_float("temperature", self.temperature, 0, math.inf, "pass a temperature >= 0 (0 is greedy)")
        _check_float("top_p", self.top_p, 0, 1, "pass top_p in (0, 1]; 1 turns it off", above_low=True)
        _check_int("top_k", self.top_k, -1, MAX_INT64, "pass top_k in [1, 2**63), or 0 / -1 to turn it off (any k "
                   ">= the vocabulary size keeps every token)")
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, MAX_INT64, "pass an int seed in [0, 2**63), or None")
        object.__setattr__(self, "stop", _stop_strings(self.stop))
        object.__setattr__(self, "stop_token_ids", _stop_token_ids(self.stop_token_ids))
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"SamplingParams.ignore_eos={self.ignore_eos!r}; pass True or False")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 0, MAX_LOGPROBS, f"pass {name} in [0, {MAX_LOGPROBS}], or None")
        for name in ("presence_penalty", "frequency_penalty"):
            bound = MAX_PRESENCE_OR_FREQUENCY_PENALTY
            _check_float(name, getattr(self, name), -bound, bound, f"pass {name} in [-2, 2]; 0 turns it off")
        _check_float("repetition_penalty", self.repetition_penalty, 0, math.inf, "pass repetition_penalty > 0 (above "
                     "1 discourages repeats, below 1 encourages them); 1 turns it off", above_low=True)
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        _check_int("min_tokens", self.min_tokens, 0, self.max_tokens, "pass min_tokens in [0, max_tokens]")
        _check_float("min_p", self.min_p, 0, 1, "pass min_p in [0, 1]; 0 turns it off")
        if self.structured_output is not None:
            if not isinstance(self.structured_output, StructuredOutput):
                raise ValueError(f"SamplingParams.structured_output is a {type(self.structured_output).__name__}; "
                                 "pass a StructuredOutput (json_object(), json_schema(), regex() or choice())")
            if self.min_tokens:
                raise ValueError("SamplingParams.min_tokens cannot be combined with a structured_output, whose "
                                 "grammar decides where the output ends; leave min_tokens at 0")

    @property
    def penalized(self) -> bool:
        """Whether any of the three penalties is on."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_SAMPLING_TEMPERATURE


def _check_int(name: str, value: object, low: float, high: float, fix: str) -> None:
    """value is an int (not a bool) in [low, high]; else a ValueError naming the field and the fix."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"SamplingParams.{name}={value!r}; {fix}")


def _check_float(name: str, value: object, low: float, high: float, fix: str, *, above_low: bool = False) -> None:
    """value is a finite number in [low, high] ((low, high] with above_low); else a ValueError."""
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not low <= value <= high or (above_low and value == low)):
        raise ValueError(f"SamplingParams.{name}={value!r}; {fix}")


def _stop_strings(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    strings = (stop,) if isinstance(stop, str) else tuple(stop)
    for string in strings:
        if not isinstance(string, str) or not string:
            raise ValueError(f"SamplingParams.stop has {string!r}; pass non-empty strings, e.g. stop=['\\n']")
    return strings


def _logit_bias(bias: Mapping[int, float] | Sequence[tuple[int, float]] | None) -> tuple[tuple[int, float], ...]:
    """{token id: bias} or (token id, bias) pairs as sorted pairs, each checked."""
    pairs = () if bias is None else tuple(bias.items()) if isinstance(bias, Mapping) else tuple(bias)
    fix = "pass {token id: bias} with ids >= 0 and biases in [-100, 100]"
    for pair in pairs:
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise ValueError(f"SamplingParams.logit_bias has {pair!r}; {fix}")
        token_id, value = pair
        if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
            raise ValueError(f"SamplingParams.logit_bias has token id {token_id!r}; {fix}")
        _check_float(f"logit_bias[{token_id}]", value, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS, fix)
    if len({token_id for token_id, _ in pairs}) != len(pairs):
        raise ValueError(f"SamplingParams.logit_bias names a token id twice; {fix}")
    return tuple(sorted((token_id, float(value)) for token_id, value in pairs))


def _stop_token_ids(ids: Sequence[int] | None) -> tuple[int, ...]:
    ids = () if ids is None else tuple(ids)
    for token_id in ids:
        if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
            raise ValueError(f"SamplingParams.stop_token_ids has {token_id!r}; pass non-negative token ids")
    return ids
