// Python binding of the RWKV-7 WKV kernels (cuda/wkv7.cu); head size fixed at build time by WKV_N.
#include <torch/extension.h>
#include "wkv_check.h"
#include "wkv_common.cuh"

void wkv7_forward_cuda(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor a,
                       torch::Tensor b, torch::Tensor s0, torch::Tensor y, torch::Tensor sT, torch::Tensor ckpt,
                       torch::Tensor sa, int split);
void wkv7_backward_cuda(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor a,
                        torch::Tensor b, torch::Tensor dy, torch::Tensor dsT, torch::Tensor ckpt, torch::Tensor sa,
                        torch::Tensor dr, torch::Tensor dw, torch::Tensor dk, torch::Tensor dv, torch::Tensor da,
                        torch::Tensor db, torch::Tensor ds0, int split);

static void forward(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor a,
                    torch::Tensor b, torch::Tensor s0, torch::Tensor y, torch::Tensor sT, torch::Tensor ckpt,
                    torch::Tensor sa, int split) {
  wkv::check_seq(r, {r, w, k, v, a, b, y}, WKV_N);
  wkv::check_f32({s0, sT, ckpt, sa});
  wkv7_forward_cuda(r, w, k, v, a, b, s0, y, sT, ckpt, sa, split);
}

static void backward(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor a,
                     torch::Tensor b, torch::Tensor dy, torch::Tensor dsT, torch::Tensor ckpt, torch::Tensor sa,
                     torch::Tensor dr, torch::Tensor dw, torch::Tensor dk, torch::Tensor dv, torch::Tensor da,
                     torch::Tensor db, torch::Tensor ds0, int split) {
  wkv::check_seq(r, {r, w, k, v, a, b, dy, dr, dw, dk, dv, da, db}, WKV_N);
  wkv::check_f32({dsT, ckpt, sa, ds0});
  wkv7_backward_cuda(r, w, k, v, a, b, dy, dsT, ckpt, sa, dr, dw, dk, dv, da, db, ds0, split);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "wkv7 forward: (r,w,k,v,a,b,s0) -> fills y, sT, end-of-chunk states, sa; split: "
        "threads per state index (0 auto)");
  m.def("backward", &backward, "wkv7 backward: fills every input gradient and ds0 from dy and dsT");
  m.def("head_size", []() { return WKV_N; });
  m.def("chunk_len", []() { return wkv::CK; });
}
