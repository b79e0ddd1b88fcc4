// RWKV-5/6 WKV kernels with state in/out and exact gradients; included by wkv5.cu (decay constant over time,
// w [H,N]) and wkv6.cu (decay per token, w [B,T,H,N]) with WKV_TIME_DECAY set accordingly.
//   y_t = S_{t-1} r_t + v_t (sum_j u_j k_tj r_tj),  S_t = S_{t-1} diag(d_t) + v_t k_t^T,  d_t = exp(-exp(w_t))
// Rows of a head split over G blocks (wkv::Tile), P threads per row in the forward, checkpoints every CK tokens,
// column-slice recompute into a scratch in the backward, dS kept as row and column slices. No per-token exchange
// is needed here: every sum is a row or a column sum. As in wkv7.cu, the next chunk's inputs (and in the backward
// its checkpoint) are loaded into registers while the current chunk is computed (wkv::ChunkShare), so global
// latency stays off the sequential token loop. (The decay can be ~0 here, so wkv7's backstepping does not apply.)
#include "wkv_common.cuh"
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include "wkv_error.h"

using wkv::ChunkShare;
using wkv::CK;
using wkv::group_sum;
using wkv::ident;
using wkv::plain;

namespace {

constexpr bool kTimeDecay = WKV_TIME_DECAY;
constexpr int kDecayRows = kTimeDecay ? CK : 1;  // wkv5 keeps one decay row for every token

__device__ __forceinline__ float decay56(float w) { return expf(-expf(w)); }
__device__ __forceinline__ float exp_w(float w) { return expf(w); }  // d(decay)/dw = -decay e^w

// The next chunk's key-side inputs (r, k and wkv6's w: all N features) and its value-side inputs for this block's R rows
// (v in the forward; v and dy in the backward), in registers until the chunk before it is done.
template <typename F, class Tl>
struct NextChunk {
  static constexpr int N = Tl::N, R = Tl::R, kThreads = Tl::kThreads;
  ChunkShare<N, N, kThreads, F> r, k, w;
  ChunkShare<N, R, kThreads, F> v, dy;

  template <bool kWithDy>
  __device__ __forceinline__ void load(const F* r_, const F* k_, const F* w_, const F* v_, const F* dy_, int b,
                                       int t0, int T, int h, int H, int g) {
    const int L = min(CK, T - t0);
    r.load(r_, b, t0, L, h, T, H);
    k.load(k_, b, t0, L, h, T, H);
    if constexpr (kTimeDecay) w.load(w_, b, t0, L, h, T, H);
    v.load(v_, b, t0, L, h, T, H, g * R);
    if constexpr (kWithDy) dy.load(dy_, b, t0, L, h, T, H, g * R);
  }

