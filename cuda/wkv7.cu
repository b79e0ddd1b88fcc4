// RWKV-7 WKV with state in/out and exact gradients (incl. the initial state and an incoming final-state gradient).
//   S_t = S_{t-1} diag(d_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T,  y_t = S_t r_t,  d_t = exp(-e^{-1/2} sigmoid(w_t))
// State layout S[b, h, i, j]: i = value row, j = key column.
//
// Forward: every value row evolves on its own (sa_i = S_i. a reads only row i), so a block owns R = N/G rows of a
// head and P threads share a row, each holding the M = N/P keys j = p*M + q in registers. A chunk of CK tokens of
// key vectors sits in shared memory ("sliced": each thread's M keys contiguous, slices padded so the P slices read
// together fall in distinct banks, read 4 at a time); the next chunk is loaded into registers while this one is
// computed. The only exchanges are two P-lane shuffles per token (sa_i and y_i). Within a chunk the state is held
// divided by the chunk's cumulative decay (keys pre-scaled when staged), so a token costs 4 FMAs per state entry,
// not 5. The state is saved at the end of every chunk (checkpoint) and sa_t per token.
//
// Backward ("backstepping"): d_t >= e^{-e^{-1/2}} ~ 0.545, so S_{t-1} = (S_t - sa_t b_t^T - v_t k_t^T) diag(1/d_t)
// is well conditioned over a chunk; each chunk restarts from its exact checkpoint, so rounding never accumulates past
// CK steps. One block per head; thread group i holds column i of S and both row i and column i of dS, so that every
// gradient is a local dot product with a shared vector: dr, dk, db, dw, da are column sums, dv and dsa row sums.
// The one per-token exchange is dsa (needed by da and by dS's column update) through shared memory.
//
// Span path (long T, few heads; cuda_wkv._WKV7Spans, math in tests/test_wkv7_span_math.py): the sequence is cut
// into spans that run as the batch rows of these same kernels. A span's effect on the state is affine,
// S_end = S_start P + U; fwd_kernel's kOwn and kTransition roles give U and P (and q_t = P_{<=t} r_t), a scan over
// spans gives every span's start state (span_scan_kernel), and the ordinary forward and backward run every span
// at once. In the backward the state gradient at span ends runs back through P^T plus sum_t dy_t q_t^T.
#include "wkv_common.cuh"
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include "wkv_error.h"
#include <algorithm>

using wkv::ChunkShare;
using wkv::CK;
using wkv::group_sum;
using wkv::ident;
using wkv::plain;
using wkv::write_chunk;

namespace {

constexpr float kDecayScale = 0.60653065971263342f;  // e^{-1/2}

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }
__device__ __forceinline__ float decay7(float w) { return expf(-kDecayScale * sigmoid(w)); }

// Shared layout of one token's N-vector for threads that hold M = N/P consecutive entries each: slice p at
// p*(M+4), so one thread's entries are 16-byte aligned and the P slices of a warp-wide read use distinct banks.
template <int N, int P>
struct Sliced {
  static constexpr int M = N / P, kPitch = M + 4, kStride = P * kPitch;
  static_assert(M % 4 == 0, "slices are read as float4");
  __device__ __forceinline__ static int at(int j) { return (j / M) * kPitch + j % M; }
};

// Dot product of a thread's M register entries with its slice of a sliced shared vector.
template <int M>
__device__ __forceinline__ float dot_slice(const float (&x)[M], const float* slice) {
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int q = 0; q < M; q += 4) {
    const float4 s = *reinterpret_cast<const float4*>(slice + q);
    acc[0] += x[q] * s.x;
    acc[1] += x[q + 1] * s.y;
    acc[2] += x[q + 2] * s.z;
    acc[3] += x[q + 3] * s.w;
  }
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

__device__ __forceinline__ float4 ld4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float at4(const float4& v, int c) { return c == 0 ? v.x : c == 1 ? v.y : c == 2 ? v.z : v.w; }

// The next chunk's inputs, in registers until the chunk before it is done: r, w, k, a, b (all N features; stored
// sliced, w as its decay) and v for the block's R value rows: plain in the forward, sliced like the keys in the
// backward (R = N).
template <typename F, int N, int R, int kThreads>
struct NextChunk {
  ChunkShare<N, N, kThreads, F> r, w, k, a, b;
  ChunkShare<N, R, kThreads, F> v;

  __device__ __forceinline__ void load(const F* r_, const F* w_, const F* k_, const F* v_, const F* a_,
                                       const F* b_, int bb, int t0, int L, int h, int T, int H, int x0 = 0) {
    r.load(r_, bb, t0, L, h, T, H);
    w.load(w_, bb, t0, L, h, T, H);
    k.load(k_, bb, t0, L, h, T, H);
    v.load(v_, bb, t0, L, h, T, H, x0);
    a.load(a_, bb, t0, L, h, T, H);
    b.load(b_, bb, t0, L, h, T, H);
  }

  // The forward's staging (fwd_kernel): sd gets the chunk's cumulative decay P_l = d_0 * ... * d_l and the key
  // vectors go in pre-scaled by it, r_l P_l, a_l P_{l-1}, b_l / P_l, k_l / P_l. Starts and ends synchronised.
  template <class At>
  __device__ __forceinline__ void store_scaled(float* sr, float* sd, float* sk, float* sv, float* sa, float* sb,
                                               int stride, At at, int L) const {
    w.store(sd, stride, at, decay7);
    v.store(sv, R, plain, ident);
    __syncthreads();
    for (int j = threadIdx.x; j < N; j += kThreads) {  // serial over the chunk's tokens, one key column per thread
      float p = 1.f;
#pragma unroll
      for (int l = 0; l < CK; ++l)
        if (l < L) sd[l * stride + at(j)] = p *= sd[l * stride + at(j)];
    }
    __syncthreads();
    r.store_at(sr, stride, at, [&](float x, int e) { return x * sd[e]; });
    a.store_at(sa, stride, at, [&](float x, int e) { return e >= stride ? x * sd[e - stride] : x; });
    b.store_at(sb, stride, at, [&](float x, int e) { return __fdividef(x, sd[e]); });
    k.store_at(sk, stride, at, [&](float x, int e) { return __fdividef(x, sd[e]); });
    __syncthreads();
  }

