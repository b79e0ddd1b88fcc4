// Python binding of the RWKV-7 WKV kernels (cuda/wkv7.cu); head size fixed at build time by WKV_N.
#include <torch/extension.h>
#include "wkv_check.h"
#include "wkv_common.cuh"

void wkv7_forward_cuda(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor a,
                       torch::Tensor b, torch::Tensor s0, torch::Tensor y, torch::Tensor sT, torch::Tensor ckpt,
                       torch::Tensor sa, int split, int groups);
void wkv7_forward_chunked_cuda(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor a,
                               torch::Tensor b, torch::Tensor s0, torch::Tensor y, torch::Tensor sT,
                               torch::Tensor ckpt, torch::Tensor sa, torch::Tensor packet);
int wkv7_packet_floats();
int64_t wkv7_smem_bytes();
void wkv7_backward_grads_chunked_cuda(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v,
                                      torch::Tensor a, torch::Tensor b, torch::Tensor dy, torch::Tensor s0,
                                      torch::Tensor ckpt, torch::Tensor dckpt, torch::Tensor sa, torch::Tensor gsa,
                                      torch::Tensor dr, torch::Tensor dw, torch::Tensor dk, torch::Tensor dv,
                                      torch::Tensor da, torch::Tensor db);
void wkv7_backward_state_chunked_cuda(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v,
                                      torch::Tensor a, torch::Tensor b, torch::Tensor dy, torch::Tensor dsT,
                                      torch::Tensor dckpt, torch::Tensor g, torch::Tensor ds0, torch::Tensor packet);
void wkv7_backward_cuda(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor a,
                        torch::Tensor b, torch::Tensor dy, torch::Tensor dsT, torch::Tensor ckpt, torch::Tensor sa,
                        torch::Tensor dr, torch::Tensor dw, torch::Tensor dk, torch::Tensor dv, torch::Tensor da,
                        torch::Tensor db, torch::Tensor ds0, int split);
void wkv7_transfer_cuda(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor a,
                        torch::Tensor b, torch::Tensor u, torch::Tensor p, torch::Tensor q, int split, int groups);
void wkv7_span_scan_cuda(torch::Tensor s0, torch::Tensor p, torch::Tensor u, torch::Tensor starts);
void wkv7_span_scan_back_cuda(torch::Tensor dsT, torch::Tensor p, torch::Tensor q, torch::Tensor dy,
                              torch::Tensor ends);

// The span path's N x N per-span matrices are [B, ns, H, N, N]; its state (or state gradient) in/out [B, H, N, N].
static void check_spans(const torch::Tensor& x0, std::initializer_list<torch::Tensor> mats) {
  wkv::check_f32({x0});
  wkv::check_f32(mats);
  const auto& p = *mats.begin();
  WKV_CHECK(p.dim() == 5 && p.size(3) == WKV_N && p.size(4) == WKV_N, "wkv7 span: matrices must be [B,ns,H,N,N]");
  WKV_CHECK(x0.dim() == 4 && x0.size(0) == p.size(0) && x0.size(1) == p.size(2) && x0.size(2) == WKV_N &&
            x0.size(3) == WKV_N, "wkv7 span: the state must be [B,H,N,N] matching the span matrices");
  for (const auto& t : mats) WKV_CHECK(t.sizes() == p.sizes(), "wkv7 span: every span matrix must be [B,ns,H,N,N]");
}

// States (or their gradients) [B,H,N,N], end-of-chunk checkpoints [B,H,nc,N,N], sa_t [B,T,H,N], all fp32.
static void check_buffers(const torch::Tensor& r, std::initializer_list<torch::Tensor> states,
                          const torch::Tensor& ckpt, const torch::Tensor& sa) {
  wkv::check_states(r, states);
  wkv::check_checkpoints(r, ckpt);
  wkv::check_f32_numel({sa}, wkv::Sizes(r).per_token(), "sa [B,T,H,N]");
}

static void forward(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor a,
                    torch::Tensor b, torch::Tensor s0, torch::Tensor y, torch::Tensor sT, torch::Tensor ckpt,
                    torch::Tensor sa, int split, int groups) {
  wkv::check_seq(r, {r, w, k, v, a, b, y}, WKV_N);
  check_buffers(r, {s0, sT}, ckpt, sa);
  wkv7_forward_cuda(r, w, k, v, a, b, s0, y, sT, ckpt, sa, split, groups);
}

// The chunked kernels' fp32 workspace: packet_floats per chunk of every (b, h).
static void check_packet(const torch::Tensor& r, const torch::Tensor& packet) {
  const wkv::Sizes n(r);
  wkv::check_f32_numel({packet}, n.B * n.H * n.nc * wkv7_packet_floats(),
                       "the packet workspace [B*H*ceil(T/16), packet_floats]");
}

static void forward_chunked(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor a,
                            torch::Tensor b, torch::Tensor s0, torch::Tensor y, torch::Tensor sT, torch::Tensor ckpt,
                            torch::Tensor sa, torch::Tensor packet) {
  wkv::check_seq(r, {r, w, k, v, a, b, y}, WKV_N);
  check_buffers(r, {s0, sT}, ckpt, sa);
  check_packet(r, packet);
  wkv7_forward_chunked_cuda(r, w, k, v, a, b, s0, y, sT, ckpt, sa, packet);
}

