"""Typed requests and responses for Python callers of the application handle.

    handle = serve.get_app_handle("flora")
    reply = await handle.generate.remote(GenerateRequest(adapter="reverse-lora-r8", prompt="hello="))
    reply.text, reply.finish_reason, reply.usage

    async for chunk in handle.options(stream=True).generate_stream.remote(GenerateRequest(...)):
        print(chunk.delta_text, end="")
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from router.protocol import ResponseFormat


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter: Optional[str] = Field(None, description="An adapter's name; None for the base model.")
    prompt: Union[str, list[int]] = Field(description="Text, or token ids.")
    max_tokens: Optional[int] = Field(None, description="Tokens to generate at most (default: the app's).")
    temperature: float = Field(0.0, description="0 is greedy decoding.")
    top_p: float = 1.0
    top_k: int = -1
    seed: Optional[int] = None
    stop: list[str] = Field(default_factory=list, description="Strings that end generation (not returned).")
    stop_token_ids: list[int] = Field(default_factory=list)
    logprobs: Optional[int] = Field(None, description="Top log-probabilities per generated token.")
    prompt_logprobs: Optional[int] = Field(None, description="Top log-probabilities per prompt token (scoring).")
    presence_penalty: float = Field(0.0, description="In [-2, 2], as OpenAI's; 0 is off.")
    frequency_penalty: float = Field(0.0, description="In [-2, 2], as OpenAI's; 0 is off.")
    repetition_penalty: float = Field(1.0, description="> 0, as transformers' and vLLM's; 1 is off.")
    logit_bias: Optional[dict[int, float]] = Field(None, description="{token id: bias in [-100, 100]}.")
    min_tokens: int = Field(0, description="No stop token before this many tokens.")
    min_p: float = Field(0.0, description="In [0, 1], as vLLM's; 0 is off.")
    response_format: Optional[ResponseFormat] = Field(None, description="json_object or json_schema, as OpenAI's.")
    guided_json: Optional[Union[dict[str, Any], str]] = Field(None, description="A JSON schema to follow.")
    guided_regex: Optional[str] = Field(None, description="A regular expression the output matches.")
    guided_choice: Optional[list[str]] = Field(None, description="The output is one of these strings.")


class GenerateUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(BaseModel):
    adapter: Optional[str]
    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"]
    usage: GenerateUsage
    logprobs: Optional[list[dict]] = Field(None, description="Per token: token_id, logprob, top [[id, logprob]].")
    prompt_logprobs: Optional[list[Optional[dict]]] = Field(
        None, description="Per prompt token, as logprobs; None for the first (nothing precedes it).")
    time_to_first_token_s: Optional[float] = None


class GenerateChunk(BaseModel):
    delta_text: str
    delta_token_ids: list[int]
    finish_reason: Optional[Literal["stop", "length"]] = None