  // r, k -> sr, sk; wkv6's decay -> sd; v -> sv
  __device__ __forceinline__ void store(float* sr, float* sk, float* sd, float* sv) const {
    r.store(sr, N, plain, ident);
    k.store(sk, N, plain, ident);
    if constexpr (kTimeDecay) w.store(sd, N, plain, decay56);
    v.store(sv, R, plain, ident);
  }
};

template <typename F, class Tl>
__global__ void __launch_bounds__(Tl::kThreads) fwd_kernel(int T, int H, const F* __restrict__ r,
    const F* __restrict__ w, const F* __restrict__ k, const F* __restrict__ v, const F* __restrict__ u,
    const float* __restrict__ s0, F* __restrict__ y, float* __restrict__ sT, float* __restrict__ ckpt) {
  constexpr int N = Tl::N, R = Tl::R, P = Tl::P, M = Tl::M;
  extern __shared__ __align__(16) float smem[];
  float (*sr)[N] = reinterpret_cast<float (*)[N]>(smem);
  float (*sk)[N] = sr + CK, (*su)[N] = sk + CK, (*sd)[N] = su + 1;
  float (*sv)[R] = reinterpret_cast<float (*)[R]>(sd + kDecayRows);
  const int bh = blockIdx.x / Tl::G, g = blockIdx.x % Tl::G, bb = bh / H, h = bh % H;
  const int il = threadIdx.x / P, p = threadIdx.x % P, i = g * R + il;
  const int nc = (T + CK - 1) / CK;
  for (int x = threadIdx.x; x < N; x += Tl::kThreads) {
    su[0][x] = wkv::to_f(u[h * N + x]);
    if (!kTimeDecay) sd[0][x] = decay56(wkv::to_f(w[h * N + x]));
  }
  float S[M];
  const float* s0row = s0 + (int64_t(bh) * N + i) * N;
#pragma unroll
  for (int jj = 0; jj < M; ++jj) S[jj] = s0row[jj * P + p];
  NextChunk<F, Tl> next;
  next.template load<false>(r, k, w, v, nullptr, bb, 0, T, h, H, g);
  for (int c = 0; c < nc; ++c) {
    const int t0 = c * CK, L = min(CK, T - t0);
    float* cp = ckpt + ((int64_t(bh) * nc + c) * N + i) * N;
#pragma unroll
    for (int jj = 0; jj < M; ++jj) cp[jj * P + p] = S[jj];
    __syncthreads();  // the previous chunk is done with the shared inputs
    next.store(&sr[0][0], &sk[0][0], &sd[0][0], &sv[0][0]);
    __syncthreads();
    if (c + 1 < nc) next.template load<false>(r, k, w, v, nullptr, bb, t0 + CK, T, h, H, g);
    for (int l = 0; l < L; ++l) {
      const float vi = sv[l][il];
      const int ld = kTimeDecay ? l : 0;
      float yp = 0.f, ukr = 0.f;
#pragma unroll
      for (int jj = 0; jj < M; ++jj) {
        const int j = jj * P + p;
        yp += S[jj] * sr[l][j];
        ukr += su[0][j] * sk[l][j] * sr[l][j];
        S[jj] = S[jj] * sd[ld][j] + vi * sk[l][j];
      }
      const float yi = group_sum<P>(yp + vi * ukr);
      if (p == 0) y[wkv::seq_off(bb, t0 + l, h, T, H, N) + i] = wkv::from_f<F>(yi);
    }
  }
  float* strow = sT + (int64_t(bh) * N + i) * N;
#pragma unroll
  for (int jj = 0; jj < M; ++jj) strow[jj * P + p] = S[jj];
}

// dr, dk (and wkv6's dw): written directly when one block owns the whole head (G == 1); else each of the G blocks
// of a head stores its share in its own slice of fp32 partials, and the host sums the slices in a fixed order (no
// atomics, so the same bits on every run).
template <typename F, bool kPartial>
struct KeyGrads {
  F *dr, *dk, *dw;  // dw unused for wkv5
  float* part;      // [G, 3, B, T, H, N] when kPartial
  int64_t n;        // B*T*H*N
  __device__ __forceinline__ void put(int g, int64_t o, float r_, float k_, float w_) const {
    if constexpr (kPartial) {
      float* mine = part + int64_t(g) * 3 * n + o;
      mine[0] = r_;
      mine[n] = k_;
      if (kTimeDecay) mine[2 * n] = w_;
    } else {
      dr[o] = wkv::from_f<F>(r_);
      dk[o] = wkv::from_f<F>(k_);
      if (kTimeDecay) dw[o] = wkv::from_f<F>(w_);
    }
  }
};

// du and wkv5's dw: fp32 [G, B, H, N], each block's share stored once (the host sums over G when G > 1).
template <typename F, class Tl>
__global__ void __launch_bounds__(Tl::kThreads) bwd_kernel(int T, int H, const F* __restrict__ r,
    const F* __restrict__ w, const F* __restrict__ k, const F* __restrict__ v, const F* __restrict__ u,
    const F* __restrict__ dy, const float* __restrict__ dsT, const float* __restrict__ ckpt,
    float* __restrict__ scratch, KeyGrads<F, (Tl::G > 1)> out, F* __restrict__ dv, float* __restrict__ du,
    float* __restrict__ dw_const, float* __restrict__ ds0) {
  constexpr int N = Tl::N, R = Tl::R, P = Tl::P, M = Tl::M, Q = Tl::Q, MC = Tl::MC, RS = Tl::RS;
  extern __shared__ __align__(16) float smem[];
  float (*sr)[N] = reinterpret_cast<float (*)[N]>(smem);
  float (*sk)[N] = sr + CK, (*su)[N] = sk + CK, (*sd)[N] = su + 1, (*sew)[N] = sd + kDecayRows;  // sew: e^w
  float (*sdy)[R] = reinterpret_cast<float (*)[R]>(sew + kDecayRows);
  float (*sv)[R] = sdy + CK;
  const int bh = blockIdx.x / Tl::G, g = blockIdx.x % Tl::G, bb = bh / H, h = bh % H;
  const int il = threadIdx.x / P, p = threadIdx.x % P, i = g * R + il;  // row role
  const int jc = threadIdx.x / Q, q = threadIdx.x % Q;                   // column role: rows g*R + ii*Q + q
  const int nc = (T + CK - 1) / CK;
  float* scr = Tl::kSmemScratch ? reinterpret_cast<float*>(sv + CK) : scratch + int64_t(blockIdx.x) * CK * R * N;
  for (int x = threadIdx.x; x < N; x += Tl::kThreads) {
    su[0][x] = wkv::to_f(u[h * N + x]);
    if (!kTimeDecay) {
      sd[0][x] = decay56(wkv::to_f(w[h * N + x]));
      sew[0][x] = exp_w(wkv::to_f(w[h * N + x]));
    }
  }
  __syncthreads();
  const float uj = su[0][jc];
  float du_acc = 0.f, dw_acc = 0.f;
  float Grow[M], Gcol[MC];  // dL/dS_t: a slice of row i and a slice of column jc
  const float* g0 = dsT + int64_t(bh) * N * N;
#pragma unroll
  for (int jj = 0; jj < M; ++jj) Grow[jj] = g0[i * N + jj * P + p];
#pragma unroll
  for (int ii = 0; ii < MC; ++ii) Gcol[ii] = g0[(g * R + ii * Q + q) * N + jc];
  NextChunk<F, Tl> next;
  float nS[MC];  // the next chunk's checkpoint: this thread's column slice of S at the chunk's start
  auto prefetch = [&](int c) {
    next.template load<true>(r, k, w, v, dy, bb, c * CK, T, h, H, g);
    const float* cp = ckpt + (int64_t(bh) * nc + c) * N * N + g * R * N + jc;
#pragma unroll
    for (int ii = 0; ii < MC; ++ii) nS[ii] = cp[(ii * Q + q) * N];
  };
  prefetch(nc - 1);
  for (int c = nc - 1; c >= 0; --c) {
    const int t0 = c * CK, L = min(CK, T - t0);
    float Sc[MC];
#pragma unroll
    for (int ii = 0; ii < MC; ++ii) Sc[ii] = nS[ii];
    __syncthreads();  // the previous chunk is done with the shared inputs
    next.store(&sr[0][0], &sk[0][0], &sd[0][0], &sv[0][0]);
    next.dy.store(&sdy[0][0], R, plain, ident);
    if constexpr (kTimeDecay) next.w.store(&sew[0][0], N, plain, exp_w);
    __syncthreads();
    if (c > 0) prefetch(c - 1);
    {  // recompute this thread's column slice of S_{t-1} for every token of the chunk into the scratch
      for (int l = 0; l < L; ++l) {
        float* dst = scr + l * R * RS + jc;
        const float dj = sd[kTimeDecay ? l : 0][jc], kj = sk[l][jc];
#pragma unroll
        for (int ii = 0; ii < MC; ++ii) {
          const int row = ii * Q + q;
          dst[row * RS] = Sc[ii];
          Sc[ii] = Sc[ii] * dj + sv[l][row] * kj;
        }
      }
    }
    for (int l = L - 1; l >= 0; --l) {
      const int64_t o = wkv::seq_off(bb, t0 + l, h, T, H, N);
      const int ld = kTimeDecay ? l : 0;
      // row role: dv_i = sum_j dS_ij k_j + dy_i (u.k.r); dS_{t-1} = dS_t diag(d) + dy r^T
      const float dyi = sdy[l][il];
      float dvp = 0.f, ukr = 0.f;
#pragma unroll
      for (int jj = 0; jj < M; ++jj) {
        const int j = jj * P + p;
        dvp += Grow[jj] * sk[l][j];
        ukr += su[0][j] * sk[l][j] * sr[l][j];
        Grow[jj] = Grow[jj] * sd[ld][j] + dyi * sr[l][j];
      }
      const float dvi = group_sum<P>(dvp + dyi * ukr);
      if (p == 0) dv[o + i] = wkv::from_f<F>(dvi);
      // column role: sums over this block's value rows
      const float rj = sr[l][jc], kj = sk[l][jc], dj = sd[ld][jc];
      const float* Sp = scr + l * R * RS + jc;
      float drj = 0.f, dkj = 0.f, ddj = 0.f, dyv = 0.f;
#pragma unroll
      for (int ii = 0; ii < MC; ++ii) {
        const int row = ii * Q + q;
        const float s = Sp[row * RS], dy_i = sdy[l][row], vi = sv[l][row];
        drj += s * dy_i;
        dkj += Gcol[ii] * vi;
        ddj += Gcol[ii] * s;
        dyv += dy_i * vi;
        Gcol[ii] = Gcol[ii] * dj + dy_i * rj;
      }
      dyv = group_sum<Q>(dyv);
      drj = group_sum<Q>(drj) + uj * kj * dyv;
      dkj = group_sum<Q>(dkj) + uj * rj * dyv;
      ddj = group_sum<Q>(ddj);
      du_acc += rj * kj * dyv;
      const float dwj = -ddj * dj * sew[ld][jc];
      if (!kTimeDecay) dw_acc += dwj;
      if (q == 0) out.put(g, o + jc, drj, dkj, dwj);
    }
  }
  if (q == 0) {
    const int64_t share = (int64_t(g) * (gridDim.x / Tl::G) + bh) * N + jc;
    du[share] = du_acc;
    if (!kTimeDecay) dw_const[share] = dw_acc;
  }
  float* gout = ds0 + int64_t(bh) * N * N + g * R * N + jc;
#pragma unroll
  for (int ii = 0; ii < MC; ++ii) gout[(ii * Q + q) * N] = Gcol[ii];
}

template <typename F>
const F* cptr(const torch::Tensor& t) { return reinterpret_cast<const F*>(t.data_ptr()); }
template <typename F>
F* mptr(torch::Tensor& t) { return reinterpret_cast<F*>(t.data_ptr()); }

// Calls f(Tile{}) with `rows` value rows per block (0: pick by B*H so that the GPU fills up).
template <class Fn>
void with_tile(int BH, int rows, Fn&& f) {
  static_assert(WKV_N == 64, "RWKV-5/6 kernels are built for head size 64");
  if (rows == 0) rows = BH >= 64 ? 64 : 16;  // measured on H100 (bench/results/kernels.md, --sweep-rows)
  WKV_CHECK(rows == 64 || rows == 16 || rows == 8, "wkv5/6: rows per block must be 0, 8, 16 or 64");
  if (rows == 64) f(wkv::Tile<64, 64, 4>{});
  else if (rows == 16) f(wkv::Tile<64, 16, 8>{});
  else f(wkv::Tile<64, 8, 8>{});
}

template <typename F>
void fwd_typed(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor u,
               torch::Tensor s0, torch::Tensor y, torch::Tensor sT, torch::Tensor ckpt, int rows) {
  const int B = r.size(0), T = r.size(1), H = r.size(2);
  with_tile(B * H, rows, [&](auto tile) {
    using Tl = decltype(tile);
    const size_t smem = (size_t(2 * CK + 1 + kDecayRows) * Tl::N + size_t(CK) * Tl::R) * sizeof(float);
    auto kern = fwd_kernel<F, Tl>;
    wkv::allow_smem(kern, smem);
    kern<<<B * H * Tl::G, Tl::kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(T, H, cptr<F>(r), cptr<F>(w),
        cptr<F>(k), cptr<F>(v), cptr<F>(u), s0.data_ptr<float>(), mptr<F>(y), sT.data_ptr<float>(),
        ckpt.data_ptr<float>());
    WKV_LAUNCH_CHECK();
  });
}

// dw is [B,T,H,N] of the input dtype (wkv6) or fp32 [B,H,N] per-(b,h) sums (wkv5); du is fp32 [B,H,N].
template <typename F>
void bwd_typed(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor u,
               torch::Tensor dy, torch::Tensor dsT, torch::Tensor ckpt, torch::Tensor scratch, torch::Tensor dr,
               torch::Tensor dw, torch::Tensor dk, torch::Tensor dv, torch::Tensor du, torch::Tensor ds0,
               int rows) {
  const int B = r.size(0), T = r.size(1), H = r.size(2);
  with_tile(B * H, rows, [&](auto tile) {
    using Tl = decltype(tile);
    constexpr bool kPartial = Tl::G > 1;
    KeyGrads<F, kPartial> out{mptr<F>(dr), mptr<F>(dk), kTimeDecay ? mptr<F>(dw) : nullptr, nullptr, r.numel()};
    torch::Tensor part, du_part = du, dw_part = dw;  // G == 1: the blocks' shares are the results
    const auto f32 = r.options().dtype(torch::kFloat);
    if (kPartial) {
      part = torch::empty({Tl::G, 3, r.numel()}, f32);
      out.part = part.data_ptr<float>();
      du_part = torch::empty({Tl::G, du.numel()}, f32);
      if (!kTimeDecay) dw_part = torch::empty({Tl::G, dw.numel()}, f32);
    }
    const size_t smem = (size_t(2 * CK + 1 + 2 * kDecayRows) * Tl::N + size_t(2 * CK) * Tl::R +
                         (Tl::kSmemScratch ? size_t(CK) * Tl::R * Tl::RS : 0)) * sizeof(float);
    torch::Tensor scr = scratch;  // global recompute scratch, only for tiles whose scratch is not in shared memory
    if (!Tl::kSmemScratch && scr.numel() < int64_t(B) * H * Tl::G * CK * Tl::R * Tl::N)
      scr = torch::empty({int64_t(B) * H * Tl::G * CK * Tl::R * Tl::N}, f32);
    auto kern = bwd_kernel<F, Tl>;
    wkv::allow_smem(kern, smem);
    kern<<<B * H * Tl::G, Tl::kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(T, H, cptr<F>(r), cptr<F>(w),
        cptr<F>(k), cptr<F>(v), cptr<F>(u), cptr<F>(dy), dsT.data_ptr<float>(), ckpt.data_ptr<float>(),
        scr.data_ptr<float>(), out, mptr<F>(dv), du_part.data_ptr<float>(),
        kTimeDecay ? nullptr : dw_part.data_ptr<float>(), ds0.data_ptr<float>());
    WKV_LAUNCH_CHECK();
    if (kPartial) {  // sums over the G blocks of each head, in a fixed order
      const torch::Tensor key_grads = part.sum(0);
      dr.view({-1}).copy_(key_grads[0]);
      dk.view({-1}).copy_(key_grads[1]);
      if (kTimeDecay) dw.view({-1}).copy_(key_grads[2]);
      du.view({-1}).copy_(du_part.sum(0));
      if (!kTimeDecay) dw.view({-1}).copy_(dw_part.sum(0));
    }
  });
}

}  // namespace

// Entry points with the version in the name, defined once per including .cu file.
#define WKV56_DEFINE_ENTRY_POINTS(FWD_NAME, BWD_NAME)                                                              \
  void FWD_NAME(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor u,               \
                torch::Tensor s0, torch::Tensor y, torch::Tensor sT, torch::Tensor ckpt, int rows) {               \
    wkv::with_element(r, [&](auto e) { fwd_typed<decltype(e)>(r, w, k, v, u, s0, y, sT, ckpt, rows); });          \
  }                                                                                                                \
  void BWD_NAME(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor u,               \
                torch::Tensor dy, torch::Tensor dsT, torch::Tensor ckpt, torch::Tensor scratch, torch::Tensor dr,  \
                torch::Tensor dw, torch::Tensor dk, torch::Tensor dv, torch::Tensor du, torch::Tensor ds0,         \
                int rows) {                                                                                        \
    wkv::with_element(r, [&](auto e) {                                                                             \
      bwd_typed<decltype(e)>(r, w, k, v, u, dy, dsT, ckpt, scratch, dr, dw, dk, dv, du, ds0, rows);                \
    });                                                                                                            \
  }
