// RWKV-7 WKV with state in/out and exact gradients (incl. the initial state and an incoming final-state gradient).
//   S_t = S_{t-1} diag(d_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T,  y_t = S_t r_t,  d_t = exp(-e^{-1/2} sigmoid(w_t))
// State layout S[b, h, i, j]: i = value row, j = key column. Every value row evolves on its own (sa_i = S_i. a only
// reads row i), so a head's rows are split over G = N/R blocks (see wkv::Tile) to fill the GPU at small B*H.
// Forward: P threads per row hold it in registers; every CK tokens the state is saved (checkpoint), and sa_t is saved
// per token. Backward walks the chunks in reverse: the column role recomputes its slice of S over the chunk from the
// checkpoint into a per-block scratch, then the reverse recurrence runs on dS, kept twice in registers (row slices
// for row sums: dv, dsa; column slices for column sums: dr, dk, da, db, dw). The only per-token exchange is dsa
// through shared memory. Column sums are partial over a block's rows: with G > 1 they are added atomically.
#include "wkv_common.cuh"
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

using wkv::CK;
using wkv::group_sum;

namespace {

constexpr float kDecayScale = 0.60653065971263342f;  // e^{-1/2}

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }
__device__ __forceinline__ float decay7(float w) { return expf(-kDecayScale * sigmoid(w)); }

template <typename F, class Tl>
__global__ void __launch_bounds__(Tl::kThreads) fwd_kernel(int T, int H, const F* __restrict__ r,
    const F* __restrict__ w, const F* __restrict__ k, const F* __restrict__ v, const F* __restrict__ a,
    const F* __restrict__ b, const float* __restrict__ s0, F* __restrict__ y, float* __restrict__ sT,
    float* __restrict__ ckpt, float* __restrict__ sa_out) {
  constexpr int N = Tl::N, R = Tl::R, P = Tl::P, M = Tl::M;
  extern __shared__ __align__(16) float smem[];
  float (*sr)[N] = reinterpret_cast<float (*)[N]>(smem);
  float (*sd)[N] = sr + CK, (*sk)[N] = sd + CK, (*sa)[N] = sk + CK, (*sb)[N] = sa + CK;
  float (*sv)[R] = reinterpret_cast<float (*)[R]>(sb + CK);
  const int bh = blockIdx.x / Tl::G, g = blockIdx.x % Tl::G, bb = bh / H, h = bh % H;
  const int il = threadIdx.x / P, p = threadIdx.x % P, i = g * R + il;
  const int nc = (T + CK - 1) / CK;
  float S[M];
  const float* s0row = s0 + (int64_t(bh) * N + i) * N;
#pragma unroll
  for (int jj = 0; jj < M; ++jj) S[jj] = s0row[jj * P + p];
  for (int c = 0; c < nc; ++c) {
    const int t0 = c * CK, L = min(CK, T - t0);
    float* cp = ckpt + ((int64_t(bh) * nc + c) * N + i) * N;
#pragma unroll
    for (int jj = 0; jj < M; ++jj) cp[jj * P + p] = S[jj];
    __syncthreads();  // the previous chunk's readers are done with the shared vectors
    for (int e = threadIdx.x; e < L * N; e += Tl::kThreads) {
      const int l = e / N, x = e % N;
      const int64_t o = wkv::seq_off(bb, t0 + l, h, T, H, N) + x;
      sr[l][x] = wkv::to_f(r[o]);
      sd[l][x] = decay7(wkv::to_f(w[o]));
      sk[l][x] = wkv::to_f(k[o]);
      sa[l][x] = wkv::to_f(a[o]);
      sb[l][x] = wkv::to_f(b[o]);
    }
    for (int e = threadIdx.x; e < L * R; e += Tl::kThreads) {
      const int l = e / R, x = e % R;
      sv[l][x] = wkv::to_f(v[wkv::seq_off(bb, t0 + l, h, T, H, N) + g * R + x]);
    }
    __syncthreads();
    for (int l = 0; l < L; ++l) {
      float part = 0.f;
#pragma unroll
      for (int jj = 0; jj < M; ++jj) part += S[jj] * sa[l][jj * P + p];
      const float sai = group_sum<P>(part), vi = sv[l][il];
      float yp = 0.f;
#pragma unroll
      for (int jj = 0; jj < M; ++jj) {
        const int j = jj * P + p;
        S[jj] = S[jj] * sd[l][j] + sai * sb[l][j] + vi * sk[l][j];
        yp += S[jj] * sr[l][j];
      }
      const float yi = group_sum<P>(yp);
      if (p == 0) {
        const int64_t o = wkv::seq_off(bb, t0 + l, h, T, H, N) + i;
        y[o] = wkv::from_f<F>(yi);
        sa_out[o] = sai;
      }
    }
  }
  float* strow = sT + (int64_t(bh) * N + i) * N;
#pragma unroll
  for (int jj = 0; jj < M; ++jj) strow[jj * P + p] = S[jj];
}

