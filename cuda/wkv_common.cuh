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

// Blocks may need more than the default 48 KB of dynamic shared memory (head size 128).
template <typename K> inline void allow_smem(K kernel, size_t bytes) {
  if (bytes > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
}

}  // namespace wkv
#endif  // __CUDACC__
