"""The Triton kernels compiled for a Hopper GPU (sm_90, the H100's) on this machine, which has none.

Triton's interpreter (tests/test_triton_lora.py, tests/test_triton_flora.py) checks what the kernels
compute, but not whether the GPU compiler takes them: a layout it cannot lower, a block shape
tl.dot refuses, a type it cannot cast. Triton's wheel brings its own ptxas, so here each kernel is
compiled to a cubin for sm_90, with the tile sizes its launcher picks for decode and prefill
batches at a 7B model's widths, in bf16 and fp32. Skipped where Triton is not installed.
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton", reason="Triton is not installed (CPU builds of torch do not bring it)")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from flora_core import triton_flora, triton_lora  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
H100_MULTIPROCESSORS = 132
DTYPES = ("bf16", "fp32")


def compile_for_hopper(kernel, pointers: dict[str, str], scalars: dict[str, str], constexprs: dict[str, object],
                       options: dict[str, int] | None = None):
    """kernel's cubin for sm_90; pointers/scalars: argument name -> Triton type, in the kernel's order."""
    signature = {**pointers, **scalars, **{name: "constexpr" for name in constexprs}}
    assert list(signature) == kernel.arg_names, f"arguments {list(signature)} are not {kernel.arg_names}"
    by_index = {(kernel.arg_names.index(name),): value for name, value in constexprs.items()}
    compiled = triton.compile(ASTSource(kernel, signature, by_index), target=HOPPER, options=options)
    assert compiled.asm.get("cubin"), "no cubin came out"
    return compiled


def flora_cases() -> list[tuple[str, int, int, int]]:
    """(dtype, tokens, rank, d_out): decode of 1 and 64 rows, a 4096-token prefill, ranks 1-64."""
    shapes = [(1, 1, 4096), (64, 1, 4096), (64, 1, 11008), (64, 3, 4096), (64, 8, 4096), (4096, 2, 4096),
              (64, 64, 4096)]
    return [(dtype, *shape) for dtype in DTYPES for shape in shapes]


@pytest.mark.parametrize(("dtype", "tokens", "rank", "d_out"), flora_cases())
def test_fused_flora_kernel_compiles_for_hopper(dtype, tokens, rank, d_out):
    tiles = triton_flora.tile_sizes(tokens, rank, d_out, H100_MULTIPROCESSORS)
    assert tiles.block_t * tiles.block_r >= 16 and tiles.block_n >= 16, "tiles below tl.dot's documented least of 16"
    compile_fused_flora(dtype, tiles, d_in=4096)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tiles", [
    triton_flora.FusedTiles(64, 1, 128, split_k=4),  # decode, B=64 at rank 1: 32 column blocks x 4 splits
    triton_flora.FusedTiles(16, 4, 256, block_k=32, split_k=8, num_warps=8, num_stages=4),
    triton_flora.FusedTiles(64, 1, 64, block_k=128, num_warps=8, num_stages=2),
], ids=["split4", "split8-wide", "k128-8warps"])
def test_fused_flora_kernel_compiles_for_hopper_with_other_tilings(dtype, tiles):
    """The tilings bench.flora_tiles tries reach the compiler too: split K's atomic adds, other warps and stages."""
    compile_fused_flora(dtype, tiles, d_in=11008)


def compile_fused_flora(dtype: str, tiles: triton_flora.FusedTiles, d_in: int):
    """_flora_gemm's cubin for `tiles`, as flora_matmul_fused launches it (split K adds into an fp32 output)."""
    pointers = {"x_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "fin_ptr": f"*{dtype}", "fout_ptr": f"*{dtype}",
                "token_ptr": "*i64", "slot_ptr": "*i64", "out_ptr": "*fp32" if tiles.split_k > 1 else f"*{dtype}"}
    strides = ("stride_x", "stride_w_out", "stride_w_in", "stride_fin_slot", "stride_fin_rank", "stride_fout_slot",
               "stride_fout_rank", "stride_out")
    scalars = {"n": "i32", "d_out": "i32", "rank": "i32", **{name: "i64" for name in strides}}
    k_per_split = triton.cdiv(triton.cdiv(d_in, tiles.split_k), tiles.block_k) * tiles.block_k
    constexprs = {"D_IN": d_in, "BLOCK_T": tiles.block_t, "BLOCK_R": tiles.block_r, "BLOCK_N": tiles.block_n,
                  "BLOCK_K": tiles.block_k, "K_PER_SPLIT": k_per_split, "SPLIT_K": tiles.split_k,
                  "IEEE_FP32": dtype == "fp32"}
    compiled = compile_for_hopper(triton_flora._flora_gemm, pointers, scalars, constexprs,
                                  {"num_warps": tiles.num_warps, "num_stages": tiles.num_stages})
    assert (compiled.metadata.num_warps, compiled.metadata.num_stages) == (tiles.num_warps, tiles.num_stages)
    assert ("atom" in compiled.asm["ptx"]) == (tiles.split_k > 1), "split K adds atomically, and only split K"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank", [1, 16, 64])
def test_bgmv_kernels_compile_for_hopper(dtype, rank):
    block_r = max(16, triton.next_power_of_2(rank))  # as lora_delta_bgmv picks it
    compile_for_hopper(triton_lora._shrink,
                       {"x_ptr": f"*{dtype}", "a_ptr": f"*{dtype}", "token_ptr": "*i64", "slot_ptr": "*i64",
                        "hidden_ptr": "*fp32"},
                       {"rank": "i32", "stride_x": "i64", "stride_a_slot": "i64", "stride_a_rank": "i64"},
                       {"D_IN": 4096, "BLOCK_R": block_r, "BLOCK_K": triton_lora.BLOCK_K})
    compile_for_hopper(triton_lora._expand,
                       {"hidden_ptr": "*fp32", "b_ptr": f"*{dtype}", "slot_ptr": "*i64", "out_ptr": f"*{dtype}"},
                       {"d_out": "i32", "rank": "i32", "stride_b_slot": "i64", "stride_b_rank": "i64",
                        "stride_out": "i64"},
                       {"BLOCK_R": block_r, "BLOCK_N": triton_lora.BLOCK_N})
