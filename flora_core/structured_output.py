"""Structured output: each row's tokens held to its own grammar (any JSON, a JSON schema, a regex,
one of a list of strings), with xgrammar, the library vLLM uses by default.

    params = SamplingParams(max_tokens=64, structured_output=StructuredOutput.json_schema(schema))

A spec is checked when it is made (a bad schema or regex is a ValueError naming it). The engine
compiles it against the tokenizer's vocabulary once (`GrammarCompiler`, cached per spec); every
request gets its own matcher, which each step turns into the row's mask of allowed tokens and
then accepts the chosen token. Rows without a grammar are not masked, so they share batches
freely. The mask applies first, before logit_bias, the penalties and the warpers; logprobs stay
the model's own. JSON is generated without free whitespace (a weak model can otherwise emit
spaces until max_tokens): `{"a": 1, "b": [2, 3]}`.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch

Kind = Literal["json", "json_schema", "regex", "choice"]
MAX_SPEC_CHARS = 100_000  # a schema, regex or choice list this long is refused, not compiled
_NATIVE_PREFIX = re.compile(r"^\[[^\]]*\] \S+:\d+: (Check failed: .*? is false: )?")  # xgrammar's C++ location


@dataclass(frozen=True)
class StructuredOutput:
    """What a request's output must match. Build with json_object(), json_schema(), regex() or choice()."""

    kind: Kind
    spec: str = ""  # the schema as JSON text, the regex, or the choices as a JSON list; "" for any JSON

    def __post_init__(self) -> None:
        if len(self.spec) > MAX_SPEC_CHARS:
            raise ValueError(f"SamplingParams.structured_output: the {self.kind} spec has {len(self.spec)} "
                             f"characters; at most {MAX_SPEC_CHARS}")
        self.grammar()  # parse now: a bad spec fails at the request, not in the engine

    @staticmethod
    def json_object() -> "StructuredOutput":
        return StructuredOutput("json")

    @staticmethod
    def json_schema(schema: dict[str, Any] | str) -> "StructuredOutput":
        return StructuredOutput("json_schema", schema if isinstance(schema, str) else json.dumps(schema))

    @staticmethod
    def regex(pattern: str) -> "StructuredOutput":
        return StructuredOutput("regex", pattern)

    @staticmethod
    def choice(options: Sequence[str]) -> "StructuredOutput":
        return StructuredOutput("choice", json.dumps(list(options)))

    def grammar(self):
        """The spec as an xgrammar Grammar (parsed once per spec, process-wide)."""
        return _parse(self.kind, self.spec)


@functools.lru_cache(maxsize=256)
def _parse(kind: Kind, spec: str):
    xgr = _xgrammar()
    try:
        if kind in ("json", "json_schema"):  # any JSON: an object, as OpenAI's json_object asks
            return xgr.Grammar.from_json_schema(spec or '{"type": "object"}', any_whitespace=False)
        if kind == "regex":
            return xgr.Grammar.from_regex(spec)
        options = json.loads(spec)
        if not options or not all(isinstance(option, str) and option for option in options):
            raise ValueError("choice needs a non-empty list of non-empty strings")
        return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(option) for option in options))
    except (RuntimeError, ValueError) as error:
        reason = _NATIVE_PREFIX.sub("", str(error).strip())
        raise ValueError(f"SamplingParams.structured_output: this {kind} cannot be used: {reason}") from None


def _xgrammar():
    try:
        import xgrammar  # noqa: PLC0415 - needed only by requests that ask for structured output
    except ImportError:
        raise ValueError("SamplingParams.structured_output needs the xgrammar package: pip install xgrammar") from None
    return xgrammar


class GrammarCompiler:
    """Compiles specs against one tokenizer and model vocabulary; makes each request's matcher."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        xgr = _xgrammar()
        self._xgr = xgr
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids) or None)
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)

    def compile(self, spec: StructuredOutput):
        """The spec compiled against the vocabulary (xgrammar caches it: a second call is cheap)."""
        return self._compiler.compile_grammar(spec.grammar())

    def matcher(self, spec: StructuredOutput) -> "GrammarMatcher":
        return GrammarMatcher(self._xgr.GrammarMatcher(self.compile(spec)))

    def mask(self, logits: torch.Tensor, matchers: Sequence["GrammarMatcher | None"]) -> torch.Tensor:
        """The logits with every token a row's grammar forbids at -inf; rows without a matcher unchanged.

        logits: [B, V] float; matchers: B entries. Returns logits itself when no row has a matcher.
        """
        rows = [row for row, matcher in enumerate(matchers) if matcher is not None]
        if not rows:
            return logits
        bitmask = self._xgr.allocate_token_bitmask(len(matchers), self.vocab_size)  # [B, ceil(V / 32)] int32
        for row in rows:
            matchers[row].fill(bitmask, row)
        # A row whose grammar allows no token of this vocabulary stays unmasked (a softmax over nothing
        # but -inf is NaN); the token it gets is refused by its matcher, which ends that request alone.
        rows = [row for row in rows if bool(bitmask[row].any())]
        masked = logits.clone()
        self._xgr.apply_token_bitmask_inplace(masked, bitmask.to(logits.device), indices=rows)
        return masked


class GrammarMatcher:
    """One request's place in its grammar."""

    def __init__(self, matcher) -> None:
        self._matcher = matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        """Advance by the chosen token; True once the grammar is complete (its stop token accepted).

        GrammarDeadEnd where the grammar refuses it: only when it allowed no token of the vocabulary.
        """
        if not self._matcher.accept_token(token_id):
            raise GrammarDeadEnd("the structured output cannot go on: its grammar allows no token of this model's "
                                 "vocabulary here (the vocabulary lacks a character it needs, such as '{' or '\"'); "
                                 "use a regex or choice this vocabulary can spell")
        return self._matcher.is_terminated()


class GrammarDeadEnd(ValueError):
    """A request's grammar allows no token of the vocabulary: that request ends with this error."""
