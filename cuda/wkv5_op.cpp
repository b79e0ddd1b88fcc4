// Python binding of the RWKV-5 WKV kernels (cuda/wkv5.cu): w [H,N] decay logits constant over time.
#define WKV_TIME_DECAY false
#define WKV_LABEL "wkv5"
#define WKV_ENTRY(name) wkv5_##name
#include "wkv56_bind.h"