  // The backward's staging: raw w also goes plain into sw (dw needs it), v sliced like the keys (R = N).
  template <class At>
  __device__ __forceinline__ void store(float* sr, float* sd, float* sk, float* sv, float* sa, float* sb, int stride,
                                        At at, float* sw) const {
    r.store(sr, stride, at, ident);
    w.store(sw, N, plain, ident);
    w.store(sd, stride, at, decay7);
    k.store(sk, stride, at, ident);
    v.store(sv, stride, at, ident);
    a.store(sa, stride, at, ident);
    b.store(sb, stride, at, ident);
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Forward: grid B*H*G blocks of R*P threads (R = N/G value rows per block).
// The span path's first pass (every batch row one span) runs the same recurrence in two more roles, and writes no
// checkpoints: kOwn from S = 0 (the span's own state U, to sT; no y), kTransition from S = I with v = 0 (the span's
// transition P, to sT, and its y, q_t = P_{<=t} r_t, in fp32 to q_out).
enum Role { kOrdinary, kOwn, kTransition };

template <typename F, int N, int G, int P, Role kRole = kOrdinary>
__global__ void __launch_bounds__(N / G * P) fwd_kernel(int T, int H, const F* __restrict__ r,
    const F* __restrict__ w, const F* __restrict__ k, const F* __restrict__ v, const F* __restrict__ a,
    const F* __restrict__ b, const float* __restrict__ s0, F* __restrict__ y, float* __restrict__ sT,
    float* __restrict__ ckpt, float* __restrict__ sa_out, float* __restrict__ q_out = nullptr) {
  using Lay = Sliced<N, P>;
  constexpr int R = N / G, M = Lay::M, VS = Lay::kStride, kThreads = R * P;
  extern __shared__ __align__(16) float smem[];
  float *sr = smem, *sd = sr + CK * VS, *sk = sd + CK * VS, *sa = sk + CK * VS, *sb = sa + CK * VS;
  float (*sv)[R] = reinterpret_cast<float (*)[R]>(sb + CK * VS);
  float (*sy)[R] = sv + CK, (*ssa)[R] = sy + CK;
  const int bh = blockIdx.x / G, g = blockIdx.x % G, bb = bh / H, h = bh % H;
  const int il = threadIdx.x / P, p = threadIdx.x % P, i = g * R + il;
  const int nc = (T + CK - 1) / CK;
  float S[M];
  if constexpr (kRole != kOrdinary) {
#pragma unroll
    for (int q = 0; q < M; ++q) S[q] = kRole == kTransition && p * M + q == i ? 1.f : 0.f;
  } else {
    const float* row = s0 + (int64_t(bh) * N + i) * N + p * M;
#pragma unroll
    for (int q = 0; q < M; q += 4) {
      const float4 x = ld4(row + q);
      S[q] = x.x, S[q + 1] = x.y, S[q + 2] = x.z, S[q + 3] = x.w;
    }
  }
  NextChunk<F, N, R, kThreads> next;  // in flight
  auto prefetch = [&](int t0) { next.load(r, w, k, v, a, b, bb, t0, min(CK, T - t0), h, T, H, g * R); };
  prefetch(0);
  const int off = p * Lay::kPitch;  // this thread's slice
  for (int c = 0; c < nc; ++c) {
    const int t0 = c * CK, L = min(CK, T - t0);
    __syncthreads();  // the previous chunk is done with the shared vectors
    next.store_scaled(sr, sd, sk, &sv[0][0], sa, sb, VS, Lay::at, L);
    if (c + 1 < nc) prefetch(t0 + CK);
    // Within the chunk S holds S~_l = S_l diag(P_l)^-1 (store_scaled's P), so that no entry is multiplied by a decay:
    //   S~_l = S~_{l-1} + sa_l (b_l/P_l)^T + v_l (k_l/P_l)^T,  sa_l = S~_{l-1} (P_{l-1} a_l),  y_l = S~_l (P_l r_l).
    for (int l = 0; l < L; ++l) {
      const float sai = group_sum<P>(dot_slice<M>(S, sa + l * VS + off)), vi = sv[l][il];
      float y4[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int q = 0; q < M; q += 4) {
        const float4 b4 = ld4(sb + l * VS + off + q), k4 = ld4(sk + l * VS + off + q), r4 = ld4(sr + l * VS + off + q);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          // v k^T first: it does not wait for sa_l's reduction
          const float s = kRole == kTransition ? S[q + u] : fmaf(vi, at4(k4, u), S[q + u]);
          S[q + u] = fmaf(sai, at4(b4, u), s);
          if constexpr (kRole != kOwn) y4[u] += S[q + u] * at4(r4, u);
        }
      }
      if constexpr (kRole == kOwn) continue;
      const float yi = group_sum<P>((y4[0] + y4[1]) + (y4[2] + y4[3]));
      if (p == 0) {
        sy[l][il] = yi;
        ssa[l][il] = sai;
      }
    }
#pragma unroll
    for (int q = 0; q < M; q += 4) {  // back to S_{L-1} = S~_{L-1} diag(P_{L-1})
      const float4 p4 = ld4(sd + (L - 1) * VS + off + q);
      S[q] *= p4.x, S[q + 1] *= p4.y, S[q + 2] *= p4.z, S[q + 3] *= p4.w;
    }
    float* cp = ckpt + ((int64_t(bh) * nc + c) * N + i) * N + p * M;
    float* st = sT + (int64_t(bh) * N + i) * N + p * M;
#pragma unroll
    for (int q = 0; q < M; q += 4) {
      const float4 x = make_float4(S[q], S[q + 1], S[q + 2], S[q + 3]);
      if constexpr (kRole == kOrdinary) *reinterpret_cast<float4*>(cp + q) = x;
      if (c == nc - 1) *reinterpret_cast<float4*>(st + q) = x;
    }
    if constexpr (kRole == kOwn) continue;
    __syncthreads();  // y and sa of the chunk are staged
    const auto y_at = [&](int l, int x) { return sy[l][x]; };
    if constexpr (kRole == kTransition) {
      write_chunk<N, R, kThreads, float>(q_out, bb, t0, L, h, T, H, g * R, y_at);
    } else {
      write_chunk<N, R, kThreads, F>(y, bb, t0, L, h, T, H, g * R, y_at);
      write_chunk<N, R, kThreads, float>(sa_out, bb, t0, L, h, T, H, g * R, [&](int l, int x) { return ssa[l][x]; });
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward: grid B*H blocks of N*P threads; thread (i, p) holds the entries j = p*M + q (q < M = N/P) of
//   Sc = column i of S,  dR = row i of dS,  dC = column i of dS.
// Shared per chunk: 9 sliced input vectors (decay, not w) + dsa; raw w and 6 staged gradients as plain CK x N;
// where it fits (BwdSmem), the chunk's checkpoint (N x N), copied in asynchronously while the chunk after it is
// computed; elsewhere each thread reads its column of the checkpoint from global memory at the chunk's start.
constexpr int kBwdSliced = 10, kBwdPlain = 7;

template <int N, int P>
struct BwdSmem {
  static constexpr size_t kBase = size_t(CK) * (kBwdSliced * Sliced<N, P>::kStride + kBwdPlain * N) * sizeof(float);
  static constexpr size_t kCkpt = size_t(N) * N * sizeof(float);
  // Staged only within the smallest opt-in limit of the GPUs we build for (99 KB, sm_86/sm_89), so that no GPU
  // loses the kernel to it: N = 64 with P = 2 or 4 (90.75 / 95.9 KB).
  static constexpr bool kStagedCkpt = kBase + kCkpt <= 99 * 1024;
  static constexpr size_t kBytes = kBase + (kStagedCkpt ? kCkpt : 0);
};

__device__ __forceinline__ void copy16_async(float* dst_smem, const float* src) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst_smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
}
__device__ __forceinline__ void wait_copies() { asm volatile("cp.async.wait_all;\n" ::); }

// Place of checkpoint entry (row, col) in shared memory: the column index is XOR-swizzled by the row's slice
// (row / M), so that the P slices a warp reads together (rows p*M + q of one column) fall in distinct banks.
template <int N, int P>
__device__ __forceinline__ int ckpt_at(int row, int col) {
  return row * N + (col ^ (row / (N / P) * (32 / P)));
}

template <typename F, int N, int P, bool kScaled>
__global__ void __launch_bounds__(N * P) bwd_kernel(int T, int H, const F* __restrict__ r, const F* __restrict__ w,
    const F* __restrict__ k, const F* __restrict__ v, const F* __restrict__ a, const F* __restrict__ b,
    const F* __restrict__ dy, const float* __restrict__ dsT, const float* __restrict__ ckpt,
    const float* __restrict__ sa_in, F* __restrict__ dr, F* __restrict__ dw, F* __restrict__ dk, F* __restrict__ dv,
    F* __restrict__ da, F* __restrict__ db, float* __restrict__ ds0) {
  using Lay = Sliced<N, P>;
  constexpr int M = Lay::M, VS = Lay::kStride, kThreads = N * P;
  extern __shared__ __align__(16) float smem[];
  float *sr = smem, *sd = sr + CK * VS, *sk = sd + CK * VS, *sv = sk + CK * VS, *sa = sv + CK * VS;
  float *sb = sa + CK * VS, *sdy = sb + CK * VS, *ssa = sdy + CK * VS, *sdsa = ssa + CK * VS;
  float (*sw)[N] = reinterpret_cast<float (*)[N]>(sdsa + CK * VS);
  float (*gr)[N] = sw + CK, (*gw)[N] = gr + CK, (*gk)[N] = gw + CK, (*gv)[N] = gk + CK, (*ga)[N] = gv + CK;
  float (*gb)[N] = ga + CK, *sck = &gb[0][0] + CK * N;
  const int bh = blockIdx.x, bb = bh / H, h = bh % H;
  const int i = threadIdx.x / P, p = threadIdx.x % P, off = p * Lay::kPitch, ii = Lay::at(i);
  const int nc = (T + CK - 1) / CK;
  float Sc[M], dR[M], dC[M];
  {
    const float* g0 = dsT + int64_t(bh) * N * N;
#pragma unroll
    for (int q = 0; q < M; q += 4) {
      const float4 x = ld4(g0 + i * N + p * M + q);
      dR[q] = x.x, dR[q + 1] = x.y, dR[q + 2] = x.z, dR[q + 3] = x.w;
    }
#pragma unroll
    for (int q = 0; q < M; ++q) dC[q] = g0[(p * M + q) * N + i];
  }
  struct : NextChunk<F, N, N, kThreads> {  // the next chunk (going backwards), in flight, with its dy and sa_t
    ChunkShare<N, N, kThreads, F> dy;
    ChunkShare<N, N, kThreads, float> sa_t;
  } next;
  auto prefetch = [&](int t0) {
    const int L = min(CK, T - t0);
    next.load(r, w, k, v, a, b, bb, t0, L, h, T, H);
    next.dy.load(dy, bb, t0, L, h, T, H);
    next.sa_t.load(sa_in, bb, t0, L, h, T, H);
  };
  constexpr bool kStaged = BwdSmem<N, P>::kStagedCkpt;
  auto ckpt_of = [&](int c) { return ckpt + (int64_t(bh) * nc + c) * N * N; };  // S at the end of chunk c
  auto fetch_ckpt = [&](int c) {  // -> sck, in flight until wait_copies
    if constexpr (kStaged) {
      static_assert(N * N / 4 % kThreads == 0, "the checkpoint copy must split evenly");
#pragma unroll
      for (int n = 0; n < N * N / 4 / kThreads; ++n) {
        const int e = threadIdx.x + n * kThreads, row = e / (N / 4), col = e % (N / 4) * 4;
        copy16_async(sck + ckpt_at<N, P>(row, col), ckpt_of(c) + row * N + col);
      }
    }
  };
  prefetch((nc - 1) * CK);
  fetch_ckpt(nc - 1);
  for (int c = nc - 1; c >= 0; --c) {
    const int t0 = c * CK, L = min(CK, T - t0);
    if constexpr (kStaged) wait_copies();
    __syncthreads();  // the checkpoint has landed; the previous chunk's gradients are written out
#pragma unroll
    for (int q = 0; q < M; ++q) Sc[q] = kStaged ? sck[ckpt_at<N, P>(p * M + q, i)] : ckpt_of(c)[(p * M + q) * N + i];
    next.store(sr, sd, sk, sv, sa, sb, VS, Lay::at, &sw[0][0]);
    next.dy.store(sdy, VS, Lay::at, ident);
    next.sa_t.store(ssa, VS, Lay::at, ident);
    __syncthreads();  // staged, and every thread has its column of the checkpoint
    if (c > 0) {
      prefetch(t0 - CK);
      fetch_ckpt(c - 1);
    }
    // kScaled: Sc and dC are both column i, decayed by d_i alone, so within the chunk they can be kept scaled by the
    // scalar e_t = d_i over the chunk's tokens after t: Sc = e_t * S_t[:, i], dC = dS_t[:, i] / e_t. Their updates
    // then need no per-entry decay multiply (Sc_{t-1} = Sc_t - e_t (v_t k_ti + sa_t b_ti), dC_{t-1} = dC_t +
    // dsa_t a_ti / e_{t-1}), and the sums over them take the scale as one scalar factor. That wins where several
    // blocks share an SM; with one block per SM the extra scalars lengthen the single warp's chain (bwd_typed).
    float e = 1.f;
    for (int l = L - 1; l >= 0; --l) {
      const int t = l * VS;
      const float dyi = sdy[t + ii], ri = sr[t + ii], ki = sk[t + ii], bi = sb[t + ii], di = sd[t + ii];
      const float ai = sa[t + ii], inv_d = 1.f / di, inv_e = kScaled ? 1.f / e : 1.f;
      const float ri_e = ri * inv_e, ki_e = ki * e, bi_e = bi * e;
      float pr = 0.f, pv = 0.f, pk = 0.f, psa = 0.f, pb = 0.f, pw = 0.f;
#pragma unroll
      for (int q = 0; q < M; q += 4) {
        const float4 r4 = ld4(sr + t + off + q), y4 = ld4(sdy + t + off + q), k4 = ld4(sk + t + off + q);
        const float4 v4 = ld4(sv + t + off + q), b4 = ld4(sb + t + off + q), s4 = ld4(ssa + t + off + q);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int j = q + u;
          dR[j] += dyi * at4(r4, u);  // dS_t += dy_t r_t^T
          dC[j] += at4(y4, u) * ri_e;
          pr += Sc[j] * at4(y4, u);
          pv += dR[j] * at4(k4, u);
          pk += dC[j] * at4(v4, u);
          psa += dR[j] * at4(b4, u);
          pb += dC[j] * at4(s4, u);
          if constexpr (kScaled)
            Sc[j] = Sc[j] - at4(v4, u) * ki_e - at4(s4, u) * bi_e;  // S_{t-1}, column i (scaled by e_{t-1})
          else
            Sc[j] = (Sc[j] - at4(v4, u) * ki - at4(s4, u) * bi) * inv_d;  // S_{t-1}, column i
          pw += dC[j] * Sc[j];
        }
      }
      pr = group_sum<P>(pr);
      pv = group_sum<P>(pv);
      pk = group_sum<P>(pk);
      const float dsai = group_sum<P>(psa);
      pb = group_sum<P>(pb);
      pw = group_sum<P>(pw);
      if (p == 0) {
        sdsa[t + ii] = dsai;
        gr[l][i] = pr * inv_e;
        gv[l][i] = pv;
        gk[l][i] = pk * e;
        gb[l][i] = pb * e;
        gw[l][i] = kScaled ? pw * inv_d : pw;  // e_t / e_{t-1}
      }
      if constexpr (kScaled) e *= di;  // e_{t-1}
      const float inv_e1 = inv_e * inv_d, ai_e = ai * inv_e1;
      __syncthreads();  // dsa of every row is in shared memory
      float pa = 0.f;
#pragma unroll
      for (int q = 0; q < M; q += 4) {
        const float4 g4 = ld4(sdsa + t + off + q), d4 = ld4(sd + t + off + q), a4 = ld4(sa + t + off + q);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int j = q + u;
          pa += Sc[j] * at4(g4, u);
          dR[j] = dR[j] * at4(d4, u) + dsai * at4(a4, u);  // dS_{t-1} = dS_t diag(d) + dsa a^T
          if constexpr (kScaled)
            dC[j] += at4(g4, u) * ai_e;
          else
            dC[j] = dC[j] * di + at4(g4, u) * ai;
        }
      }
      pa = group_sum<P>(pa);
      if (p == 0) ga[l][i] = kScaled ? pa * inv_e1 : pa;
    }
    if constexpr (kScaled) {
#pragma unroll
      for (int q = 0; q < M; ++q) dC[q] *= e;  // unscaled for the chunk before
    }
    __syncthreads();
    const auto write = [&](F* dst, float (*src)[N]) {
      write_chunk<N, N, kThreads, F>(dst, bb, t0, L, h, T, H, 0, [&](int l, int x) { return src[l][x]; });
    };
    write(dr, gr);
    write(dk, gk);
    write(dv, gv);
    write(da, ga);
    write(db, gb);
    write_chunk<N, N, kThreads, F>(dw, bb, t0, L, h, T, H, 0, [&](int l, int x) {
      const float wx = sw[l][x];  // d(decay)/dw = -e^{-1/2} decay sigmoid(w) sigmoid(-w), without 1 - sigmoid's cancellation
      return gw[l][x] * sd[l * VS + Lay::at(x)] * (-kDecayScale) * sigmoid(wx) * sigmoid(-wx);
    });
  }
  float* out = ds0 + (int64_t(bh) * N + i) * N + p * M;
#pragma unroll
  for (int q = 0; q < M; q += 4) *reinterpret_cast<float4*>(out + q) = make_float4(dR[q], dR[q + 1], dR[q + 2], dR[q + 3]);
}

// ---------------------------------------------------------------------------------------------------------------
// Span scan (the span path, see the header): the state at span starts, X_{c+1} = X_c P_c + U_c (c ascending,
// out[c] = X_c), or its gradient, X_c = X_{c+1} P_c^T + V_c (c descending, out[c] = X_{c+1}), where
// V_c = sum_{t in c} dy_t q_t^T comes from span_outer_kernel, every span at once. Rows of X are independent, so a
// block owns kScanRows of them for one head. Thread (it, j) computes column j of rows it*RPT .. it*RPT + RPT-1;
// P_c (padded rows: both the P[k][j] and the P[j][k] walk are conflict-free) and X sit in shared memory.
constexpr int kScanRows = 16, kScanThreads = 256, kScanPiece = 64;

template <int N>
struct ScanTile {
  static constexpr int JT = kScanThreads / N, RPT = kScanRows / JT;
  static_assert(kScanThreads % N == 0 && kScanRows % JT == 0, "scan tile must split evenly");
  static constexpr size_t kScanSmem = sizeof(float) * (N * (N + 1) + kScanRows * N);
  static constexpr size_t kOuterSmem = sizeof(float) * kScanPiece * (N + kScanRows);
};

template <int N, bool kBack>
__global__ void __launch_bounds__(kScanThreads) span_scan_kernel(int ns, int H, const float* __restrict__ x0,
    const float* __restrict__ pm, const float* __restrict__ u, float* __restrict__ out) {
  constexpr int R = kScanRows, RPT = ScanTile<N>::RPT;
  extern __shared__ __align__(16) float smem[];
  float (*Ps)[N + 1] = reinterpret_cast<float (*)[N + 1]>(smem);
  float (*X)[N] = reinterpret_cast<float (*)[N]>(smem + N * (N + 1));
  const int groups = N / R, bh = blockIdx.x / groups, i0 = (blockIdx.x % groups) * R, bb = bh / H, h = bh % H;
  const int j = threadIdx.x % N, r0 = threadIdx.x / N * RPT;
#pragma unroll
  for (int rr = 0; rr < RPT; ++rr) X[r0 + rr][j] = x0[(int64_t(bh) * N + i0 + r0 + rr) * N + j];
  for (int step = 0; step < ns; ++step) {
    const int c = kBack ? ns - 1 - step : step;
    const int64_t mat = ((int64_t(bb) * ns + c) * H + h) * N * N;  // span c's N x N matrices in P, U and out
    float acc[RPT];
    __syncthreads();  // X is complete
#pragma unroll
    for (int rr = 0; rr < RPT; ++rr) {
      const int64_t e = mat + int64_t(i0 + r0 + rr) * N + j;
      out[e] = X[r0 + rr][j];
      acc[rr] = u[e];
    }
    for (int e = threadIdx.x; e < N * N; e += kScanThreads) Ps[e / N][e % N] = pm[mat + e];
    __syncthreads();
    for (int kk = 0; kk < N; ++kk) {
      const float pk = kBack ? Ps[j][kk] : Ps[kk][j];
#pragma unroll
      for (int rr = 0; rr < RPT; ++rr) acc[rr] += X[r0 + rr][kk] * pk;
    }
    __syncthreads();  // every read of X is done
#pragma unroll
    for (int rr = 0; rr < RPT; ++rr) X[r0 + rr][j] = acc[rr];
  }
}

// V_c = sum_{t in span} dy_t q_t^T for every (span, head, kScanRows rows) block at once; dy, q are [B*ns, L, H, N]
// (every span a batch row), V is [B*ns, H, N, N]. Pieces of kScanPiece tokens of q and of the block's dy rows are
// staged in shared memory.
template <typename F, int N>
__global__ void __launch_bounds__(kScanThreads) span_outer_kernel(int L, int H, const float* __restrict__ q,
    const F* __restrict__ dy, float* __restrict__ out) {
  constexpr int R = kScanRows, RPT = ScanTile<N>::RPT;
  extern __shared__ __align__(16) float smem[];
  float (*sq)[N] = reinterpret_cast<float (*)[N]>(smem);
  float (*sdy)[R] = reinterpret_cast<float (*)[R]>(smem + kScanPiece * N);
  const int groups = N / R, bh = blockIdx.x / groups, i0 = (blockIdx.x % groups) * R, vb = bh / H, h = bh % H;
  const int j = threadIdx.x % N, r0 = threadIdx.x / N * RPT;
  float acc[RPT] = {};
  for (int t0 = 0; t0 < L; t0 += kScanPiece) {
    __syncthreads();  // the previous piece is used
    for (int e = threadIdx.x; e < kScanPiece * N; e += kScanThreads)
      sq[e / N][e % N] = q[wkv::seq_off(vb, t0 + e / N, h, L, H, N) + e % N];
    for (int e = threadIdx.x; e < kScanPiece * R; e += kScanThreads)
      sdy[e / R][e % R] = wkv::to_f(dy[wkv::seq_off(vb, t0 + e / R, h, L, H, N) + i0 + e % R]);
    __syncthreads();
    for (int t = 0; t < kScanPiece; ++t) {
      const float qj = sq[t][j];
#pragma unroll
      for (int rr = 0; rr < RPT; ++rr) acc[rr] += sdy[t][r0 + rr] * qj;
    }
  }
#pragma unroll
  for (int rr = 0; rr < RPT; ++rr) out[(int64_t(bh) * N + i0 + r0 + rr) * N + j] = acc[rr];
}

// Host side.
template <typename F>
const F* cptr(const torch::Tensor& t) { return reinterpret_cast<const F*>(t.data_ptr()); }
template <typename F>
F* mptr(torch::Tensor& t) { return reinterpret_cast<F*>(t.data_ptr()); }

template <int V> using Const = std::integral_constant<int, V>;

// Threads per state index (P) for split == 0. P = 2 was fastest (fwd+bwd) at both B*H = 32 and 128 in the
// H200 sweep of 2026-12-01 (bench/results/kernels-notes.md); N = 128 takes 4 to hold fewer registers per thread.
constexpr int kAutoSplit = WKV_N == 128 ? 4 : 2;

template <class Fn>
void with_split(int split, Fn&& f) {
  if (split == 0) split = kAutoSplit;
  WKV_CHECK(split == 2 || split == 4 || split == 8,
            "wkv7: threads per state index (split) must be 0 (auto), 2, 4 or 8");
  if (split == 2) f(Const<2>{});
  else if (split == 4) f(Const<4>{});
  else f(Const<8>{});
}

// Forward blocks per head (groups; 0 = by B*H): more blocks (fewer rows each) when B*H alone cannot fill the GPU.
template <class Fn>
void with_groups(int BH, int groups, Fn&& f) {
  constexpr int kMost = WKV_N / 16;
  if (groups == 0) groups = BH >= 128 ? 1 : BH >= 32 ? 4 : kMost;
  WKV_CHECK(groups == 1 || groups == 2 || groups == 4 || groups == kMost,
            "wkv7: forward blocks per head (groups) must be 0 (auto), 1, 2, 4 or ", kMost);
  if (groups == 1) f(Const<1>{});
  else if (groups == 2) f(Const<2>{});
  else if (groups == 4) f(Const<4>{});
  else f(Const<kMost>{});
}

// Where a forward launch writes: the ordinary role fills y, sT, ckpt and sa from s0; kOwn fills sT; kTransition
// fills sT and q.
struct FwdOut {
  const float* s0 = nullptr;
  void* y = nullptr;
  float *sT = nullptr, *ckpt = nullptr, *sa = nullptr, *q = nullptr;
};

template <int G, int P>
constexpr size_t fwd_smem() {  // per block: the chunk's 5 sliced key vectors and 3 row vectors
  return size_t(CK) * (5 * Sliced<WKV_N, P>::kStride + 3 * (WKV_N / G)) * sizeof(float);
}

template <typename F, int G, int P, Role kRole>
void fwd_launch(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor a, torch::Tensor b,
                const FwdOut& o) {
  const int B = r.size(0), T = r.size(1), H = r.size(2);
  constexpr int N = WKV_N, R = N / G;
  constexpr size_t smem = fwd_smem<G, P>();
  auto kern = fwd_kernel<F, N, G, P, kRole>;
  wkv::allow_smem(kern, smem);
  kern<<<B * H * G, R * P, smem, c10::cuda::getCurrentCUDAStream()>>>(T, H, cptr<F>(r), cptr<F>(w), cptr<F>(k),
      cptr<F>(v), cptr<F>(a), cptr<F>(b), o.s0, static_cast<F*>(o.y), o.sT, o.ckpt, o.sa, o.q);
  WKV_LAUNCH_CHECK();
}

// A head split over G > 1 blocks keeps 8 threads per row, so that a block still has >= 128 threads and the
// prefetched chunk (5 key vectors) stays small per thread; one block per head takes `split`.
template <typename F, Role kRole>
void fwd_typed(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor a, torch::Tensor b,
               const FwdOut& o, int split, int groups) {
  const int BH = r.size(0) * r.size(2);
  with_groups(BH, groups, [&](auto gc) {
    constexpr int G = decltype(gc)::value;
    if constexpr (G > 1) {
      fwd_launch<F, G, 8, kRole>(r, w, k, v, a, b, o);
    } else {
      with_split(split, [&](auto pc) { fwd_launch<F, 1, decltype(pc)::value, kRole>(r, w, k, v, a, b, o); });
    }
  });
}

// The span kernels: kScanThreads per block, N / kScanRows blocks per (batch row, head) of `rows`.
template <typename K, typename... Args>
void span_launch(K kern, int rows, size_t smem, Args... args) {
  wkv::allow_smem(kern, smem);
  kern<<<rows * (WKV_N / kScanRows), kScanThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(args...);
  WKV_LAUNCH_CHECK();
}

template <bool kBack>
void scan_launch(torch::Tensor x0, torch::Tensor pm, torch::Tensor u, torch::Tensor out) {
  const int B = pm.size(0), ns = pm.size(1), H = pm.size(2);
  span_launch(span_scan_kernel<WKV_N, kBack>, B * H, ScanTile<WKV_N>::kScanSmem, ns, H, x0.data_ptr<float>(),
              pm.data_ptr<float>(), u.data_ptr<float>(), out.data_ptr<float>());
}

template <typename F>
void outer_launch(torch::Tensor q, torch::Tensor dy, torch::Tensor out) {
  const int Bv = q.size(0), L = q.size(1), H = q.size(2);
  span_launch(span_outer_kernel<F, WKV_N>, Bv * H, ScanTile<WKV_N>::kOuterSmem, L, H, q.data_ptr<float>(),
              cptr<F>(dy), out.data_ptr<float>());
}

template <typename F>
void bwd_typed(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor a, torch::Tensor b,
               torch::Tensor dy, torch::Tensor dsT, torch::Tensor ckpt, torch::Tensor sa, torch::Tensor dr,
               torch::Tensor dw, torch::Tensor dk, torch::Tensor dv, torch::Tensor da, torch::Tensor db,
               torch::Tensor ds0, int split) {
  const int B = r.size(0), T = r.size(1), H = r.size(2);
  // More blocks than SMs: some SMs run several, where the scaled form is faster (H200, 2026-12-02: 2.66 -> 2.57 ms at
  // (16,1024,32)); at <= one block per SM it is slower (3.28 -> 3.41 ms at (4,4096,32); kernels-scaled-loops/).
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device());
  const bool scaled = B * H > sms;
  with_split(split, [&](auto pc) {
    constexpr int N = WKV_N, P = decltype(pc)::value;
    const size_t smem = BwdSmem<N, P>::kBytes;
    auto kern = scaled ? bwd_kernel<F, N, P, true> : bwd_kernel<F, N, P, false>;
    wkv::allow_smem(kern, smem);
    kern<<<B * H, N * P, smem, c10::cuda::getCurrentCUDAStream()>>>(T, H, cptr<F>(r), cptr<F>(w), cptr<F>(k),
        cptr<F>(v), cptr<F>(a), cptr<F>(b), cptr<F>(dy), dsT.data_ptr<float>(), ckpt.data_ptr<float>(),
        sa.data_ptr<float>(), mptr<F>(dr), mptr<F>(dw), mptr<F>(dk), mptr<F>(dv), mptr<F>(da), mptr<F>(db),
        ds0.data_ptr<float>());
    WKV_LAUNCH_CHECK();
  });
}

}  // namespace

