// The wkv7 forward as chunks on tensor cores: the same outputs as the sequential forward (y, sT, the state at the end
// of every chunk of CK tokens, sa_t = S_{t-1} a_t), so the sequential backward consumes them unchanged.
//
// Per chunk (L = CK tokens, c_t = cumulative log decay through token t, S = the state at the chunk's start):
//   r_in = r e^c, a_ex = a e^{c - lw}, b_src = b e^{-c}, k_src = k e^{-c}, b_end = b e^{c_L - c}, k_end = k e^{c_L - c}
//   Mb = tril(a_ex b_src^T, -1), Mk = tril(a_ex k_src^T, -1), Pb = tril(r_in b_src^T), Pk = tril(r_in k_src^T)
//   (I - Mb) U = a_ex S^T + Mk V   (row t of U is sa_t)
//   y = r_in S^T + Pb U + Pk V,   S <- S diag(e^{c_L}) + U^T b_end + V^T k_end
// Everything that does not involve S is the same for every start state, so it runs for all chunks at once
// (prep_kernel, one warp per chunk, its products on tensor cores as below):
//   W = (I - Mb)^-1 a_ex, Z = (I - Mb)^-1 Mk V, R = r_in + Pb W, Y = Pb Z + Pk V, so
//   U = W S^T + Z,   y = R S^T + Y,   S <- S diag(e^{c_L}) + U^T b_end + V^T k_end.
// What is left is a pass over chunks per head (state_kernel) whose products run on tensor cores (mma.sync m16n8k8,
// tf32 operands split into a high and a low part, three products each: fp32-grade results, so fp32 inputs keep
// their 1e-5 contract and the backward, which backsteps from these outputs, sees what the sequential forward gives;
// one tf32 product was measured to leave da of bf16 inputs at 5.1-5.8e-3, over their 5e-3).
// Value rows of S never mix, so each warp owns 16 rows and keeps them in registers as mma accumulators; with the key
// index permuted the accumulator layout is also the A-operand layout, so S never goes through shared memory.
#pragma once
#include <cstdint>
#include <type_traits>

