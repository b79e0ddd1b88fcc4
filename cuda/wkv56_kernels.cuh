// RWKV-5/6 WKV kernels with state in/out and exact gradients; included by wkv5.cu (decay constant over time,
// w [H,N]) and wkv6.cu (decay per token, w [B,T,H,N]) with WKV_TIME_DECAY set accordingly.
//   y_t = S_{t-1} r_t + v_t (sum_j u_j k_tj r_tj),  S_t = S_{t-1} diag(d_t) + v_t k_t^T,  d_t = exp(-exp(w_t))
// Same structure as wkv7.cu: one block per (batch, head), thread i holds row i of S; state checkpoints every CK
// tokens; the backward recomputes each chunk's columns into a scratch and keeps dS as a row and as a column.
#include "wkv_common.cuh"
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

using wkv::CK;

namespace {

constexpr bool kTimeDecay = WKV_TIME_DECAY;
constexpr int kDecayRows = kTimeDecay ? CK : 1;  // wkv5 keeps one decay row for every token

__device__ __forceinline__ float decay56(float w) { return expf(-expf(w)); }

// Offset of decay logit w for token t, feature 0 of head h.
__device__ __forceinline__ int64_t w_off(int b, int t, int h, int T, int H, int N) {
  return kTimeDecay ? wkv::seq_off(b, t, h, T, H, N) : int64_t(h) * N;
}

template <typename F, int N>
__device__ __forceinline__ void load_decay(float (*sd)[N], const F* w, int b, int t0, int L, int h, int T, int H,
                                           int x) {
  for (int l = 0; l < (kTimeDecay ? L : 1); ++l) sd[l][x] = decay56(wkv::to_f(w[w_off(b, t0 + l, h, T, H, N) + x]));
}

template <typename F, int N>
__global__ void __launch_bounds__(N) fwd_kernel(int T, int H, const F* __restrict__ r, const F* __restrict__ w,
    const F* __restrict__ k, const F* __restrict__ v, const F* __restrict__ u, const float* __restrict__ s0,
    F* __restrict__ y, float* __restrict__ sT, float* __restrict__ ckpt) {
  extern __shared__ __align__(16) float smem[];
  float (*sr)[N] = reinterpret_cast<float (*)[N]>(smem);
  float (*sk)[N] = sr + CK, (*sv)[N] = sk + CK, (*su)[N] = sv + CK, (*sd)[N] = su + 1;
  const int bh = blockIdx.x, bb = bh / H, h = bh % H, i = threadIdx.x;
  const int nc = (T + CK - 1) / CK;
  su[0][i] = wkv::to_f(u[h * N + i]);
  if (!kTimeDecay) load_decay<F, N>(sd, w, bb, 0, 1, h, T, H, i);
  float S[N];
  const float* s0row = s0 + (int64_t(bh) * N + i) * N;
#pragma unroll
  for (int j = 0; j < N; ++j) S[j] = s0row[j];
  for (int c = 0; c < nc; ++c) {
    const int t0 = c * CK, L = min(CK, T - t0);
    float* cp = ckpt + ((int64_t(bh) * nc + c) * N + i) * N;
#pragma unroll
    for (int j = 0; j < N; j += 4) *reinterpret_cast<float4*>(cp + j) = make_float4(S[j], S[j + 1], S[j + 2], S[j + 3]);
    __syncthreads();
    for (int l = 0; l < L; ++l) {
      const int64_t o = wkv::seq_off(bb, t0 + l, h, T, H, N) + i;
      sr[l][i] = wkv::to_f(r[o]);
      sk[l][i] = wkv::to_f(k[o]);
      sv[l][i] = wkv::to_f(v[o]);
    }
    if (kTimeDecay) load_decay<F, N>(sd, w, bb, t0, L, h, T, H, i);
    __syncthreads();
    for (int l = 0; l < L; ++l) {
      const float vi = sv[l][i];
      const int ld = kTimeDecay ? l : 0;
      float yi = 0.f, ukr = 0.f;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        yi += S[j] * sr[l][j];
        ukr += su[0][j] * sk[l][j] * sr[l][j];
        S[j] = S[j] * sd[ld][j] + vi * sk[l][j];
      }
      y[wkv::seq_off(bb, t0 + l, h, T, H, N) + i] = wkv::from_f<F>(yi + vi * ukr);
    }
  }
  float* strow = sT + (int64_t(bh) * N + i) * N;
#pragma unroll
  for (int j = 0; j < N; j += 4) *reinterpret_cast<float4*>(strow + j) = make_float4(S[j], S[j + 1], S[j + 2], S[j + 3]);
}