#include "wkv7_chunked.cuh"

int wkv7_packet_floats() { return wkv7tc::kPacketFloats; }

// The most dynamic shared memory a block of this build asks for with the default split and groups, the chunked
// kernels included (infctx/ops/cuda_build.py's SMEM_NEEDED must agree; tests/gpu checks it).
int64_t wkv7_smem_bytes() {
  constexpr size_t kGrad = WKV_N == 64 ? wkv7tc::GradSmem::kBytes : 0;  // the chunked backward: head size 64 only
  return int64_t(std::max({BwdSmem<WKV_N, kAutoSplit>::kBytes, fwd_smem<1, kAutoSplit>(), ScanTile<WKV_N>::kScanSmem,
                           ScanTile<WKV_N>::kOuterSmem, wkv7tc::PrepSmem::kBytes, wkv7tc::StateSmem::kBytes, kGrad}));
}

// The chunked tensor-core forward (wkv7_chunked.cuh): every chunk's S-independent terms at once, then one pass over
// chunks per head. Same outputs as wkv7_forward_cuda; `packet` is its fp32 workspace, [B*H*nc, packet_floats].
// kBackward: the state-gradient pass (dy given; `state` = dsT in, `y` unused, `out` = ds0).
template <bool kBackward>
void chunked_launch(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor a,
                    torch::Tensor b, torch::Tensor dy, torch::Tensor state, torch::Tensor y, torch::Tensor out,
                    torch::Tensor ckpt, torch::Tensor rows, torch::Tensor packet) {
  const int B = r.size(0), T = r.size(1), H = r.size(2), nc = (T + CK - 1) / CK;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](auto element) {
    using F = decltype(element);
    auto prep = wkv7tc::prep_kernel<F, kBackward>;
    wkv::allow_smem(prep, wkv7tc::PrepSmem::kBytes);
    prep<<<B * H * nc, 32, wkv7tc::PrepSmem::kBytes, stream>>>(T, H, kDecayScale, cptr<F>(r), cptr<F>(w),
        cptr<F>(k), cptr<F>(v), cptr<F>(a), cptr<F>(b), cptr<F>(dy), packet.data_ptr<float>());
    WKV_LAUNCH_CHECK();
    auto pass = wkv7tc::state_kernel<F, kBackward>;
    wkv::allow_smem(pass, wkv7tc::StateSmem::kBytes);
    pass<<<B * H, wkv7tc::kThreads, wkv7tc::StateSmem::kBytes, stream>>>(T, H, packet.data_ptr<float>(),
        state.data_ptr<float>(), mptr<F>(y), out.data_ptr<float>(), ckpt.data_ptr<float>(), rows.data_ptr<float>());
    WKV_LAUNCH_CHECK();
  };
  wkv::with_element(r, launch);
}