namespace wkv7tc {

using wkv::CK;

// The per-chunk packet prep_kernel writes and state_kernel reads (fp32). W and R are [CK][N] (token-major); b_end,
// k_end, Z, Y and V are stored transposed, [N][CK], which is how state_kernel reads them; then e^{c_L} [N].
enum Part { kW, kR, kPT, kQT, kZT, kYT, kXT, kParts };
constexpr int kPartFloats = CK * WKV_N, kPacketFloats = kParts * kPartFloats + WKV_N;
constexpr int kRowsPerWarp = 16, kWarps = WKV_N / kRowsPerWarp, kThreads = 32 * kWarps;
// Shared-memory pitches: token-major rows N + 8 floats, transposed rows CK + 8, so that the float2 fragment reads of a
// half-warp hit 32 distinct banks.
constexpr int kLdRow = WKV_N + 8, kLdCol = CK + 8;
struct StateSmem {  // offsets in floats
  static constexpr int kW = 0, kR = kW + CK * kLdRow, kT = kR + CK * kLdRow, kTotal = kT + 5 * WKV_N * kLdCol,
                       kFloats = kTotal + WKV_N;
  static constexpr size_t kBytes = size_t(kFloats) * sizeof(float);
};

__device__ __forceinline__ float sigmoid_f(float x) { return 1.f / (1.f + expf(-x)); }

// ---- state_kernel: one block per head, warp w owns value rows 16w..16w+15, chunks in order ----------------------
__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

// x as hi + lo, both tf32: the pair of operands for the three-product (fp32-grade) mma.
struct Split {
  uint32_t hi, lo;
};
__device__ __forceinline__ Split split(float x) {
  const uint32_t hi = to_tf32(x);
  float rest;
  asm("sub.f32 %0, %1, %2;" : "=f"(rest) : "f"(x), "r"(hi));
  return {hi, to_tf32(rest)};
}

__device__ __forceinline__ void mma_tf32(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// d += A B for one 16x8x8 tile from split operands (A's four fragment values, B's two): lo*hi terms first.
__device__ __forceinline__ void mma3(float (&d)[4], const Split (&A)[4], float2 b) {
  const Split B[2] = {split(b.x), split(b.y)};
  mma_tf32(d, A[0].lo, A[1].lo, A[2].lo, A[3].lo, B[0].hi, B[1].hi);
  mma_tf32(d, A[0].hi, A[1].hi, A[2].hi, A[3].hi, B[0].lo, B[1].lo);
  mma_tf32(d, A[0].hi, A[1].hi, A[2].hi, A[3].hi, B[0].hi, B[1].hi);
}

// The backward kernels take one tf32 product (the high parts) instead of three for bf16 inputs: nothing backsteps
// from their outputs, and with tf32 products throughout the chunked forward and backward the precision study gives
// 7.2e-4 worst at T = 16384 (bench/results/wkv7-mma-precision/), inside bf16's 5e-3. fp32 inputs (1e-5) and the
// forward (the sequential backward backsteps from it) keep three.
template <typename F, bool kBackward>
constexpr bool kExact = !kBackward || std::is_same_v<F, float>;
template <bool kThree>
__device__ __forceinline__ void mma(float (&d)[4], const Split (&A)[4], float2 b) {
  if constexpr (kThree)
    mma3(d, A, b);
  else
    mma_tf32(d, A[0].hi, A[1].hi, A[2].hi, A[3].hi, to_tf32(b.x), to_tf32(b.y));
}

// Fragment indices (PTX m16n8k8 tf32): lane = 4g + q. A (16x8): a0 (g, q), a1 (g+8, q), a2 (g, q+4), a3 (g+8, q+4);
// B (8x8): b0 (q, g), b1 (q+4, g); C (16x8): c0 (g, 2q), c1 (g, 2q+1), c2 (g+8, 2q), c3 (g+8, 2q+1). Reduction index
// k = q stands for 2q and k = q+4 for 2q+1 of each group of 8: a C fragment is then an A fragment (a0..a3 = c0, c2,
// c1, c3), and B's two values are adjacent (one float2).
// ---- fragments of shared-memory matrices (row-major, pitch ld), with the permuted reduction index above ----------
// A (16 rows x 8 of the reduction, from column k0 of M)
__device__ __forceinline__ void load_a(Split (&A)[4], const float* M, int ld, int k0, int g, int q) {
  const float2 lo = *reinterpret_cast<const float2*>(M + g * ld + k0 + 2 * q);
  const float2 hi = *reinterpret_cast<const float2*>(M + (g + 8) * ld + k0 + 2 * q);
  A[0] = split(lo.x), A[1] = split(hi.x), A[2] = split(lo.y), A[3] = split(hi.y);
}
// A = M^T (16 rows x 8 of the reduction) for M stored by the reduction index: A[row][k] = M[k0 + k][row]
__device__ __forceinline__ void load_a_t(Split (&A)[4], const float* M, int ld, int k0, int g, int q) {
  const float* lo = M + (k0 + 2 * q) * ld;
  A[0] = split(lo[g]), A[1] = split(lo[g + 8]), A[2] = split(lo[ld + g]), A[3] = split(lo[ld + g + 8]);
}
// B = Bt^T for a matrix stored by its n index (Bt[n][k]), tile (k0, n0)
__device__ __forceinline__ float2 b_nt(const float* Bt, int ld, int k0, int n0, int g, int q) {
  return *reinterpret_cast<const float2*>(Bt + (n0 + g) * ld + k0 + 2 * q);
}
// B stored by its reduction index (Bm[k][n]), tile (k0, n0)
__device__ __forceinline__ float2 b_kn(const float* Bm, int ld, int k0, int n0, int g, int q) {
  return make_float2(Bm[(k0 + 2 * q) * ld + n0 + g], Bm[(k0 + 2 * q + 1) * ld + n0 + g]);
}
// a C tile (16 x 8 at column n0) to or from a row-major matrix
__device__ __forceinline__ void store_c(float* M, int ld, int n0, const float (&d)[4], int g, int q) {
  *reinterpret_cast<float2*>(M + g * ld + n0 + 2 * q) = make_float2(d[0], d[1]);
  *reinterpret_cast<float2*>(M + (g + 8) * ld + n0 + 2 * q) = make_float2(d[2], d[3]);
}
__device__ __forceinline__ void load_c(float (&d)[4], const float* M, int ld, int n0, int g, int q) {
  const float2 lo = *reinterpret_cast<const float2*>(M + g * ld + n0 + 2 * q);
  const float2 hi = *reinterpret_cast<const float2*>(M + (g + 8) * ld + n0 + 2 * q);
  d[0] = lo.x, d[1] = lo.y, d[2] = hi.x, d[3] = hi.y;
}
// ... and into a transposed packet part ([N][CK]: element (t, j) at j * CK + t)
__device__ __forceinline__ void store_c_transposed(float* part, int n0, const float (&d)[4], int g, int q) {
  const int j = n0 + 2 * q;
  part[j * CK + g] = d[0], part[(j + 1) * CK + g] = d[1];
  part[j * CK + g + 8] = d[2], part[(j + 1) * CK + g + 8] = d[3];
}

// d += A B over a reduction of 16 (A as two preloaded fragments of 8), B stored by the reduction index, columns n0..
template <bool kThree>
__device__ __forceinline__ void mma_k16(float (&d)[4], const Split (&A)[2][4], const float* Bm, int ld, int n0, int g,
                                        int q) {
#pragma unroll
  for (int kt = 0; kt < 2; ++kt) mma<kThree>(d, A[kt], b_kn(Bm, ld, 8 * kt, n0, g, q));
}

// Columns 8nt..8nt+7 of a 16 x 16 pair matrix lhs rhs^T over the N keys (both token-major, pitch ld): kept below the
// diagonal (strict, the M's) or on and below it (the P's)
template <bool kThree>
__device__ __forceinline__ void pair_tile(float (&d)[4], const float* lhs, const float* rhs, int ld, int nt,
                                          bool strict, int g, int q) {
  d[0] = d[1] = d[2] = d[3] = 0.f;
#pragma unroll
  for (int kt = 0; kt < WKV_N / 8; ++kt) {
    Split A[4];
    load_a(A, lhs, ld, 8 * kt, g, q);
    mma<kThree>(d, A, b_nt(rhs, ld, 8 * kt, 8 * nt, g, q));
  }
#pragma unroll
  for (int x = 0; x < 4; ++x) {
    const int t = g + 8 * (x >> 1), s = 8 * nt + 2 * q + (x & 1);
    if (strict ? s >= t : s > t) d[x] = 0.f;
  }
}

// The backward prep's products: Pb^T dy (shared), W = (I - Mb)^-T b_end and Z = (I - Mb)^-T (Pb^T dy) (packet)
template <bool kThree>
__device__ __forceinline__ void chunk_backward_tail(float* out, const float* Ainv, const float* Pb, const float* DY,
                                                    const float* B_end, float* PbT_dy, int g, int q) {
  constexpr int N = WKV_N, ld = WKV_N + 8, lp = CK + 8;
  Split At[2][4], Pt[2][4];  // Ainv^T and Pb^T as A operands
#pragma unroll
  for (int kt = 0; kt < 2; ++kt) load_a_t(At[kt], Ainv, lp, 8 * kt, g, q), load_a_t(Pt[kt], Pb, lp, 8 * kt, g, q);
#pragma unroll
  for (int n = 0; n < N / 8; ++n) {
    float dp[4] = {0.f, 0.f, 0.f, 0.f}, dw[4] = {0.f, 0.f, 0.f, 0.f};
    mma_k16<kThree>(dp, Pt, DY, ld, 8 * n, g, q);
    mma_k16<kThree>(dw, At, B_end, ld, 8 * n, g, q);
    store_c(PbT_dy, ld, 8 * n, dp, g, q);
    store_c(out + kW * kPartFloats, N, 8 * n, dw, g, q);
  }
  __syncwarp();
#pragma unroll
  for (int n = 0; n < N / 8; ++n) {
    float dz[4] = {0.f, 0.f, 0.f, 0.f};
    mma_k16<kThree>(dz, At, PbT_dy, ld, 8 * n, g, q);
    store_c_transposed(out + kZT * kPartFloats, 8 * n, dz, g, q);
  }
}

// The forward prep's products (three tf32 products each: the sequential backward backsteps from the forward):
// W = (I - Mb)^-1 a_ex, Z = (I - Mb)^-1 Mk V, R = r_in + Pb W, Y = Pb Z + Pk V (packet); W, Mk V and Z also go to
// the shared slots Ws, MkV, Zs for the products that read them
__device__ __forceinline__ void chunk_forward_tail(float* out, const float* Ainv, const float* pairs,
                                                  const float* a_ex, const float* r_in, const float* V, float* Ws,
                                                  float* MkV, float* Zs, int g, int q) {
  constexpr int N = WKV_N, ld = WKV_N + 8, lp = CK + 8;
  const float *Mk = pairs + CK * lp, *Pb = pairs + 2 * CK * lp, *Pk = pairs + 3 * CK * lp;
  Split Ai[2][4], Ab[2][4], Am[2][4], Ak[2][4];  // Ainv, Pb, Mk and Pk as A operands, each 16 x 16
#pragma unroll
  for (int kt = 0; kt < 2; ++kt) {
    load_a(Ai[kt], Ainv, lp, 8 * kt, g, q), load_a(Ab[kt], Pb, lp, 8 * kt, g, q);
    load_a(Am[kt], Mk, lp, 8 * kt, g, q), load_a(Ak[kt], Pk, lp, 8 * kt, g, q);
  }
#pragma unroll
  for (int n = 0; n < N / 8; ++n) {  // W and Mk V
    float dw[4] = {0.f, 0.f, 0.f, 0.f}, dm[4] = {0.f, 0.f, 0.f, 0.f};
    mma_k16<true>(dw, Ai, a_ex, ld, 8 * n, g, q);
    mma_k16<true>(dm, Am, V, ld, 8 * n, g, q);
    store_c(out + kW * kPartFloats, N, 8 * n, dw, g, q);
    store_c(Ws, ld, 8 * n, dw, g, q);
    store_c(MkV, ld, 8 * n, dm, g, q);
  }
  __syncwarp();
#pragma unroll
  for (int n = 0; n < N / 8; ++n) {  // Z (transposed) and R
    float dz[4] = {0.f, 0.f, 0.f, 0.f}, dr[4];
    load_c(dr, r_in, ld, 8 * n, g, q);
    mma_k16<true>(dz, Ai, MkV, ld, 8 * n, g, q);
    mma_k16<true>(dr, Ab, Ws, ld, 8 * n, g, q);
    store_c_transposed(out + kZT * kPartFloats, 8 * n, dz, g, q);
    store_c(Zs, ld, 8 * n, dz, g, q);
    store_c(out + kR * kPartFloats, N, 8 * n, dr, g, q);
  }
  __syncwarp();
#pragma unroll
  for (int n = 0; n < N / 8; ++n) {  // Y (transposed)
    float dy[4] = {0.f, 0.f, 0.f, 0.f};
    mma_k16<true>(dy, Ab, Zs, ld, 8 * n, g, q);
    mma_k16<true>(dy, Ak, V, ld, 8 * n, g, q);
    store_c_transposed(out + kYT * kPartFloats, 8 * n, dy, g, q);
  }
}

// ---- prep_kernel: one warp per chunk, the chunk's products on tensor cores (three tf32 products each) -------------
struct PrepSmem {  // offsets in floats; W reuses b_src's slot, Mk V k_src's, Z a_ex's once those are dead
  static constexpr int kLd = WKV_N + 8, kLdPair = CK + 8, kArray = CK * kLd;
  enum Array { kAex, kRin, kBsrc, kKsrc, kV, kArrays };
  static constexpr int kPair = kArrays * kArray, kAinv = kPair + 4 * CK * kLdPair, kFloats = kAinv + CK * kLdPair;
  static constexpr size_t kBytes = size_t(kFloats) * sizeof(float);
};

// kBackward: the packet of the state-gradient pass instead (dy given): W = (I - Mb)^-T b_end, Z = (I - Mb)^-T Pb^T dy,
// b_end -> a_ex, k_end -> r_in, V -> dy; so that pass computes G = Z + W dS^T (row t of G: d sa_t) and
// dS <- dS diag(e^{c_L}) + G^T a_ex + dy^T r_in, chunks in reverse.
template <typename F, bool kBackward>
__global__ void __launch_bounds__(32) prep_kernel(int T, int H, float decay_scale, const F* __restrict__ r,
    const F* __restrict__ w, const F* __restrict__ k, const F* __restrict__ v, const F* __restrict__ a,
    const F* __restrict__ b, const F* __restrict__ dy, float* __restrict__ packet) {
  constexpr int N = WKV_N, E = N / 32, ld = PrepSmem::kLd, lp = PrepSmem::kLdPair;
  constexpr bool kThree = kExact<F, kBackward>;
  extern __shared__ __align__(16) float sm[];
  float *a_ex = sm + PrepSmem::kAex * PrepSmem::kArray, *r_in = sm + PrepSmem::kRin * PrepSmem::kArray;
  float *b_src = sm + PrepSmem::kBsrc * PrepSmem::kArray, *k_src = sm + PrepSmem::kKsrc * PrepSmem::kArray;
  float *V = sm + PrepSmem::kV * PrepSmem::kArray, *pair = sm + PrepSmem::kPair, *Ainv = sm + PrepSmem::kAinv;
  float *Ws = b_src, *MkV = k_src, *Zs = a_ex;  // later contents of dead slots
  float *DY = V, *B_end = k_src, *PbT_dy = b_src;  // the backward's (it needs neither V nor k_src)
  const int nc = (T + CK - 1) / CK, chunk = blockIdx.x, bh = chunk / nc, c = chunk % nc;
  const int bb = bh / H, h = bh % H, lane = threadIdx.x, g = lane / 4, q = lane % 4, t0 = c * CK;
  const int L = min(CK, T - t0);
  float* out = packet + int64_t(chunk) * kPacketFloats;
  auto column = [&](Part part, int j, const float (&x)[CK]) {  // 16 contiguous floats of a transposed part
    float4* dst = reinterpret_cast<float4*>(out + part * kPartFloats + j * CK);
#pragma unroll
    for (int u = 0; u < CK / 4; ++u) dst[u] = make_float4(x[4 * u], x[4 * u + 1], x[4 * u + 2], x[4 * u + 3]);
  };
  // 1. per key column j: cumulative log decay, the scaled arrays (shared), b_end, k_end, V^T, e^{c_L} (packet)
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const int j = E * lane + e;
    float lw[CK], cL = 0.f;
#pragma unroll
    for (int t = 0; t < CK; ++t) {
      const int64_t o = wkv::seq_off(bb, t0 + min(t, L - 1), h, T, H, N) + j;
      lw[t] = t < L ? -decay_scale * sigmoid_f(wkv::to_f(w[o])) : 0.f;
      cL += lw[t];
    }
    float cum = 0.f, p_col[CK], q_col[CK], x_col[CK];  // this column of the packet's P, Q, X
#pragma unroll
    for (int t = 0; t < CK; ++t) {
      const bool in = t < L;
      const int64_t o = wkv::seq_off(bb, t0 + min(t, L - 1), h, T, H, N) + j;
      const float before = cum;
      cum += lw[t];
      const float rt = in ? wkv::to_f(r[o]) : 0.f, kt = in ? wkv::to_f(k[o]) : 0.f;
      const float at = in ? wkv::to_f(a[o]) : 0.f, bt = in ? wkv::to_f(b[o]) : 0.f;
      const float inv = expf(-cum), after = expf(cL - cum), rin = rt * expf(cum), aex = at * expf(before);
      r_in[t * ld + j] = rin;
      a_ex[t * ld + j] = aex;
      b_src[t * ld + j] = bt * inv;
      if constexpr (kBackward) {
        x_col[t] = in ? wkv::to_f(dy[o]) : 0.f;
        p_col[t] = aex, q_col[t] = rin;
        B_end[t * ld + j] = bt * after;
      } else {
        x_col[t] = in ? wkv::to_f(v[o]) : 0.f;
        p_col[t] = bt * after, q_col[t] = kt * after;
        k_src[t * ld + j] = kt * inv;
      }
      V[t * ld + j] = x_col[t];  // V, or dy in the backward's DY (the same slot)
    }
    column(kPT, j, p_col);
    column(kQT, j, q_col);
    column(kXT, j, x_col);
    out[kParts * kPartFloats + j] = expf(cL);
  }
  __syncwarp();
  // 2. the pair matrices Mb, Mk (strictly lower) and Pb, Pk (lower with the diagonal): [16 t] x [16 s], K = N
#pragma unroll
  for (int m = 0; m < 4; ++m) {
    if (kBackward && (m & 1)) continue;  // the backward's pass needs Mb and Pb only
    const float* lhs = m < 2 ? a_ex : r_in;
    const float* rhs = (m & 1) ? k_src : b_src;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      float d[4];
      pair_tile<kThree>(d, lhs, rhs, ld, nt, m < 2, g, q);
      store_c(pair + m * CK * lp, lp, 8 * nt, d, g, q);
    }
  }
  __syncwarp();
  const float *Mb = pair, *Pb = pair + 2 * CK * lp;
  if (lane < CK) {  // 3. (I - Mb)^-1, unit lower triangular: column `lane` by forward substitution
    float x[CK];
#pragma unroll
    for (int t = 0; t < CK; ++t) {
      float xt = t == lane ? 1.f : 0.f;
#pragma unroll
      for (int s = 0; s < t; ++s) xt += Mb[t * lp + s] * x[s];
      x[t] = xt;
      Ainv[t * lp + lane] = xt;
    }
  }
  __syncwarp();
  if constexpr (kBackward)  // 4. the products with (I - Mb)^-1 and Pb
    chunk_backward_tail<kThree>(out, Ainv, Pb, DY, B_end, PbT_dy, g, q);
  else
    chunk_forward_tail(out, Ainv, pair, a_ex, r_in, V, Ws, MkV, Zs, g, q);
}