// Key-side gradients: written directly when one block owns the whole head (G == 1), else added into fp32 sums.
template <typename F, bool kAtomic>
struct KeyGrads {
  F *dr, *dw, *dk, *da, *db;
  float* acc;  // [5, B, T, H, N] when kAtomic
  int64_t n;   // B*T*H*N
  __device__ __forceinline__ void put(int64_t o, float r_, float w_, float k_, float a_, float b_) const {
    if constexpr (kAtomic) {
      atomicAdd(acc + o, r_);
      atomicAdd(acc + n + o, w_);
      atomicAdd(acc + 2 * n + o, k_);
      atomicAdd(acc + 3 * n + o, a_);
      atomicAdd(acc + 4 * n + o, b_);
    } else {
      dr[o] = wkv::from_f<F>(r_);
      dw[o] = wkv::from_f<F>(w_);
      dk[o] = wkv::from_f<F>(k_);
      da[o] = wkv::from_f<F>(a_);
      db[o] = wkv::from_f<F>(b_);
    }
  }
};

template <typename F, class Tl>
__global__ void __launch_bounds__(Tl::kThreads) bwd_kernel(int T, int H, const F* __restrict__ r,
    const F* __restrict__ w, const F* __restrict__ k, const F* __restrict__ v, const F* __restrict__ a,
    const F* __restrict__ b, const F* __restrict__ dy, const float* __restrict__ dsT, const float* __restrict__ ckpt,
    const float* __restrict__ sa_in, float* __restrict__ scratch, KeyGrads<F, (Tl::G > 1)> out, F* __restrict__ dv,
    float* __restrict__ ds0) {
  constexpr int N = Tl::N, R = Tl::R, P = Tl::P, M = Tl::M, Q = Tl::Q, MC = Tl::MC, RS = Tl::RS;
  extern __shared__ __align__(16) float smem[];
  float (*sr)[N] = reinterpret_cast<float (*)[N]>(smem);
  float (*sd)[N] = sr + CK, (*sk)[N] = sd + CK, (*sa)[N] = sk + CK, (*sb)[N] = sa + CK;
  float (*sdy)[R] = reinterpret_cast<float (*)[R]>(sb + CK);
  float (*sv)[R] = sdy + CK, (*ssa)[R] = sv + CK, (*sdsa)[R] = ssa + CK;  // sdsa: 2 rows, double-buffered
  const int bh = blockIdx.x / Tl::G, g = blockIdx.x % Tl::G, bb = bh / H, h = bh % H;
  const int il = threadIdx.x / P, p = threadIdx.x % P, i = g * R + il;  // row role
  const int jc = threadIdx.x / Q, q = threadIdx.x % Q;                   // column role: rows g*R + ii*Q + q
  const int nc = (T + CK - 1) / CK;
  float* scr = Tl::kSmemScratch ? reinterpret_cast<float*>(sdsa + 2) : scratch + int64_t(blockIdx.x) * CK * R * N;
  float Grow[M], Gcol[MC];  // dL/dS_t: a slice of row i and a slice of column jc
  const float* g0 = dsT + int64_t(bh) * N * N;
#pragma unroll
  for (int jj = 0; jj < M; ++jj) Grow[jj] = g0[i * N + jj * P + p];
#pragma unroll
  for (int ii = 0; ii < MC; ++ii) Gcol[ii] = g0[(g * R + ii * Q + q) * N + jc];
  for (int c = nc - 1; c >= 0; --c) {
    const int t0 = c * CK, L = min(CK, T - t0);
    __syncthreads();
    for (int e = threadIdx.x; e < L * N; e += Tl::kThreads) {
      const int l = e / N, x = e % N;
      const int64_t o = wkv::seq_off(bb, t0 + l, h, T, H, N) + x;
      sr[l][x] = wkv::to_f(r[o]);
      sd[l][x] = decay7(wkv::to_f(w[o]));
      sk[l][x] = wkv::to_f(k[o]);
      sa[l][x] = wkv::to_f(a[o]);
      sb[l][x] = wkv::to_f(b[o]);
    }
    for (int e = threadIdx.x; e < L * R; e += Tl::kThreads) {
      const int l = e / R, x = e % R;
      const int64_t o = wkv::seq_off(bb, t0 + l, h, T, H, N) + g * R + x;
      sdy[l][x] = wkv::to_f(dy[o]);
      sv[l][x] = wkv::to_f(v[o]);
      ssa[l][x] = sa_in[o];
    }
    __syncthreads();
    {  // recompute this thread's column slice of S_{t-1} for every token of the chunk into the scratch
      const float* cp = ckpt + (int64_t(bh) * nc + c) * N * N + g * R * N + jc;
      float Sc[MC];
#pragma unroll
      for (int ii = 0; ii < MC; ++ii) Sc[ii] = cp[(ii * Q + q) * N];
      for (int l = 0; l < L; ++l) {
        float* dst = scr + l * R * RS + jc;
        const float dj = sd[l][jc], bj = sb[l][jc], kj = sk[l][jc];
#pragma unroll
        for (int ii = 0; ii < MC; ++ii) {
          const int row = ii * Q + q;
          dst[row * RS] = Sc[ii];
          Sc[ii] = Sc[ii] * dj + ssa[l][row] * bj + sv[l][row] * kj;
        }
      }
    }
    for (int l = L - 1; l >= 0; --l) {
      const int64_t o = wkv::seq_off(bb, t0 + l, h, T, H, N);
      // row role: dS'_t = dS_t + dy r^T; dv, dsa; then dS_{t-1} = dS'_t diag(d) + dsa a^T
      const float dyi = sdy[l][il];
      float dvp = 0.f, dsap = 0.f;
#pragma unroll
      for (int jj = 0; jj < M; ++jj) {
        const int j = jj * P + p;
        const float gg = Grow[jj] + dyi * sr[l][j];
        dvp += gg * sk[l][j];
        dsap += gg * sb[l][j];
        Grow[jj] = gg;
      }
      const float dvi = group_sum<P>(dvp), dsai = group_sum<P>(dsap);
#pragma unroll
      for (int jj = 0; jj < M; ++jj) Grow[jj] = Grow[jj] * sd[l][jj * P + p] + dsai * sa[l][jj * P + p];
      if (p == 0) {
        sdsa[l & 1][il] = dsai;
        dv[o + i] = wkv::from_f<F>(dvi);
      }
      __syncthreads();
      // column role: sums over this block's value rows
      const float rj = sr[l][jc], dj = sd[l][jc], kj = sk[l][jc], aj = sa[l][jc], bj = sb[l][jc];
      const float* Sp = scr + l * R * RS + jc;
      float dkj = 0.f, dbj = 0.f, ddj = 0.f, daj = 0.f, sdyj = 0.f, sady = 0.f, vdy = 0.f;
#pragma unroll
      for (int ii = 0; ii < MC; ++ii) {
        const int row = ii * Q + q;
        const float s = Sp[row * RS], dyv = sdy[l][row], vi = sv[l][row], sai = ssa[l][row], dsa = sdsa[l & 1][row];
        const float gg = Gcol[ii] + dyv * rj;
        dkj += gg * vi;
        dbj += gg * sai;
        ddj += gg * s;
        daj += dsa * s;
        sdyj += s * dyv;
        sady += sai * dyv;
        vdy += vi * dyv;
        Gcol[ii] = gg * dj + dsa * aj;
      }
      const float drj = group_sum<Q>(dj * sdyj + bj * sady + kj * vdy);
      dkj = group_sum<Q>(dkj);
      dbj = group_sum<Q>(dbj);
      ddj = group_sum<Q>(ddj);
      daj = group_sum<Q>(daj);
      if (q == 0) {
        const float sg = sigmoid(wkv::to_f(w[o + jc]));
        out.put(o + jc, drj, ddj * dj * (-kDecayScale) * sg * (1.f - sg), dkj, daj, dbj);
      }
    }
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
#if WKV_N == 64
  if (rows == 0) rows = BH >= 64 ? 64 : 16;  // measured on H100 (bench/results/kernels.md, --sweep-rows)
  TORCH_CHECK(rows == 64 || rows == 16 || rows == 8, "wkv7: rows per block must be 0, 8, 16 or 64");
  if (rows == 64) f(wkv::Tile<64, 64, 4>{});
  else if (rows == 16) f(wkv::Tile<64, 16, 8>{});
  else f(wkv::Tile<64, 8, 8>{});
#else
  if (rows == 0) rows = BH >= 64 ? WKV_N : WKV_N / 4;
  TORCH_CHECK(rows == WKV_N || rows == WKV_N / 4, "wkv7: rows per block must be 0, ", WKV_N / 4, " or ", WKV_N);
  if (rows == WKV_N) f(wkv::Tile<WKV_N, WKV_N, 4>{});
  else f(wkv::Tile<WKV_N, WKV_N / 4, 8>{});
#endif
}

template <typename F>
void fwd_typed(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor a, torch::Tensor b,
               torch::Tensor s0, torch::Tensor y, torch::Tensor sT, torch::Tensor ckpt, torch::Tensor sa, int rows) {
  const int B = r.size(0), T = r.size(1), H = r.size(2);
  with_tile(B * H, rows, [&](auto tile) {
    using Tl = decltype(tile);
    const size_t smem = size_t(CK) * (5 * Tl::N + Tl::R) * sizeof(float);
    auto kern = fwd_kernel<F, Tl>;
    wkv::allow_smem(kern, smem);
    kern<<<B * H * Tl::G, Tl::kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(T, H, cptr<F>(r), cptr<F>(w),
        cptr<F>(k), cptr<F>(v), cptr<F>(a), cptr<F>(b), s0.data_ptr<float>(), mptr<F>(y), sT.data_ptr<float>(),
        ckpt.data_ptr<float>(), sa.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename F>
void bwd_typed(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor a, torch::Tensor b,
               torch::Tensor dy, torch::Tensor dsT, torch::Tensor ckpt, torch::Tensor sa, torch::Tensor scratch,
               torch::Tensor dr, torch::Tensor dw, torch::Tensor dk, torch::Tensor dv, torch::Tensor da,
               torch::Tensor db, torch::Tensor ds0, int rows) {
  const int B = r.size(0), T = r.size(1), H = r.size(2);
  with_tile(B * H, rows, [&](auto tile) {
    using Tl = decltype(tile);
    constexpr bool kAtomic = Tl::G > 1;
    torch::Tensor acc;
    KeyGrads<F, kAtomic> out{mptr<F>(dr), mptr<F>(dw), mptr<F>(dk), mptr<F>(da), mptr<F>(db), nullptr, r.numel()};
    if (kAtomic) {
      acc = torch::zeros({5, r.numel()}, r.options().dtype(torch::kFloat));
      out.acc = acc.data_ptr<float>();
    }
    const size_t smem = (size_t(CK) * (5 * Tl::N + 3 * Tl::R) + 2 * Tl::R +
                         (Tl::kSmemScratch ? size_t(CK) * Tl::R * Tl::RS : 0)) * sizeof(float);
    torch::Tensor scr = scratch;  // global recompute scratch, only for tiles whose scratch is not in shared memory
    if (!Tl::kSmemScratch && scr.numel() < int64_t(B) * H * Tl::G * CK * Tl::R * Tl::N)
      scr = torch::empty({int64_t(B) * H * Tl::G * CK * Tl::R * Tl::N}, r.options().dtype(torch::kFloat));
    auto kern = bwd_kernel<F, Tl>;
    wkv::allow_smem(kern, smem);
    kern<<<B * H * Tl::G, Tl::kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(T, H, cptr<F>(r), cptr<F>(w),
        cptr<F>(k), cptr<F>(v), cptr<F>(a), cptr<F>(b), cptr<F>(dy), dsT.data_ptr<float>(), ckpt.data_ptr<float>(),
        sa.data_ptr<float>(), scr.data_ptr<float>(), out, mptr<F>(dv), ds0.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (kAtomic) {
      torch::Tensor grads[5] = {dr, dw, dk, da, db};
      for (int n = 0; n < 5; ++n) grads[n].view({-1}).copy_(acc[n]);
    }
  });
}

}  // namespace

void wkv7_forward_cuda(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor a,
                       torch::Tensor b, torch::Tensor s0, torch::Tensor y, torch::Tensor sT, torch::Tensor ckpt,
                       torch::Tensor sa, int rows) {
  if (r.scalar_type() == at::kBFloat16)
    fwd_typed<__nv_bfloat16>(r, w, k, v, a, b, s0, y, sT, ckpt, sa, rows);
  else
    fwd_typed<float>(r, w, k, v, a, b, s0, y, sT, ckpt, sa, rows);
}

void wkv7_backward_cuda(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor a,
                        torch::Tensor b, torch::Tensor dy, torch::Tensor dsT, torch::Tensor ckpt, torch::Tensor sa,
                        torch::Tensor scratch, torch::Tensor dr, torch::Tensor dw, torch::Tensor dk, torch::Tensor dv,
                        torch::Tensor da, torch::Tensor db, torch::Tensor ds0, int rows) {
  if (r.scalar_type() == at::kBFloat16)
    bwd_typed<__nv_bfloat16>(r, w, k, v, a, b, dy, dsT, ckpt, sa, scratch, dr, dw, dk, dv, da, db, ds0, rows);
  else
    bwd_typed<float>(r, w, k, v, a, b, dy, dsT, ckpt, sa, scratch, dr, dw, dk, dv, da, db, ds0, rows);
}
