"""The math of the chunked state-gradient pass (the tensor-core kernels of cuda/wkv7_chunked.cuh: prep_kernel<F, true>
and state_kernel<F, true>), in float64 against autograd of the per-token oracle `wkv7_naive`.

Per chunk of 16 tokens (c = cumulative log decay, r_in = r e^c, a_ex = a e^{c - lw}, b_src = b e^-c, b_end = b
e^{c_L - c}, Mb = tril(a_ex b_src^T, -1), Pb = tril(r_in b_src^T)), walking chunks in reverse from dsT:
  W = (I - Mb)^-T b_end, Z = (I - Mb)^-T Pb^T dy   (no state involved: every chunk at once)
  G = Z + W dS^T                                    (row t: the gradient of sa_t)
  dS <- dS diag(e^{c_L}) + G^T a_ex + dy^T r_in     (the state gradient at the chunk's start)
so the pass is the forward's state pass with (W, Z, a_ex, r_in, dy) in place of (W, Z, b_end, k_end, v).
"""

from __future__ import annotations

import pytest
import torch

from infctx import ops
from infctx.ops._common import wkv7_log_decay

CK = 16


def chunk_terms(x: dict, t0: int, L: int) -> dict:
    """One head's chunk [t0, t0 + L), zero-padded to CK tokens: the pass's inputs."""
    pad = lambda t: torch.cat([t[0, t0:t0 + L, 0], t.new_zeros(CK - L, t.shape[-1])])  # noqa: E731
    lw = pad(wkv7_log_decay(x["w"]))
    cum = lw.cumsum(0)
    cL = cum[-1]
    r_in, a_ex = pad(x["r"]) * cum.exp(), pad(x["a"]) * (cum - lw).exp()
    b_src, b_end = pad(x["b"]) * (-cum).exp(), pad(x["b"]) * (cL - cum).exp()
    Mb, Pb = torch.tril(a_ex @ b_src.T, -1), torch.tril(r_in @ b_src.T)
    inv_t = torch.linalg.inv(torch.eye(CK, dtype=lw.dtype) - Mb).T
    dy = pad(x["dy"])
    return dict(W=inv_t @ b_end, Z=inv_t @ (Pb.T @ dy), a_ex=a_ex, r_in=r_in, dy=dy, total=cL.exp())


@pytest.mark.parametrize("T", [1, 16, 45, 64])
def test_chunked_state_gradient_pass_gives_ds0(T):
    g = torch.Generator().manual_seed(T)
    rnd = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * scale  # noqa: E731
    N = 8
    kappa = torch.nn.functional.normalize(rnd(1, T, 1, N), dim=-1)
    x = dict(r=rnd(1, T, 1, N, scale=0.5), w=rnd(1, T, 1, N), k=rnd(1, T, 1, N, scale=0.5), v=rnd(1, T, 1, N),
             a=-kappa, b=kappa * torch.sigmoid(rnd(1, T, 1, N)))
    s0 = rnd(1, 1, N, N, scale=0.3).requires_grad_(True)
    x["dy"], dsT = rnd(1, T, 1, N), rnd(1, 1, N, N)
    y, sT = ops.wkv7_naive(*(x[n] for n in ("r", "w", "k", "v", "a", "b")), s0)
    torch.autograd.backward([y, sT], [x["dy"], dsT])
    dS = dsT[0, 0].clone()
    for c in reversed(range(-(-T // CK))):
        p = chunk_terms(x, c * CK, min(CK, T - c * CK))
        G = p["Z"] + p["W"] @ dS.T
        dS = dS * p["total"] + G.T @ p["a_ex"] + p["dy"].T @ p["r_in"]
    assert torch.allclose(dS, s0.grad[0, 0], rtol=1e-10, atol=1e-12)
