// SM90 W4AFP8 MoE: routing + static fp8 quantization, an int4 x e4m3 grouped GEMM on fp8 wgmma (with a fused
// SwiGLU + fp8 requantization epilogue for the gate/up GEMM), and the top-k combine.
//
// Numerics (../shared/reference/w4afp8-sglang.md, section 2.2; oracle: runtime/quant/numerics.py):
//   P_g = sum over K group g of e4m3(q) * a_q        fp8 wgmma, fp32 accumulator reset per group
//   acc = sum_g float(bf16 s[n, g]) * P_g           fp32 FMA in registers
//   D   = bf16(alpha * acc)                          one fp32 alpha per GEMM
//
// GEMM structure: the problem runs transposed (weights are the wgmma A operand, tokens its N extent) so that
// a 64-row weight tile meets 8..64 tokens. Weights are pre-shuffled once (prepare) into the register order
// of the wgmma A fragment: each thread's 16 bytes per 64-wide K block are contiguous, so weights stream with
// 16-byte cp.async into a multi-stage shared-memory ring and are converted int4 -> e4m3 in registers.
// Activations (the B operand) are gathered row by row into a swizzled K-major shared layout. One pipeline
// stage holds one scale group (G = 128, or 64 for the demo model), so scales apply once per stage.
#include "w4afp8_moe.h"
#include "int4_to_fp8.cuh"

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cub/block/block_scan.cuh>
#include <cute/tensor.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/arch/mma_sm90.hpp>

namespace evalpipe::w4afp8 {

namespace {

using namespace cute;

constexpr float kFp8Max = 448.0f;

__device__ __forceinline__ uint8_t to_fp8(float v) {
  v = fminf(fmaxf(v, -kFp8Max), kFp8Max);
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
}

__device__ __forceinline__ float round_bf16(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

__device__ __forceinline__ float bf16_bits_to_float(uint16_t bits) { return __uint_as_float(uint32_t(bits) << 16); }

// Programmatic dependent launch (PDL): a kernel launched with the PDL attribute may start as soon as every CTA of
// the previous kernel has called launch_dependents (or exited); it must wait before touching anything that kernel
// writes. Both are no-ops without the attribute. The chain per MoE call is route (plain launch: starts after the
// engine's previous kernel completed) -> gate/up GEMM -> down GEMM -> combine. The wait only covers the previous
// kernel of the chain, so whatever a kernel reads before its wait must be complete by the time that previous
// kernel lets it launch: the gate/up GEMM therefore triggers only after its own wait (routing complete), which is
// what makes the down GEMM's early read of the tile list safe.
__device__ __forceinline__ void wait_for_previous_kernel() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void allow_next_kernel_launch() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }

template <typename Kernel, typename Args>
cudaError_t launch(Kernel kernel, dim3 grid, int threads, int smem, cudaStream_t stream, bool pdl, const Args& args) {
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, args);
}

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(valid ? 16 : 0));
}

// ------------------------------------------------------------------------------------------ routing + quant

constexpr int kRouteThreads = 1024;

template <typename Id>
__device__ void route_block(const RouteArgs& a) {
  __shared__ int counts[kRouteThreads];
  __shared__ int cursor[kRouteThreads];
  using Scan = cub::BlockScan<int, kRouteThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  const Id* ids = static_cast<const Id*>(a.topk_ids);
  const int pairs = a.M * a.topk;
  const int tid = threadIdx.x;
  counts[tid] = 0;
  __syncthreads();
  for (int p = tid; p < pairs; p += kRouteThreads) {
    const long long e = static_cast<long long>(ids[p]) - a.expert_offset;
    if (e >= 0 && e < a.n_experts) atomicAdd(&counts[e], 1);
  }
  __syncthreads();
  const int count = tid < a.n_experts ? counts[tid] : 0;
  const int tiles = (count + a.tile_tokens - 1) / a.tile_tokens;
  int offset, tile_offset, total_tiles;
  Scan(scan_storage).ExclusiveSum(count, offset);
  __syncthreads();
  Scan(scan_storage).ExclusiveSum(tiles, tile_offset, total_tiles);
  if (tid < a.n_experts) {
    a.expert_offsets[tid] = offset;
    cursor[tid] = offset;
    for (int i = 0; i < tiles; ++i) {
      int* t = a.tiles + 3 * (tile_offset + i);
      t[0] = tid;
      t[1] = offset + i * a.tile_tokens;
      t[2] = min(a.tile_tokens, count - i * a.tile_tokens);
    }
  }
  if (tid == a.n_experts - 1) a.expert_offsets[a.n_experts] = offset + count;
  if (tid == 0) *a.num_tiles = total_tiles;
  __syncthreads();
  for (int p = tid; p < pairs; p += kRouteThreads) {
    const long long e = static_cast<long long>(ids[p]) - a.expert_offset;
    if (e >= 0 && e < a.n_experts) {
      const int row = atomicAdd(&cursor[e], 1);
      a.row_token[row] = p / a.topk;
      a.src2dst[p] = row;
    } else {
      a.src2dst[p] = -1;
    }
  }
}

