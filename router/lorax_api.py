"""LoRAX's generate API (TGI's, with `adapter_id`): bodies in, answers and stream events out.

`POST /generate`, `POST /generate_stream` and `POST /` (what `lorax.Client` calls: a list of one
answer, or the stream when the body says `stream`). A body becomes a CompletionRequest, so every
check and every sampling control is the OpenAI routes' own; this module only renames fields, and
answers and errors in LoRAX's shapes (`{"error", "error_type"}`, validation errors 422).
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flora_core.request_output import RequestOutput, TokenLogprob
from router.errors import ApiError, bad_request
from router.protocol import CompletionRequest, JsonSchemaFormat, ResponseFormat

# LoRAX's name for each OpenAI field a refusal's message may name
LORAX_FIELDS = {"max_tokens": "max_new_tokens", "ignore_eos": "ignore_eos_token", "logprobs": "return_k_alternatives",
                "prompt": "inputs"}
_ERROR_TYPES = {400: "validation", 404: "not_found", 429: "overloaded", 503: "overloaded"}
_DETOKENIZE_WINDOW = 5  # tokens of left context when decoding one token's text


class LoraxResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: str = Field(description="json_object: the output follows `schema` (any JSON object if it is empty).")
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")


class LoraxParameters(BaseModel):
    """Every field `lorax.Client` sends; those with no effect here are accepted at their neutral value only."""

    model_config = ConfigDict(extra="forbid")
    adapter_id: Optional[str] = Field(None, description="A served adapter's name (its folder, with adapter_source "
                                      "'local'); none: the base model.")
    adapter_source: Optional[str] = Field(None, description="'local': adapter_id is the adapter's folder under "
                                          "adapter_dir; none: its name. Nothing is downloaded.")
    merged_adapters: Optional[dict[str, Any]] = None
    api_token: Optional[str] = Field(None, description="Accepted and unused: adapters are served from adapter_dir.")
    do_sample: bool = False
    max_new_tokens: Optional[int] = None
    ignore_eos_token: bool = False
    repetition_penalty: Optional[float] = None
    return_full_text: bool = False
    stop: list[str] = Field(default_factory=list)
    seed: Optional[int] = None
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    truncate: Optional[int] = Field(None, description="Keep only the prompt's last `truncate` tokens.")
    typical_p: Optional[float] = None
    best_of: Optional[int] = None
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    return_k_alternatives: Optional[int] = None
    response_format: Optional[LoraxResponseFormat] = None

    @property
    def samples(self) -> bool:
        """TGI's rule: sampling if asked for, or if any sampling control is set; greedy otherwise."""
        warped = (self.temperature not in (None, 1.0) or self.top_k is not None or self.top_p is not None)
        return (self.do_sample or warped) and self.temperature != 0


class LoraxRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: str = Field(min_length=1)
    parameters: LoraxParameters = Field(default_factory=LoraxParameters)
    stream: bool = False


def _openapi_body() -> dict:
    """The routes' request body for GET /openapi.json (they read the body themselves, to answer in LoRAX's shapes)."""
    schema = LoraxRequest.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            return inline(definitions[node["$ref"].rsplit("/", 1)[-1]]) if "$ref" in node else {
                key: inline(value) for key, value in node.items()}
        return [inline(value) for value in node] if isinstance(node, list) else node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


def parse_request(raw: bytes) -> LoraxRequest:
    """The body, or a 400 naming the first field at fault."""
    try:
        data = json.loads(raw or b"null")
    except ValueError as error:  # not JSON, or not UTF-8
        raise bad_request(f"the body is not JSON ({error}); send {{\"inputs\": ..., \"parameters\": {{...}}}}",
                          None) from None
    try:
        return LoraxRequest.model_validate(data)
    except ValidationError as error:
        raise _refusal(error) from None


def _refusal(error: ValidationError) -> ApiError:
    """A 400 for pydantic's first complaint, naming its innermost field."""
    first = error.errors()[0]
    field = next((str(part) for part in reversed(first["loc"]) if isinstance(part, str)), None)
    return bad_request(f"{'.'.join(map(str, first['loc'])) or 'body'}: {first['msg']}", field)


def check_adapter_source(p: LoraxParameters) -> None:
    """400 for LoRAX's sources that download adapters ("hub", "s3", "pbase"): only "local" (a folder
    under adapter_dir) and none (a served adapter's name) name what is served here."""
    if p.adapter_source not in (None, "local"):
        raise bad_request(f"adapter_source={p.adapter_source!r} is not supported here: nothing is downloaded. Leave "
                          "it unset and name a served adapter (GET /v1/models), or pass 'local' with adapter_id a "
                          "folder under adapter_dir", "adapter_source")


def completion_body(body: LoraxRequest, model: str) -> CompletionRequest:
    """The same request as OpenAI's completion; 400 for what has no counterpart here."""
    p = body.parameters
    for field, neutral, fix in [("merged_adapters", None, "merge once with POST /v1/adapters/merge and name the "
                                 "merge in adapter_id"),
                                ("typical_p", None, "typical decoding is not implemented"),
                                ("watermark", False, "watermarking is not implemented")]:
        if getattr(p, field) != neutral:
            raise bad_request(f"{field} is not supported here: {fix}; leave it unset", field)
    if p.best_of not in (None, 1):
        raise bad_request("best_of is not supported here; leave it unset or 1", "best_of")
    if p.truncate is not None and p.truncate < 1:
        raise bad_request(f"truncate={p.truncate}; pass a positive token count", "truncate")
    fields: dict[str, Any] = {"temperature": (p.temperature or 1.0) if p.samples else 0.0}
    for ours, theirs in [("top_k", p.top_k), ("top_p", p.top_p), ("seed", p.seed),
                         ("repetition_penalty", p.repetition_penalty), ("max_tokens", p.max_new_tokens)]:
        if theirs is not None:
            fields[ours] = theirs
    if p.response_format is not None:
        if p.response_format.type != "json_object":
            raise bad_request(f"response_format.type={p.response_format.type!r}; LoRAX's is 'json_object'",
                              "response_format")
        fields["response_format"] = (ResponseFormat(type="json_schema", json_schema=JsonSchemaFormat(
            schema=p.response_format.schema_)) if p.response_format.schema_ else ResponseFormat(type="json_object"))
    try:
        return CompletionRequest(model=model, prompt=body.inputs, stop=p.stop or None,
                                 ignore_eos=p.ignore_eos_token, **fields)
    except ValidationError as error:
        raise _refusal(error) from None


