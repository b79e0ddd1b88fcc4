// Python binding of the RWKV-6 WKV kernels (cuda/wkv6.cu): w [B,T,H,N] per-token decay logits; head size fixed at build time by WKV_N.
#include <torch/extension.h>
#include "wkv_check.h"
#include "wkv_common.cuh"

void wkv6_forward_cuda(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor u,
                       torch::Tensor s0, torch::Tensor y, torch::Tensor sT, torch::Tensor ckpt, int rows);
void wkv6_backward_cuda(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor u,
                        torch::Tensor dy, torch::Tensor dsT, torch::Tensor ckpt, torch::Tensor scratch,
                        torch::Tensor dr, torch::Tensor dw, torch::Tensor dk, torch::Tensor dv, torch::Tensor du,
                        torch::Tensor ds0, int rows);

static void check_param(const torch::Tensor& ref, const torch::Tensor& p) {
  TORCH_CHECK(p.is_cuda() && p.is_contiguous() && p.dim() == 2 && p.size(0) == ref.size(2) && p.size(1) == WKV_N &&
                  p.scalar_type() == ref.scalar_type(),
              "wkv6: per-head parameters must be contiguous CUDA [H,N] tensors of the input dtype");
}

static void forward(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor u,
                    torch::Tensor s0, torch::Tensor y, torch::Tensor sT, torch::Tensor ckpt, int rows) {
  wkv::check_seq(r, {r, w, k, v, y}, WKV_N);
  check_param(r, u);
  wkv::check_f32({s0, sT, ckpt});
  wkv6_forward_cuda(r, w, k, v, u, s0, y, sT, ckpt, rows);
}

static void backward(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor u,
                     torch::Tensor dy, torch::Tensor dsT, torch::Tensor ckpt, torch::Tensor scratch, torch::Tensor dr,
                     torch::Tensor dw, torch::Tensor dk, torch::Tensor dv, torch::Tensor du, torch::Tensor ds0,
                     int rows) {
  wkv::check_seq(r, {r, w, k, v, dy, dr, dw, dk, dv}, WKV_N);
  check_param(r, u);
  wkv::check_f32({dsT, ckpt, scratch, du, ds0});
  wkv6_backward_cuda(r, w, k, v, u, dy, dsT, ckpt, scratch, dr, dw, dk, dv, du, ds0, rows);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "wkv6 forward: (r,w,k,v,u,s0) -> fills y, sT, checkpoints");
  m.def("backward", &backward, "wkv6 backward: fills every input gradient (per-(b,h) partials for u) and ds0");
  m.def("head_size", []() { return WKV_N; });
  m.def("chunk_len", []() { return wkv::CK; });
}