// A warp's 16 state rows (accumulator layout) to an N x N fp32 matrix.
__device__ __forceinline__ void store_rows(float* dst, const float (&S)[WKV_N / 8][4], int i0, int g, int q) {
#pragma unroll
  for (int n = 0; n < WKV_N / 8; ++n) {
    *reinterpret_cast<float2*>(dst + (i0 + g) * WKV_N + 8 * n + 2 * q) = make_float2(S[n][0], S[n][1]);
    *reinterpret_cast<float2*>(dst + (i0 + g + 8) * WKV_N + 8 * n + 2 * q) = make_float2(S[n][2], S[n][3]);
  }
}

// kBackward: the state-gradient pass of the same form (prep_kernel<F, true>'s packet): chunks in reverse from dsT,
// `ckpt` gets the state gradient at every chunk's end, `sa` the rows of G (d sa_t), sT the gradient at the start (ds0).
template <typename F, bool kBackward>
__global__ void __launch_bounds__(kThreads) state_kernel(int T, int H, const float* __restrict__ packet,
    const float* __restrict__ s0, F* __restrict__ y, float* __restrict__ sT, float* __restrict__ ckpt,
    float* __restrict__ sa) {
  constexpr int N = WKV_N, NT = N / 8;  // NT column tiles of 8 keys
  constexpr bool kThree = kExact<F, kBackward>;
  extern __shared__ __align__(16) float sm[];
  const int bh = blockIdx.x, bb = bh / H, h = bh % H, nc = (T + CK - 1) / CK;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4, i0 = kRowsPerWarp * warp;
  float S[NT][4];  // rows i0+g (c0, c1) and i0+g+8 (c2, c3), keys 8n+2q and 8n+2q+1
  const float* s0h = s0 + int64_t(bh) * N * N;
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    const float2 lo = *reinterpret_cast<const float2*>(s0h + (i0 + g) * N + 8 * n + 2 * q);
    const float2 hi = *reinterpret_cast<const float2*>(s0h + (i0 + g + 8) * N + 8 * n + 2 * q);
    S[n][0] = lo.x, S[n][1] = lo.y, S[n][2] = hi.x, S[n][3] = hi.y;
  }
  const float *Ws = sm + StateSmem::kW, *Rs = sm + StateSmem::kR, *total = sm + StateSmem::kTotal;
  auto part = [&](Part p) { return sm + StateSmem::kT + (p - kPT) * N * kLdCol; };  // transposed parts
  const float *PT = part(kPT), *QT = part(kQT), *ZT = part(kZT), *YT = part(kYT), *XT = part(kXT);
  for (int it = 0; it < nc; ++it) {
    const int c = kBackward ? nc - 1 - it : it, t0 = c * CK, L = min(CK, T - t0);
    const float* src = packet + (int64_t(bh) * nc + c) * kPacketFloats;
    for (int x = threadIdx.x; x < kPacketFloats / 4; x += kThreads) {  // stage the packet, 16 bytes a copy
      const int f = 4 * x, p = f / kPartFloats, e = f % kPartFloats;
      int dst;
      if (p >= kParts)
        dst = StateSmem::kTotal + e;
      else if (p < kPT)
        dst = (p == kW ? StateSmem::kW : StateSmem::kR) + (e / N) * kLdRow + e % N;
      else
        dst = StateSmem::kT + (p - kPT) * N * kLdCol + (e / CK) * kLdCol + e % CK;
      const unsigned saddr = static_cast<unsigned>(__cvta_generic_to_shared(sm + dst));
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(saddr), "l"(src + f));
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
    __syncthreads();
    // U^T and y^T for this warp's rows: [16 rows] x [16 tokens], two tiles of 8 tokens; start from Z^T, Y^T
    float U[2][4], Y[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const int t = 8 * nt + 2 * q;
      const float2 z0 = *reinterpret_cast<const float2*>(ZT + (i0 + g) * kLdCol + t);
      const float2 z1 = *reinterpret_cast<const float2*>(ZT + (i0 + g + 8) * kLdCol + t);
      const float2 y0 = *reinterpret_cast<const float2*>(YT + (i0 + g) * kLdCol + t);
      const float2 y1 = *reinterpret_cast<const float2*>(YT + (i0 + g + 8) * kLdCol + t);
      U[nt][0] = z0.x, U[nt][1] = z0.y, U[nt][2] = z1.x, U[nt][3] = z1.y;
      if constexpr (!kBackward) Y[nt][0] = y0.x, Y[nt][1] = y0.y, Y[nt][2] = y1.x, Y[nt][3] = y1.y;
    }
#pragma unroll
    for (int kt = 0; kt < NT; ++kt) {  // U^T += S W^T, y^T += S R^T over keys 8kt..8kt+7
      const Split A[4] = {split(S[kt][0]), split(S[kt][2]), split(S[kt][1]), split(S[kt][3])};
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const int row = (8 * nt + g) * kLdRow + 8 * kt + 2 * q;
        mma<kThree>(U[nt], A, *reinterpret_cast<const float2*>(Ws + row));
        if constexpr (!kBackward) mma<kThree>(Y[nt], A, *reinterpret_cast<const float2*>(Rs + row));
      }
    }
    const int64_t base = wkv::seq_off(bb, t0, h, T, H, N), token_stride = int64_t(H) * N;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {  // sa and y out: tokens 8nt+2q(+1), rows i0+g(+8)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int t = 8 * nt + 2 * q + (e & 1), i = i0 + g + 8 * (e >> 1);
        if (t < L) {
          const int64_t o = base + t * token_stride + i;
          sa[o] = U[nt][e];
          if constexpr (!kBackward) y[o] = wkv::from_f<F>(Y[nt][e]);
        }
      }
    }
    float* cp = ckpt + (int64_t(bh) * nc + c) * N * N;  // the state at the end of chunk c (backward: its gradient)
    if constexpr (kBackward) store_rows(cp, S, i0, g, q);
