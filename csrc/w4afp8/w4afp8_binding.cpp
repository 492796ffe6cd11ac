// PyTorch binding of the SM90 W4AFP8 MoE kernels: checks tensors, then calls the raw-pointer launchers.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "w4afp8_moe.h"

namespace w4 = evalpipe::w4afp8;

namespace {

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, " must be 16-byte aligned");
}

// Routing metadata and the fp8 copy of x for one MoE call. Returns nothing: all outputs are preallocated.
void route_and_quantize(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& a1, int64_t n_experts,
                        int64_t expert_offset, int64_t tile_tokens, const at::Tensor& xq, const at::Tensor& expert_offsets,
                        const at::Tensor& row_token, const at::Tensor& src2dst, const at::Tensor& tiles,
                        const at::Tensor& num_tiles) {
  check_tensor(x, "x", at::kBFloat16);
  TORCH_CHECK(topk_ids.scalar_type() == at::kInt || topk_ids.scalar_type() == at::kLong, "topk_ids must be int32 or int64");
  TORCH_CHECK(topk_ids.is_contiguous() && topk_ids.dim() == 2 && topk_ids.size(0) == x.size(0), "topk_ids must be [M, topk]");
  check_tensor(a1, "a1", at::kFloat);
  check_tensor(xq, "xq", at::kFloat8_e4m3fn);
  for (auto* t : {&expert_offsets, &row_token, &src2dst, &tiles, &num_tiles}) check_tensor(*t, "routing buffer", at::kInt);
  const c10::cuda::CUDAGuard guard(x.device());
  w4::RouteArgs args{};
  args.x = x.data_ptr();
  args.topk_ids = topk_ids.data_ptr();
  args.ids_int64 = topk_ids.scalar_type() == at::kLong;
  args.a1 = a1.data_ptr<float>();
  args.M = static_cast<int>(x.size(0));
  args.H = static_cast<int>(x.size(1));
  args.topk = static_cast<int>(topk_ids.size(1));
  args.n_experts = static_cast<int>(n_experts);
  args.expert_offset = static_cast<int>(expert_offset);
  args.tile_tokens = static_cast<int>(tile_tokens);
  args.max_tiles = static_cast<int>(tiles.size(0));
  args.xq = static_cast<uint8_t*>(xq.data_ptr());
  args.expert_offsets = expert_offsets.data_ptr<int>();
  args.row_token = row_token.data_ptr<int>();
  args.src2dst = src2dst.data_ptr<int>();
  args.tiles = tiles.data_ptr<int>();
  args.num_tiles = num_tiles.data_ptr<int>();
  check_cuda(w4::route_and_quantize(args, c10::cuda::getCurrentCUDAStream()), "route_and_quantize");
}

