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
  int bad = 0;
  for (uint32_t bits = 0; bits < 0x10000; ++bits) {
    const uint32_t out = evalpipe::w4afp8::int4x4_to_e4m3x4(bits);
    for (int i = 0; i < 4; ++i) {
      const int v = int((bits >> (4 * i)) & 0xF) - (((bits >> (4 * i)) & 0x8) ? 16 : 0);
      const cutlass::float_e4m3_t want{static_cast<float>(v)};
      if (((out >> (8 * i)) & 0xFF) != want.storage) ++bad;
    }
  }
  printf("CONVERT_BAD %d\n", bad);
  return 0;
}
