"""Chunking helpers shared by the chunked WKV ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def to_chunks(x: Tensor, L: int) -> Tensor:
    """[B,T,H,N] -> [B,H,n,L,N], zero-padding T up to a multiple of L.

    Zero padding is neutral for every WKV op: log decay 0 (decay 1) and zero k, v, a, b leave the state unchanged.
    """
    B, T, H, N = x.shape
    n = -(-T // L)
    x = F.pad(x, (0, 0, 0, 0, 0, n * L - T))
    return x.reshape(B, n, L, H, N).permute(0, 3, 1, 2, 4)


def from_chunks(y: Tensor, T: int) -> Tensor:
    """[B,H,n,L,N] -> [B,T,H,N], dropping the padding."""
    B, H, n, L, N = y.shape
    return y.permute(0, 2, 3, 1, 4).reshape(B, n * L, H, N)[:, :T]


class ChunkDecay:
    """Decays inside chunks, from log decays lw [..., L, N] (t = query token, s = source token).

    log_upto[t]   = sum_{i<=t} lw_i     (decay from the chunk start through token t, in log)
    log_before[t] = sum_{i<t} lw_i      (decay from the chunk start up to token t, in log)
    after[s]      = exp(sum_{i>s} lw_i) (decay from after token s to the chunk end)
    total         = exp(sum_i lw_i)     (decay across the whole chunk)  [..., N]
    All exponentiated factors are <= 1.
    """

    def __init__(self, lw: Tensor) -> None:
        self.lw = lw
        self.log_upto = lw.cumsum(-2)
        self.log_before = F.pad(self.log_upto[..., :-1, :], (0, 0, 1, 0))
        self.upto = torch.exp(self.log_upto)
        self.before = torch.exp(self.log_before)
        self.after = torch.exp(F.pad(lw.flip(-2).cumsum(-2)[..., :-1, :], (0, 0, 1, 0)).flip(-2))
        self.total = self.upto[..., -1, :]

    def pairwise_before(self) -> Tensor:
        """exp(sum_{s<i<t} lw_i) for s < t, zero for s >= t: [..., L(t), L(s), N].

        Each entry sums the log decays over exactly its own token range (a running sum over t, never a
        difference of two long cumulative sums), so it is exact and <= 1 for decays of any strength.
        """
        lw, L = self.lw, self.lw.shape[-2]
        ones = torch.ones(L, L, dtype=torch.bool, device=lw.device)
        # seg[t, s] = sum_{s<i<=t} lw_i: running sum over t of lw_t kept where t > s.
        seg = torch.where(torch.tril(ones, -1)[:, :, None], lw[..., :, None, :], 0.0).cumsum(-3)
        seg = seg.masked_fill(~torch.tril(ones)[:, :, None], float("-inf"))
        return F.pad(torch.exp(seg)[..., :-1, :, :], (0, 0, 0, 0, 1, 0))  # row t takes row t-1


def pair(x: Tensor, y: Tensor, decay: Tensor) -> Tensor:
    """P[t, s] = sum_j x_tj y_sj decay[t, s, j]  for x, y [..., L, N] and decay [..., L, L, N]."""
    return torch.einsum("...tsj,...sj->...ts", x[..., :, None, :] * decay, y)
