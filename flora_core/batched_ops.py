"""The batched adapter math: pure functions over activations, slot-stacked weights and SlotRows.

Every function takes the flattened activations x [T, d_in], the weights of every slot of one
adapter kind stacked on dim 0 (zero-padded to the pool's rank R), the `SlotRows` of that kind
(the n tokens that use it, sorted by slot) and the rank to compute with (the largest rank among
the batch's slots, <= R), and returns results for those n tokens only, in SlotRows order.
All of them are differentiable, so batched multi-adapter training uses them too.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

from flora_core.adapter_batch import SlotRows


def _gather_rows(x: torch.Tensor, rows: SlotRows) -> torch.Tensor:
    """x[rows.token_index] ([n, d]) without a copy when the rows are the whole batch in order."""
    return x if rows.covers_all_tokens else x.index_select(0, rows.token_index)


def lora_delta_bmm(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, rows: SlotRows, rank: int
) -> torch.Tensor:
    """delta[i] = (x[t_i] @ lora_a[s_i].T) @ lora_b[s_i], with one gathered adapter per chunk.

    The sorted tokens cut into C = n / L chunks of L tokens with one slot each (rows.chunk_length):
    one per token at decode (paper App. B.1), one per row (or more) for a [B, S] prefill, so the
    gather copies C factors, not n. x: [T, d_in]; lora_a: [S, R, d_in]; lora_b: [S, R, d_out]
    (B transposed, LoRA scale folded in); rows: n tokens (t_i) with slots (s_i); rank: r <= R.
    Returns [n, d_out].
    """
    xs = _gather_rows(x, rows)  # [n, d_in]
    chunks, length = rows.num_chunks, rows.chunk_length
    a = lora_a[:, :rank].index_select(0, rows.chunk_slots)  # [C, r, d_in]
    b = lora_b[:, :rank].index_select(0, rows.chunk_slots)  # [C, r, d_out]
    # Tokens as row vectors times their factors: 2-4x faster on the CPU than the column form
    # bmm(a, x[..., None]) (bench/lora_strategies.py), the same math.
    hidden = torch.bmm(xs.reshape(chunks, length, xs.shape[1]), a.transpose(1, 2))  # [C, L, r]
    return torch.bmm(hidden, b).reshape(rows.num_tokens, b.shape[2])  # [n, d_out]


def lora_delta_grouped(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, rows: SlotRows, rank: int
) -> torch.Tensor:
    """Same result as lora_delta_bmm, one pair of matmuls per distinct slot (the SGMV idea).

    x: [T, d_in]; lora_a: [S, R, d_in]; lora_b: [S, R, d_out]; rows sorted by slot, cut in
    segments; rank: r <= R. Returns [n, d_out].
    """
    xs = _gather_rows(x, rows)  # [n, d_in], grouped by slot
    pieces = []
    for segment in rows.segments:
        x_seg = xs.narrow(0, segment.start, segment.length)  # [len, d_in]
        hidden = x_seg @ lora_a[segment.slot, :rank].t()  # [len, r]
        pieces.append(hidden @ lora_b[segment.slot, :rank])  # [len, d_out]
    if not pieces:
        return x.new_zeros(0, lora_b.shape[2])
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


LoraDeltaFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, SlotRows, int], torch.Tensor]

LORA_STRATEGIES: dict[str, LoraDeltaFn] = {
    "bmm": lora_delta_bmm,
    "grouped": lora_delta_grouped,
}


@functools.cache
def gpu_lora_strategies() -> dict[str, LoraDeltaFn]:
    """Strategies that run as Triton kernels (CUDA): {} where Triton is not installed (CPU builds).

    Tests and benchmarks force them by name; the rule does not pick them until they are measured.
    """
    try:
        from flora_core.triton_lora import lora_delta_bgmv  # noqa: PLC0415 - Triton is optional
    except ImportError:
        return {}
    return {"bgmv": lora_delta_bgmv}


def lora_strategy(name: str) -> LoraDeltaFn:
    """The strategy called `name`: in LORA_STRATEGIES, or else in gpu_lora_strategies()."""
    return _by_name(name, "LoRA strategy", LORA_STRATEGIES, gpu_lora_strategies, "bgmv")


def _by_name(name: str, what: str, ours: dict, triton_kernels: Callable[[], dict], kernel: str):
    """ours[name], or else triton_kernels()[name] (looked up only then); a ValueError naming what there is."""
    found = ours.get(name) or triton_kernels().get(name)
    if found is None:
        known = sorted({*ours, *triton_kernels()})
        raise ValueError(f"{what} {name!r} is not available here (these are: {known}); "
                         f"'{kernel}' needs Triton, which CUDA builds of torch install")
    return found


# The rule, from bench/lora_strategies.py (README, Performance). bmm pays per chunk (it copies
# each chunk's A and B), grouped pays per adapter (two matmul calls each). A batch with a single
# adapter takes grouped (no copy at all); with more, bmm needs few chunks per adapter (decode,
# or a [B, S] prefill: a chunk per row). On the CPU bmm then wins where its copies are no larger
# than the activations they multiply (chunks of at least `rank` tokens: prefill, 1.1-2x) or stay
# cache-sized in a layer up to 4096 wide (d_in + d_out), C * r * (d_in + d_out) <= 2**20 elements:
# 3-5x at decode at the embedded model's widths. At decode in wider layers copying one token's
# factors costs more than the calls it saves and grouped wins (by up to 7x at d_model 4096). On a
# GPU grouped launches two kernels per adapter and bmm two in all, so bmm takes every batch of 8
# or more adapters with few chunks each: the paper's reasoning, still to be measured on a GPU.
BMM_MAX_CHUNKS_PER_SLOT = 2
CPU_BMM_MIN_DISTINCT = 2
CPU_BMM_MAX_WIDTH = 4096
CPU_BMM_MAX_GATHERED = 2**20
CUDA_BMM_MIN_DISTINCT = 8


def pick_lora_strategy(rows: SlotRows, rank: int, width: int) -> str:
    """Choose the LoRA strategy for one batch in one layer: a name in LORA_STRATEGIES.

    rows: the batch's LoRA tokens; rank: the rank computed with; width: the layer's d_in + d_out.
    """
    num_distinct = len(rows.segments)
    few_chunks_per_slot = rows.num_chunks <= BMM_MAX_CHUNKS_PER_SLOT * num_distinct
    if rows.token_index.device.type == "cuda":
        return "bmm" if num_distinct >= CUDA_BMM_MIN_DISTINCT and few_chunks_per_slot else "grouped"
    if num_distinct < CPU_BMM_MIN_DISTINCT or not few_chunks_per_slot:
        return "grouped"
    long_chunks = rows.chunk_length >= rank
    small_gather = width <= CPU_BMM_MAX_WIDTH and rows.num_chunks * rank * width <= CPU_BMM_MAX_GATHERED
    return "bmm" if long_chunks or small_gather else "grouped"


def flora_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    flora_in: torch.Tensor,
    flora_out: torch.Tensor,
    rows: SlotRows,
    rank: int,
) -> torch.Tensor:
    """y[i] = sum_j flora_out[s_i, j] * ((flora_in[s_i, j] * x[t_i]) @ weight.T), i.e. x @ (W0 o M_s).T.

    The rank-mean 1/r is folded into flora_out, so zero-padded ranks add nothing. The r scaled
    copies of each token go through ONE GEMM over [n*r, d_in]; the bias is the caller's.
    x: [T, d_in]; weight: [d_out, d_in]; flora_in: [S, R, d_in]; flora_out: [S, R, d_out];
    rows: n tokens; rank: r <= R. Returns [n, d_out].
    """
    xs = _gather_rows(x, rows)  # [n, d_in]
    if rank == 1:  # the common case in fewer ops: factors [n or 1, d]
        factor_in, factor_out = _flora_factors(flora_in[:, 0], flora_out[:, 0], rows)
        return F.linear(xs * factor_in, weight) * factor_out
    n, d_in = xs.shape
    factor_in, factor_out = _flora_factors(flora_in[:, :rank], flora_out[:, :rank], rows)  # [n or 1, r, d]
    scaled = (factor_in * xs.unsqueeze(1)).reshape(n * rank, d_in)  # [n*r, d_in]
    projected = F.linear(scaled, weight).view(n, rank, -1)  # [n, r, d_out]
    return (projected * factor_out).sum(dim=1)


def _flora_factors(
    flora_in: torch.Tensor, flora_out: torch.Tensor, rows: SlotRows
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's factors, [n, ...], from per-slot factors [S, ...]; [1, ...] (to broadcast) for one slot."""
    if len(rows.segments) == 1:
        slot = rows.segments[0].slot
        return flora_in[slot : slot + 1], flora_out[slot : slot + 1]
    return flora_in.index_select(0, rows.slots), flora_out.index_select(0, rows.slots)


FloraMatmulFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, SlotRows, int], torch.Tensor]

FLORA_MATMULS: dict[str, FloraMatmulFn] = {"gemm": flora_matmul}


@functools.cache
def gpu_flora_matmuls() -> dict[str, FloraMatmulFn]:
    """FLoRA layers that run as one Triton kernel (CUDA): {} where Triton is not installed (CPU builds).

    Tests and benchmarks force them by name; pick_flora_matmul does not pick them until they are measured.
    """
    try:
        from flora_core.triton_flora import flora_matmul_fused  # noqa: PLC0415 - Triton is optional
    except ImportError:
        return {}
    return {"fused": flora_matmul_fused}


def flora_matmul_named(name: str) -> FloraMatmulFn:
    """The FLoRA layer implementation called `name`: in FLORA_MATMULS, or else in gpu_flora_matmuls()."""
    return _by_name(name, "FLoRA implementation", FLORA_MATMULS, gpu_flora_matmuls, "fused")


def pick_flora_matmul(rows: SlotRows, rank: int) -> str:
    """Choose the FLoRA implementation for one batch in one layer: a name in FLORA_MATMULS.

    rows: the batch's FLoRA tokens; rank: the largest rank among their slots in this layer.
    Always "gemm" (scales around torch's GEMM, differentiable) until the fused Triton kernel is
    measured against it on a GPU (bench.adapter_overhead --device cuda times both); a measured
    crossover in tokens and rank goes here.
    """
    return "gemm"


def ia3_scale(h: torch.Tensor, scales: torch.Tensor, rows: SlotRows) -> torch.Tensor:
    """h[t_i] = h[t_i] * scales[s_i] for the rows' tokens; every other token is returned untouched.

    h: [T, d]; scales: [S, d]; rows: n tokens. Returns [T, d].
    """
    factors = scales.index_select(0, rows.slots)  # [n, d]
    if rows.covers_all_tokens:
        return h * factors
    scaled = h.index_select(0, rows.token_index) * factors
    return h.index_copy(0, rows.token_index, scaled)
