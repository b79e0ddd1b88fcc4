"""Chunking helpers shared by the chunked WKV ops.

Inside a chunk of L tokens every decay product is formed from sums of log decays over the exact token
range it spans (never as a difference of two long cumulative sums), so each factor is exp(<=0) <= 1:
nothing overflows and strong decays lose no precision. Pairwise factors cost O(L^2 N) per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    return x.view(B, n, L, H, N).permute(0, 3, 1, 2, 4)


def from_chunks(y: Tensor, T: int) -> Tensor:
    """[B,H,n,L,N] -> [B,T,H,N], dropping the padding."""
    B, H, n, L, N = y.shape
    return y.permute(0, 2, 3, 1, 4).reshape(B, n * L, H, N)[:, :T]


@dataclass
class ChunkDecay:
    """Decay factors of one chunk (all <= 1), from log decays lw [..., L, N]; t = query token, s = source token.

    upto:   exp(sum_{i<=t} lw_i)            decay from the chunk start through token t     [..., L, N]
    before: exp(sum_{i<t} lw_i)             decay from the chunk start up to token t       [..., L, N]
    after:  exp(sum_{i>s} lw_i)             decay from after token s to the chunk end      [..., L, N]
    total:  exp(sum_i lw_i)                 decay across the whole chunk                   [..., N]
    incl:   exp(sum_{s<i<=t} lw_i), s <= t  (zero for s > t)                               [..., L, L, N]
    excl:   exp(sum_{s<i<t} lw_i),  s < t   (zero for s >= t)                              [..., L, L, N]
    """

    upto: Tensor
    before: Tensor
    after: Tensor
    total: Tensor
    incl: Tensor
    excl: Tensor

    @classmethod
    def of(cls, lw: Tensor) -> "ChunkDecay":
        L = lw.shape[-2]
        c = lw.cumsum(-2)
        before = F.pad(c[..., :-1, :], (0, 0, 1, 0))
        after = F.pad(lw.flip(-2).cumsum(-2)[..., :-1, :], (0, 0, 1, 0)).flip(-2)
        ones = torch.ones(L, L, dtype=torch.bool, device=lw.device)
        strict = torch.tril(ones, -1)[:, :, None]  # [t, s, 1]: s < t
        # seg[t, s] = sum_{s<i<=t} lw_i, built by a running sum over t of lw_t masked to t > s.
        seg = torch.where(strict, lw[..., :, None, :], 0.0).cumsum(-3)
        seg = seg.masked_fill(~torch.tril(ones)[:, :, None], float("-inf"))
        incl = torch.exp(seg)
        excl = F.pad(incl[..., :-1, :, :], (0, 0, 0, 0, 1, 0))  # excl[t] = incl[t-1], row 0 empty
        return cls(torch.exp(c), torch.exp(before), torch.exp(after), torch.exp(c[..., -1, :]), incl, excl)


def pair(x: Tensor, y: Tensor, decay: Tensor) -> Tensor:
    """P[t, s] = sum_j x_tj y_sj decay[t, s, j]  for x, y [..., L, N] and decay [..., L, L, N]."""
    return torch.einsum("...tj,...sj,...tsj->...ts", x, y, decay)