template <typename Id>
__global__ void __launch_bounds__(kRouteThreads) route_and_quantize_kernel(RouteArgs a) {
  allow_next_kernel_launch();
  if (blockIdx.x == 0) route_block<Id>(a);
  // Every block (block 0 too) quantizes a share of x: 8 bf16 in, 8 fp8 out per step.
  const float inv = 1.0f / *a.a1;
  const size_t vectors = static_cast<size_t>(a.M) * a.H / 8;
  const uint4* x = static_cast<const uint4*>(a.x);
  uint2* xq = reinterpret_cast<uint2*>(a.xq);
  for (size_t v = blockIdx.x * size_t(kRouteThreads) + threadIdx.x; v < vectors; v += size_t(gridDim.x) * kRouteThreads) {
    const uint4 in = x[v];
    const uint32_t words[4] = {in.x, in.y, in.z, in.w};
    uint32_t out[2] = {0, 0};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const uint16_t bits = static_cast<uint16_t>(words[i / 2] >> (16 * (i % 2)));
      out[i / 4] |= uint32_t(to_fp8(bf16_bits_to_float(bits) * inv)) << (8 * (i % 4));
    }
    xq[v] = make_uint2(out[0], out[1]);
  }
}

// ------------------------------------------------------------------------------------------ grouped GEMM

// SG: scale groups per pipeline stage. Small token tiles are bound by per-stage overhead (barrier, wgmma wait,
// bookkeeping) rather than by the dot products; two groups per stage (one fp32 partial each) halve it.
template <int NT, int G, int SG>
struct GemmConfig {
  static constexpr int kGroupsPerStage = SG;
  static constexpr int kStageK = G * kGroupsPerStage;     // K per stage
  static constexpr int kStages = kGroupsPerStage == 2 ? 3 : (NT <= 16 ? 5 : 4);  // about 16 KB in flight per CTA
  static constexpr int kKSteps = G / 32;                 // wgmma k32 steps per group
  static constexpr int kABytes = kTileRows * kStageK / 2;  // int4 weights per stage
  static constexpr int kSBytes = kTileRows * 2 * kGroupsPerStage;  // bf16 scales of the tile's rows per stage
  static constexpr int kBBytes = NT * kStageK;           // fp8 activations per stage
  // All A stages, then all B stages, then the scales: every B stage stays aligned for its swizzle atom.
  static constexpr int kSmemBytes = kStages * (kABytes + kBBytes + kSBytes) + 1024;  // + alignment slack
  static constexpr int kAcc = NT / 2;                    // fp32 accumulators per thread
  using SmemAtomB = std::conditional_t<G == 128, GMMA::Layout_K_SW128_Atom<float_e4m3_t>,
                                       GMMA::Layout_K_SW64_Atom<float_e4m3_t>>;
  using SmemLayoutB = decltype(tile_to_shape(SmemAtomB{}, Shape<Int<NT>, Int<kStageK>, Int<kStages>>{}));
  static_assert(decltype(cosize(SmemLayoutB{}))::value == kStages * kBBytes, "B stages are contiguous");
  using TiledMma = decltype(make_tiled_mma(
      GMMA::rs_op_selector<float_e4m3_t, float_e4m3_t, float, Shape<_64, Int<NT>, Int<G>>,
                           GMMA::Major::K, GMMA::Major::K>()));
  static_assert(kABytes % 1024 == 0 && kBBytes % 512 == 0, "stage sections must keep the swizzle alignment");
};

