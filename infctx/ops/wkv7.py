"""RWKV-7 WKV op in pure PyTorch: a per-token oracle and an exact chunked form.

S_t = S_{t-1} diag(d_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T ;  y_t = S_t r_t ;  d_t = exp(-e^-0.5 sigmoid(w_t)).
State layout S[b, h, value, key], fp32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._chunk import ChunkDecay, from_chunks, to_chunks
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


def wkv7_chunked(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
                 s0: Tensor | None = None, chunk_len: int = 32) -> tuple[Tensor, Tensor]:
    """Exact chunked form of `wkv7_naive`, differentiable by plain autograd.

    Within a chunk, with u_t := S_{t-1} a_t and c_t := sum_{i<=t} log d_i,
        S_t = S_0 diag(e^{c_t}) + sum_{s<=t} (u_s b_s^T + v_s k_s^T) diag(e^{c_t - c_s}),
    so U solves the unit lower-triangular system (I - M_b) U = X + M_k V with
    M_x[t,s] = sum_j a_tj x_sj e^{c_{t-1,j} - c_{s,j}} (s < t) and X_t = S_0 (e^{c_{t-1}} * a_t).
    Splitting U = W S_0^T + Z leaves only the chunk-to-chunk state update sequential.

    The pairwise factors are products e^{c_t - ref} e^{ref - c_s} around a mid-chunk reference, i.e. plain
    matmuls. That is exact and safe because RWKV-7's log decay is bounded, -e^-0.5 < log d <= 0, so no factor
    exceeds e^{0.61 * chunk_len / 2} (1.6e4 for 32).
    """
    for name, t in (("w", w), ("k", k), ("v", v), ("a", a), ("b", b)):
        check_seq(name, t, r)
    B, T, H, N = r.shape
    out_dtype, dt = r.dtype, compute_dtype(r, w, k, v, a, b, s0)
    S = initial_state(s0, r, dt)
    if T == 0:
        return r.new_zeros(r.shape), S
    lw = wkv7_log_decay(w.to(dt))
    r, lw, k, v, a, b = (to_chunks(x.to(dt), chunk_len) for x in (r, lw, k, v, a, b))
    d = ChunkDecay(lw)
    L = r.shape[-2]
    ref = d.log_upto[..., L // 2 : L // 2 + 1, :].detach()               # cancels exactly; no gradient needed
    src = torch.exp(ref - d.log_upto)                                  # source side e^{ref - c_s}
    r_in, a_ex = r * torch.exp(d.log_upto - ref), a * torch.exp(d.log_before - ref)
    b_src, k_src = b * src, k * src
    eye = torch.eye(L, dtype=dt, device=r.device)

    tri = eye - (a_ex @ b_src.mT).tril(-1)                             # I - M_b
    rhs = torch.cat([a * d.before, (a_ex @ k_src.mT).tril(-1) @ v], dim=-1)  # [X's S_0 factor | M_k V]
    W, Z = torch.linalg.solve_triangular(tri, rhs, upper=False, unitriangular=True).split(N, dim=-1)
    b_end, k_end = b * d.after, k * d.after
    # Chunk transition S' = S A + C, from S' = S diag(total) + U^T b_end + V^T k_end and U = W S^T + Z.
    A = torch.diag_embed(d.total) + W.mT @ b_end
    C = Z.mT @ b_end + v.mT @ k_end

    starts = []
    for A_i, C_i in zip(A.unbind(2), C.unbind(2)):
        starts.append(S)
        S = S @ A_i + C_i
    S0t = torch.stack(starts, dim=2).mT                                # chunk-start states, transposed
    U = W @ S0t + Z
    y = (r * d.upto) @ S0t + (r_in @ b_src.mT).tril() @ U + (r_in @ k_src.mT).tril() @ v
    return from_chunks(y, T).to(out_dtype), S
