// RWKV-7 WKV with state in/out and exact gradients (incl. the initial state and an incoming final-state gradient).
//   S_t = S_{t-1} diag(d_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T,  y_t = S_t r_t,  d_t = exp(-e^{-1/2} sigmoid(w_t))
// State layout S[b, h, i, j]: i = value row, j = key column.  One block per (batch, head), one thread per row/column.
// Forward: thread i keeps row i of S in registers; every CK tokens it saves the state (checkpoint) and it saves
// sa_t = S_{t-1} a_t per token.  Backward walks chunks in reverse: each thread recomputes its column of S over the
// chunk from the checkpoint into a per-block scratch, then runs the reverse recurrence on dS, kept twice in
// registers (row i for row sums, column j for column sums) so no reduction crosses threads except dsa (shared).
#include "wkv_common.cuh"
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

using wkv::CK;

namespace {

constexpr float kDecayScale = 0.60653065971263342f;  // e^{-1/2}

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }
__device__ __forceinline__ float decay7(float w) { return expf(-kDecayScale * sigmoid(w)); }

template <typename F, int N>
__global__ void __launch_bounds__(N) fwd_kernel(int T, int H, const F* __restrict__ r, const F* __restrict__ w,
    const F* __restrict__ k, const F* __restrict__ v, const F* __restrict__ a, const F* __restrict__ b,
    const float* __restrict__ s0, F* __restrict__ y, float* __restrict__ sT, float* __restrict__ ckpt,
    float* __restrict__ sa_out) {
  extern __shared__ __align__(16) float smem[];
  float (*sr)[N] = reinterpret_cast<float (*)[N]>(smem);
  float (*sd)[N] = sr + CK, (*sk)[N] = sd + CK, (*sv)[N] = sk + CK, (*sa)[N] = sv + CK, (*sb)[N] = sa + CK;
  const int bh = blockIdx.x, bb = bh / H, h = bh % H, i = threadIdx.x;
  const int nc = (T + CK - 1) / CK;
  float S[N];
  const float* s0row = s0 + (int64_t(bh) * N + i) * N;
#pragma unroll
  for (int j = 0; j < N; ++j) S[j] = s0row[j];
  for (int c = 0; c < nc; ++c) {
    const int t0 = c * CK, L = min(CK, T - t0);
    float* cp = ckpt + ((int64_t(bh) * nc + c) * N + i) * N;
#pragma unroll
    for (int j = 0; j < N; j += 4) *reinterpret_cast<float4*>(cp + j) = make_float4(S[j], S[j + 1], S[j + 2], S[j + 3]);
    __syncthreads();  // previous chunk's readers are done with the shared vectors
    for (int l = 0; l < L; ++l) {
      const int64_t o = wkv::seq_off(bb, t0 + l, h, T, H, N) + i;
      sr[l][i] = wkv::to_f(r[o]);
      sd[l][i] = decay7(wkv::to_f(w[o]));
      sk[l][i] = wkv::to_f(k[o]);
      sv[l][i] = wkv::to_f(v[o]);
      sa[l][i] = wkv::to_f(a[o]);
      sb[l][i] = wkv::to_f(b[o]);
    }
    __syncthreads();
    for (int l = 0; l < L; ++l) {
      float sai = 0.f;
#pragma unroll
      for (int j = 0; j < N; ++j) sai += S[j] * sa[l][j];
      const float vi = sv[l][i];
      float yi = 0.f;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        S[j] = S[j] * sd[l][j] + sai * sb[l][j] + vi * sk[l][j];
        yi += S[j] * sr[l][j];
      }
      const int64_t o = wkv::seq_off(bb, t0 + l, h, T, H, N) + i;
      y[o] = wkv::from_f<F>(yi);
      sa_out[o] = sai;
    }
  }
  float* strow = sT + (int64_t(bh) * N + i) * N;
#pragma unroll
  for (int j = 0; j < N; j += 4) *reinterpret_cast<float4*>(strow + j) = make_float4(S[j], S[j + 1], S[j + 2], S[j + 3]);
}