template <int NT, int G, int SG, bool kSwiGLU>
__global__ void __launch_bounds__(kThreads) w4afp8_grouped_gemm_kernel(GemmArgs p) {
  using Cfg = GemmConfig<NT, G, SG>;
  constexpr int kStages = Cfg::kStages;
  const int tile = blockIdx.x;
  // The tile list comes from the routing kernel. The gate/up GEMM runs right after it and waits first. The down
  // GEMM prefetches its weights while the gate/up GEMM drains, reading the tile list before its wait: that is
  // safe only because the gate/up GEMM lets it launch after that GEMM's own wait, i.e. once routing completed
  // (launching dependents before the wait let the down GEMM read a tile list still being written: garbage
  // expert and row indices, an illegal memory access when the buffer last held another kernel's data).
  if (!p.prefetch_weights_early) wait_for_previous_kernel();
  allow_next_kernel_launch();
  // L2 loads (.cg): the tile list was written by another kernel that this one is not ordered after by a wait.
  if (tile >= __ldcg(p.num_tiles)) {
    // Even an idle CTA waits: this kernel then completes only after the previous one did, so the next kernel's
    // wait on this one covers the whole chain (with no tiles at all, no CTA would wait otherwise).
    if (p.prefetch_weights_early) wait_for_previous_kernel();
    return;
  }
  const int tid = threadIdx.x;
  const int expert = __ldcg(p.tiles + 3 * tile), row0 = __ldcg(p.tiles + 3 * tile + 1), nrows = __ldcg(p.tiles + 3 * tile + 2);
  const int n_tiles = p.N / kTileRows;
  const int nt_begin = blockIdx.y * p.n_per_cta;
  const int nt_count = min(p.n_per_cta, n_tiles - nt_begin);
  constexpr int kSG = Cfg::kGroupsPerStage;
  const int groups = p.K / G;
  const int stages_per_tile = (groups + kSG - 1) / kSG;  // an odd last group leaves the stage's second half empty
  const int per_split = (stages_per_tile + p.splits - 1) / p.splits;
  const int g_begin = blockIdx.z * per_split;  // first stage of this split (in stages of kSG groups)
  const int g_count = min(stages_per_tile, g_begin + per_split) - g_begin;
  const int iters = nt_count * g_count;

  extern __shared__ uint8_t smem_raw[];
  // Align in the shared window (integer offset on the shared pointer keeps LDS instead of generic loads).
  uint8_t* smem = smem_raw + ((1024u - (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) & 1023u)) & 1023u);
  uint8_t* smem_a = smem;                                              // kStages x int4 weights
  uint8_t* smem_b = smem + kStages * Cfg::kABytes;                     // kStages x fp8 activations (swizzled)
  uint8_t* smem_s = smem + kStages * (Cfg::kABytes + Cfg::kBBytes);    // kStages x 64 bf16 scales

  // Loads walk this CTA's stages in order (kSG scale groups per stage, then the next weight tile) with running
  // pointers: the loop adds strides rather than recomputing 64-bit addresses (the load path once took a third of
  // the main loop's instructions, and small token tiles are bound by instruction issue).
  struct Cursor {
    const uint8_t* a;    // this thread's 16 bytes of the stage's first 64-wide K block of weights
    const uint16_t* sc;  // scales of the stage's first group for the tile's rows (8 bf16 per copying thread)
    int stage;           // stage within the weight tile, g_begin <= stage < g_begin + g_count
  };
  const size_t a_tile_bytes = static_cast<size_t>(p.K / 64) * 2048;
  // From the stage after a tile's last one to the next tile's first (negative when the last stage is half empty).
  const ptrdiff_t a_wrap = static_cast<ptrdiff_t>(a_tile_bytes) - static_cast<ptrdiff_t>(g_count) * Cfg::kABytes;
  const int sc_wrap = kTileRows - g_count * kSG * p.N;
  auto advance = [&](Cursor& c) {
    c.a += Cfg::kABytes;
    c.sc += kSG * p.N;
    if (++c.stage == g_begin + g_count) {
      c.stage = g_begin;
      c.a += a_wrap;
      c.sc += sc_wrap;
    }
  };
  // A stage's weights are kSG * G / 64 blocks of 2048 bytes, contiguous in global memory and in shared memory.
  constexpr int kABlocks = kSG * (G / 64);
  uint8_t* const a_dst = smem_a + tid * 16;
  const bool copies_scales = tid < kTileRows * 2 / 16;
  // The second group of a stage exists unless the group count is odd and this is the tile's last stage.
  auto second_group_exists = [&](int stage) { return kSG == 1 || stage * kSG + 1 < groups; };
  auto load_weights = [&](int s, const Cursor& c) {
    const bool second = second_group_exists(c.stage);
#pragma unroll
    for (int b = 0; b < kABlocks; ++b) {
      if (kSG > 1 && b >= G / 64 && !second) break;
      cp_async_16(a_dst + s * Cfg::kABytes + b * 2048, c.a + b * 2048, true);
    }
    if (copies_scales) {
#pragma unroll
      for (int h = 0; h < kSG; ++h)
        if (h == 0 || second) cp_async_16(smem_s + s * Cfg::kSBytes + h * kTileRows * 2 + tid * 16, c.sc + h * p.N, true);
    }
  };
  // Prologue, part 1: weights and scales of the first stages (one cp.async group), possibly before the wait.
  const Cursor first{p.w + (static_cast<size_t>(expert) * n_tiles + nt_begin) * a_tile_bytes +
                         static_cast<size_t>(g_begin) * Cfg::kABytes + tid * 16,
                     p.scales + (static_cast<size_t>(expert) * groups + g_begin * kSG) * p.N + nt_begin * kTileRows + tid * 8,
                     g_begin};
  Cursor cursor = first;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < iters) load_weights(s, cursor);
    advance(cursor);
  }
  cute::cp_async_fence();
  if (p.prefetch_weights_early) wait_for_previous_kernel();

  // Which activation pieces (16 B) of one group this thread copies each stage, and from where.
  constexpr int kBPieces = NT * G / 16;
  constexpr int kBPerThread = (kBPieces + kThreads - 1) / kThreads;
  const uint8_t* b_src[kBPerThread];
  int b_dst[kSG][kBPerThread];
