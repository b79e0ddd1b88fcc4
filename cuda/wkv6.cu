// RWKV-6 WKV: per-token decay w [B,T,H,N]. The kernels live in wkv56_kernels.cuh (sequential) and
// wkv56_chunked.cuh (chunk-parallel), shared with RWKV-5.
#define WKV_TIME_DECAY true
#include "wkv56_kernels.cuh"
#include "wkv56_chunked.cuh"
WKV56_DEFINE_ENTRY_POINTS(wkv6_forward_cuda, wkv6_backward_cuda)
WKV56_DEFINE_CHUNKED_ENTRY_POINTS(wkv6_forward_chunked_cuda, wkv6_backward_chunked_cuda)