void wkv7_forward_chunked_cuda(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor a,
                               torch::Tensor b, torch::Tensor s0, torch::Tensor y, torch::Tensor sT,
                               torch::Tensor ckpt, torch::Tensor sa, torch::Tensor packet) {
  chunked_launch<false>(r, w, k, v, a, b, r, s0, y, sT, ckpt, sa, packet);
}

// The state-gradient pass in the same form: from dsT, the state gradient at every chunk's end (dckpt), the
// rows of G = d sa (g, fp32 [B,T,H,N]) and ds0.
void wkv7_backward_state_chunked_cuda(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v,
                                      torch::Tensor a, torch::Tensor b, torch::Tensor dy, torch::Tensor dsT,
                                      torch::Tensor dckpt, torch::Tensor g, torch::Tensor ds0, torch::Tensor packet) {
  chunked_launch<true>(r, w, k, v, a, b, dy, dsT, r, ds0, dckpt, g, packet);
}

// Every chunk's input gradients at once (wkv7_chunked.cuh grad_kernel, head size 64), from the forward's
// checkpoints and sa and the state-gradient pass's checkpoints and G.
void wkv7_backward_grads_chunked_cuda(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v,
                                      torch::Tensor a, torch::Tensor b, torch::Tensor dy, torch::Tensor s0,
                                      torch::Tensor ckpt, torch::Tensor dckpt, torch::Tensor sa, torch::Tensor gsa,
                                      torch::Tensor dr, torch::Tensor dw, torch::Tensor dk, torch::Tensor dv,
                                      torch::Tensor da, torch::Tensor db) {
  const int B = r.size(0), T = r.size(1), H = r.size(2), nc = (T + CK - 1) / CK;
  auto launch = [&](auto element) {
    using F = decltype(element);
    auto kern = wkv7tc::grad_kernel<F>;
    wkv::allow_smem(kern, wkv7tc::GradSmem::kBytes);
    kern<<<B * H * nc, wkv7tc::kThreads, wkv7tc::GradSmem::kBytes, c10::cuda::getCurrentCUDAStream()>>>(T, H,
        kDecayScale, cptr<F>(r), cptr<F>(w), cptr<F>(k), cptr<F>(v), cptr<F>(a), cptr<F>(b), cptr<F>(dy),
        s0.data_ptr<float>(), ckpt.data_ptr<float>(), dckpt.data_ptr<float>(), sa.data_ptr<float>(),
        gsa.data_ptr<float>(), mptr<F>(dr), mptr<F>(dw), mptr<F>(dk), mptr<F>(dv), mptr<F>(da), mptr<F>(db));
    WKV_LAUNCH_CHECK();
  };
  wkv::with_element(r, launch);
}

