// RWKV-6 WKV: per-token decay w [B,T,H,N]. The kernels live in wkv56_kernels.cuh (shared with RWKV-5).
#define WKV_TIME_DECAY true
#include "wkv56_kernels.cuh"
WKV56_DEFINE_ENTRY_POINTS(wkv6_forward_cuda, wkv6_backward_cuda)
