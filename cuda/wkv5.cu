// RWKV-5 WKV: decay w [H,N] constant over time. The kernels live in wkv56_kernels.cuh (sequential) and
// wkv56_chunked.cuh (chunk-parallel), shared with RWKV-6.
#define WKV_TIME_DECAY false
#include "wkv56_kernels.cuh"
#include "wkv56_chunked.cuh"
WKV56_DEFINE_ENTRY_POINTS(wkv5_forward_cuda, wkv5_backward_cuda)
WKV56_DEFINE_CHUNKED_ENTRY_POINTS(wkv5_forward_chunked_cuda, wkv5_backward_chunked_cuda)
