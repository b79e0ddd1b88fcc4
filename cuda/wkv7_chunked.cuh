// The wkv7 forward as chunks on tensor cores: the same outputs as the sequential forward (y, sT, the state at the end
// of every chunk of CK tokens, sa_t = S_{t-1} a_t), so the sequential backward consumes them unchanged.
//
// Per chunk (L = CK tokens, c_t = cumulative log decay through token t, S = the state at the chunk's start):
//   r_in = r e^c, a_ex = a e^{c - lw}, b_src = b e^{-c}, k_src = k e^{-c}, b_end = b e^{c_L - c}, k_end = k e^{c_L - c}
//   Mb = tril(a_ex b_src^T, -1), Mk = tril(a_ex k_src^T, -1), Pb = tril(r_in b_src^T), Pk = tril(r_in k_src^T)
//   (I - Mb) U = a_ex S^T + Mk V   (row t of U is sa_t)
//   y = r_in S^T + Pb U + Pk V,   S <- S diag(e^{c_L}) + U^T b_end + V^T k_end
// Everything that does not involve S is the same for every start state, so it runs for all chunks at once
// (prep_kernel, fp32 on CUDA cores): W = (I - Mb)^-1 a_ex, Z = (I - Mb)^-1 Mk V, R = r_in + Pb W, Y = Pb Z + Pk V, so
//   U = W S^T + Z,   y = R S^T + Y,   S <- S diag(e^{c_L}) + U^T b_end + V^T k_end.
// What is left is a pass over chunks per head (state_kernel) whose products run on tensor cores (mma.sync m16n8k8,
// tf32 operands split into a high and a low part, three products each: fp32-grade results, so fp32 inputs keep
// their 1e-5 contract and the backward, which backsteps from these outputs, sees what the sequential forward gives;
// one tf32 product was measured to leave da of bf16 inputs at 5.1-5.8e-3, over their 5e-3).
// Value rows of S never mix, so each warp owns 16 rows and keeps them in registers as mma accumulators; with the key
// index permuted the accumulator layout is also the A-operand layout, so S never goes through shared memory.
#pragma once
#include <cstdint>

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

// ---- prep_kernel: one block of N threads per chunk; thread j owns column j of every CK x N array ----------------
template <typename F>
__global__ void __launch_bounds__(WKV_N) prep_kernel(int T, int H, float decay_scale, const F* __restrict__ r,
    const F* __restrict__ w, const F* __restrict__ k, const F* __restrict__ v, const F* __restrict__ a,
    const F* __restrict__ b, float* __restrict__ packet) {
  constexpr int N = WKV_N, LP = N + 4;  // LP: 8 threads reading float4s of 8 rows hit distinct banks
  __shared__ __align__(16) float a_ex[CK][LP], r_in[CK][LP], b_src[CK][LP], k_src[CK][LP];
  __shared__ __align__(16) float pair[4][CK][CK];  // Mb, Mk, Pb, Pk
  const int nc = (T + CK - 1) / CK, chunk = blockIdx.x, bh = chunk / nc, c = chunk % nc;
  const int bb = bh / H, h = bh % H, j = threadIdx.x, t0 = c * CK, L = min(CK, T - t0);
  float lw[CK], vj[CK], b_end[CK], k_end[CK];
  float cL = 0.f;
#pragma unroll
  for (int t = 0; t < CK; ++t) {
    const int64_t o = wkv::seq_off(bb, t0 + min(t, L - 1), h, T, H, N) + j;
    lw[t] = t < L ? -decay_scale * sigmoid_f(wkv::to_f(w[o])) : 0.f;
    cL += lw[t];
  }
  float cum = 0.f;
#pragma unroll
  for (int t = 0; t < CK; ++t) {
    const bool in = t < L;
    const int64_t o = wkv::seq_off(bb, t0 + min(t, L - 1), h, T, H, N) + j;
    const float before = cum;
    cum += lw[t];
    const float rt = in ? wkv::to_f(r[o]) : 0.f, kt = in ? wkv::to_f(k[o]) : 0.f;
    const float at = in ? wkv::to_f(a[o]) : 0.f, bt = in ? wkv::to_f(b[o]) : 0.f;
    const float inv = expf(-cum), after = expf(cL - cum);
    r_in[t][j] = rt * expf(cum);
    a_ex[t][j] = at * expf(before);
    b_src[t][j] = bt * inv;
    k_src[t][j] = kt * inv;
    b_end[t] = bt * after;
    k_end[t] = kt * after;
    vj[t] = in ? wkv::to_f(v[o]) : 0.f;
  }
  __syncthreads();
  // The four pair matrices, masked to their triangles; each (m, 4x4 tile) work item reads float4s of 4 + 4 rows.
  for (int item = j; item < 4 * (CK / 4) * (CK / 4); item += N) {
    const int m = item / 16, t0q = 4 * ((item / 4) % 4), s0q = 4 * (item % 4);
    const float(*lhs)[LP] = m < 2 ? a_ex : r_in;
    const float(*rhs)[LP] = (m & 1) ? k_src : b_src;
    float acc[4][4] = {};
    for (int x = 0; x < N; x += 4) {
      float4 l[4], rr[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        l[u] = *reinterpret_cast<const float4*>(&lhs[t0q + u][x]);
        rr[u] = *reinterpret_cast<const float4*>(&rhs[s0q + u][x]);
      }
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int z = 0; z < 4; ++z)
          acc[u][z] = fmaf(l[u].w, rr[z].w,
                           fmaf(l[u].z, rr[z].z, fmaf(l[u].y, rr[z].y, fmaf(l[u].x, rr[z].x, acc[u][z]))));
    }
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int z = 0; z < 4; ++z) {
        const int t = t0q + u, s = s0q + z;
        pair[m][t][s] = (m < 2 ? s < t : s <= t) ? acc[u][z] : 0.f;
      }
  }
  __syncthreads();
  // Column j: W = (I - Mb)^-1 a_ex, Z = (I - Mb)^-1 Mk V (forward substitution), R = r_in + Pb W, Y = Pb Z + Pk V
  auto pair_row = [&](int m, int t, float (&row)[CK]) {  // one row of a pair matrix, four float4 reads
#pragma unroll
    for (int x = 0; x < CK / 4; ++x) {
      const float4 f = *reinterpret_cast<const float4*>(&pair[m][t][4 * x]);
      row[4 * x] = f.x, row[4 * x + 1] = f.y, row[4 * x + 2] = f.z, row[4 * x + 3] = f.w;
    }
  };
  float Wc[CK], Zc[CK];
