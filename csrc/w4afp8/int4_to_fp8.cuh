// Exact conversion of signed int4 weights to e4m3 for the W4AFP8 grouped GEMM.
//
// Every int4 value (-8..7) is exactly representable in e4m3, so a lookup table is exact. PTX `prmt` looks up
// 4 bytes out of 8 at a time: one table for 0..7, one for -8..-1, and a third `prmt` picks, per byte, the
// table named by the nibble's sign bit. Six integer instructions convert 8 weights.
#pragma once

#include <cstdint>

namespace evalpipe::w4afp8 {

// e4m3 encodings of 0..7 (bytes 0..7) and of -8..-1 (bytes 0..7), little-endian in two words each.
constexpr uint32_t kFp8PosLo = 0x44403800u, kFp8PosHi = 0x4e4c4a48u;
constexpr uint32_t kFp8NegLo = 0xcaccced0u, kFp8NegHi = 0xb8c0c4c8u;

__host__ __device__ inline uint32_t byte_perm(uint32_t lo, uint32_t hi, uint32_t selector) {
#if defined(__CUDA_ARCH__)
  uint32_t out;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(out) : "r"(lo), "r"(hi), "r"(selector));
  return out;
#else
  // Host model of prmt's default mode, used by the CPU layout probe. Selector nibbles here never set bit 3.
  const uint64_t bytes = (uint64_t(hi) << 32) | lo;
  uint32_t out = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t idx = (selector >> (4 * i)) & 0x7u;
    out |= uint32_t((bytes >> (8 * idx)) & 0xffu) << (8 * i);
  }
  return out;
#endif
}

// Four int4 in the low 16 bits (element i in nibble i, two's complement) -> four e4m3 bytes (element i in byte i).
__host__ __device__ inline uint32_t int4x4_to_e4m3x4(uint32_t nibbles) {
  const uint32_t index = nibbles & 0x7777u;
  const uint32_t pos = byte_perm(kFp8PosLo, kFp8PosHi, index);
  const uint32_t neg = byte_perm(kFp8NegLo, kFp8NegHi, index);
  // Byte i comes from `neg` (bytes 4..7 of the pair) when nibble i's sign bit is set.
  const uint32_t pick = ((nibbles >> 1) & 0x4444u) | 0x3210u;
  return byte_perm(pos, neg, pick);
}

}  // namespace evalpipe::w4afp8