#pragma unroll
  for (int i = 0; i < kBPerThread; ++i) {
    const int piece = tid + i * kThreads;
    const int r = piece / (G / 16), col = (piece % (G / 16)) * 16;
#pragma unroll
    for (int h = 0; h < kSG; ++h)
      b_dst[h][i] = piece < kBPieces ? static_cast<int>(typename Cfg::SmemLayoutB{}(r, h * G + col, 0)) : -1;
    b_src[i] = nullptr;
    if (piece < kBPieces && r < nrows) {
      const int src_row = p.b_rows ? p.b_rows[row0 + r] : row0 + r;
      b_src[i] = p.b + static_cast<size_t>(src_row) * p.K + col;
    }
  }
  // Rows past the tile's token count, and a group past K (odd group count), get zero activations: their
  // products are exactly zero.
  auto load_activations = [&](int s, int stage) {
    const bool second = second_group_exists(stage);
#pragma unroll
    for (int h = 0; h < kSG; ++h) {
#pragma unroll
      for (int i = 0; i < kBPerThread; ++i) {
        const bool valid = b_src[i] != nullptr && (h == 0 || second);
        if (b_dst[h][i] >= 0)
          cp_async_16(smem_b + s * Cfg::kBBytes + b_dst[h][i], valid ? b_src[i] + stage * Cfg::kStageK + h * G : p.b, valid);
      }
    }
  };
  // Prologue, part 2: activations of the first stages, one group each (so group it+1 completes stage it).
  {
    Cursor c = first;
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < iters) load_activations(s, c.stage);
      advance(c);
      cute::cp_async_fence();
    }
  }
  auto load_next_stage = [&](int s) {
    load_weights(s, cursor);
    load_activations(s, cursor.stage);
    advance(cursor);
  };

  typename Cfg::TiledMma mma;
  auto thr = mma.get_thread_slice(tid);
  Tensor sB = make_tensor(make_smem_ptr(reinterpret_cast<float_e4m3_t*>(smem_b)), typename Cfg::SmemLayoutB{});
  Tensor tCrB = thr.partition_fragment_B(sB);  // wgmma descriptors (MMA, 1, k-steps, stages)
  Tensor accum = partition_fragment_C(mma, Shape<_64, Int<NT>>{});
  Tensor partial = partition_fragment_C(mma, Shape<_64, Int<NT>>{});   // first group of the stage
  Tensor partial2 = partition_fragment_C(mma, Shape<_64, Int<NT>>{});  // second group (kSG == 2)
  Tensor tCrA = make_tensor<float_e4m3_t>(partition_shape_A(mma, Shape<_64, Int<Cfg::kStageK>>{}));
  uint32_t* a_regs = reinterpret_cast<uint32_t*>(raw_pointer_cast(tCrA.data()));
  static_assert(decltype(size(accum))::value == Cfg::kAcc, "accumulator fragment size");

  // Thread's rows within the 64-row tile (wgmma accumulator layout): warp*16 + lane/4 and 8 below.
  const int warp = tid / 32, lane = tid % 32;
  const int my_row = warp * 16 + lane / 4;
  const int my_tok = 2 * (lane % 4);

  clear(accum);
  const float alpha = *p.alpha;
  int use_nt = nt_begin, use_g = g_begin, s = 0;
  // The lookup tables' register words (see int4x8_to_e4m3x8), reloaded after each barrier so that they stay
  // loaded values in registers; written before the loop's first barrier. Two copies read by lane parity: from
  // one address the compiler knows the value is uniform, moves it to a uniform register and copies it back
  // before every lookup again.
  __shared__ uint2 lut_lo[2];
  if (tid < 2) lut_lo[tid] = make_uint2(kFp8PosLo, kFp8NegLo);

  for (int it = 0; it < iters; ++it) {
    cute::cp_async_wait<kStages - 2>();
    __syncthreads();
    if (it + kStages - 1 < iters) load_next_stage(s == 0 ? kStages - 1 : s - 1);
    cute::cp_async_fence();

    // int4 -> e4m3 into the A fragment: word (step, half) holds rows (r, r+8) x 4 k of one register pair.
    const uint2 lut = lut_lo[tid & 1];
#pragma unroll
    for (int j = 0; j < Cfg::kStageK / 64; ++j) {
      const uint4 v = *reinterpret_cast<const uint4*>(smem_a + s * Cfg::kABytes + (j * kThreads + tid) * 16);
      const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const int step = 2 * j + w / 2, half = w % 2;
        int4x8_to_e4m3x8(words[w], lut.x, lut.y, a_regs[step * 4 + 2 * half + 0], a_regs[step * 4 + 2 * half + 1]);
      }
    }
    const uint16_t* sc = reinterpret_cast<const uint16_t*>(smem_s + s * Cfg::kSBytes);

    warpgroup_fence_operand(partial);
    if constexpr (kSG == 2) warpgroup_fence_operand(partial2);
    warpgroup_arrive();
    mma.accumulate_ = GMMA::ScaleOut::Zero;