// dw: per token (wkv6, type F) or summed over time per (b,h) (wkv5, fp32 [B,H,N]); du: fp32 [B,H,N] partial sums.
template <typename F, int N, typename DW>
__global__ void __launch_bounds__(N) bwd_kernel(int T, int H, const F* __restrict__ r, const F* __restrict__ w,
    const F* __restrict__ k, const F* __restrict__ v, const F* __restrict__ u, const F* __restrict__ dy,
    const float* __restrict__ dsT, const float* __restrict__ ckpt, float* __restrict__ scratch, F* __restrict__ dr,
    DW* __restrict__ dw, F* __restrict__ dk, F* __restrict__ dv, float* __restrict__ du, float* __restrict__ ds0) {
  extern __shared__ __align__(16) float smem[];
  float (*sr)[N] = reinterpret_cast<float (*)[N]>(smem);
  float (*sk)[N] = sr + CK, (*sv)[N] = sk + CK, (*sdy)[N] = sv + CK, (*su)[N] = sdy + CK, (*sd)[N] = su + 1;
  const int bh = blockIdx.x, bb = bh / H, h = bh % H, x = threadIdx.x;
  const int nc = (T + CK - 1) / CK;
  float* scr = scratch + int64_t(bh) * CK * N * N;
  su[0][x] = wkv::to_f(u[h * N + x]);
  if (!kTimeDecay) load_decay<F, N>(sd, w, bb, 0, 1, h, T, H, x);
  const float uj = su[0][x];
  float du_acc = 0.f, dw_acc = 0.f;
  float Grow[N], Gcol[N];  // dL/dS_t: row x and column x
  const float* g0 = dsT + int64_t(bh) * N * N;
#pragma unroll
  for (int j = 0; j < N; ++j) Grow[j] = g0[x * N + j];
#pragma unroll
  for (int i = 0; i < N; ++i) Gcol[i] = g0[i * N + x];
  for (int c = nc - 1; c >= 0; --c) {
    const int t0 = c * CK, L = min(CK, T - t0);
    __syncthreads();
    for (int l = 0; l < L; ++l) {
      const int64_t o = wkv::seq_off(bb, t0 + l, h, T, H, N) + x;
      sr[l][x] = wkv::to_f(r[o]);
      sk[l][x] = wkv::to_f(k[o]);
      sv[l][x] = wkv::to_f(v[o]);
      sdy[l][x] = wkv::to_f(dy[o]);
    }
    if (kTimeDecay) load_decay<F, N>(sd, w, bb, t0, L, h, T, H, x);
    __syncthreads();
    {  // recompute column x of S_{t-1} for every token of the chunk into the scratch
      const float* cp = ckpt + (int64_t(bh) * nc + c) * N * N + x;
      float Sc[N];
#pragma unroll
      for (int i = 0; i < N; ++i) Sc[i] = cp[i * N];
      for (int l = 0; l < L; ++l) {
        float* out = scr + int64_t(l) * N * N + x;
        const float dj = sd[kTimeDecay ? l : 0][x], kj = sk[l][x];
#pragma unroll
        for (int i = 0; i < N; ++i) {
          out[i * N] = Sc[i];
          Sc[i] = Sc[i] * dj + sv[l][i] * kj;
        }
      }
    }
    for (int l = L - 1; l >= 0; --l) {
      const int64_t o = wkv::seq_off(bb, t0 + l, h, T, H, N) + x;
      const int ld = kTimeDecay ? l : 0;
      // row role (i = x)
      const float dyi = sdy[l][x];
      float dvi = 0.f, ukr = 0.f;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        dvi += Grow[j] * sk[l][j];
        ukr += su[0][j] * sk[l][j] * sr[l][j];
        Grow[j] = Grow[j] * sd[ld][j] + dyi * sr[l][j];
      }
      dv[o] = wkv::from_f<F>(dvi + dyi * ukr);
      // column role (j = x)
      const float rj = sr[l][x], kj = sk[l][x], dj = sd[ld][x];
      const float* Sp = scr + int64_t(l) * N * N + x;
      float drj = 0.f, dkj = 0.f, ddj = 0.f, dyv = 0.f;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float s = Sp[i * N], dy_i = sdy[l][i], vi = sv[l][i];
        drj += s * dy_i;
        dkj += Gcol[i] * vi;
        ddj += Gcol[i] * s;
        dyv += dy_i * vi;
        Gcol[i] = Gcol[i] * dj + dy_i * rj;
      }
      dr[o] = wkv::from_f<F>(drj + uj * kj * dyv);
      dk[o] = wkv::from_f<F>(dkj + uj * rj * dyv);
      du_acc += rj * kj * dyv;
      const float dwj = -ddj * dj * expf(wkv::to_f(w[w_off(bb, t0 + l, h, T, H, N) + x]));
      if constexpr (kTimeDecay) dw[o] = wkv::from_f<F>(dwj);
      else dw_acc += dwj;
    }
  }
  du[int64_t(bh) * N + x] = du_acc;
  if constexpr (!kTimeDecay) dw[int64_t(bh) * N + x] = dw_acc;
  float* g = ds0 + int64_t(bh) * N * N + x;
