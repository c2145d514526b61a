"""OpenAI-compatible request and response bodies (completions, chat completions, models, errors).

Request bodies refuse unknown fields, so a typo is a 400 naming the field rather than a silent
default. Fields OpenAI defines that we do not implement are accepted only at their neutral value.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flora_core.adapter_merge import MAX_MERGE_COMPONENTS

MAX_LOGPROBS = 20


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[Union[str, int]] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = Field(False, description="Send a last chunk with the token usage.")


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = "response"
    description: Optional[str] = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema", description="The JSON schema to follow.")
    strict: Optional[bool] = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: free text, any JSON object, or JSON that follows a schema."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class SamplingControls(BaseModel):
    """The controls beyond OpenAI's basic sampling fields, one per request: penalties, biases,
    vLLM's extensions and structured output. The HTTP bodies and the handle's GenerateRequest share them."""

    model_config = ConfigDict(extra="forbid")

    presence_penalty: float = Field(0.0, description="In [-2, 2]: lowers the logit of each token the output has.")
    frequency_penalty: float = Field(0.0, description="In [-2, 2]: lowers a token's logit per time the output has it.")
    repetition_penalty: float = Field(1.0, description="> 0 (vLLM's extension): divides the positive logits of "
                                      "prompt and output tokens, multiplies the negative ones; 1 is off.")
    logit_bias: Optional[dict[int, float]] = Field(None, description="{token id: bias in [-100, 100]} added to "
                                                   "those logits.")
    min_tokens: int = Field(0, description="vLLM's extension: no stop token before this many tokens.")
    min_p: float = Field(0.0, description="vLLM's extension: sample only tokens at least min_p times as likely as "
                         "the most likely one; 0 is off.")
    response_format: Optional[ResponseFormat] = Field(None, description="json_object or json_schema: the output "
                                                      "follows it.")
    guided_json: Optional[Union[dict[str, Any], str]] = Field(None, description="vLLM's: a JSON schema to follow.")
    guided_regex: Optional[str] = Field(None, description="vLLM's: a regular expression the output matches.")
    guided_choice: Optional[list[str]] = Field(None, description="vLLM's: the output is one of these strings.")

    @field_validator("presence_penalty", "frequency_penalty", "repetition_penalty", mode="before")
    @classmethod
    def _null_is_off(cls, value, info):
        """null turns a penalty off, as OpenAI's API (whose penalties are nullable) and vLLM take it."""
        return cls.model_fields[info.field_name].default if value is None else value


class SamplingFields(SamplingControls):
    """The sampling fields completions and chat completions share."""

    model: str = Field(description="An adapter's name, or the base model's name for no adapter.")
    max_tokens: Optional[int] = Field(None, description="Tokens to generate at most (default 16).")
    temperature: float = Field(1.0, description="0 is greedy decoding.")
    top_p: float = Field(1.0, description="Nucleus sampling mass, in (0, 1].")
    top_k: int = Field(-1, description="Sample from the k most likely tokens; -1 or 0 is off.")
    n: int = Field(1, description="Completions to generate for each prompt.")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = Field(None, description="Strings that end generation (not returned).")
    stop_token_ids: Optional[list[int]] = Field(None, description="Token ids that end generation.")
    seed: Optional[int] = Field(None, description="Makes sampling reproducible for this request.")
    ignore_eos: bool = Field(False, description="Keep generating past end-of-sequence (vLLM's extension).")
    user: Optional[str] = None
    prompt_logprobs: Optional[int] = Field(None, description=f"vLLM's: per prompt token, its log-probability and "
                                           f"rank and the top 0 to {MAX_LOGPROBS} alternatives; not with stream.")

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: Union[str, list[int], list[str], list[list[int]]] = Field(
        description="Text, token ids, or a list of either (one completion set per prompt)."
    )
    logprobs: Optional[int] = Field(None, description=f"Top log-probabilities per token, 0 to {MAX_LOGPROBS}; "
                                    "with echo, the prompt's tokens too (the first has none).")
    echo: bool = Field(False, description="Return the prompt before the completion; with max_tokens 0, alone.")
    best_of: Optional[int] = Field(None, description="Not supported beyond n.")
    suffix: Optional[str] = Field(None, description="Not supported.")

    @model_validator(mode="after")
    def _check_unsupported(self) -> "CompletionRequest":
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported; leave it unset or equal to n")
        if self.suffix:
            raise ValueError("suffix is not supported; leave it unset")
        return self

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0: the answer is the prompt alone (with its logprobs), as OpenAI and vLLM give it."""
        return self.echo and self.max_tokens == 0

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompts as a list: one text or one token-id list each."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        return list(prompt)


class ChatTextPart(BaseModel):
    """One part of a message's content in OpenAI's list form: {"type": "text", "text": ...}."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[ChatTextPart]] = Field(
        description="Text, or OpenAI's list of text parts (joined with newlines, as vLLM joins them).")
    name: Optional[str] = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value):
        """Name the fix for parts this text-only model cannot read (images, audio, files) before pydantic's union
        error does."""
        for index, part in enumerate(value if isinstance(value, list) else ()):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text":
                raise ValueError(f"content part {index} has type {kind!r}; this model reads text only: send a "
                                 "string or parts {'type': 'text', 'text': ...}")
        return value

    @property
    def text(self) -> str:
        """The content as one string: the text parts joined with newlines."""
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, description="Same as max_tokens; wins if both are set.")
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, description=f"0 to {MAX_LOGPROBS}, with logprobs=true.")