#pragma unroll
  for (int t = 0; t < CK; ++t) {
    float mb[CK], mk[CK];
    pair_row(0, t, mb);
    pair_row(1, t, mk);
    float wt = a_ex[t][j], zt = 0.f;
#pragma unroll
    for (int s = 0; s < t; ++s) {
      wt += mb[s] * Wc[s];
      zt += mb[s] * Zc[s] + mk[s] * vj[s];
    }
    Wc[t] = wt, Zc[t] = zt;
  }
  float* out = packet + int64_t(chunk) * kPacketFloats;
  float Yc[CK];
#pragma unroll
  for (int t = 0; t < CK; ++t) {
    float pb[CK], pk[CK];
    pair_row(2, t, pb);
    pair_row(3, t, pk);
    float rt = r_in[t][j], yt = 0.f;
#pragma unroll
    for (int s = 0; s <= t; ++s) {
      rt += pb[s] * Wc[s];
      yt += pb[s] * Zc[s] + pk[s] * vj[s];
    }
    out[kW * kPartFloats + t * N + j] = Wc[t];
    out[kR * kPartFloats + t * N + j] = rt;
    Yc[t] = yt;
  }
  auto column = [&](Part part, const float (&x)[CK]) {  // thread j's 16 contiguous floats of a transposed part
    float4* dst = reinterpret_cast<float4*>(out + part * kPartFloats + j * CK);
#pragma unroll
    for (int q = 0; q < CK / 4; ++q) dst[q] = make_float4(x[4 * q], x[4 * q + 1], x[4 * q + 2], x[4 * q + 3]);
  };
  column(kPT, b_end);
  column(kQT, k_end);
  column(kZT, Zc);
  column(kYT, Yc);
  column(kXT, vj);
  out[kParts * kPartFloats + j] = expf(cL);
}

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

// Fragment indices (PTX m16n8k8 tf32): lane = 4g + q. A (16x8): a0 (g, q), a1 (g+8, q), a2 (g, q+4), a3 (g+8, q+4);
// B (8x8): b0 (q, g), b1 (q+4, g); C (16x8): c0 (g, 2q), c1 (g, 2q+1), c2 (g+8, 2q), c3 (g+8, 2q+1). Reduction index
// k = q stands for 2q and k = q+4 for 2q+1 of each group of 8: a C fragment is then an A fragment (a0..a3 = c0, c2,
// c1, c3), and B's two values are adjacent (one float2).
template <typename F>
__global__ void __launch_bounds__(kThreads) state_kernel(int T, int H, const float* __restrict__ packet,
    const float* __restrict__ s0, F* __restrict__ y, float* __restrict__ sT, float* __restrict__ ckpt,
    float* __restrict__ sa) {
  constexpr int N = WKV_N, NT = N / 8;  // NT column tiles of 8 keys
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
  for (int c = 0; c < nc; ++c) {
    const int t0 = c * CK, L = min(CK, T - t0);
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
      Y[nt][0] = y0.x, Y[nt][1] = y0.y, Y[nt][2] = y1.x, Y[nt][3] = y1.y;
    }
#pragma unroll
    for (int kt = 0; kt < NT; ++kt) {  // U^T += S W^T, y^T += S R^T over keys 8kt..8kt+7
      const Split A[4] = {split(S[kt][0]), split(S[kt][2]), split(S[kt][1]), split(S[kt][3])};
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const int row = (8 * nt + g) * kLdRow + 8 * kt + 2 * q;
        mma3(U[nt], A, *reinterpret_cast<const float2*>(Ws + row));
        mma3(Y[nt], A, *reinterpret_cast<const float2*>(Rs + row));
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
          y[o] = wkv::from_f<F>(Y[nt][e]);
        }
      }
    }
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
        mma3(S[n], Au, *reinterpret_cast<const float2*>(PT + col));
        mma3(S[n], Ax, *reinterpret_cast<const float2*>(QT + col));
      }
    }
    float* cp = ckpt + (int64_t(bh) * nc + c) * N * N;  // the state at the end of chunk c
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      *reinterpret_cast<float2*>(cp + (i0 + g) * N + 8 * n + 2 * q) = make_float2(S[n][0], S[n][1]);
      *reinterpret_cast<float2*>(cp + (i0 + g + 8) * N + 8 * n + 2 * q) = make_float2(S[n][2], S[n][3]);
    }
    __syncthreads();  // every warp is done with the staged packet
  }
  float* out = sT + int64_t(bh) * N * N;
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    *reinterpret_cast<float2*>(out + (i0 + g) * N + 8 * n + 2 * q) = make_float2(S[n][0], S[n][1]);
    *reinterpret_cast<float2*>(out + (i0 + g + 8) * N + 8 * n + 2 * q) = make_float2(S[n][2], S[n][3]);
  }
}

}  // namespace wkv7tc
