"""RWKV-7 WKV op in pure PyTorch: a per-token oracle and an exact chunked form.

S_t = S_{t-1} diag(d_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T ;  y_t = S_t r_t ;  d_t = exp(-e^-0.5 sigmoid(w_t)).
State layout S[b, h, value, key], fp32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import check_seq, compute_dtype, initial_state, wkv7_log_decay


def wkv7_naive(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
               s0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Token-by-token recurrence, written to be obviously right; the reference for everything else."""
    for name, t in (("w", w), ("k", k), ("v", v), ("a", a), ("b", b)):
        check_seq(name, t, r)
    out_dtype, dt = r.dtype, compute_dtype(r, w, k, v, a, b, s0)
    r, k, v, a, b = (x.to(dt) for x in (r, k, v, a, b))
    decay = torch.exp(wkv7_log_decay(w.to(dt)))
    S = initial_state(s0, r, dt)
    ys = []
    for t in range(r.shape[1]):
        Sa = torch.einsum("bhij,bhj->bhi", S, a[:, t])
        S = (S * decay[:, t, :, None, :]
             + Sa[..., :, None] * b[:, t, :, None, :]
             + v[:, t, :, :, None] * k[:, t, :, None, :])
        ys.append(torch.einsum("bhij,bhj->bhi", S, r[:, t]))
    y = torch.stack(ys, dim=1) if ys else r.new_zeros(r.shape)
    return y.to(out_dtype), S