#pragma unroll
    for (int n = 0; n < NT; ++n) {  // S diag(e^{c_L})
      const float2 tot = *reinterpret_cast<const float2*>(total + 8 * n + 2 * q);
      S[n][0] *= tot.x, S[n][1] *= tot.y, S[n][2] *= tot.x, S[n][3] *= tot.y;
    }
#pragma unroll
    for (int kt = 0; kt < 2; ++kt) {  // S += U^T b_end + V^T k_end over tokens 8kt..8kt+7
      const int t = 8 * kt + 2 * q;
      const float2 x0 = *reinterpret_cast<const float2*>(XT + (i0 + g) * kLdCol + t);
      const float2 x1 = *reinterpret_cast<const float2*>(XT + (i0 + g + 8) * kLdCol + t);
      const Split Au[4] = {split(U[kt][0]), split(U[kt][2]), split(U[kt][1]), split(U[kt][3])};
      const Split Ax[4] = {split(x0.x), split(x1.x), split(x0.y), split(x1.y)};
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const int col = (8 * n + g) * kLdCol + t;
        mma<kThree>(S[n], Au, *reinterpret_cast<const float2*>(PT + col));
        mma<kThree>(S[n], Ax, *reinterpret_cast<const float2*>(QT + col));
      }
    }
    if constexpr (!kBackward) store_rows(cp, S, i0, g, q);
    __syncthreads();  // every warp is done with the staged packet
  }
  store_rows(sT + int64_t(bh) * N * N, S, i0, g, q);
}


