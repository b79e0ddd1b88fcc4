// Python binding of the RWKV-5/6 WKV kernels, included by wkv5_op.cpp and wkv6_op.cpp after they define
// WKV_TIME_DECAY (wkv6: w [B,T,H,N] per token; wkv5: w [H,N] constant over time), WKV_LABEL ("wkv5"/"wkv6") and
// WKV_ENTRY(name) (the version-prefixed entry points of wkv5.cu / wkv6.cu). Head size fixed at build time by WKV_N.
#include <torch/extension.h>
#include "wkv_check.h"
#include "wkv_common.cuh"

using torch::Tensor;

void WKV_ENTRY(forward_cuda)(Tensor r, Tensor w, Tensor k, Tensor v, Tensor u, Tensor s0, Tensor y, Tensor sT,
                             Tensor ckpt, int rows);
void WKV_ENTRY(backward_cuda)(Tensor r, Tensor w, Tensor k, Tensor v, Tensor u, Tensor dy, Tensor dsT, Tensor ckpt,
                              Tensor scratch, Tensor dr, Tensor dw, Tensor dk, Tensor dv, Tensor du, Tensor ds0,
                              int rows);
void WKV_ENTRY(forward_chunked_cuda)(Tensor r, Tensor w, Tensor k, Tensor v, Tensor u, Tensor s0, Tensor y,
                                     Tensor sT, Tensor states, Tensor decay, Tensor scores);
void WKV_ENTRY(backward_chunked_cuda)(Tensor r, Tensor w, Tensor k, Tensor v, Tensor u, Tensor dy, Tensor dsT,
                                      Tensor states, Tensor decay, Tensor scores, Tensor dstates, Tensor dr,
                                      Tensor dw, Tensor dk, Tensor dv, Tensor du, Tensor ds0);

namespace {

constexpr bool kTimeDecay = WKV_TIME_DECAY;

void check_param(const Tensor& ref, const Tensor& p) {
  WKV_CHECK(p.is_cuda() && p.is_contiguous() && p.dim() == 2 && p.size(0) == ref.size(2) && p.size(1) == WKV_N &&
                p.scalar_type() == ref.scalar_type(),
            WKV_LABEL ": per-head parameters must be contiguous CUDA [H,N] tensors of the input dtype");
}

// r, k, v (and wkv6's w) share [B,T,H,N]; u (and wkv5's w) are [H,N].
void check_inputs(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v, const Tensor& u,
                  std::initializer_list<Tensor> more) {
  for (const auto& t : more) wkv::check_seq(r, {t}, WKV_N);
  wkv::check_seq(r, {r, k, v}, WKV_N);
  if (kTimeDecay) wkv::check_seq(r, {w}, WKV_N);
  else check_param(r, w);
  check_param(r, u);
}

// wkv5's dw is an fp32 [B,H,N] sum per (b, h); wkv6's is [B,T,H,N] of the input dtype. du is always the former.
void check_dw_du(const Tensor& r, const Tensor& dw, const Tensor& du) {
  const wkv::Sizes n(r);
  if (kTimeDecay) wkv::check_seq(r, {dw}, WKV_N);
  else wkv::check_f32_numel({dw}, n.per_head(), "wkv5's dw [B,H,N]");
  wkv::check_f32_numel({du}, n.per_head(), "du [B,H,N]");
}


void forward(Tensor r, Tensor w, Tensor k, Tensor v, Tensor u, Tensor s0, Tensor y, Tensor sT, Tensor ckpt,
             int rows) {
  check_inputs(r, w, k, v, u, {y});
  wkv::check_states(r, {s0, sT});
  wkv::check_checkpoints(r, ckpt);
  WKV_ENTRY(forward_cuda)(r, w, k, v, u, s0, y, sT, ckpt, rows);
}

void backward(Tensor r, Tensor w, Tensor k, Tensor v, Tensor u, Tensor dy, Tensor dsT, Tensor ckpt, Tensor scratch,
              Tensor dr, Tensor dw, Tensor dk, Tensor dv, Tensor du, Tensor ds0, int rows) {
  check_inputs(r, w, k, v, u, {dy, dr, dk, dv});
  check_dw_du(r, dw, du);
  wkv::check_states(r, {dsT, ds0});
  wkv::check_checkpoints(r, ckpt);
  wkv::check_f32({scratch});
  WKV_ENTRY(backward_cuda)(r, w, k, v, u, dy, dsT, ckpt, scratch, dr, dw, dk, dv, du, ds0, rows);
}

// Workspaces: states [B,H,nc,N,N], decay [B,H,nc,N], scores [B,H,nc,16,16] (nc = ceil(T/16)).
void check_workspaces(const Tensor& r, const Tensor& states, const Tensor& decay, const Tensor& scores) {
  wkv::check_f32({states, decay, scores});
  const wkv::Sizes n(r);
  const int64_t chunks = n.B * n.H * n.nc;
  WKV_CHECK(states.numel() == n.ckpt() && decay.numel() == chunks * n.N &&
                scores.numel() == chunks * wkv::CK * wkv::CK,
            WKV_LABEL ": chunked workspaces must be [B,H,ceil(T/16)] x [N,N], [N] and [16,16]");
}

void forward_chunked(Tensor r, Tensor w, Tensor k, Tensor v, Tensor u, Tensor s0, Tensor y, Tensor sT,
                     Tensor states, Tensor decay, Tensor scores) {
  check_inputs(r, w, k, v, u, {y});
  wkv::check_states(r, {s0, sT});
  check_workspaces(r, states, decay, scores);
  WKV_ENTRY(forward_chunked_cuda)(r, w, k, v, u, s0, y, sT, states, decay, scores);
}

void backward_chunked(Tensor r, Tensor w, Tensor k, Tensor v, Tensor u, Tensor dy, Tensor dsT, Tensor states,
                      Tensor decay, Tensor scores, Tensor dstates, Tensor dr, Tensor dw, Tensor dk, Tensor dv,
                      Tensor du, Tensor ds0) {
  check_inputs(r, w, k, v, u, {dy, dr, dk, dv});
  check_dw_du(r, dw, du);
  wkv::check_states(r, {dsT, ds0});
  wkv::check_f32({dstates});
  check_workspaces(r, states, decay, scores);
  WKV_CHECK(dstates.numel() == states.numel(), WKV_LABEL ": dstates must be shaped like states");
  WKV_ENTRY(backward_chunked_cuda)(r, w, k, v, u, dy, dsT, states, decay, scores, dstates, dr, dw, dk, dv, du,
                                    ds0);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, WKV_LABEL " forward (sequential): (r,w,k,v,u,s0) -> fills y, sT, checkpoints");
  m.def("backward", &backward, WKV_LABEL " backward (sequential): every input gradient (per-(b,h) partials for u"
        " and wkv5's w) and ds0");
  m.def("forward_chunked", &forward_chunked, WKV_LABEL " forward (chunk-parallel): fills y, sT, chunk start states"
        ", chunk decays and pair scores");
  m.def("backward_chunked", &backward_chunked, WKV_LABEL " backward (chunk-parallel): every input gradient and ds0");
  m.def("head_size", []() { return WKV_N; });
  m.def("chunk_len", []() { return wkv::CK; });
}
