"""Optional backend "fla": flash-linear-attention's Triton chunk kernels behind our op contract.

fla takes log decays (we convert the raw logits with the model's own formula) and keeps its state as
[B,H,key,value], the transpose of ours. It needs `pip install fla-core` and a CUDA GPU.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from ._common import wkv6_log_decay, wkv7_log_decay
from .wkv6 import _time_constant


def fla_available(head_size: int = 64) -> str | None:
    """None when fla can run here, else why not."""
    if importlib.util.find_spec("fla") is None:
        return "flash-linear-attention is not installed (pip install fla-core)"
    if not torch.cuda.is_available():
        return "fla's Triton kernels need a CUDA GPU"
    return None


def _fla_state(s0: Tensor | None) -> Tensor | None:
    return None if s0 is None else s0.float().mT.contiguous()


def wkv7_fla(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
             s0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """RWKV-7 through fla's chunk_rwkv7 (same recurrence: S_t = S_{t-1}(diag(d_t) + a_t b_t^T) + v_t k_t^T)."""
    from fla.ops.rwkv7 import chunk_rwkv7

    y, sT = chunk_rwkv7(r=r, w=wkv7_log_decay(w.float()).to(r.dtype), k=k, v=v, a=a, b=b, scale=1.0,
                        initial_state=_fla_state(s0), output_final_state=True)
    return y, sT.mT


def wkv6_fla(r: Tensor, w: Tensor, k: Tensor, v: Tensor, u: Tensor,
             s0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """RWKV-6 through fla's chunk_rwkv6 (scale 1: RWKV applies no 1/sqrt(N))."""
    from fla.ops.rwkv6 import chunk_rwkv6

    y, sT = chunk_rwkv6(r=r, k=k, v=v, w=wkv6_log_decay(w.float()).to(r.dtype), u=u.to(r.dtype), scale=1.0,
                        initial_state=_fla_state(s0), output_final_state=True)
    return y, sT.mT


def wkv5_fla(r: Tensor, w: Tensor, k: Tensor, v: Tensor, u: Tensor,
             s0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """wkv6_fla with the time-constant decay w [H,N]."""
    return wkv6_fla(r, _time_constant(w, r), k, v, u, s0)
