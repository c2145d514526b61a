"""LoRA with every token's own adapter as two Triton kernels, shrink then expand (Punica's BGMV).

`lora_delta_bgmv` takes `batched_ops.lora_delta_bmm`'s arguments and returns its result, without
the gathered copies: each program reads its token's factors where they sit in the slot-stacked
pool. It runs on CUDA, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1, set before
this module is imported), which is how the tests check it where no GPU is. The strategy rule does
not pick it yet: its speed against bmm and grouped is to be measured on a GPU
(`python -m bench.lora_strategies --device cuda`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flora_core.adapter_batch import SlotRows

BLOCK_K = 64  # input features per step of the shrink loop
BLOCK_N = 128  # output features per expand program


@triton.jit
def _shrink(x_ptr, a_ptr, token_ptr, slot_ptr, hidden_ptr, rank,
            stride_x, stride_a_slot, stride_a_rank,
            D_IN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """hidden[i, :rank] = lora_a[s_i, :rank] @ x[t_i], in fp32: one program per token i.

    D_IN is a compile-time constant (a model has a few layer widths): the loop bound is static.
    """
    i = tl.program_id(0)
    token = tl.load(token_ptr + i)
    slot = tl.load(slot_ptr + i)
    r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for start in range(0, D_IN, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + token * stride_x + k, mask=k < D_IN, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + slot * stride_a_slot + r[:, None] * stride_a_rank + k[None, :],
                    mask=(r[:, None] < rank) & (k[None, :] < D_IN), other=0.0).to(tl.float32)
        acc += tl.sum(a * x[None, :], axis=1)
    tl.store(hidden_ptr + i * BLOCK_R + r, acc)


@triton.jit
def _expand(hidden_ptr, b_ptr, slot_ptr, out_ptr, d_out, rank,
            stride_b_slot, stride_b_rank, stride_out,
            BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[i, cols] = hidden[i, :rank] @ lora_b[s_i, :rank, cols]: one program per token and column block."""
    i = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot = tl.load(slot_ptr + i)
    r = tl.arange(0, BLOCK_R)
    hidden = tl.load(hidden_ptr + i * BLOCK_R + r)
    b = tl.load(b_ptr + slot * stride_b_slot + r[:, None] * stride_b_rank + cols[None, :],
                mask=(r[:, None] < rank) & (cols[None, :] < d_out), other=0.0).to(tl.float32)
    out = tl.sum(hidden[:, None] * b, axis=0)
    tl.store(out_ptr + i * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=cols < d_out)


def lora_delta_bgmv(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, rows: SlotRows, rank: int
) -> torch.Tensor:
    """delta[i] = (x[t_i] @ lora_a[s_i, :rank].T) @ lora_b[s_i, :rank], accumulated in fp32.

    x: [T, d_in]; lora_a: [S, R, d_in]; lora_b: [S, R, d_out] (B transposed, LoRA scale folded in);
    rows: n tokens (t_i) with slots (s_i); rank: r <= R. Returns [n, d_out] in x's dtype.
    Not differentiable: serving only.
    """
    n, d_in, d_out = rows.num_tokens, x.shape[1], lora_b.shape[2]
    out = x.new_empty(n, d_out)
    if n == 0:
        return out
    x = x if x.stride(1) == 1 else x.contiguous()
    lora_a = lora_a if lora_a.stride(2) == 1 else lora_a.contiguous()
    lora_b = lora_b if lora_b.stride(2) == 1 else lora_b.contiguous()
    block_r = max(16, triton.next_power_of_2(rank))
    hidden = torch.empty(n, block_r, device=x.device, dtype=torch.float32)
    _shrink[(n,)](x, lora_a, rows.token_index, rows.slots, hidden, rank,
                  x.stride(0), lora_a.stride(0), lora_a.stride(1), D_IN=d_in, BLOCK_R=block_r, BLOCK_K=BLOCK_K)
    _expand[(n, triton.cdiv(d_out, BLOCK_N))](hidden, lora_b, rows.slots, out, d_out, rank,
                                              lora_b.stride(0), lora_b.stride(1), out.stride(0),
                                              BLOCK_R=block_r, BLOCK_N=BLOCK_N)
    return out