#pragma unroll
  for (int i = 0; i < N; ++i) g[i * N] = Gcol[i];
}

template <typename F>
const F* cptr(const torch::Tensor& t) { return reinterpret_cast<const F*>(t.data_ptr()); }
template <typename F>
F* mptr(torch::Tensor& t) { return reinterpret_cast<F*>(t.data_ptr()); }

template <typename F>
void fwd_typed(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor u,
               torch::Tensor s0, torch::Tensor y, torch::Tensor sT, torch::Tensor ckpt) {
  constexpr int N = WKV_N;
  const int B = r.size(0), T = r.size(1), H = r.size(2);
  const size_t smem = (size_t(3) * CK + 1 + kDecayRows) * N * sizeof(float);
  auto kern = fwd_kernel<F, N>;
  wkv::allow_smem(kern, smem);
  kern<<<B * H, N, smem, c10::cuda::getCurrentCUDAStream()>>>(T, H, cptr<F>(r), cptr<F>(w), cptr<F>(k), cptr<F>(v),
      cptr<F>(u), s0.data_ptr<float>(), mptr<F>(y), sT.data_ptr<float>(), ckpt.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename F>
void bwd_typed(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor u,
               torch::Tensor dy, torch::Tensor dsT, torch::Tensor ckpt, torch::Tensor scratch, torch::Tensor dr,
               torch::Tensor dw, torch::Tensor dk, torch::Tensor dv, torch::Tensor du, torch::Tensor ds0) {
  constexpr int N = WKV_N;
  using DW = std::conditional_t<kTimeDecay, F, float>;
  const int B = r.size(0), T = r.size(1), H = r.size(2);
  const size_t smem = (size_t(4) * CK + 1 + kDecayRows) * N * sizeof(float);
  auto kern = bwd_kernel<F, N, DW>;
  wkv::allow_smem(kern, smem);
  kern<<<B * H, N, smem, c10::cuda::getCurrentCUDAStream()>>>(T, H, cptr<F>(r), cptr<F>(w), cptr<F>(k), cptr<F>(v),
      cptr<F>(u), cptr<F>(dy), dsT.data_ptr<float>(), ckpt.data_ptr<float>(), scratch.data_ptr<float>(), mptr<F>(dr),
      mptr<DW>(dw), mptr<F>(dk), mptr<F>(dv), du.data_ptr<float>(), ds0.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// Entry points with the version in the name, defined once per including .cu file.
#define WKV56_DEFINE_ENTRY_POINTS(FWD_NAME, BWD_NAME)                                                              \
  void FWD_NAME(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor u,               \
                torch::Tensor s0, torch::Tensor y, torch::Tensor sT, torch::Tensor ckpt) {                         \
    if (r.scalar_type() == at::kBFloat16) fwd_typed<__nv_bfloat16>(r, w, k, v, u, s0, y, sT, ckpt);                \
    else fwd_typed<float>(r, w, k, v, u, s0, y, sT, ckpt);                                                         \
  }                                                                                                                \
  void BWD_NAME(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor u,               \
                torch::Tensor dy, torch::Tensor dsT, torch::Tensor ckpt, torch::Tensor scratch, torch::Tensor dr,  \
                torch::Tensor dw, torch::Tensor dk, torch::Tensor dv, torch::Tensor du, torch::Tensor ds0) {       \
    if (r.scalar_type() == at::kBFloat16)                                                                          \
      bwd_typed<__nv_bfloat16>(r, w, k, v, u, dy, dsT, ckpt, scratch, dr, dw, dk, dv, du, ds0);                    \
    else bwd_typed<float>(r, w, k, v, u, dy, dsT, ckpt, scratch, dr, dw, dk, dv, du, ds0);                         \
  }
