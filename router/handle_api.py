"""Typed requests and responses for Python callers of the application handle.

    handle = serve.get_app_handle("flora")
    reply = await handle.generate.remote(GenerateRequest(adapter="reverse-lora-r8", prompt="hello="))
    reply.text, reply.finish_reason, reply.usage

    async for chunk in handle.options(stream=True).generate_stream.remote(GenerateRequest(...)):
        print(chunk.delta_text, end="")
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, Field

from router.protocol import SamplingControls


class GenerateRequest(SamplingControls):
    """One generation; the penalties, biases and structured output are SamplingControls, as over HTTP."""

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
