"""Resolved settings the application builder hands to each deployment (typed, no defaults guessed here)."""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field

from flora_core.adapter_pool import PoolLimits
from flora_core.engine import EngineConfig
from flora_core.multi_adapter_linear import SlotCapacity

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ReplicaSettings(BaseModel):
    """What a FloraReplica needs: the model, the adapter root, the pool and the engine limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_path: str
    served_model_name: str
    adapter_dir: Optional[str]
    dtype: Literal["float32", "bfloat16", "float16"]
    device: str
    lora_slots: int
    lora_max_rank: int
    flora_slots: int
    flora_max_rank: int
    ia3_slots: int
    max_host_bytes: Optional[int]
    max_adapter_bytes: Optional[int]
    max_model_len: int
    max_running: int
    max_batched_tokens: int
    max_adapters_per_step: Optional[int] = Field(None, description="Distinct adapters per running batch; None: "
                                                 "unlimited (EngineConfig.max_adapters_per_step).")
    torch_threads: int = Field(1, description="CPU threads for torch in this replica.")
    stream_interval_ms: float = Field(50.0, ge=0, description="Least time between two messages of a batch's "
                                      "stream; outputs in between are merged (0: one message per engine step).")
    keep_freed_host_memory: bool = Field(True, description="Keep freed host memory for reuse (glibc malloc; "
                                         "flora_core.host_memory).")

    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def capacity(self) -> SlotCapacity:
        return SlotCapacity(lora_slots=self.lora_slots, lora_max_rank=self.lora_max_rank, flora_slots=self.flora_slots,
                            flora_max_rank=self.flora_max_rank, ia3_slots=self.ia3_slots)

    def pool_limits(self) -> PoolLimits:
        return PoolLimits(max_host_bytes=self.max_host_bytes, max_adapter_bytes=self.max_adapter_bytes)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(max_model_len=self.max_model_len, max_running=self.max_running,
                            max_batched_tokens=self.max_batched_tokens,
                            max_adapters_per_step=self.max_adapters_per_step)


class IngressSettings(BaseModel):
    """What the OpenAI ingress needs: names, limits, batching and the management switch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_path: str
    served_model_name: str
    adapter_dir: Optional[str]
    max_model_len: int
    default_max_tokens: int = Field(16, description="max_tokens when a request leaves it out.")
    max_batch_size: int
    batch_wait_timeout_s: float
    max_concurrent_batches: int
    max_queued_requests: int = Field(description="Requests waiting or running in the ingress before 503.")
    enable_adapter_management: bool
    management_token: Optional[str]
    max_adapter_bytes: Optional[int]
    max_prompt_chars: Optional[int] = Field(None, description="Longest text prompt; None: derived from the "
                                            "tokenizer and max_model_len.")