template <typename F, int N>
__global__ void __launch_bounds__(N) bwd_kernel(int T, int H, const F* __restrict__ r, const F* __restrict__ w,
    const F* __restrict__ k, const F* __restrict__ v, const F* __restrict__ a, const F* __restrict__ b,
    const F* __restrict__ dy, const float* __restrict__ dsT, const float* __restrict__ ckpt,
    const float* __restrict__ sa_in, float* __restrict__ scratch, F* __restrict__ dr, F* __restrict__ dw,
    F* __restrict__ dk, F* __restrict__ dv, F* __restrict__ da, F* __restrict__ db, float* __restrict__ ds0) {
  extern __shared__ __align__(16) float smem[];
  float (*sr)[N] = reinterpret_cast<float (*)[N]>(smem);
  float (*sd)[N] = sr + CK, (*sk)[N] = sd + CK, (*sv)[N] = sk + CK, (*sa)[N] = sv + CK, (*sb)[N] = sa + CK;
  float (*sdy)[N] = sb + CK, (*ssa)[N] = sdy + CK, (*sdsa)[N] = ssa + CK;  // sdsa: 2 rows, double-buffered
  const int bh = blockIdx.x, bb = bh / H, h = bh % H, x = threadIdx.x;
  const int nc = (T + CK - 1) / CK;
  float* scr = scratch + int64_t(bh) * CK * N * N;
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
      sd[l][x] = decay7(wkv::to_f(w[o]));
      sk[l][x] = wkv::to_f(k[o]);
      sv[l][x] = wkv::to_f(v[o]);
      sa[l][x] = wkv::to_f(a[o]);
      sb[l][x] = wkv::to_f(b[o]);
      sdy[l][x] = wkv::to_f(dy[o]);
      ssa[l][x] = sa_in[o];
    }
    __syncthreads();
    {  // recompute column x of S_{t-1} for every token of the chunk into the scratch
      const float* cp = ckpt + (int64_t(bh) * nc + c) * N * N + x;
      float Sc[N];
#pragma unroll
      for (int i = 0; i < N; ++i) Sc[i] = cp[i * N];
      for (int l = 0; l < L; ++l) {
        float* out = scr + int64_t(l) * N * N + x;
        const float dj = sd[l][x], bj = sb[l][x], kj = sk[l][x];
#pragma unroll
        for (int i = 0; i < N; ++i) {
          out[i * N] = Sc[i];
          Sc[i] = Sc[i] * dj + ssa[l][i] * bj + sv[l][i] * kj;
        }
      }
    }
    for (int l = L - 1; l >= 0; --l) {
      const int64_t o = wkv::seq_off(bb, t0 + l, h, T, H, N) + x;
      // row role (i = x): dS'_t = dS_t + dy r^T, dv, dsa, then dS_{t-1} = dS'_t diag(d) + dsa a^T
      const float dyi = sdy[l][x];
      float dvi = 0.f, dsai = 0.f;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const float g = Grow[j] + dyi * sr[l][j];
        dvi += g * sk[l][j];
        dsai += g * sb[l][j];
        Grow[j] = g;
      }
#pragma unroll
      for (int j = 0; j < N; ++j) Grow[j] = Grow[j] * sd[l][j] + dsai * sa[l][j];
      sdsa[l & 1][x] = dsai;
      dv[o] = wkv::from_f<F>(dvi);
      __syncthreads();
      // column role (j = x): sums over value rows i
      const float rj = sr[l][x], dj = sd[l][x], kj = sk[l][x], aj = sa[l][x], bj = sb[l][x];
      const float* Sp = scr + int64_t(l) * N * N + x;
      float dkj = 0.f, dbj = 0.f, ddj = 0.f, daj = 0.f, sdyj = 0.f, sady = 0.f, vdy = 0.f;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float s = Sp[i * N], dyv = sdy[l][i], vi = sv[l][i], sai = ssa[l][i], dsa = sdsa[l & 1][i];
        const float g = Gcol[i] + dyv * rj;
        dkj += g * vi;
        dbj += g * sai;
        ddj += g * s;
        daj += dsa * s;
        sdyj += s * dyv;
        sady += sai * dyv;
        vdy += vi * dyv;
        Gcol[i] = g * dj + dsa * aj;
      }
      const float sg = sigmoid(wkv::to_f(w[o]));
      dr[o] = wkv::from_f<F>(dj * sdyj + bj * sady + kj * vdy);
      dw[o] = wkv::from_f<F>(ddj * dj * (-kDecayScale) * sg * (1.f - sg));
      dk[o] = wkv::from_f<F>(dkj);
      da[o] = wkv::from_f<F>(daj);
      db[o] = wkv::from_f<F>(dbj);
    }
  }
  float* g = ds0 + int64_t(bh) * N * N + x;
