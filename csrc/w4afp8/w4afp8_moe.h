// Host API of the SM90 W4AFP8 MoE kernels (raw pointers, no torch: the binding in w4afp8_binding.cpp owns
// tensors and checks). Layouts are produced by runtime/kernels/cutlass_moe.py:prepare.
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

namespace evalpipe::w4afp8 {

// Rows of the weight tile (the wgmma M extent); K is consumed one scale group per pipeline stage.
constexpr int kTileRows = 64;
constexpr int kThreads = 128;

struct RouteArgs {
  const void* x;             // bf16 [M, H]
  const void* topk_ids;      // int32 or int64 [M, topk]
  bool ids_int64;
  const float* a1;           // device scalar: static activation scale of GEMM1
  int M, H, topk, n_experts, expert_offset, tile_tokens, max_tiles;
  uint8_t* xq;               // out fp8 [M, H]
  int* expert_offsets;       // out [n_experts + 1]
  int* row_token;            // out [M * topk]: sorted row -> token
  int* src2dst;              // out [M * topk]: (token, slot) -> sorted row, -1 when the expert is not local
  int* tiles;                // out [max_tiles, 3]: (expert, first sorted row, rows)
  int* num_tiles;            // out [1]
};

struct GemmArgs {
  const uint8_t* b;          // fp8 activations, K bytes per row
  const int* b_rows;         // optional gather: activation row of each sorted row (nullptr: identity)
  const uint8_t* w;          // prepared int4 weights [E][N/64][K/64][128 threads][16 bytes]
  const uint16_t* scales;    // prepared bf16 group scales [E][K/G][N]
  const float* alpha;        // device scalar: the GEMM's activation scale
  const float* next_scale;   // device scalar: scale of the fp8 requantization (SwiGLU mode only)
  const int* tiles;
  const int* num_tiles;
  void* out;                 // SwiGLU mode: fp8 [rows, N/2]; plain mode: bf16 [rows, N]
  float* workspace;          // split-K partial sums (splits > 1)
  int* counters;             // split-K arrival counters, zero on entry, left zero on exit
  int N, K, group, tile_tokens, max_tiles, n_per_cta, splits;
  int groups_per_stage;          // 1 or 2 (see gemm_groups_per_stage)
  bool swiglu;
  bool pdl;                      // launch as a programmatic dependent of the previous kernel
  bool prefetch_weights_early;   // the tile list is complete when this launches (the previous kernel triggered
                                 // after its own wait): load weights before waiting on it
};

struct CombineArgs {
  const uint16_t* z;         // bf16 [rows, H]
  const int* src2dst;        // [M * topk]
  const float* topk_weights; // fp32 [M, topk]
  float routed_scaling_factor;
  int M, H, topk;
  uint16_t* out;             // bf16 [M, H]
  bool pdl;
};

cudaError_t route_and_quantize(const RouteArgs& args, cudaStream_t stream);
cudaError_t grouped_gemm(const GemmArgs& args, cudaStream_t stream);
cudaError_t combine(const CombineArgs& args, cudaStream_t stream);

// Bytes of split-K workspace (floats) and counters (ints) a grouped_gemm call with these arguments needs.
size_t gemm_workspace_floats(int max_tiles, int N, int tile_tokens, int splits);
size_t gemm_counter_ints(int max_tiles, int N);
// Scale groups per pipeline stage the kernel uses for (group, tile_tokens) when `requested` (1 or 2) are asked
// for; split-K splits whole stages, so the host plans with this value.
int gemm_groups_per_stage(int group, int tile_tokens, int requested);

}  // namespace evalpipe::w4afp8
