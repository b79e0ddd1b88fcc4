// Python binding of the RWKV-5 WKV kernels (cuda/wkv5.cu): w [H,N] decay logits constant over time; head size fixed at build time by WKV_N.
#include <torch/extension.h>
#include "wkv_check.h"
#include "wkv_common.cuh"

void wkv5_forward_cuda(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor u,
                       torch::Tensor s0, torch::Tensor y, torch::Tensor sT, torch::Tensor ckpt, int rows);
void wkv5_backward_cuda(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor u,
                        torch::Tensor dy, torch::Tensor dsT, torch::Tensor ckpt, torch::Tensor scratch,
                        torch::Tensor dr, torch::Tensor dw, torch::Tensor dk, torch::Tensor dv, torch::Tensor du,
                        torch::Tensor ds0, int rows);

static void check_param(const torch::Tensor& ref, const torch::Tensor& p) {
  TORCH_CHECK(p.is_cuda() && p.is_contiguous() && p.dim() == 2 && p.size(0) == ref.size(2) && p.size(1) == WKV_N &&
                  p.scalar_type() == ref.scalar_type(),
              "wkv5: per-head parameters must be contiguous CUDA [H,N] tensors of the input dtype");
}

static void forward(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor u,
                    torch::Tensor s0, torch::Tensor y, torch::Tensor sT, torch::Tensor ckpt, int rows) {
  wkv::check_seq(r, {r, k, v, y}, WKV_N);
  check_param(r, w);
  check_param(r, u);
  wkv::check_f32({s0, sT, ckpt});
  wkv5_forward_cuda(r, w, k, v, u, s0, y, sT, ckpt, rows);
}

static void backward(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor u,
                     torch::Tensor dy, torch::Tensor dsT, torch::Tensor ckpt, torch::Tensor scratch, torch::Tensor dr,
                     torch::Tensor dw, torch::Tensor dk, torch::Tensor dv, torch::Tensor du, torch::Tensor ds0,
                     int rows) {
  wkv::check_seq(r, {r, k, v, dy, dr, dk, dv}, WKV_N);
  check_param(r, w);
  check_param(r, u);
  wkv::check_f32({dsT, ckpt, scratch, dw, du, ds0});
  wkv5_backward_cuda(r, w, k, v, u, dy, dsT, ckpt, scratch, dr, dw, dk, dv, du, ds0, rows);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "wkv5 forward: (r,w,k,v,u,s0) -> fills y, sT, checkpoints");
  m.def("backward", &backward, "wkv5 backward: fills every input gradient (per-(b,h) partials for u and w) and ds0");
  m.def("head_size", []() { return WKV_N; });
  m.def("chunk_len", []() { return wkv::CK; });
}