#pragma unroll
    for (int k = 0; k < Cfg::kKSteps; ++k) {
      cute::gemm(mma, tCrA(_, _, k), tCrB(_, _, k, s), partial);
      mma.accumulate_ = GMMA::ScaleOut::One;
    }
    if constexpr (kSG == 2) {
      mma.accumulate_ = GMMA::ScaleOut::Zero;
#pragma unroll
      for (int k = Cfg::kKSteps; k < 2 * Cfg::kKSteps; ++k) {
        cute::gemm(mma, tCrA(_, _, k), tCrB(_, _, k, s), partial2);
        mma.accumulate_ = GMMA::ScaleOut::One;
      }
    }
    warpgroup_commit_batch();
    warpgroup_wait<0>();
    warpgroup_fence_operand(partial);
    {
      const float lo = bf16_bits_to_float(sc[my_row]), hi = bf16_bits_to_float(sc[my_row + 8]);
#pragma unroll
      for (int i = 0; i < Cfg::kAcc; ++i) accum(i) += ((i / 2) % 2 ? hi : lo) * partial(i);
    }
    if constexpr (kSG == 2) {
      warpgroup_fence_operand(partial2);
      if (use_g * 2 + 1 < groups) {  // the second group exists (stale scales of a missing one are never read)
        const float lo = bf16_bits_to_float(sc[kTileRows + my_row]), hi = bf16_bits_to_float(sc[kTileRows + my_row + 8]);
#pragma unroll
        for (int i = 0; i < Cfg::kAcc; ++i) accum(i) += ((i / 2) % 2 ? hi : lo) * partial2(i);
      }
    }

    s = s == kStages - 1 ? 0 : s + 1;
    const int nt = use_nt;
    if (++use_g != g_begin + g_count) continue;
    use_g = g_begin;
    ++use_nt;

    // ---- end of one weight tile: split-K fix-up, then the epilogue.
    if (p.splits > 1) {
      __shared__ int is_last;
      const size_t slot = static_cast<size_t>(tile) * n_tiles + nt;
      float* ws = p.workspace + (slot * p.splits * kThreads) * Cfg::kAcc;
      float4* mine = reinterpret_cast<float4*>(ws + (size_t(blockIdx.z) * kThreads + tid) * Cfg::kAcc);
#pragma unroll
      for (int i = 0; i < Cfg::kAcc / 4; ++i) mine[i] = make_float4(accum(4 * i), accum(4 * i + 1), accum(4 * i + 2), accum(4 * i + 3));
      __threadfence();
      __syncthreads();
      if (tid == 0) is_last = atomicAdd(p.counters + slot, 1) == p.splits - 1;
      __syncthreads();
      if (!is_last) {
        clear(accum);
        continue;
      }
      __threadfence();
      // Sum the splits in a fixed order so results do not depend on which CTA finished last.
      clear(accum);
      for (int sp = 0; sp < p.splits; ++sp) {
        const float4* part = reinterpret_cast<const float4*>(ws + (size_t(sp) * kThreads + tid) * Cfg::kAcc);
#pragma unroll
        for (int i = 0; i < Cfg::kAcc / 4; ++i) {
          const float4 v = __ldcg(part + i);
          accum(4 * i) += v.x; accum(4 * i + 1) += v.y; accum(4 * i + 2) += v.z; accum(4 * i + 3) += v.w;
        }
      }
      if (tid == 0) p.counters[slot] = 0;
    }

    // Accumulator i: token 8*(i/4) + my_tok + i%2, tile row my_row + 8*((i/2)%2).
    if constexpr (kSwiGLU) {
      // prepare() orders w13 rows so that tile row r (< 8 within its 16-row warp slice) is a gate row and r+8
      // the matching up row: each thread holds both halves of its neurons.
      const int inter = p.N / 2;
      const int neuron = nt * (kTileRows / 2) + warp * 8 + lane / 4;
      const float inv_next = 1.0f / *p.next_scale;
      uint8_t* y = static_cast<uint8_t*>(p.out);
#pragma unroll
      for (int i = 0; i < Cfg::kAcc; i += 4) {
#pragma unroll
        for (int t = 0; t < 2; ++t) {
          const int tok = 8 * (i / 4) + my_tok + t;
          if (tok >= nrows) continue;
          const float gate = round_bf16(alpha * accum(i + t)), up = round_bf16(alpha * accum(i + 2 + t));
          const float act = gate / (1.0f + expf(-gate)) * up;
          y[static_cast<size_t>(row0 + tok) * inter + neuron] = to_fp8(act * inv_next);
        }
      }
    } else {
      __nv_bfloat16* z = static_cast<__nv_bfloat16*>(p.out);
      const int n = nt * kTileRows + my_row;
#pragma unroll
      for (int i = 0; i < Cfg::kAcc; ++i) {
        const int tok = 8 * (i / 4) + my_tok + i % 2;
        if (tok < nrows) z[static_cast<size_t>(row0 + tok) * p.N + n + 8 * ((i / 2) % 2)] = __float2bfloat16_rn(alpha * accum(i));
      }
    }
    clear(accum);
  }
}