# ------------------------------------------------------------------ responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[Optional[float]] = []
    top_logprobs: list[Optional[dict[str, float]]] = []
    text_offset: list[int] = []


class PromptTokenLogprob(BaseModel):
    """vLLM's Logprob: one entry of a prompt token's {token id: ...} dict."""

    logprob: float
    rank: Optional[int] = Field(None, description="1 = the most likely token at this position.")
    decoded_token: str


PromptLogprobs = list[Optional[dict[int, PromptTokenLogprob]]]  # per prompt token; None for the first


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    prompt_logprobs: Optional[PromptLogprobs] = Field(None, description="vLLM's, when the request asks for them.")
    finish_reason: Optional[Literal["stop", "length"]] = None


def _completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=_completion_id)
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatDelta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] = []


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[Literal["stop", "length"]] = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[Literal["stop", "length"]] = None


def _chat_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=_chat_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Optional[Usage] = None
    prompt_logprobs: Optional[PromptLogprobs] = Field(None, description="vLLM's, when the request asks for them.")


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatStreamChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    """One entry of GET /v1/models: the base model or an adapter, with what it is."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "flora-serve"
    root: str = Field(description="The base model every adapter runs on.")
    parent: Optional[str] = Field(None, description="The base model, for an adapter; null for the base.")
    kind: Optional[Literal["lora", "flora", "ia3"]] = None
    rank: Optional[int] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's): the ids a completion or chat request with this prompt would run on."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="The base model or an adapter: all share one tokenizer.")
    prompt: Optional[str] = Field(None, description="Text, tokenized as /v1/completions does.")
    messages: Optional[list[ChatMessage]] = Field(None, min_length=1, description="Chat messages, through the chat "
                                                  "template with the generation prompt, as /v1/chat/completions does.")
    add_special_tokens: bool = Field(True, description="With prompt: add the tokenizer's special tokens (BOS).")
    return_token_strs: bool = Field(False, description="Also return each token as its vocabulary string.")

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("pass exactly one of prompt and messages")
        if self.messages is not None and not self.add_special_tokens:
            raise ValueError("add_special_tokens applies to prompt only; the chat template places special tokens")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[str]] = None


class DetokenizeRequest(BaseModel):
    """POST /detokenize (vLLM's)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="The base model or an adapter: all share one tokenizer.")
    tokens: list[int] = Field(max_length=1 << 20, description="Token ids, each in [0, vocab size).")


class DetokenizeResponse(BaseModel):
    prompt: str


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="The adapter's folder name under the configured adapter root.")


class LoadLoraAdapterRequest(BaseModel):
    """POST /v1/load_lora_adapter (vLLM's dynamic LoRA loading), for adapter folders under adapter_dir."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(description="The adapter's name: its folder's name.")
    lora_path: str = Field(description="Its folder, directly under adapter_dir: absolute, or relative to it.")
    load_inplace: bool = Field(False, description="Re-read an adapter already served (a new version).")


class UnloadLoraAdapterRequest(BaseModel):
    """POST /v1/unload_lora_adapter (vLLM's)."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_int_id: Optional[int] = Field(None, description="Accepted for vLLM's clients; names are what count here.")


class AdapterMerge(BaseModel):
    """A merged adapter: POST /v1/adapters/merge, or an entry of the deploy config's merged_adapters."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="The merged adapter's name: what requests pass as model.")
    adapters: list[str] = Field(min_length=1, max_length=MAX_MERGE_COMPONENTS,
                                description="Served adapter folders to merge, all of one kind (LoRA, FLoRA or IA3).")
    weights: list[float] = Field(description="One weight per adapter, negative ones subtract. LoRA: delta W = "
                                 "sum w_k delta W_k (PEFT's add_weighted_adapter, 'cat'); FLoRA and IA3: "
                                 "mask = sum w_k mask_k (PEFT's IA3 merge).")

    @model_validator(mode="after")
    def _one_weight_each(self) -> "AdapterMerge":
        if len(self.weights) != len(self.adapters):
            raise ValueError(f"weights has {len(self.weights)} entries for {len(self.adapters)} adapters; "
                             "pass one weight each")
        return self

    def recipe(self) -> tuple[tuple[str, float], ...]:
        return tuple(zip(self.adapters, self.weights))
