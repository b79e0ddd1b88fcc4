// Shared helpers for the WKV kernels: element conversion, chunk length, and the launch-time error check.
#pragma once
#include <cstdint>

namespace wkv {

// Tokens per chunk: the forward saves the state every CK tokens and the backward recomputes one chunk at a time.
constexpr int CK = 16;

}  // namespace wkv

#ifdef __CUDACC__  // device helpers and the launchers' dispatch; the host-only bindings need just CK
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <torch/extension.h>

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

// E values of type F moved as whole words: vector loads and stores of E * sizeof(F) bytes (16 at a time), bf16 kept
// packed two to a 32-bit register. The address must be aligned to min(16, E * sizeof(F)) bytes.
template <typename F, int E>
struct Packed {
  static constexpr int kBytes = E * int(sizeof(F)), kWords = kBytes >= 4 ? kBytes / 4 : 1;
  uint32_t w[kWords];

  __device__ __forceinline__ void load(const F* src) {
    if constexpr (kBytes >= 16) {
#pragma unroll
      for (int u = 0; u < kWords / 4; ++u) {
        const uint4 x = reinterpret_cast<const uint4*>(src)[u];
        w[4 * u] = x.x, w[4 * u + 1] = x.y, w[4 * u + 2] = x.z, w[4 * u + 3] = x.w;
      }
    } else if constexpr (kBytes == 8) {
      const uint2 x = *reinterpret_cast<const uint2*>(src);
      w[0] = x.x, w[1] = x.y;
    } else if constexpr (kBytes == 4) {
      w[0] = *reinterpret_cast<const uint32_t*>(src);
    } else {
      w[0] = *reinterpret_cast<const unsigned short*>(src);
    }
  }
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int u = 0; u < kWords; ++u) w[u] = 0u;
  }
  __device__ __forceinline__ float get(int n) const {
    if constexpr (sizeof(F) == 4) return __uint_as_float(w[n]);
    else return __uint_as_float(n % 2 ? w[n / 2] & 0xffff0000u : w[n / 2] << 16);
  }
  __device__ __forceinline__ void set(int n, float x) {
    if constexpr (sizeof(F) == 4) {
      w[n] = __float_as_uint(x);
    } else {
      const uint32_t h = __bfloat16_as_ushort(__float2bfloat16(x));
      w[n / 2] = n % 2 ? (w[n / 2] & 0xffffu) | (h << 16) : h;
    }
  }
  __device__ __forceinline__ void store(F* dst) const {
    if constexpr (kBytes >= 16) {
#pragma unroll
      for (int u = 0; u < kWords / 4; ++u)
        reinterpret_cast<uint4*>(dst)[u] = make_uint4(w[4 * u], w[4 * u + 1], w[4 * u + 2], w[4 * u + 3]);
    } else if constexpr (kBytes == 8) {
      *reinterpret_cast<uint2*>(dst) = make_uint2(w[0], w[1]);
    } else if constexpr (kBytes == 4) {
      *reinterpret_cast<uint32_t*>(dst) = w[0];
    } else {
      *reinterpret_cast<unsigned short*>(dst) = static_cast<unsigned short>(w[0]);
    }
  }
};

// Which part of a chunk (CK tokens x W features starting at feature x0 of a [B,T,H,N] tensor) a thread moves:
// E consecutive features of one token, so that a warp reads or writes whole rows with vector accesses.
template <int W, int kThreads>
struct ChunkSpot {
  static constexpr int E = CK * W / kThreads, kPerToken = W / E;
  static_assert(E >= 1 && CK * W % kThreads == 0 && W % E == 0, "a chunk must split evenly over the block");
  __device__ __forceinline__ static int token() { return threadIdx.x / kPerToken; }
  __device__ __forceinline__ static int feature() { return threadIdx.x % kPerToken * E; }
};

// One thread's share of a chunk of a [B,T,H,N] tensor (ChunkSpot), held in registers: loaded for the next chunk
// while the current one is computed, so global latency stays off the sequential path; tokens past T read 0.
template <int N, int W, int kThreads, typename F>
struct ChunkShare {
  using Spot = ChunkSpot<W, kThreads>;
  static constexpr int E = Spot::E;
  Packed<F, E> x;

  __device__ __forceinline__ void load(const F* src, int bb, int t0, int L, int h, int T, int H, int x0 = 0) {
    const int l = Spot::token();
    if (l < L) x.load(src + seq_off(bb, t0 + l, h, T, H, N) + x0 + Spot::feature());
    else x.zero();
  }

  // dst[l * stride + at(f)] = fn(value of (l, f)); `at` must map E consecutive features to consecutive places.
  template <class At, class Fn>
  __device__ __forceinline__ void store(float* dst, int stride, At at, Fn fn) const {
    store_at(dst, stride, at, [&](float v, int) { return fn(v); });
  }
  // As store, with fn(value, place) also given the place it writes, to read a same-layout array there.
  template <class At, class Fn>
  __device__ __forceinline__ void store_at(float* dst, int stride, At at, Fn fn) const {
    const int base = Spot::token() * stride + at(Spot::feature());
#pragma unroll
    for (int n = 0; n < E; ++n) dst[base + n] = fn(x.get(n), base + n);
  }
};

// Writes this thread's share of a chunk's output rows (tokens < L) to a [B,T,H,N] tensor: value(l, f) for its
// token l and E features f (ChunkSpot), with vector stores.
template <int N, int W, int kThreads, typename F, class Val>
__device__ __forceinline__ void write_chunk(F* dst, int bb, int t0, int L, int h, int T, int H, int x0, Val value) {
  using Spot = ChunkSpot<W, kThreads>;
  const int l = Spot::token(), f = Spot::feature();
  if (l >= L) return;
  Packed<F, Spot::E> out;
#pragma unroll
  for (int n = 0; n < Spot::E; ++n) out.set(n, value(l, f + n));
  out.store(dst + seq_off(bb, t0 + l, h, T, H, N) + x0 + f);
}

// Blocks may need more than the default 48 KB of dynamic shared memory (head size 128).
template <typename K> inline void allow_smem(K kernel, size_t bytes) {
  if (bytes > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
}

// Calls f(__nv_bfloat16{}) or f(float{}) by t's dtype (the bindings accept only these two), so that every launcher
// names its element type once: `with_element(r, [&](auto e) { launch<decltype(e)>(...); })`.
template <class Fn> void with_element(const torch::Tensor& t, Fn&& f) {
  if (t.scalar_type() == at::kBFloat16)
    f(__nv_bfloat16{});
  else
    f(float{});
}

}  // namespace wkv
#endif  // __CUDACC__
