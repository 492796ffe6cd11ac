"""Weight layout of the SM90 W4AFP8 grouped GEMM (csrc/w4afp8): pure torch, runs on CPU and GPU.

The kernel feeds int4 weights to fp8 wgmma as the register-sourced A operand. `pack_wgmma_a_operand` orders the
packed nibbles so that each thread's 16 bytes per (64-row tile, 64-wide K block) are contiguous and already in
the register order of the wgmma m64nNk32 e4m3 A fragment (CuTe's ALayout_64x32): thread T = 32*warp + 4*g + q
holds rows 16*warp + g (+8) and, per k32 step, K columns 4q..4q+3 and 16+4q..16+4q+3.
tests/test_kernel_layout.py checks this mapping against CuTe itself.
"""

from __future__ import annotations

import torch

from runtime.quant.numerics import unpack_int4

TILE_ROWS = 64
K_BLOCK = 64
THREADS = 128


def swiglu_row_order(inter: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Row order of w13 [gate; up] (2*inter rows) for the fused SwiGLU epilogue.

    In each 64-row tile, the thread holding tile row r (r % 16 < 8) also holds row r + 8: those two rows are
    made the gate and up rows of one neuron, so SiLU(gate) * up needs no data exchange between threads.
    Tile t, row r maps to neuron 32*t + 8*(r // 16) + r % 8, gate half when r % 16 < 8.
    """
    if inter % (TILE_ROWS // 2):
        raise ValueError(f"intermediate size {inter} must be a multiple of {TILE_ROWS // 2} for the fused SwiGLU tiles")
    tile = torch.arange(2 * inter // TILE_ROWS, device=device).unsqueeze(1)
    r = torch.arange(TILE_ROWS, device=device).unsqueeze(0)
    neuron = (TILE_ROWS // 2) * tile + 8 * (r // 16) + r % 8
    return (neuron + inter * ((r % 16) // 8)).reshape(-1)


def pack_wgmma_a_operand(packed: torch.Tensor) -> torch.Tensor:
    """int8 [E, N, K/2] (TRT-LLM int4 packing) -> uint8 [E, N/64, K/64, 128, 16] in wgmma A-fragment order.

    Thread T's 16 bytes are 4 little-endian words; word w covers k32 step w // 2 and K half w % 2: 4 consecutive
    K values a0..a3 of row g and b0..b3 of row g + 8, bit-packed for the kernel's lookup (int4_to_fp8.cuh):
    q & 7 of a_i at bits 4i..4i+2 and of b_i at 16+4i..16+4i+2, the sign of a_i at bit 8i+7, of b_i at 8i+3.
    """
    e, n, k_half = packed.shape
    k = 2 * k_half
    if n % TILE_ROWS or k % K_BLOCK:
        raise ValueError(f"weight shape N={n}, K={k} must be multiples of {TILE_ROWS} and {K_BLOCK}")
    q = unpack_int4(packed).to(torch.int64)
    # [E, N/64, warp, row8, g, K/64, step, half, q, i]
    q = q.reshape(e, n // TILE_ROWS, 4, 2, 8, k // K_BLOCK, 2, 2, 4, 4)
    q = q.permute(0, 1, 5, 2, 4, 8, 6, 7, 3, 9)  # [E, nt, kb, warp, g, q, step, half, row8 (a, b), i]
    q = q.reshape(e, n // TILE_ROWS, k // K_BLOCK, THREADS, 4, 2, 4)
    i = torch.arange(4, device=q.device)
    index, sign = q & 7, (q < 0).to(torch.int64)
    word = (index[..., 0, :] << (4 * i)) | (index[..., 1, :] << (16 + 4 * i))
    word = word | (sign[..., 0, :] << (8 * i + 7)) | (sign[..., 1, :] << (8 * i + 3))
    word = word.sum(-1)  # the fields are disjoint: the sum is their bitwise or
    byte = (word.unsqueeze(-1) >> (8 * i)) & 0xFF  # [..., 4 words, 4 bytes], little-endian
    return byte.reshape(e, n // TILE_ROWS, k // K_BLOCK, THREADS, 16).to(torch.uint8).contiguous()


def prepare_scales(scale: torch.Tensor) -> torch.Tensor:
    """[E, N, K/G] fp32 group scales -> bf16 [E, K/G, N] (64 rows of a tile contiguous per group)."""
    return scale.to(torch.bfloat16).transpose(1, 2).contiguous()
