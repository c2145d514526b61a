"""Translate between OpenAI bodies and the engine: prompts and parameters in, choices and chunks out.

Pure functions over a tokenizer; the ingress calls them and does the I/O.
"""

from __future__ import annotations

import json
from typing import Optional, Sequence, Union

from jinja2 import TemplateError

from flora_core.request_output import RequestOutput, TokenLogprob
from flora_core.sampling_params import SamplingParams
from flora_core.structured_output import StructuredOutput
from router.errors import ApiError, bad_request, bad_value
from router.protocol import (
    ChatCompletionRequest,
    ChatLogprobs,
    ChatMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    PromptLogprobs,
    PromptTokenLogprob,
    SamplingFields,
    TopLogprob,
    Usage,
)


def prompt_chars_bound(tokenizer, max_model_len: int) -> int:
    """Characters a text prompt of at most max_model_len tokens can have: no token covers more
    characters than its vocabulary entry has (bytes, for byte-level vocabularies)."""
    longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
    return max_model_len * max(1, longest)


def _check_prompt_chars(chars: int, max_chars: int, param: str) -> None:
    """Refuse text too long for the context before tokenizing it (a huge text takes seconds to tokenize)."""
    if chars > max_chars:
        raise bad_request(f"{param} has {chars} characters; this server accepts at most {max_chars} (more could "
                          "not fit the model's context). Shorten it.", param)


def tokenize_prompt(tokenizer, prompt: Union[str, Sequence[int]], vocab_size: int, max_chars: int) -> list[int]:
    """Token ids of a text or token-id prompt; 400 for empty or too long prompts and ids outside the vocabulary."""
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("prompt is empty; send at least one character or token id", "prompt")
        return text_prompt_ids(tokenizer, prompt, max_chars, add_special_tokens=True)
    ids = list(prompt)
    if not ids:
        raise bad_request("prompt is an empty token list; send at least one token id", "prompt")
    check_token_ids(ids, vocab_size, "prompt")
    return ids


def chat_prompt_ids(tokenizer, messages: Sequence[ChatMessage], max_chars: int) -> list[int]:
    """The chat template applied to the messages, ready for generation; 400 if the model has none."""
    if not getattr(tokenizer, "chat_template", None):
        raise bad_request("this model's tokenizer has no chat template; use /v1/completions instead", "messages")
    _check_prompt_chars(sum(len(m.text) for m in messages), max_chars, "messages")
    messages = [{"role": m.role, "content": m.text} for m in messages]
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except TemplateError as error:  # a template's raise_exception (roles that must alternate, no system role)
        raise bad_request(f"the model's chat template refused these messages: {error}", "messages") from None
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    return list(ids)


def text_prompt_ids(tokenizer, prompt: str, max_chars: int, add_special_tokens: bool) -> list[int]:
    """Token ids of a text prompt for /tokenize; 400 if it is too long to tokenize."""
    _check_prompt_chars(len(prompt), max_chars, "prompt")
    return list(tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str) -> None:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise bad_request(f"{param} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}", param)


def sampling_params(body: SamplingFields, prompt_len: int, max_model_len: int, default_max_tokens: int,
                    logprobs: Optional[int], choice_index: int,
                    prompt_logprobs: Optional[int] = None) -> SamplingParams:
    """SamplingParams for one choice, with the context check; 400 naming the field otherwise.

    An echo-only completion (max_tokens 0) asks the engine for one token, which the answer leaves out.
    """
    max_tokens = body.max_tokens
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        max_tokens = body.max_completion_tokens
    if max_tokens is None:
        max_tokens = max(1, min(default_max_tokens, max_model_len - prompt_len))
    if max_tokens == 0:
        if not (isinstance(body, CompletionRequest) and body.echo_only):
            raise bad_request("max_tokens=0 generates nothing; pass max_tokens >= 1 (or, on /v1/completions, "
                              "echo=true with logprobs to get the prompt back, scored)", "max_tokens")
        max_tokens = 1
    if prompt_len + max_tokens > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens; the prompt has {prompt_len} and "
            f"max_tokens asks for {max_tokens}. Shorten the prompt or lower max_tokens.", "max_tokens")
    seed = None if body.seed is None else body.seed + choice_index  # n choices differ, each reproducible
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              top_k=body.top_k, seed=seed, stop=tuple(body.stop_strings()),
                              stop_token_ids=tuple(body.stop_token_ids or ()), logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs, ignore_eos=body.ignore_eos,
                              presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                              repetition_penalty=body.repetition_penalty, logit_bias=body.logit_bias,
                              min_tokens=body.min_tokens, min_p=body.min_p,
                              structured_output=structured_output(body))
    except ValueError as error:
        raise bad_value(error) from error


def structured_output(body: SamplingFields) -> Optional[StructuredOutput]:
    """The one structured output a body asks for (response_format or vLLM's guided_*), or None; 400s name the field."""
    asked = {field: value for field, value in (
        ("response_format", None if body.response_format is None or body.response_format.type == "text"
         else body.response_format),
        ("guided_json", body.guided_json), ("guided_regex", body.guided_regex),
        ("guided_choice", body.guided_choice)) if value is not None}
    if len(asked) > 1:
        raise bad_request(f"{' and '.join(asked)} both constrain the output; pass only one", list(asked)[1])
    if not asked:
        return None
    (field, value), = asked.items()
    try:
        if field == "response_format":
            if value.type == "json_object":
                return StructuredOutput.json_object()
            if value.json_schema is None:
                raise ValueError("response_format of type json_schema needs json_schema: {name, schema}")
            return StructuredOutput.json_schema(value.json_schema.schema_)
        if field == "guided_json":
            return StructuredOutput.json_schema(value)
        return StructuredOutput.regex(value) if field == "guided_regex" else StructuredOutput.choice(value)
    except ValueError as error:
        raise bad_request(str(error).removeprefix("SamplingParams.structured_output: "), field) from error


