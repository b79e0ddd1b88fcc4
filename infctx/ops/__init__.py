"""WKV ops for RWKV-5/6/7 and the registry that picks an implementation by backend name.

See CONTRACTS.md: sequence tensors [B,T,H,N], state fp32 [B,H,N(value),N(key)], every op returns (y, sT).
Built-in backends: "torch" (exact chunked form) and "torch-naive" (per-token recurrence, the oracle).
"""

from . import registry
from .registry import get_wkv, register, resolve_backend
from .wkv6 import wkv5_chunked, wkv5_naive, wkv6_chunked, wkv6_naive
from .wkv7 import wkv7_chunked, wkv7_naive

for _version, _naive, _chunked in ((5, wkv5_naive, wkv5_chunked), (6, wkv6_naive, wkv6_chunked),
                                   (7, wkv7_naive, wkv7_chunked)):
    register(_version, "torch-naive", _naive)
    register(_version, "torch", _chunked)

__all__ = ["get_wkv", "register", "registry", "resolve_backend",
           "wkv5_chunked", "wkv5_naive", "wkv6_chunked", "wkv6_naive", "wkv7_chunked", "wkv7_naive"]