void wkv7_forward_cuda(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor a,
                       torch::Tensor b, torch::Tensor s0, torch::Tensor y, torch::Tensor sT, torch::Tensor ckpt,
                       torch::Tensor sa, int split, int groups) {
  FwdOut o;
  o.s0 = s0.data_ptr<float>(), o.y = y.data_ptr(), o.sT = sT.data_ptr<float>();
  o.ckpt = ckpt.data_ptr<float>(), o.sa = sa.data_ptr<float>();
  wkv::with_element(r, [&](auto e) { fwd_typed<decltype(e), kOrdinary>(r, w, k, v, a, b, o, split, groups); });
}

void wkv7_transfer_cuda(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor a,
                        torch::Tensor b, torch::Tensor u, torch::Tensor p, torch::Tensor q, int split, int groups) {
  FwdOut own, trans;
  own.sT = u.data_ptr<float>();
  trans.sT = p.data_ptr<float>(), trans.q = q.data_ptr<float>();
  wkv::with_element(r, [&](auto e) {
    fwd_typed<decltype(e), kOwn>(r, w, k, v, a, b, own, split, groups);
    fwd_typed<decltype(e), kTransition>(r, w, k, v, a, b, trans, split, groups);
  });
}

void wkv7_span_scan_cuda(torch::Tensor s0, torch::Tensor p, torch::Tensor u, torch::Tensor starts) {
  scan_launch<false>(s0, p, u, starts);
}

