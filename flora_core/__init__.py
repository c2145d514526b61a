"""flora_core: one forward pass where every row of a batch uses its own adapter.

Plain PyTorch and transformers; nothing here knows of Ray. The public pieces:
- MultiAdapterModel: a causal LM patched for per-row adapters, with its AdapterPool.
- load_adapter / save_adapter: PEFT LoRA and IA3 directories, and FLoRA in the same layout.
- merge_adapters / MergedSource: exact weighted merges of adapters of one kind (PEFT's "cat").
- batched_ops: the pure batched math (LoRA bmm and grouped, FLoRA, IA3).
- Engine / AsyncEngine: continuous batching across adapters, sampling, streaming, cancellation.
"""

from flora_core.adapter_batch import AdapterBatch, AdapterSlot
from flora_core.adapter_io import load_adapter, save_adapter
from flora_core.adapter_merge import MergedSource, merge_adapters
from flora_core.adapter_pool import AdapterPool, PoolExhaustedError, PoolLimits, UnknownAdapterError
from flora_core.adapter_weights import AdapterKind, AdapterWeights, FloraModule, Ia3Module, LoraModule
from flora_core.async_engine import AsyncEngine
from flora_core.engine import Engine, EngineConfig
from flora_core.multi_adapter_linear import MultiAdapterLinear, SlotCapacity
from flora_core.multi_adapter_model import MultiAdapterModel
from flora_core.patching import adapter_batch_scope, patch_model
from flora_core.request_output import EngineStats, RequestOutput
from flora_core.sampling_params import SamplingParams
from flora_core.structured_output import StructuredOutput

__all__ = [
    "AdapterBatch", "AdapterSlot", "load_adapter", "save_adapter", "MergedSource", "merge_adapters", "AdapterPool",
    "PoolExhaustedError", "PoolLimits", "UnknownAdapterError", "AdapterKind", "AdapterWeights", "FloraModule",
    "Ia3Module", "LoraModule", "MultiAdapterLinear", "SlotCapacity", "MultiAdapterModel", "adapter_batch_scope",
    "patch_model", "AsyncEngine", "Engine", "EngineConfig", "EngineStats", "RequestOutput", "SamplingParams",
    "StructuredOutput",
]