// Two groups per stage exist for 128-wide groups and token tiles up to 32 (few instantiations).
constexpr bool has_two_group_stages(int nt, int g) { return g == 128 && nt <= 32; }
template <int NT, int G>
constexpr bool kHasTwoGroupStages = has_two_group_stages(NT, G);

template <int NT, int G, bool kSwiGLU>
cudaError_t launch_gemm(const GemmArgs& p, cudaStream_t stream) {
  if constexpr (kHasTwoGroupStages<NT, G>) {
    if (p.groups_per_stage == 2) {
      using Cfg = GemmConfig<NT, G, 2>;
      auto kernel = w4afp8_grouped_gemm_kernel<NT, G, 2, kSwiGLU>;
      cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
      if (err != cudaSuccess) return err;
      const dim3 grid(p.max_tiles, (p.N / kTileRows + p.n_per_cta - 1) / p.n_per_cta, p.splits);
      const cudaError_t launched = launch(kernel, grid, kThreads, Cfg::kSmemBytes, stream, p.pdl, p);
      return launched != cudaSuccess ? launched : cudaGetLastError();
    }
  }
  using Cfg = GemmConfig<NT, G, 1>;
  auto kernel = w4afp8_grouped_gemm_kernel<NT, G, 1, kSwiGLU>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  if (err != cudaSuccess) return err;
  const int n_tiles = p.N / kTileRows;
  const dim3 grid(p.max_tiles, (n_tiles + p.n_per_cta - 1) / p.n_per_cta, p.splits);
  const cudaError_t launched = launch(kernel, grid, kThreads, Cfg::kSmemBytes, stream, p.pdl, p);
  return launched != cudaSuccess ? launched : cudaGetLastError();
}

