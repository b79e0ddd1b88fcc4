// Host-side argument checks shared by the op bindings (the Python wrapper checks first with friendlier messages;
// these guard direct calls into the extension).
#pragma once
#include <torch/extension.h>
#include <initializer_list>
#include "wkv_common.cuh"  // CK
#include "wkv_error.h"

namespace wkv {

inline void check_seq(const torch::Tensor& ref, std::initializer_list<torch::Tensor> ts, int N) {
  WKV_CHECK(ref.is_cuda() && ref.dim() == 4 && ref.size(3) == N, "wkv: expected CUDA [B,T,H,", N, "] tensors");
  WKV_CHECK(ref.scalar_type() == at::kBFloat16 || ref.scalar_type() == at::kFloat, "wkv: dtype must be bf16 or fp32");
  for (const auto& t : ts) {
    WKV_CHECK(t.is_cuda() && t.is_contiguous(), "wkv: every tensor must be a contiguous CUDA tensor");
    WKV_CHECK(t.scalar_type() == ref.scalar_type(), "wkv: every sequence tensor must share one dtype");
    WKV_CHECK(t.sizes() == ref.sizes(), "wkv: every sequence tensor must have shape [B,T,H,N]");
    WKV_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0,
              "wkv: sequence tensors must start 16-byte aligned (the kernels load rows as vectors; clone a view)");
  }
}

inline void check_f32(std::initializer_list<torch::Tensor> ts) {
  for (const auto& t : ts)
    WKV_CHECK(t.is_cuda() && t.is_contiguous() && t.scalar_type() == at::kFloat,
              "wkv: state/workspace tensors must be contiguous fp32 CUDA tensors");
}

// The kernels index fp32 buffers from the sequence's shape [B,T,H,N], so each must hold exactly its share.
struct Sizes {
  int64_t B, T, H, N, nc;  // nc = chunks of CK tokens (one checkpoint each)
  explicit Sizes(const torch::Tensor& r)
      : B(r.size(0)), T(r.size(1)), H(r.size(2)), N(r.size(3)), nc((r.size(1) + CK - 1) / CK) {}
  int64_t state() const { return B * H * N * N; }       // [B,H,N,N]
  int64_t ckpt() const { return B * H * nc * N * N; }   // [B,H,nc,N,N]
  int64_t per_token() const { return B * T * H * N; }   // [B,T,H,N]
  int64_t per_head() const { return B * H * N; }        // [B,H,N]
};

inline void check_f32_numel(std::initializer_list<torch::Tensor> ts, int64_t numel, const char* what) {
  check_f32(ts);
  for (const auto& t : ts)
    WKV_CHECK(t.numel() == numel, "wkv: ", what, " must hold ", numel, " fp32 elements for this input, not ",
              t.numel());
}

// States (or their gradients) and the end-of-chunk checkpoints of input r, as every sequential kernel takes them.
inline void check_states(const torch::Tensor& r, std::initializer_list<torch::Tensor> states) {
  check_f32_numel(states, Sizes(r).state(), "the state [B,H,N,N]");
}
inline void check_checkpoints(const torch::Tensor& r, const torch::Tensor& ckpt) {
  check_f32_numel({ckpt}, Sizes(r).ckpt(), "the checkpoints [B,H,ceil(T/16),N,N]");
}

}  // namespace wkv