#pragma unroll
  for (int i = 0; i < N; ++i) g[i * N] = Gcol[i];
}

template <typename F>
const F* cptr(const torch::Tensor& t) { return reinterpret_cast<const F*>(t.data_ptr()); }
template <typename F>
F* mptr(torch::Tensor& t) { return reinterpret_cast<F*>(t.data_ptr()); }

template <typename F>
void fwd_typed(int B, int T, int H, torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v,
               torch::Tensor a, torch::Tensor b, torch::Tensor s0, torch::Tensor y, torch::Tensor sT,
               torch::Tensor ckpt, torch::Tensor sa) {
  constexpr int N = WKV_N;
  const size_t smem = size_t(6) * CK * N * sizeof(float);
  auto kern = fwd_kernel<F, N>;
  wkv::allow_smem(kern, smem);
  kern<<<B * H, N, smem, c10::cuda::getCurrentCUDAStream()>>>(T, H, cptr<F>(r), cptr<F>(w), cptr<F>(k), cptr<F>(v),
      cptr<F>(a), cptr<F>(b), s0.data_ptr<float>(), mptr<F>(y), sT.data_ptr<float>(), ckpt.data_ptr<float>(),
      sa.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename F>
void bwd_typed(int B, int T, int H, torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v,
               torch::Tensor a, torch::Tensor b, torch::Tensor dy, torch::Tensor dsT, torch::Tensor ckpt,
               torch::Tensor sa, torch::Tensor scratch, torch::Tensor dr, torch::Tensor dw, torch::Tensor dk,
               torch::Tensor dv, torch::Tensor da, torch::Tensor db, torch::Tensor ds0) {
  constexpr int N = WKV_N;
  const size_t smem = (size_t(8) * CK + 2) * N * sizeof(float);
  auto kern = bwd_kernel<F, N>;
  wkv::allow_smem(kern, smem);
  kern<<<B * H, N, smem, c10::cuda::getCurrentCUDAStream()>>>(T, H, cptr<F>(r), cptr<F>(w), cptr<F>(k), cptr<F>(v),
      cptr<F>(a), cptr<F>(b), cptr<F>(dy), dsT.data_ptr<float>(), ckpt.data_ptr<float>(), sa.data_ptr<float>(),
      scratch.data_ptr<float>(), mptr<F>(dr), mptr<F>(dw), mptr<F>(dk), mptr<F>(dv), mptr<F>(da), mptr<F>(db),
      ds0.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void wkv7_forward_cuda(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor a,
                       torch::Tensor b, torch::Tensor s0, torch::Tensor y, torch::Tensor sT, torch::Tensor ckpt,
                       torch::Tensor sa) {
  const int B = r.size(0), T = r.size(1), H = r.size(2);
  if (r.scalar_type() == at::kBFloat16)
    fwd_typed<__nv_bfloat16>(B, T, H, r, w, k, v, a, b, s0, y, sT, ckpt, sa);
  else
    fwd_typed<float>(B, T, H, r, w, k, v, a, b, s0, y, sT, ckpt, sa);
}

void wkv7_backward_cuda(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor a,
                        torch::Tensor b, torch::Tensor dy, torch::Tensor dsT, torch::Tensor ckpt, torch::Tensor sa,
                        torch::Tensor scratch, torch::Tensor dr, torch::Tensor dw, torch::Tensor dk, torch::Tensor dv,
                        torch::Tensor da, torch::Tensor db, torch::Tensor ds0) {
  const int B = r.size(0), T = r.size(1), H = r.size(2);
  if (r.scalar_type() == at::kBFloat16)
    bwd_typed<__nv_bfloat16>(B, T, H, r, w, k, v, a, b, dy, dsT, ckpt, sa, scratch, dr, dw, dk, dv, da, db, ds0);
  else
    bwd_typed<float>(B, T, H, r, w, k, v, a, b, dy, dsT, ckpt, sa, scratch, dr, dw, dk, dv, da, db, ds0);
}
