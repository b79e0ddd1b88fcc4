// Python binding of the RWKV-6 WKV kernels (cuda/wkv6.cu): w [B,T,H,N] per-token decay logits.
#define WKV_TIME_DECAY true
#define WKV_LABEL "wkv6"
#define WKV_ENTRY(name) wkv6_##name
#include "wkv56_bind.h"