static void backward_state_chunked(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v,
                                   torch::Tensor a, torch::Tensor b, torch::Tensor dy, torch::Tensor dsT,
                                   torch::Tensor dckpt, torch::Tensor g, torch::Tensor ds0, torch::Tensor packet) {
  wkv::check_seq(r, {r, w, k, v, a, b, dy}, WKV_N);
  check_buffers(r, {dsT, ds0}, dckpt, g);
  check_packet(r, packet);
  wkv7_backward_state_chunked_cuda(r, w, k, v, a, b, dy, dsT, dckpt, g, ds0, packet);
}

static void backward_grads_chunked(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v,
                                   torch::Tensor a, torch::Tensor b, torch::Tensor dy, torch::Tensor s0,
                                   torch::Tensor ckpt, torch::Tensor dckpt, torch::Tensor sa, torch::Tensor gsa,
                                   torch::Tensor dr, torch::Tensor dw, torch::Tensor dk, torch::Tensor dv,
                                   torch::Tensor da, torch::Tensor db) {
  WKV_CHECK(WKV_N == 64, "wkv7 chunked backward: head size 64 only (its shared memory); use backward='sequential'");
  wkv::check_seq(r, {r, w, k, v, a, b, dy, dr, dw, dk, dv, da, db}, WKV_N);
  check_buffers(r, {s0}, ckpt, sa);
  check_buffers(r, {s0}, dckpt, gsa);
  wkv7_backward_grads_chunked_cuda(r, w, k, v, a, b, dy, s0, ckpt, dckpt, sa, gsa, dr, dw, dk, dv, da, db);
}

static void backward(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor a,
                     torch::Tensor b, torch::Tensor dy, torch::Tensor dsT, torch::Tensor ckpt, torch::Tensor sa,
                     torch::Tensor dr, torch::Tensor dw, torch::Tensor dk, torch::Tensor dv, torch::Tensor da,
                     torch::Tensor db, torch::Tensor ds0, int split) {
  wkv::check_seq(r, {r, w, k, v, a, b, dy, dr, dw, dk, dv, da, db}, WKV_N);
  check_buffers(r, {dsT, ds0}, ckpt, sa);
  wkv7_backward_cuda(r, w, k, v, a, b, dy, dsT, ckpt, sa, dr, dw, dk, dv, da, db, ds0, split);
}

// Transfer of every batch row (each one span): u = its own state from 0, p = its transition, q_t = P_{<=t} r_t.
static void transfer(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor a,
                     torch::Tensor b, torch::Tensor u, torch::Tensor p, torch::Tensor q, int split, int groups) {
  wkv::check_seq(r, {r, w, k, v, a, b}, WKV_N);
  wkv::check_f32({u, p, q});
  WKV_CHECK(q.sizes() == r.sizes(), "wkv7 transfer: q must be fp32 shaped like r");
  WKV_CHECK(u.dim() == 4 && u.size(0) == r.size(0) && u.size(1) == r.size(2) && u.sizes() == p.sizes(),
            "wkv7 transfer: u and p must be [B,H,N,N]");
  wkv7_transfer_cuda(r, w, k, v, a, b, u, p, q, split, groups);
}

static void span_scan(torch::Tensor s0, torch::Tensor p, torch::Tensor u, torch::Tensor starts) {
  check_spans(s0, {p, u, starts});
  wkv7_span_scan_cuda(s0, p, u, starts);
}

static void span_scan_back(torch::Tensor dsT, torch::Tensor p, torch::Tensor q, torch::Tensor dy,
                           torch::Tensor ends) {
  check_spans(dsT, {p, ends});
  wkv::check_seq(dy, {dy}, WKV_N);
  wkv::check_f32({q});
  WKV_CHECK(q.sizes() == dy.sizes() && q.size(0) == p.size(0) && q.size(2) == p.size(2) &&
            q.size(1) % (p.size(1) * 64) == 0, "wkv7 span: q and dy must be [B, ns*L, H, N] with L % 64 == 0");
  wkv7_span_scan_back_cuda(dsT, p, q, dy, ends);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "wkv7 forward: (r,w,k,v,a,b,s0) -> fills y, sT, end-of-chunk states, sa; split: "
        "threads per state index (0 auto); groups: forward blocks per head (0 auto)");
  m.def("forward_chunked", &forward_chunked, "wkv7 forward on tensor cores, chunk terms at once then a pass over "
        "chunks: the outputs of forward; packet: fp32 workspace of packet_floats per chunk");
  m.def("packet_floats", &wkv7_packet_floats);
  m.def("smem_bytes", &wkv7_smem_bytes, "the most dynamic shared memory per block a launch of this build asks for");
  m.def("backward_grads_chunked", &backward_grads_chunked, "wkv7 input gradients of every chunk at once on "
        "tensor cores, from both passes' checkpoints, sa and d sa (head size 64)");
  m.def("backward_state_chunked", &backward_state_chunked, "wkv7 state-gradient pass on tensor cores: from dy "
        "and dsT, the state gradient at every chunk end, d sa_t per token (fp32), ds0");
  m.def("backward", &backward, "wkv7 backward: fills every input gradient and ds0 from dy and dsT");
  m.def("transfer", &transfer, "wkv7 span transfer: per batch row, own state u, transition p and q = P r (fp32)");
  m.def("span_scan", &span_scan, "wkv7 span scan: state at every span start from s0, p, u");
  m.def("span_scan_back", &span_scan_back, "wkv7 span scan back: state gradient at every span end from dsT");
  m.def("head_size", []() { return WKV_N; });
  m.def("chunk_len", []() { return wkv::CK; });
}
