// Host-side argument checks shared by the op bindings (the Python wrapper checks first with friendlier messages;
// these guard direct calls into the extension).
#pragma once
#include <torch/extension.h>
#include <initializer_list>

namespace wkv {

inline void check_seq(const torch::Tensor& ref, std::initializer_list<torch::Tensor> ts, int N) {
  TORCH_CHECK(ref.is_cuda() && ref.dim() == 4 && ref.size(3) == N, "wkv: expected CUDA [B,T,H,", N, "] tensors");
  TORCH_CHECK(ref.scalar_type() == at::kBFloat16 || ref.scalar_type() == at::kFloat, "wkv: dtype must be bf16 or fp32");
  for (const auto& t : ts) {
    TORCH_CHECK(t.is_cuda() && t.is_contiguous(), "wkv: every tensor must be a contiguous CUDA tensor");
    TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "wkv: every sequence tensor must share one dtype");
    TORCH_CHECK(t.sizes() == ref.sizes(), "wkv: every sequence tensor must have shape [B,T,H,N]");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0,
                "wkv: sequence tensors must start 16-byte aligned (the kernels load rows as vectors; clone a view)");
  }
}

inline void check_f32(std::initializer_list<torch::Tensor> ts) {
  for (const auto& t : ts)
    TORCH_CHECK(t.is_cuda() && t.is_contiguous() && t.scalar_type() == at::kFloat,
                "wkv: state/workspace tensors must be contiguous fp32 CUDA tensors");
}

}  // namespace wkv
