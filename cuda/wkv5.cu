// RWKV-5 WKV: decay w [H,N] constant over time. The kernels live in wkv56_kernels.cuh (shared with RWKV-6).
#define WKV_TIME_DECAY false
#include "wkv56_kernels.cuh"
WKV56_DEFINE_ENTRY_POINTS(wkv5_forward_cuda, wkv5_backward_cuda)