// ---- grad_kernel: every chunk's input gradients at once (infctx/ops/wkv7_chunk_grad.py: chunk_backward) ---------
// From the chunk's start state S0 (s0 or the forward's checkpoint c-1), the state gradient at its end dS (the
// state-gradient pass's checkpoint c), U = sa and G = d sa. Block of kWarps warps per chunk; warp w computes the
// output columns 16w..16w+15 of every 16 x N product, then thread j < N finishes column j (the log-decay sums).
// Shared memory stays under 75 KB, so that three blocks share an SM: b_end and k_end are b_src and k_src scaled by
// the column's e^{c_L} (applied where they are read); S0 and dS are read by the products over the state first,
// then their space takes the pair matrices and, once the pair products are done, six of the seven outputs (dv goes
// from the fragments straight to global memory).
struct GradSmem {  // offsets in floats
  static constexpr int kLd = WKV_N + 8, kLp = CK + 8, kArray = CK * kLd, kMat = WKV_N * kLd;
  enum Array { kRin, kAex, kBsrc, kKsrc, kV, kDy, kU, kG, kArrays };
  enum Pair { kMk, kPk, kdMb, kdMk, kdPb, kdPk, kPairs };
  enum Out { oRin, oAex, oBsrc, oKsrc, oBend, oKend, kStaged, oDv = kStaged, kOuts };  // staged: over S0 and dS
  static constexpr int kS0 = kArrays * kArray, kdS = kS0 + kMat, kPair = kS0 + kStaged * kArray,
                       kEnd = kS0 + 2 * kMat, kDtotal = kEnd + WKV_N, kFloats = kDtotal + WKV_N;
  static_assert(kPair + kPairs * CK * kLp <= kEnd, "the pairs and the staged outputs must fit where S0 and dS were");
  static constexpr size_t kBytes = size_t(kFloats) * sizeof(float);
  static_assert(WKV_N != 64 || kBytes + 1024 <= 228 * 1024 / 3,
                "head size 64: three blocks per SM (sm_90: 228 KB, 1 KB reserved per block)");
};