def error_body(error: ApiError) -> dict:
    """LoRAX's error body: `lorax.Client` raises by error_type (validation, overloaded, generation). The message
    names the field at fault by LoRAX's name (max_new_tokens, not max_tokens)."""
    theirs = LORAX_FIELDS.get(error.param)
    message = error.message if theirs is None else error.message.replace(error.param, theirs)
    return {"error": message, "error_type": _ERROR_TYPES.get(error.status, "generation")}


def error_response(error: ApiError) -> JSONResponse:
    status = 422 if error.status == 400 else error.status  # TGI and LoRAX answer invalid input with 422
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return JSONResponse(status_code=status, content=error_body(error), headers=headers)


def token_texts(tokenizer, ids: Sequence[int], start: int) -> list[str]:
    """The text each of ids[start:] adds after the ones before it (a few tokens of context, so a
    sentencepiece word's leading space survives); special tokens spell themselves."""
    texts = []
    for j in range(start, len(ids)):
        window = ids[max(0, j - _DETOKENIZE_WINDOW):j]
        before, after = tokenizer.decode(window), tokenizer.decode([*window, ids[j]])
        texts.append(after[len(before):] if after.startswith(before) else tokenizer.decode([ids[j]]))
    return texts


def finish_reason(tokenizer, output: RequestOutput) -> str:
    if output.finish_reason == "length":
        return "length"
    ended_on_eos = bool(output.token_ids) and output.token_ids[-1] == tokenizer.eos_token_id
    return "eos_token" if ended_on_eos else "stop_sequence"


def tokens(tokenizer, output: RequestOutput, start: int, items: Sequence[TokenLogprob],
           alternatives: bool) -> list[dict]:
    """LoRAX's Token of each generated token from index `start` (its logprob in items, in order)."""
    special = set(tokenizer.all_special_ids)
    texts = token_texts(tokenizer, output.token_ids, start)
    result = []
    for token_id, text, item in zip(output.token_ids[start:], texts, items):
        token = {"id": token_id, "text": text, "logprob": item.logprob, "special": token_id in special,
                 "alternative_tokens": None}
        if alternatives:
            token["alternative_tokens"] = [{"id": t, "text": tokenizer.decode([t]), "logprob": lp}
                                           for t, lp in item.top]
        result.append(token)
    return result


def prefill(tokenizer, output: RequestOutput) -> list[dict]:
    """LoRAX's decoder input details: each prompt token with its logprob (None for the first)."""
    texts = token_texts(tokenizer, output.prompt_token_ids, 0)
    return [{"id": t, "text": text, "logprob": None if item is None else item.logprob}
            for t, text, item in zip(output.prompt_token_ids, texts, output.prompt_logprobs or ())]


def generated_text(body: LoraxRequest, output: RequestOutput) -> str:
    """The answer's text; as in TGI and LoRAX it ends with the stop string that ended it (OpenAI's routes leave
    that out), and with return_full_text it starts with the prompt."""
    stop = output.stop_reason if output.finish_reason == "stop" and isinstance(output.stop_reason, str) else ""
    return (body.inputs if body.parameters.return_full_text else "") + output.text + stop


def response(tokenizer, body: LoraxRequest, output: RequestOutput, seed: Optional[int]) -> dict:
    """LoRAX's Response: the text and, with details, how it ended and every token."""
    p = body.parameters
    answer: dict[str, Any] = {"generated_text": generated_text(body, output), "details": None}
    if p.details or p.decoder_input_details:
        answer["details"] = {
            "finish_reason": finish_reason(tokenizer, output), "prompt_tokens": len(output.prompt_token_ids),
            "generated_tokens": len(output.token_ids), "seed": seed,
            "prefill": prefill(tokenizer, output) if p.decoder_input_details else [],
            "tokens": tokens(tokenizer, output, 0, output.logprobs or (), bool(p.return_k_alternatives)),
            "best_of_sequences": None,
        }
    return answer


def stream_events(tokenizer, body: LoraxRequest, output: RequestOutput, seed: Optional[int]) -> list[dict]:
    """LoRAX's StreamResponse of each token new in this output; the last one of a finished request
    carries the whole text and the details."""
    start = len(output.token_ids) - len(output.delta_token_ids)
    alternatives = bool(body.parameters.return_k_alternatives)
    events = [{"token": token, "generated_text": None, "details": None}
              for token in tokens(tokenizer, output, start, output.delta_logprobs or (), alternatives)]
    if output.finished and events:
        events[-1]["generated_text"] = generated_text(body, output)
        events[-1]["details"] = {"finish_reason": finish_reason(tokenizer, output),
                                 "prompt_tokens": len(output.prompt_token_ids),
                                 "generated_tokens": len(output.token_ids), "seed": seed}
    return events


OPENAPI_BODY = _openapi_body()  # made once, for the three routes
