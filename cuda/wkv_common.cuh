// Shared helpers for the WKV kernels: element conversion, chunk length, and the launch-time error check.
#pragma once
#include <cstdint>

namespace wkv {

// Tokens per chunk: the forward saves the state every CK tokens and the backward recomputes one chunk at a time.
constexpr int CK = 16;

}  // namespace wkv

#ifdef __CUDACC__  // device helpers; the host-only bindings need just CK
#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace wkv {

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename F> __device__ __forceinline__ F from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// Offset of element (b, t, h, 0) in a contiguous [B, T, H, N] tensor.
__device__ __forceinline__ int64_t seq_off(int b, int t, int h, int T, int H, int N) {
  return ((int64_t(b) * T + t) * H + h) * N;
}

// Thread roles inside a block that owns value rows [g*R, g*R + R) of one head's N x N state (G = N/R blocks per head).
// Row role: P consecutive threads share a value row i, each holding the M = N/P keys j = jj*P + p.
// Column role: Q consecutive threads share a key column j, each holding the MC = R/Q rows ii*Q + q of the block.
// Interleaved indices keep the P (or Q) addresses of one group in distinct shared-memory banks.
template <int N_, int R_, int P_>
struct Tile {
  static constexpr int N = N_, R = R_, P = P_, G = N / R;
  static constexpr int kThreads = R * P;
  static constexpr int M = N / P;
  static constexpr int Q = kThreads / N;
  static constexpr int MC = R / Q;
  // The backward's per-chunk recompute of S (CK x R x N floats) lives in shared memory when it fits, rows padded
  // so the Q rows read together by one warp fall in distinct banks; otherwise in a global scratch (stride N).
  static constexpr int kSmemRowStride = N + (Q > 1 ? 32 / Q : 0);
  static constexpr bool kSmemScratch = CK * R * kSmemRowStride * 4 <= 96 * 1024;
  static constexpr int RS = kSmemScratch ? kSmemRowStride : N;
  static_assert(N % R == 0 && N % P == 0 && kThreads % N == 0 && R % Q == 0, "tile must split the state evenly");
  static_assert(32 % P == 0 && 32 % Q == 0 && kThreads % 32 == 0, "row/column groups must sit inside one warp");
};

// Sum over W consecutive lanes (W a power of two dividing 32); every lane of the warp must call it.
template <int W> __device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int o = W / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__device__ __forceinline__ float ident(float x) { return x; }
__device__ __forceinline__ int plain(int x) { return x; }

// One thread's share of a chunk (CK tokens x W features starting at feature x0) of a [B,T,H,N] tensor, held in
// registers: loaded for the next chunk while the current one is computed, so global latency stays off the
// sequential path. Element n of the share is e = threadIdx.x + n * kThreads (coalesced); tokens past T read 0.
template <int N, int W, int kThreads, typename F>
struct ChunkShare {
  static constexpr int E = CK * W / kThreads;
  static_assert(E >= 1 && CK * W % kThreads == 0, "a chunk must split evenly over the block");
  float x[E];

  __device__ __forceinline__ void load(const F* src, int bb, int t0, int L, int h, int T, int H, int x0 = 0) {
#pragma unroll
    for (int n = 0; n < E; ++n) {
      const int e = threadIdx.x + n * kThreads, l = e / W;
      x[n] = l < L ? to_f(src[seq_off(bb, t0 + l, h, T, H, N) + x0 + e % W]) : 0.f;
    }
  }

  // dst[l * stride + at(x)] = fn(value of (l, x))
  template <class At, class Fn>
  __device__ __forceinline__ void store(float* dst, int stride, At at, Fn fn) const {
#pragma unroll
    for (int n = 0; n < E; ++n) {
      const int e = threadIdx.x + n * kThreads;
      dst[(e / W) * stride + at(e % W)] = fn(x[n]);
    }
  }
};

// Blocks may need more than the default 48 KB of dynamic shared memory (head size 128).
template <typename K> inline void allow_smem(K kernel, size_t bytes) {
  if (bytes > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
}

}  // namespace wkv
#endif  // __CUDACC__