// A (16 rows x 8 of the reduction) from column k0 of M, each reduction column j scaled by s[j]
__device__ __forceinline__ void load_a_scaled(Split (&A)[4], const float* M, int ld, int k0, const float* s, int g,
                                              int q) {
  const float2 lo = *reinterpret_cast<const float2*>(M + g * ld + k0 + 2 * q);
  const float2 hi = *reinterpret_cast<const float2*>(M + (g + 8) * ld + k0 + 2 * q);
  const float2 sc = *reinterpret_cast<const float2*>(s + k0 + 2 * q);
  A[0] = split(lo.x * sc.x), A[1] = split(hi.x * sc.x), A[2] = split(lo.y * sc.y), A[3] = split(hi.y * sc.y);
}

template <typename F>
__global__ void __launch_bounds__(kThreads) grad_kernel(int T, int H, float decay_scale, const F* __restrict__ r,
    const F* __restrict__ w, const F* __restrict__ k, const F* __restrict__ v, const F* __restrict__ a,
    const F* __restrict__ b, const F* __restrict__ dy, const float* __restrict__ s0, const float* __restrict__ ckpt,
    const float* __restrict__ dckpt, const float* __restrict__ sa, const float* __restrict__ gsa,
    F* __restrict__ dr, F* __restrict__ dw, F* __restrict__ dk, F* __restrict__ dv, F* __restrict__ da,
    F* __restrict__ db) {
  using S = GradSmem;
  constexpr int N = WKV_N, ld = S::kLd, lp = S::kLp;
  constexpr bool kThree = kExact<F, true>;
  extern __shared__ __align__(16) float sm[];
  auto arr = [&](S::Array x) { return sm + x * S::kArray; };
  auto pr = [&](S::Pair x) { return sm + S::kPair + x * CK * lp; };
  auto res = [&](S::Out x) { return sm + S::kS0 + x * S::kArray; };
  float *r_in = arr(S::kRin), *a_ex = arr(S::kAex), *b_src = arr(S::kBsrc), *k_src = arr(S::kKsrc);
  float *V = arr(S::kV), *DY = arr(S::kDy), *U = arr(S::kU), *G = arr(S::kG);
  float *S0 = sm + S::kS0, *dS = sm + S::kdS, *e_end = sm + S::kEnd, *d_total = sm + S::kDtotal;
  const int nc = (T + CK - 1) / CK, chunk = blockIdx.x, bh = chunk / nc, c = chunk % nc;
  const int bb = bh / H, h = bh % H, t0 = c * CK, L = min(CK, T - t0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4, n0 = 16 * warp;
  // 1. S0 and dS (float4 copies into padded rows), the chunk's scaled arrays and e^{c_L} (two threads per column)
  const float* s0src = c == 0 ? s0 + int64_t(bh) * N * N : ckpt + (int64_t(bh) * nc + c - 1) * N * N;
  const float* dSsrc = dckpt + (int64_t(bh) * nc + c) * N * N;
  for (int x = threadIdx.x; x < N * N / 4; x += kThreads) {
    const int i = 4 * x / N, j = 4 * x % N;
    *reinterpret_cast<float4*>(S0 + i * ld + j) = reinterpret_cast<const float4*>(s0src)[x];
    *reinterpret_cast<float4*>(dS + i * ld + j) = reinterpret_cast<const float4*>(dSsrc)[x];
  }
  static_assert(kThreads == 2 * N, "stages 1 and 5 give each column two threads");
  const int j = threadIdx.x % N;
  // the chunk's log decays through token t for column j (c_t = cum[t], c_L = cL); past L they add nothing
  auto log_decays = [&](float (&cum)[CK], float (&wv)[CK], float& cL) {
    cL = 0.f;
#pragma unroll
    for (int t = 0; t < CK; ++t) {
      wv[t] = wkv::to_f(w[wkv::seq_off(bb, t0 + min(t, L - 1), h, T, H, N) + j]);
      cL += t < L ? -decay_scale * sigmoid_f(wv[t]) : 0.f;
      cum[t] = cL;
    }
  };
  if (threadIdx.x < N) {  // column j's decayed arrays and e^{c_L}
    float cum[CK], wv[CK], cL;
    log_decays(cum, wv, cL);
    e_end[j] = expf(cL);
#pragma unroll
    for (int t = 0; t < CK; ++t) {
      const bool in = t < L;
      const int64_t o = wkv::seq_off(bb, t0 + min(t, L - 1), h, T, H, N) + j;
      const float rt = in ? wkv::to_f(r[o]) : 0.f, kt = in ? wkv::to_f(k[o]) : 0.f;
      const float at = in ? wkv::to_f(a[o]) : 0.f, bt = in ? wkv::to_f(b[o]) : 0.f;
      const float inv = expf(-cum[t]);
      const int e = t * ld + j;
      r_in[e] = rt * expf(cum[t]), a_ex[e] = at * expf(t ? cum[t - 1] : 0.f), b_src[e] = bt * inv, k_src[e] = kt * inv;
    }
  } else {  // the other thread of column j: its plain arrays
#pragma unroll
    for (int t = 0; t < CK; ++t) {
      const bool in = t < L;
      const int64_t o = wkv::seq_off(bb, t0 + min(t, L - 1), h, T, H, N) + j;
      const int e = t * ld + j;
      V[e] = in ? wkv::to_f(v[o]) : 0.f;
      DY[e] = in ? wkv::to_f(dy[o]) : 0.f;
      U[e] = in ? sa[o] : 0.f;
      G[e] = in ? gsa[o] : 0.f;
    }
  }
  __syncthreads();
  // 2. this warp's 16 columns of the products over the state (K = N; two tiles of 8 each), d total_j =
  // sum_i S0_ij dS_ij
  float out[S::kOuts][2][4] = {};
#pragma unroll
  for (int kt = 0; kt < N / 8; ++kt) {
    Split Ak[4], Ad[4], Ag[4], Au[4], Av[4];
    load_a_scaled(Ak, k_src, ld, 8 * kt, e_end, g, q);  // k_end
    load_a(Ad, DY, ld, 8 * kt, g, q), load_a(Ag, G, ld, 8 * kt, g, q);
    load_a(Au, U, ld, 8 * kt, g, q), load_a(Av, V, ld, 8 * kt, g, q);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      mma<kThree>(out[S::oDv][nt], Ak, b_nt(dS, ld, 8 * kt, n0 + 8 * nt, g, q));    // k_end dS^T
      mma<kThree>(out[S::oRin][nt], Ad, b_kn(S0, ld, 8 * kt, n0 + 8 * nt, g, q));   // dy S0
      mma<kThree>(out[S::oAex][nt], Ag, b_kn(S0, ld, 8 * kt, n0 + 8 * nt, g, q));   // G S0
      mma<kThree>(out[S::oBend][nt], Au, b_kn(dS, ld, 8 * kt, n0 + 8 * nt, g, q));  // U dS
      mma<kThree>(out[S::oKend][nt], Av, b_kn(dS, ld, 8 * kt, n0 + 8 * nt, g, q));  // V dS
    }
  }
  if (threadIdx.x < N) {
    float acc = 0.f;
    for (int i = 0; i < N; ++i) acc += S0[i * ld + threadIdx.x] * dS[i * ld + threadIdx.x];
    d_total[threadIdx.x] = acc;
  }
  __syncthreads();  // S0 and dS are read: the pairs go over them
  // 3. the pair matrices (12 tiles of 16 x 8 over the warps)
  for (int tile = warp; tile < 2 * S::kPairs; tile += kWarps) {
    const int m = tile / 2, nt = tile % 2;
    const float* lhs = m == S::kMk ? a_ex : m == S::kPk ? r_in : (m == S::kdMb || m == S::kdMk) ? G : DY;
    const float* rhs = m <= S::kPk ? k_src : (m == S::kdMb || m == S::kdPb) ? U : V;
    float d[4];
    pair_tile<kThree>(d, lhs, rhs, ld, nt, m == S::kMk || m == S::kdMb || m == S::kdMk, g, q);
    store_c(pr(S::Pair(m)), lp, 8 * nt, d, g, q);
  }
  __syncthreads();
  // 4. the 16 x 16 pair products (K = 16); then dv to global memory and the other six outputs to shared memory
  auto small = [&](float (&d)[4], const float* P, bool transposed, const float* Bm, int nt) {  // P (16x16) B
#pragma unroll
    for (int kt = 0; kt < 2; ++kt) {
      Split A[4];
      if (transposed)
        load_a_t(A, P, lp, 8 * kt, g, q);
      else
        load_a(A, P, lp, 8 * kt, g, q);
      mma<kThree>(d, A, b_kn(Bm, ld, 8 * kt, n0 + 8 * nt, g, q));
    }
  };
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
    small(out[S::oDv][nt], pr(S::kPk), true, DY, nt), small(out[S::oDv][nt], pr(S::kMk), true, G, nt);
    small(out[S::oRin][nt], pr(S::kdPb), false, b_src, nt), small(out[S::oRin][nt], pr(S::kdPk), false, k_src, nt);
    small(out[S::oAex][nt], pr(S::kdMb), false, b_src, nt), small(out[S::oAex][nt], pr(S::kdMk), false, k_src, nt);
    small(out[S::oBsrc][nt], pr(S::kdMb), true, a_ex, nt), small(out[S::oBsrc][nt], pr(S::kdPb), true, r_in, nt);
    small(out[S::oKsrc][nt], pr(S::kdMk), true, a_ex, nt), small(out[S::oKsrc][nt], pr(S::kdPk), true, r_in, nt);
  }
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int x = 0; x < 4; ++x) {  // C fragment element x: token g + 8 (x / 2), column n0 + 8 nt + 2q + x % 2
      const int t = g + 8 * (x >> 1);
      const int64_t o = wkv::seq_off(bb, t0 + t, h, T, H, N) + n0 + 8 * nt + 2 * q + (x & 1);
      if (t < L) dv[o] = wkv::from_f<F>(out[S::oDv][nt][x]);
    }