void wkv7_span_scan_back_cuda(torch::Tensor dsT, torch::Tensor p, torch::Tensor q, torch::Tensor dy,
                              torch::Tensor ends) {
  const int B = p.size(0), ns = p.size(1), H = p.size(2), L = q.size(1) / ns;
  auto own = torch::empty_like(p);  // V_c, every span's own part of the gradient at its start
  auto qv = q.view({B * ns, L, H, WKV_N}), dyv = dy.view({B * ns, L, H, WKV_N});
  wkv::with_element(dy, [&](auto e) { outer_launch<decltype(e)>(qv, dyv, own); });
  scan_launch<true>(dsT, p, own, ends);
}

void wkv7_backward_cuda(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v, torch::Tensor a,
                        torch::Tensor b, torch::Tensor dy, torch::Tensor dsT, torch::Tensor ckpt, torch::Tensor sa,
                        torch::Tensor dr, torch::Tensor dw, torch::Tensor dk, torch::Tensor dv, torch::Tensor da,
                        torch::Tensor db, torch::Tensor ds0, int split) {
  wkv::with_element(r, [&](auto e) {
    bwd_typed<decltype(e)>(r, w, k, v, a, b, dy, dsT, ckpt, sa, dr, dw, dk, dv, da, db, ds0, split);
  });
}
