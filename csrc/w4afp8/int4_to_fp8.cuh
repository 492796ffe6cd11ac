// Exact conversion of signed int4 weights to e4m3 for the W4AFP8 grouped GEMM.
//
// Every int4 value (-8..7) is exactly representable in e4m3, so a lookup table is exact. PTX `prmt` looks up
// 4 bytes out of 8 at a time: one table for q & 7 of non-negative q (0..7), one for negative q (-8..-1). The
// weights are stored in a layout made for this lookup (runtime/kernels/wgmma_layout.py:pack_wgmma_a_operand):
// one 32-bit word holds 8 weights, a0..a3 (first output register) and b0..b3 (second), as
//   bits 4i..4i+2      q & 7 of a_i          bits 16+4i..16+4i+2   q & 7 of b_i
//   bit  8i+7          sign of a_i           bit  8i+3             sign of b_i
// so that after clearing every nibble's bit 3 the low and high halves are ready `prmt` selectors, and the sign
// bits sit at the top of each output byte (a) or 4 bits below it (b), where a sign-replicating `prmt` turns them
// into byte masks. Eleven integer instructions convert 8 weights (the previous layout took about sixteen).
#pragma once

#include <cstdint>

namespace evalpipe::w4afp8 {

// e4m3 encodings of 0..7 (bytes 0..7) and of -8..-1 (bytes 0..7), little-endian in two words each.
constexpr uint32_t kFp8PosLo = 0x44403800u, kFp8PosHi = 0x4e4c4a48u;
constexpr uint32_t kFp8NegLo = 0xcaccced0u, kFp8NegHi = 0xb8c0c4c8u;
// Selector that replicates the sign (top bit) of bytes 0..3 of the first operand into whole bytes.
constexpr uint32_t kSignBytes = 0xba98u;

__host__ __device__ inline uint32_t byte_perm(uint32_t lo, uint32_t hi, uint32_t selector) {
#if defined(__CUDA_ARCH__)
  uint32_t out;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(out) : "r"(lo), "r"(hi), "r"(selector));
  return out;
#else
  // Host model of prmt's default mode (selector bits 16..31 ignored; a nibble's bit 3 replicates the sign).
  const uint64_t bytes = (uint64_t(hi) << 32) | lo;
  uint32_t out = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t nib = (selector >> (4 * i)) & 0xFu;
    uint32_t byte = uint32_t((bytes >> (8 * (nib & 0x7u))) & 0xffu);
    if (nib & 0x8u) byte = (byte & 0x80u) ? 0xffu : 0x00u;
    out |= byte << (8 * i);
  }
  return out;
#endif
}

// One stored word (layout above) -> e4m3 bytes of a0..a3 in `a` and of b0..b3 in `b` (element i in byte i).
// `pos_lo` and `neg_lo` are kFp8PosLo and kFp8NegLo: `prmt` takes one table word as an immediate but the other
// from a register, and given the constant the compiler copies it into a fresh register before every lookup
// (four extra instructions per word); the kernel passes them in registers it loaded, which it cannot copy.
__host__ __device__ inline void int4x8_to_e4m3x8(uint32_t word, uint32_t pos_lo, uint32_t neg_lo, uint32_t& a, uint32_t& b) {
  const uint32_t index = word & 0x77777777u;
  const uint32_t index_b = index >> 16;
  const uint32_t neg_a = byte_perm(word, 0u, kSignBytes);       // 0xff where a_i < 0
  const uint32_t neg_b = byte_perm(word << 4, 0u, kSignBytes);  // 0xff where b_i < 0
  const uint32_t pos_a = byte_perm(pos_lo, kFp8PosHi, index), negv_a = byte_perm(neg_lo, kFp8NegHi, index);
  const uint32_t pos_b = byte_perm(pos_lo, kFp8PosHi, index_b), negv_b = byte_perm(neg_lo, kFp8NegHi, index_b);
  a = (pos_a & ~neg_a) | (negv_a & neg_a);
  b = (pos_b & ~neg_b) | (negv_b & neg_b);
}

}  // namespace evalpipe::w4afp8