#pragma unroll
    for (int o = 0; o < S::kStaged; ++o) store_c(res(S::Out(o)), ld, n0 + 8 * nt, out[o][nt], g, q);
  }
  __syncthreads();
  {  // 5. column j: thread j the log-decay gradient (reverse sums) and dw, thread N + j the other five gradients
    const float *d_rin = res(S::oRin), *d_aex = res(S::oAex), *d_bsrc = res(S::oBsrc);
    const float *d_ksrc = res(S::oKsrc), *d_bend = res(S::oBend), *d_kend = res(S::oKend);
    float cum[CK], wv[CK], cL;
    log_decays(cum, wv, cL);
    const float eL = e_end[j];
    if (threadIdx.x < N) {
      // b_end d_bend + k_end d_kend at token t (b_end = b_src e^{c_L}, k_end = k_src e^{c_L})
      auto ends = [&](int e) { return eL * (b_src[e] * d_bend[e] + k_src[e] * d_kend[e]); };
      float dcL = eL * d_total[j];
#pragma unroll
      for (int t = 0; t < CK; ++t) dcL += ends(t * ld + j);
      float rev_dc = 0.f, rev_dcb = 0.f;  // sums over t' >= t and t' > t
#pragma unroll
      for (int t = CK - 1; t >= 0; --t) {
        const int e = t * ld + j;
        rev_dc += r_in[e] * d_rin[e] - b_src[e] * d_bsrc[e] - k_src[e] * d_ksrc[e] - ends(e);
        const float dlw = rev_dc + rev_dcb + dcL;
        rev_dcb += a_ex[e] * d_aex[e];
        if (t < L)
          dw[wkv::seq_off(bb, t0 + t, h, T, H, N) + j] =
              wkv::from_f<F>(-dlw * decay_scale * sigmoid_f(wv[t]) * sigmoid_f(-wv[t]));
      }
    } else {
#pragma unroll
      for (int t = 0; t < L; ++t) {
        const int e = t * ld + j;
        const int64_t o = wkv::seq_off(bb, t0 + t, h, T, H, N) + j;
        const float E = expf(cum[t]), after = expf(cL - cum[t]);
        dr[o] = wkv::from_f<F>(d_rin[e] * E);
        dk[o] = wkv::from_f<F>(d_ksrc[e] / E + d_kend[e] * after);
        da[o] = wkv::from_f<F>(d_aex[e] * expf(t ? cum[t - 1] : 0.f));
        db[o] = wkv::from_f<F>(d_bsrc[e] / E + d_bend[e] * after);
      }
    }
  }
}

}  // namespace wkv7tc
