"""WKV ops for RWKV-5/6/7 and the registry that picks an implementation by backend name.

See CONTRACTS.md: sequence tensors [B,T,H,N], state fp32 [B,H,N(value),N(key)], every op returns (y, sT).
Built-in backends: "torch" (exact chunked form), "torch-naive" (per-token recurrence, the oracle) and the
optional "fla" (flash-linear-attention, when installed, on a GPU).
"""

from . import registry
from .fla_ops import fla_available, wkv5_fla, wkv6_fla, wkv7_fla
from .registry import get_wkv, register, resolve_backend
from .wkv6 import wkv5_chunked, wkv5_naive, wkv6_chunked, wkv6_naive
from .wkv7 import wkv7_chunked, wkv7_naive

for _version, _naive, _chunked, _fla in ((5, wkv5_naive, wkv5_chunked, wkv5_fla),
                                         (6, wkv6_naive, wkv6_chunked, wkv6_fla),
                                         (7, wkv7_naive, wkv7_chunked, wkv7_fla)):
    register(_version, "torch-naive", _naive)
    register(_version, "torch", _chunked)
    register(_version, "fla", _fla, available=fla_available)

__all__ = ["get_wkv", "register", "registry", "resolve_backend",
           "wkv5_chunked", "wkv5_naive", "wkv6_chunked", "wkv6_naive", "wkv7_chunked", "wkv7_naive"]
