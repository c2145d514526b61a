"""The least a decode step with adapters can cost where the step is bound by the bytes it reads.

A decode step on a GPU reads every base weight once (the input embedding aside: only the batch's
rows of it) and each row's KV cache, and does little arithmetic per byte, so its time follows its
bytes. The adapters add their factors, read at least once per distinct adapter in the batch:
r * (d_in + d_out) numbers per layer for LoRA (A and B) and for FLoRA (its input and output
scales) alike. So (base bytes + the adapters' bytes) / base bytes is the lowest overhead ratio
any implementation can reach there, however its kernels are built:

    floor = bytes_floor(decode_bytes(model, batch=64, context=128), adapter_bytes(shapes, 16, 2) * 64)

On a CPU at one thread a decode step is bound by arithmetic instead, and the floor is a lower bound
only.
"""

from __future__ import annotations

from torch import nn


def decode_bytes(model: nn.Module, batch: int, context: int) -> int:
    """Bytes one decode step of `batch` rows reads: weights (tied ones once; an untied input embedding
    only for the batch's rows) and the KV cache of `context` tokens a row."""
    params = {id(p): p for p in model.parameters()}
    weights = sum(p.numel() * p.element_size() for p in params.values())
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    if output is None or output.weight is not embedding:
        weights -= (embedding.shape[0] - batch) * embedding.shape[1] * embedding.element_size()
    config = model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * embedding.element_size()
    return weights + batch * context * kv_per_token


def adapter_bytes(shapes: dict[str, tuple[int, int]], rank: int, element_size: int) -> int:
    """Bytes of one LoRA or FLoRA adapter of `rank` on every layer of `shapes` (name -> (d_in, d_out))."""
    return sum(rank * (d_in + d_out) for d_in, d_out in shapes.values()) * element_size


def bytes_floor(base_bytes: int, adapters_bytes: int) -> float:
    """The lowest forward time / base forward time a step reading these bytes can have."""
    return (base_bytes + adapters_bytes) / base_bytes
