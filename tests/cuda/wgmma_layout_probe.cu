// Host-only probe (no GPU needed): prints CuTe's register layouts of the fp8 RS wgmma used by
// csrc/w4afp8 and checks the int4 -> e4m3 lookup. tests/test_kernel_layout.py compiles and reads it.
#include <cstdio>

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cutlass/float8.h>

#include "../../csrc/w4afp8/int4_to_fp8.cuh"

using namespace cute;

int main() {
  using Tile = Shape<_64, _16, _64>;
  auto mma = make_tiled_mma(GMMA::rs_op_selector<float_e4m3_t, float_e4m3_t, float, Tile, GMMA::Major::K, GMMA::Major::K>());
  for (int t = 0; t < 128; ++t) {
    auto thr = mma.get_thread_slice(t);
    Tensor a = thr.partition_A(make_identity_tensor(Shape<_64, _64>{}));  // (V, M, K)
    for (int s = 0; s < size<2>(a); ++s)
      for (int v = 0; v < size<0>(a); ++v) printf("A %d %d %d %d %d\n", t, s, v, int(get<0>(a(v, 0, s))), int(get<1>(a(v, 0, s))));
    Tensor c = thr.partition_C(make_identity_tensor(Shape<_64, _16>{}));
    for (int i = 0; i < size(c); ++i) printf("C %d %d %d %d\n", t, i, int(get<0>(c(i))), int(get<1>(c(i))));
  }
  // Every 32-bit word is a valid stored word (layout in int4_to_fp8.cuh): check the decode of each of its 8
  // weights on words with all nibbles equal (every value at every position) and on pseudo-random words.
  int bad = 0;
  auto check = [&](uint32_t word) {
    uint32_t out[2];
    evalpipe::w4afp8::int4x8_to_e4m3x8(word, evalpipe::w4afp8::kFp8PosLo, evalpipe::w4afp8::kFp8NegLo, out[0], out[1]);
    for (int half = 0; half < 2; ++half)
      for (int i = 0; i < 4; ++i) {
        const int index = int((word >> (16 * half + 4 * i)) & 0x7u);
        const int sign = int((word >> (8 * i + (half ? 3 : 7))) & 0x1u);
        const cutlass::float_e4m3_t want{static_cast<float>(index - 8 * sign)};
        if (((out[half] >> (8 * i)) & 0xFF) != want.storage) ++bad;
      }
  };
  for (uint32_t nib = 0; nib < 16; ++nib) check(nib * 0x11111111u);
  uint32_t state = 12345u;
  for (int n = 0; n < (1 << 20); ++n) {
    state = state * 1664525u + 1013904223u;
    check(state);
  }
  printf("CONVERT_BAD %d\n", bad);
  return 0;
}
