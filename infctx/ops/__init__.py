"""WKV ops for RWKV-5/6/7 and the registry that picks an implementation by backend name.

See CONTRACTS.md: sequence tensors [B,T,H,N], state fp32 [B,H,N(value),N(key)], every op returns (y, sT).
"""

from . import registry
from .registry import get_wkv, register, resolve_backend
from .wkv6 import wkv5_naive, wkv6_naive
from .wkv7 import wkv7_naive

_NAIVE = {5: wkv5_naive, 6: wkv6_naive, 7: wkv7_naive}
for _version, _fn in _NAIVE.items():
    register(_version, "torch-naive", _fn)
    # Interim: "torch" is the naive recurrence until the chunked form lands.
    register(_version, "torch", _fn)

__all__ = ["get_wkv", "register", "registry", "resolve_backend", "wkv5_naive", "wkv6_naive", "wkv7_naive"]
