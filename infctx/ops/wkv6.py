"""RWKV-6 and RWKV-5 WKV ops in pure PyTorch: a per-token oracle and an exact chunked form.

y_t = S_{t-1} r_t + v_t * sum_j(u_j k_tj r_tj) ;  S_t = S_{t-1} diag(d_t) + v_t k_t^T ;  d_t = exp(-exp(w_t)).
RWKV-5 is the same op with a decay that is constant over time (w [H,N]), so wkv5 broadcasts w and delegates.
State layout S[b, h, value, key], fp32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._chunk import ChunkDecay, from_chunks, pair, to_chunks
from ._common import check_seq, compute_dtype, initial_state, wkv6_log_decay


def _check_u(u: Tensor, r: Tensor) -> None:
    if u.shape != r.shape[2:]:
        raise ValueError(f"wkv: u has shape {tuple(u.shape)}, expected [H,N] = {tuple(r.shape[2:])}")


def wkv6_naive(r: Tensor, w: Tensor, k: Tensor, v: Tensor, u: Tensor,
               s0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Token-by-token recurrence, written to be obviously right; the reference for everything else."""
    for name, t in (("w", w), ("k", k), ("v", v)):
        check_seq(name, t, r)
    _check_u(u, r)
    out_dtype, dt = r.dtype, compute_dtype(r, w, k, v, u, s0)
    r, k, v, u = (x.to(dt) for x in (r, k, v, u))
    decay = torch.exp(wkv6_log_decay(w.to(dt)))
    S = initial_state(s0, r, dt)
    ys = []
    for t in range(r.shape[1]):
        bonus = (u * k[:, t] * r[:, t]).sum(-1, keepdim=True)
        ys.append(torch.einsum("bhij,bhj->bhi", S, r[:, t]) + v[:, t] * bonus)
        S = S * decay[:, t, :, None, :] + v[:, t, :, :, None] * k[:, t, :, None, :]
    y = torch.stack(ys, dim=1) if ys else r.new_zeros(r.shape, dtype=dt)
    return y.to(out_dtype), S


def wkv6_chunked(r: Tensor, w: Tensor, k: Tensor, v: Tensor, u: Tensor,
                 s0: Tensor | None = None, chunk_len: int = 8) -> tuple[Tensor, Tensor]:
    """Exact chunked form of `wkv6_naive`, differentiable by plain autograd.

    Within a chunk, with the decay factors of `ChunkDecay` (D = pairwise_before),
        y_t = S_0 (before_t * r_t) + sum_{s<t} v_s (sum_j r_tj k_sj D[t,s,j]) + v_t sum_j(u_j k_tj r_tj),
        S_L = S_0 diag(total) + sum_s v_s (after_s * k_s)^T,
    so only the chunk-to-chunk state update is sequential. The decay exp(-exp(w)) has no lower bound, so the
    in-chunk factors are formed pairwise (each <= 1) rather than as a ratio of cumulative decays that could overflow.
    """
    for name, t in (("w", w), ("k", k), ("v", v)):
        check_seq(name, t, r)
    _check_u(u, r)
    B, T, H, N = r.shape
    out_dtype, dt = r.dtype, compute_dtype(r, w, k, v, u, s0)
    S = initial_state(s0, r, dt)
    if T == 0:
        return r.new_zeros(r.shape), S
    lw = wkv6_log_decay(w.to(dt))
    r, lw, k, v = (to_chunks(x.to(dt), chunk_len) for x in (r, lw, k, v))
    d = ChunkDecay(lw)
    u = u.to(dt)[None, :, None, None, :]                               # [1,H,1,1,N]

    Q = pair(r, k, d.pairwise_before()) + torch.diag_embed((u * k * r).sum(-1))  # causal part + bonus diagonal
    C = v.mT @ (k * d.after)                                           # chunk's own contribution to S_L
    starts = []
    for total_i, C_i in zip(d.total.unbind(2), C.unbind(2)):
        starts.append(S)
        S = S * total_i[:, :, None, :] + C_i
    S0t = torch.stack(starts, dim=2).transpose(-1, -2)
    y = (r * d.before) @ S0t + Q @ v
    return from_chunks(y, T).to(out_dtype), S


def _time_constant(w: Tensor, r: Tensor) -> Tensor:
    """Broadcast the RWKV-5 decay w [H,N] over batch and time."""
    if w.shape != r.shape[2:]:
        raise ValueError(f"wkv5: w has shape {tuple(w.shape)}, expected [H,N] = {tuple(r.shape[2:])}")
    return w.expand(r.shape)


def wkv5_naive(r: Tensor, w: Tensor, k: Tensor, v: Tensor, u: Tensor,
               s0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """wkv6_naive with the time-constant decay w [H,N]."""
    return wkv6_naive(r, _time_constant(w, r), k, v, u, s0)


def wkv5_chunked(r: Tensor, w: Tensor, k: Tensor, v: Tensor, u: Tensor,
                 s0: Tensor | None = None, chunk_len: int = 8) -> tuple[Tensor, Tensor]:
    """wkv6_chunked with the time-constant decay w [H,N]."""
    return wkv6_chunked(r, _time_constant(w, r), k, v, u, s0, chunk_len)
