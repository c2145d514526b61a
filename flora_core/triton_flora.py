"""FLoRA's batched layer as one Triton GEMM: each token's own input and output scales fused in.

`flora_matmul_fused` takes `batched_ops.flora_matmul`'s arguments and returns its result. Where
that function runs five kernels at rank 1 (two factor gathers, the input scale, the GEMM, the
output scale) and materializes [n*r, d_in] scaled copies at rank r, this runs one: each program
takes a tile of (token, rank index) pairs, the paper's [tokens*r, d_in] reshape, scales the
tokens by their slot's flora_in rows as it loads them, multiplies by W0 once, then scales by
flora_out and sums over the rank in registers. It runs on CUDA, or on the CPU under Triton's
interpreter (TRITON_INTERPRET=1 set before this module is imported), which is how the tests
check it where no GPU is. The layer plan does not pick it yet: its tiling (`tile_sizes`) is a
first guess, and its speed against flora_matmul is to be measured on a GPU (`bench.adapter_overhead
--device cuda` times it as `fused` beside ours; `bench.flora_tiles` searches its tilings, split K
included, per shape).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from flora_core.adapter_batch import SlotRows

MAX_ROWS_PER_TILE = 64  # (token, rank index) pairs per program


@dataclass(frozen=True)
class FusedTiles:
    """One launch's tiling: a program's (token, rank index) pairs and output columns, its K loop, its warps.

    split_k > 1 splits the input features among that many programs per tile, which add their
    partial sums into an fp32 output (atomics, so the order of that sum varies from run to run):
    a decode batch is one token tile, and splitting K gives the SMs programs without narrowing
    the column blocks, each of which re-reads the tokens' x and flora_in tiles.
    """

    block_t: int  # tokens per program
    block_r: int  # rank indices per token: a power of two >= rank
    block_n: int  # output columns per program
    block_k: int = 64  # input features per step of the K loop
    split_k: int = 1  # programs sharing one tile's K loop
    num_warps: int = 4
    num_stages: int = 3  # Triton's default on CUDA


@triton.jit
def _flora_gemm(x_ptr, w_ptr, fin_ptr, fout_ptr, token_ptr, slot_ptr, out_ptr, n, d_out, rank,
                stride_x, stride_w_out, stride_w_in, stride_fin_slot, stride_fin_rank,
                stride_fout_slot, stride_fout_rank, stride_out,
                D_IN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, K_PER_SPLIT: tl.constexpr, SPLIT_K: tl.constexpr, IEEE_FP32: tl.constexpr):
    """out[i, cols] = sum_j fout[s_i, j, cols] * ((fin[s_i, j] * x[t_i]) @ W0[cols].T), for BLOCK_T tokens.

    The tile's rows are the BLOCK_T * BLOCK_R pairs (token i, rank index j), j fastest; j >= rank is
    masked to zero, so a tile holds BLOCK_T tokens whatever the rank. Program (tile, column block,
    split) sums input features [split * K_PER_SPLIT, (split + 1) * K_PER_SPLIT); with SPLIT_K > 1 it
    adds its share into out (fp32) atomically, else it stores.
    """
    pair = tl.arange(0, BLOCK_T * BLOCK_R)
    i = tl.program_id(0) * BLOCK_T + pair // BLOCK_R  # [P] token of each pair
    j = pair % BLOCK_R  # [P] rank index of each pair
    pair_ok = (i < n) & (j < rank)
    token = tl.load(token_ptr + i, mask=i < n, other=0)
    slot = tl.load(slot_ptr + i, mask=i < n, other=0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < d_out
    k_first = tl.program_id(2) * K_PER_SPLIT
    acc = tl.zeros((BLOCK_T * BLOCK_R, BLOCK_N), dtype=tl.float32)
    for start in range(0, K_PER_SPLIT, BLOCK_K):
        k = k_first + start + tl.arange(0, BLOCK_K)
        k_ok = k < D_IN
        load_ok = pair_ok[:, None] & k_ok[None, :]
        x = tl.load(x_ptr + token[:, None] * stride_x + k[None, :], mask=load_ok, other=0.0)
        scale = tl.load(fin_ptr + slot[:, None] * stride_fin_slot + j[:, None] * stride_fin_rank + k[None, :],
                        mask=load_ok, other=0.0)
        w = tl.load(w_ptr + cols[None, :] * stride_w_out + k[:, None] * stride_w_in,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]: W0.T's tile
        scaled = (x.to(tl.float32) * scale.to(tl.float32)).to(w.dtype)
        if IEEE_FP32:
            acc += tl.dot(scaled, w, input_precision="ieee")
        else:
            acc += tl.dot(scaled, w)
    out_scale = tl.load(fout_ptr + slot[:, None] * stride_fout_slot + j[:, None] * stride_fout_rank + cols[None, :],
                        mask=pair_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    out = tl.sum(tl.reshape(acc * out_scale, (BLOCK_T, BLOCK_R, BLOCK_N)), axis=1)  # [BLOCK_T, BLOCK_N]
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    out_at = out_ptr + rows[:, None] * stride_out + cols[None, :]
    out_ok = (rows[:, None] < n) & col_ok[None, :]
    if SPLIT_K == 1:
        tl.store(out_at, out.to(out_ptr.dtype.element_ty), mask=out_ok)
    else:
        tl.atomic_add(out_at, out, mask=out_ok)


def flora_matmul_fused(
    x: torch.Tensor,
    weight: torch.Tensor,
    flora_in: torch.Tensor,
    flora_out: torch.Tensor,
    rows: SlotRows,
    rank: int,
    tiles: FusedTiles | None = None,
) -> torch.Tensor:
    """y[i] = sum_j flora_out[s_i, j] * ((flora_in[s_i, j] * x[t_i]) @ weight.T), accumulated in fp32.

    x: [T, d_in]; weight: [d_out, d_in] (any strides); flora_in: [S, R, d_in]; flora_out: [S, R, d_out]
    (the rank-mean 1/r folded in); rows: n tokens (t_i) with slots (s_i); rank: r <= R; tiles: the
    launch's tiling, `tile_sizes`'s by default (bench.flora_tiles tries others). Returns [n, d_out]
    in x's dtype; the bias is the caller's. Not differentiable: serving only.
    """
    n, d_in, d_out = rows.num_tokens, x.shape[1], weight.shape[0]
    tiles = tiles or tile_sizes(n, rank, d_out, multiprocessor_count(x.device))
    if tiles.block_r < rank or tiles.block_t * tiles.block_r < 16:
        raise ValueError(f"tiles {tiles} do not fit rank {rank}: block_r must be >= the rank and "
                         "block_t * block_r >= 16 (tl.dot's least)")
    split = tiles.split_k > 1
    out = x.new_zeros(n, d_out, dtype=torch.float32) if split else x.new_empty(n, d_out)
    if n == 0:
        return out.to(x.dtype)
    x = x if x.stride(1) == 1 else x.contiguous()
    flora_in = flora_in if flora_in.stride(2) == 1 else flora_in.contiguous()
    flora_out = flora_out if flora_out.stride(2) == 1 else flora_out.contiguous()
    k_per_split = triton.cdiv(triton.cdiv(d_in, tiles.split_k), tiles.block_k) * tiles.block_k
    grid = (triton.cdiv(n, tiles.block_t), triton.cdiv(d_out, tiles.block_n), triton.cdiv(d_in, k_per_split))
    _flora_gemm[grid](x, weight, flora_in, flora_out, rows.token_index, rows.slots, out, n, d_out, rank,
                      x.stride(0), weight.stride(0), weight.stride(1), flora_in.stride(0), flora_in.stride(1),
                      flora_out.stride(0), flora_out.stride(1), out.stride(0),
                      D_IN=d_in, BLOCK_T=tiles.block_t, BLOCK_R=tiles.block_r, BLOCK_N=tiles.block_n,
                      BLOCK_K=tiles.block_k, K_PER_SPLIT=k_per_split, SPLIT_K=tiles.split_k,
                      IEEE_FP32=x.dtype == torch.float32, num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return out.to(x.dtype) if split else out


def tile_sizes(n: int, rank: int, d_out: int, multiprocessors: int) -> FusedTiles:
    """The tiling for n tokens at `rank`: a first guess, until bench.flora_tiles has measured a GPU.

    A tile holds up to MAX_ROWS_PER_TILE (token, rank index) pairs and at least 16 (tl.dot's documented least).
    BLOCK_N is the widest of 128/64/32 that still gives every SM a program: a decode batch is one
    token tile, so its programs are the column blocks, and too wide a block leaves SMs idle while
    the GEMM streams W0, which is all its time at that size.
    """
    block_r = triton.next_power_of_2(rank)
    block_t = max(1, min(MAX_ROWS_PER_TILE // block_r, triton.next_power_of_2(n)), 16 // block_r)
    token_tiles = triton.cdiv(n, block_t)
    for block_n in (128, 64):
        if token_tiles * triton.cdiv(d_out, block_n) >= multiprocessors:
            return FusedTiles(block_t, block_r, block_n)
    return FusedTiles(block_t, block_r, 32)


@functools.cache
def multiprocessor_count(device: torch.device) -> int:
    """The device's SMs, which tile_sizes gives a program each; 1 off CUDA."""
    if device.type != "cuda":
        return 1  # the interpreter: any block is as good
    return torch.cuda.get_device_properties(device).multi_processor_count