template <int G, bool kSwiGLU>
cudaError_t dispatch_tokens(const GemmArgs& p, cudaStream_t stream) {
  switch (p.tile_tokens) {
    case 8: return launch_gemm<8, G, kSwiGLU>(p, stream);
    case 16: return launch_gemm<16, G, kSwiGLU>(p, stream);
    case 32: return launch_gemm<32, G, kSwiGLU>(p, stream);
    case 64: return launch_gemm<64, G, kSwiGLU>(p, stream);
    case 128: return launch_gemm<128, G, kSwiGLU>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <bool kSwiGLU>
cudaError_t dispatch_group(const GemmArgs& p, cudaStream_t stream) {
  switch (p.group) {
    case 64: return dispatch_tokens<64, kSwiGLU>(p, stream);
    case 128: return dispatch_tokens<128, kSwiGLU>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

// ------------------------------------------------------------------------------------------ combine

constexpr int kCombineThreads = 128;

__global__ void __launch_bounds__(kCombineThreads) combine_kernel(CombineArgs a) {
  wait_for_previous_kernel();
  const int token = blockIdx.x;
  const int col = (blockIdx.y * kCombineThreads + threadIdx.x) * 8;
  if (col >= a.H) return;
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int k = 0; k < a.topk; ++k) {
    const int row = a.src2dst[token * a.topk + k];
    if (row < 0) continue;
    const float w = a.topk_weights[token * a.topk + k];
    const uint4 v = *reinterpret_cast<const uint4*>(a.z + static_cast<size_t>(row) * a.H + col);
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] += w * bf16_bits_to_float(static_cast<uint16_t>(words[i / 2] >> (16 * (i % 2))));
  }
  uint32_t out[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __nv_bfloat162 pair = __floats2bfloat162_rn(a.routed_scaling_factor * acc[2 * i], a.routed_scaling_factor * acc[2 * i + 1]);
    out[i] = *reinterpret_cast<const uint32_t*>(&pair);
  }
  *reinterpret_cast<uint4*>(a.out + static_cast<size_t>(token) * a.H + col) = make_uint4(out[0], out[1], out[2], out[3]);
}

}  // namespace

cudaError_t route_and_quantize(const RouteArgs& a, cudaStream_t stream) {
  if (a.n_experts > kRouteThreads || a.H % 8) return cudaErrorInvalidValue;
  const size_t vectors = static_cast<size_t>(a.M) * a.H / 8;
  const int blocks = static_cast<int>(std::max<size_t>(1, std::min<size_t>((vectors + kRouteThreads - 1) / kRouteThreads, 1024)));
  if (a.ids_int64)
    route_and_quantize_kernel<int64_t><<<blocks, kRouteThreads, 0, stream>>>(a);
  else
    route_and_quantize_kernel<int32_t><<<blocks, kRouteThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t grouped_gemm(const GemmArgs& p, cudaStream_t stream) {
  if (p.N % kTileRows || p.K % p.group || p.max_tiles <= 0) return cudaErrorInvalidValue;
  return p.swiglu ? dispatch_group<true>(p, stream) : dispatch_group<false>(p, stream);
}

cudaError_t combine(const CombineArgs& a, cudaStream_t stream) {
  if (a.H % 8) return cudaErrorInvalidValue;
  const dim3 grid(a.M, (a.H / 8 + kCombineThreads - 1) / kCombineThreads);
  const cudaError_t launched = launch(combine_kernel, grid, kCombineThreads, 0, stream, a.pdl, a);
  return launched != cudaSuccess ? launched : cudaGetLastError();
}

size_t gemm_workspace_floats(int max_tiles, int N, int tile_tokens, int splits) {
  return static_cast<size_t>(max_tiles) * (N / kTileRows) * splits * kThreads * (tile_tokens / 2);
}

size_t gemm_counter_ints(int max_tiles, int N) { return static_cast<size_t>(max_tiles) * (N / kTileRows); }

int gemm_groups_per_stage(int group, int tile_tokens, int requested) {
  return requested == 2 && has_two_group_stages(tile_tokens, group) ? 2 : 1;
}

}  // namespace evalpipe::w4afp8