void grouped_gemm(const at::Tensor& b, const c10::optional<at::Tensor>& b_rows, const at::Tensor& w, const at::Tensor& scales,
                  const at::Tensor& alpha, const c10::optional<at::Tensor>& next_scale, const at::Tensor& tiles,
                  const at::Tensor& num_tiles, const at::Tensor& out, const at::Tensor& workspace, const at::Tensor& counters,
                  int64_t group, int64_t tile_tokens, int64_t n_per_cta, int64_t splits, int64_t groups_per_stage, bool pdl,
                  bool prefetch_weights_early) {
  check_tensor(b, "activations", at::kFloat8_e4m3fn);
  check_tensor(w, "prepared weights", at::kByte);
  check_tensor(scales, "prepared scales", at::kBFloat16);
  check_tensor(alpha, "alpha", at::kFloat);
  TORCH_CHECK(w.dim() == 5 && w.size(3) == w4::kThreads && w.size(4) == 16, "prepared weights must be [E, N/64, K/64, 128, 16]");
  const int64_t n = w.size(1) * w4::kTileRows, k = w.size(2) * 64;
  TORCH_CHECK(b.size(-1) == k, "activations have K=", b.size(-1), " but the weights K=", k);
  TORCH_CHECK(scales.dim() == 3 && scales.size(0) == w.size(0) && scales.size(1) * group == k && scales.size(2) == n,
              "prepared scales must be [E, K/group, N]");
  const bool swiglu = next_scale.has_value();
  if (swiglu) {
    check_tensor(*next_scale, "next_scale", at::kFloat);
    check_tensor(out, "SwiGLU output", at::kFloat8_e4m3fn);
    TORCH_CHECK(out.size(-1) == n / 2, "SwiGLU output must have N/2 columns");
  } else {
    check_tensor(out, "output", at::kBFloat16);
    TORCH_CHECK(out.size(-1) == n, "output must have N columns");
  }
  if (b_rows) check_tensor(*b_rows, "b_rows", at::kInt);
  check_tensor(workspace, "workspace", at::kFloat);
  check_tensor(counters, "counters", at::kInt);
  const int max_tiles = static_cast<int>(tiles.size(0));
  if (splits > 1) {
    TORCH_CHECK(static_cast<size_t>(workspace.numel()) >= w4::gemm_workspace_floats(max_tiles, n, tile_tokens, splits),
                "split-K workspace too small");
    TORCH_CHECK(static_cast<size_t>(counters.numel()) >= w4::gemm_counter_ints(max_tiles, n), "split-K counters too small");
  }
  const c10::cuda::CUDAGuard guard(b.device());
  w4::GemmArgs args{};
  args.b = static_cast<const uint8_t*>(b.data_ptr());
  args.b_rows = b_rows ? b_rows->data_ptr<int>() : nullptr;
  args.w = w.data_ptr<uint8_t>();
  args.scales = reinterpret_cast<const uint16_t*>(scales.data_ptr());
  args.alpha = alpha.data_ptr<float>();
  args.next_scale = swiglu ? next_scale->data_ptr<float>() : nullptr;
  args.tiles = tiles.data_ptr<int>();
  args.num_tiles = num_tiles.data_ptr<int>();
  args.out = out.data_ptr();
  args.workspace = workspace.data_ptr<float>();
  args.counters = counters.data_ptr<int>();
  args.N = static_cast<int>(n);
  args.K = static_cast<int>(k);
  args.group = static_cast<int>(group);
  args.tile_tokens = static_cast<int>(tile_tokens);
  args.max_tiles = max_tiles;
  args.n_per_cta = static_cast<int>(n_per_cta);
  args.splits = static_cast<int>(splits);
  args.groups_per_stage = static_cast<int>(groups_per_stage);
  args.swiglu = swiglu;
  args.pdl = pdl;
  args.prefetch_weights_early = prefetch_weights_early;
  check_cuda(w4::grouped_gemm(args, c10::cuda::getCurrentCUDAStream()), "w4afp8 grouped_gemm");
}

void combine(const at::Tensor& z, const at::Tensor& src2dst, const at::Tensor& topk_weights, double routed_scaling_factor,
             const at::Tensor& out, bool pdl) {
  check_tensor(z, "expert outputs", at::kBFloat16);
  check_tensor(src2dst, "src2dst", at::kInt);
  check_tensor(topk_weights, "topk_weights", at::kFloat);
  check_tensor(out, "out", at::kBFloat16);
  const c10::cuda::CUDAGuard guard(z.device());
  w4::CombineArgs args{};
  args.z = reinterpret_cast<const uint16_t*>(z.data_ptr());
  args.src2dst = src2dst.data_ptr<int>();
  args.topk_weights = topk_weights.data_ptr<float>();
  args.routed_scaling_factor = static_cast<float>(routed_scaling_factor);
  args.M = static_cast<int>(out.size(0));
  args.H = static_cast<int>(out.size(1));
  args.topk = static_cast<int>(topk_weights.size(1));
  args.out = reinterpret_cast<uint16_t*>(out.data_ptr());
  args.pdl = pdl;
  check_cuda(w4::combine(args, c10::cuda::getCurrentCUDAStream()), "w4afp8 combine");
}

int64_t workspace_floats(int64_t max_tiles, int64_t n, int64_t tile_tokens, int64_t splits) {
  return static_cast<int64_t>(w4::gemm_workspace_floats(max_tiles, n, tile_tokens, splits));
}

int64_t groups_per_stage(int64_t group, int64_t tile_tokens, int64_t requested) {
  return w4::gemm_groups_per_stage(static_cast<int>(group), static_cast<int>(tile_tokens), static_cast<int>(requested));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "SM90 W4AFP8 MoE kernels (evalpipe)";
  m.def("route_and_quantize", &route_and_quantize);
  m.def("grouped_gemm", &grouped_gemm);
  m.def("combine", &combine);
  m.def("workspace_floats", &workspace_floats);
  m.def("groups_per_stage", &groups_per_stage);
}