def check_counts(n: int, prompts: int, limit: int) -> None:
    if prompts < 1:
        raise bad_request("prompt is an empty list; send at least one prompt", "prompt")
    if n < 1:
        raise bad_request(f"n={n}; pass n >= 1", "n")
    if n * prompts > limit:
        raise bad_request(f"n x prompts = {n * prompts} completions in one request; the limit is {limit}", "n")


def prompt_logprobs_param(body: SamplingFields, echo_logprobs: Optional[int] = None) -> Optional[int]:
    """How many alternatives per prompt token the engine computes: vLLM's prompt_logprobs, and echo's logprobs
    (on completions), whichever is larger; None if neither asks. 400 for prompt_logprobs with stream."""
    if body.prompt_logprobs is not None and body.stream:
        raise bad_request("prompt_logprobs is not available with stream=true (as in vLLM); ask for the whole answer",
                          "prompt_logprobs")
    asked = [k for k in (body.prompt_logprobs, echo_logprobs) if k is not None]
    return max(asked) if asked else None


def vllm_prompt_logprobs(tokenizer, output: RequestOutput, k: int) -> PromptLogprobs:
    """vLLM's prompt_logprobs: per prompt token {token id: {logprob, rank, decoded_token}}, the prompt's own token
    first, then its k most likely alternatives (ranks 1..k); None for the first token, which nothing precedes."""
    result: PromptLogprobs = []
    for item in output.prompt_logprobs or ():
        if item is None:
            result.append(None)
            continue
        tokens = {item.token_id: PromptTokenLogprob(logprob=item.logprob, rank=item.rank,
                                                    decoded_token=tokenizer.decode([item.token_id]))}
        for rank, (token_id, logprob) in enumerate(item.top[:k], start=1):
            tokens.setdefault(token_id, PromptTokenLogprob(logprob=logprob, rank=rank,
                                                           decoded_token=tokenizer.decode([token_id])))
        result.append(tokens)
    return result


def completion_logprobs(tokenizer, entries: Sequence[tuple[int, Optional[TokenLogprob]]], k: int) -> CompletionLogprobs:
    """OpenAI's completion logprobs from (token id, its logprob) pairs, with k alternatives each; None for a
    prompt's first token."""
    result = CompletionLogprobs()
    offset = 0
    for token_id, item in entries:
        token = tokenizer.decode([token_id])
        result.tokens.append(token)
        result.token_logprobs.append(None if item is None else item.logprob)
        result.top_logprobs.append(None if item is None else {tokenizer.decode([t]): lp for t, lp in item.top[:k]})
        result.text_offset.append(offset)
        offset += len(token)
    return result


def completion_choice(tokenizer, index: int, output: RequestOutput, echo_text: Optional[str],
                      logprobs_k: Optional[int], delta: bool, echo_only: bool = False,
                      prompt_logprobs_k: Optional[int] = None) -> CompletionChoice:
    """A choice from an output: its whole text, or (delta=True) this step's increment.

    echo_text: the prompt, put before the completion (None: not echoed, or already sent in this
    stream); with logprobs, the prompt's tokens and their logprobs (the first None) come first.
    logprobs_k: the request's logprobs (alternatives per token), None for none.
    echo_only: the answer is the prompt alone (max_tokens 0); the engine's one token is left out.
    prompt_logprobs_k: vLLM's prompt_logprobs, None for none.
    """
    text = "" if echo_only else (output.delta_text if delta else output.text)
    logprobs = None
    if logprobs_k is not None:
        entries = []
        if echo_text is not None and output.prompt_logprobs is not None:
            entries += zip(output.prompt_token_ids, output.prompt_logprobs)
        if not echo_only:
            entries += ((item.token_id, item) for item in (output.delta_logprobs if delta else output.logprobs) or ())
        logprobs = completion_logprobs(tokenizer, entries, logprobs_k)
    finish_reason = None
    if output.finished:
        finish_reason = "length" if echo_only else _finish(output)
    prompt_logprobs = None if prompt_logprobs_k is None else vllm_prompt_logprobs(tokenizer, output, prompt_logprobs_k)
    return CompletionChoice(index=index, text=(echo_text or "") + text, logprobs=logprobs,
                            prompt_logprobs=prompt_logprobs, finish_reason=finish_reason)


def chat_logprobs(tokenizer, items: Sequence[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(content=[
        ChatTokenLogprob(token=tokenizer.decode([i.token_id]), logprob=i.logprob,
                         top_logprobs=[TopLogprob(token=tokenizer.decode([t]), logprob=lp) for t, lp in i.top])
        for i in items
    ])


def usage_of(outputs: Sequence[RequestOutput], prompt_lens: Sequence[int], echo_only: bool = False) -> Usage:
    """OpenAI's usage: every prompt once, every choice's completion tokens (none when echo_only)."""
    prompt = sum(prompt_lens)
    completion = 0 if echo_only else sum(o.usage.completion_tokens for o in outputs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _finish(output: RequestOutput) -> Optional[str]:
    return output.finish_reason if output.finish_reason in ("stop", "length") else "stop"


def sse(payload) -> str:
    """One server-sent event carrying a pydantic model or a dict."""
    data = payload.model_dump_json(exclude_none=False) if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def error_event(error: ApiError) -> str:
    return sse({"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.status}})
