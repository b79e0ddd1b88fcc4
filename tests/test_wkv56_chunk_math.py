"""The math of the chunk-parallel RWKV-5/6 CUDA kernels (cuda/wkv56_chunked.cuh), mirrored step by step in
float64 PyTorch and checked against autograd through the per-token oracle `wkv6_naive`.

The kernels split T into chunks of 16 and run three passes each way: per-chunk outer products (the chunk's own state
contribution, or in the backward its own contribution to the incoming state gradient), a scan over chunks that
passes the state forward (or its gradient backward), and per-chunk outputs / gradients from the chunk's start
state and end-state gradient. The backward formulas, in particular the log-decay gradient as a sum of four
kinds of terms that each carry their own decay, are derived by hand; this test is what proves them,
independently of any GPU.
"""

from __future__ import annotations

import pytest
import torch

from infctx import ops
from infctx.ops._common import rel_rms

C = 16  # tokens per chunk, as in the kernel
MIN_LOG_DECAY = -22.0  # the kernel's floor of the per-token log-decay (kMinLogDecay)


def log_decay(w, floor=MIN_LOG_DECAY):
    """The kernel's log-decay: -exp(w), floored (a decay below e^-22 acts as e^-22). The float64 algebra tests pass
    floor=-inf: the floor moves the op by up to e^-22 ~ 3e-10, above their 1e-10 tolerance."""
    return (-w.exp()).clamp(min=floor)


def decay_grad(dlw, w, floor=MIN_LOG_DECAY):
    """dw from dlw: d(-exp(w))/dw = -exp(w) above the floor, 0 below it."""
    lw = -w.exp()
    return torch.where(lw > floor, dlw * lw, torch.zeros_like(dlw))


def chunk_views(x, T):
    """[B,T,H,N] -> [B,H,nc,C,N], zero-padded at the end like the kernel's out-of-range loads."""
    B, _, H, N = x.shape
    nc = -(-T // C)
    x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, nc * C - T))
    return x.view(B, nc, C, H, N).permute(0, 3, 1, 2, 4)


def cum_decay(lw):
    """Bx[..., t, :] = sum_{s<t} lw_s for t = 0..C (exclusive prefix sums, C+1 rows)."""
    zero = torch.zeros_like(lw[..., :1, :])
    return torch.cat([zero, lw.cumsum(-2)], dim=-2)


def pair_decay(Bx):
    """E[t, s, j] = exp(Bx_t - Bx_{s+1}) for s < t (every factor <= 1), zero elsewhere."""
    diff = Bx[..., :C, None, :] - Bx[..., None, 1:, :]
    mask = torch.ones(C, C, dtype=torch.bool).tril(-1)[..., None]
    return torch.where(mask, diff, torch.full_like(diff, -torch.inf)).exp()


def kernel_forward(r, lw, k, v, u, s0):
    T = r.shape[1]
    r, lw, k, v = (chunk_views(x, T) for x in (r, lw, k, v))
    Bx = cum_decay(lw)
    Bt = Bx[..., C, :]
    ktil = k * torch.exp(Bt[..., None, :] - Bx[..., 1:, :])            # pass 1: chunk's own state contribution
    dS = v.mT @ ktil                                                   # [B,H,nc,N(value),N(key)]
    starts, S = [], s0
    for c in range(r.shape[2]):                                        # pass 2: scan
        starts.append(S)
        S = S * Bt[:, :, c, None, :].exp() + dS[:, :, c]
    S_start = torch.stack(starts, dim=2)
    E = pair_decay(Bx)                                                 # pass 3: outputs
    A = torch.einsum("...tj,...sj,...tsj->...ts", r, k, E) + torch.diag_embed((u[:, None, None] * r * k).sum(-1))
    y = (r * Bx[..., :C, :].exp()) @ S_start.mT + A @ v
    return y, S, S_start


def kernel_backward(r, lw, k, v, u, s0, dy, dsT):
    T = r.shape[1]
    _, _, S_start = kernel_forward(r, lw, k, v, u, s0)
    r, lw, k, v, dy = (chunk_views(x, T) for x in (r, lw, k, v, dy))
    nc = r.shape[2]
    Bx = cum_decay(lw)
    Bt = Bx[..., C, :]
    ddS = dy.mT @ (r * Bx[..., :C, :].exp())                           # pass 1: chunk's own part of dS_start
    ends, dS = [None] * nc, dsT
    for c in reversed(range(nc)):                                      # pass 2: reverse scan
        ends[c] = dS
        dS = dS * Bt[:, :, c, None, :].exp() + ddS[:, :, c]
    ds0, dS_end = dS, torch.stack(ends, dim=2)

    E = pair_decay(Bx)                                                 # pass 3: per-chunk gradients
    uu = u[:, None, None]
    G = dy @ v.mT                                                      # G[t, s] = dy_t . v_s
    Gd = torch.diagonal(G, dim1=-2, dim2=-1)[..., None]
    A = torch.einsum("...tj,...sj,...tsj->...ts", r, k, E) + torch.diag_embed((uu * r * k).sum(-1))
    to_end = torch.exp(Bt[..., None, :] - Bx[..., 1:, :])
    dv = A.mT @ dy + (k * to_end) @ dS_end.mT
    dk_free = torch.einsum("...ts,...tj,...tsj->...sj", G, r, E) + to_end * (v @ dS_end)
    dr_free = torch.einsum("...ts,...sj,...tsj->...tj", G, k, E) + Bx[..., :C, :].exp() * (dy @ S_start)
    dr, dk = dr_free + uu * k * Gd, dk_free + uu * r * Gd
    du = (r * k * Gd).sum((0, 2, 3))
    # dlw from terms that each carry their own decay (no cancellation when a decay is ~0), as the kernel does
    r_in = r * Bx[..., :C, :].exp() * (dy @ S_start)                  # r_t e^{Bx_t} (S^T dy_t)
    k_end = k * to_end * (v @ dS_end)                                  # k_s e^{Bt - Bx_{s+1}} (dS_end^T v_s)
    whole = Bt.exp() * (S_start * dS_end).sum(-2)                      # S_start decays through the whole chunk
    M = G[..., None] * r[..., :, None, :] * k[..., None, :, :] * E     # M[t, s'] = G r_t k_s' e^{Bx_t - Bx_{s'+1}}
    idx = torch.arange(C)
    later = (idx[:, None] > idx).to(r.dtype)                          # later[t, s] = t > s
    earlier = (idx[:, None] < idx).to(r.dtype)                        # earlier[s', s] = s' < s
    dlw = (torch.einsum("ts,...tj->...sj", later, r_in) + torch.einsum("qs,...qj->...sj", earlier, k_end)
           + whole[..., None, :] + torch.einsum("...tqj,ts,qs->...sj", M, later, earlier))
    back = lambda x: x.permute(0, 2, 3, 1, 4).reshape(x.shape[0], -1, x.shape[1], x.shape[-1])[:, :T]  # noqa: E731
    return [back(x) for x in (dr, dlw, dk, dv)] + [du, ds0]


@pytest.mark.parametrize("T", [1, 16, 37, 64])
def test_chunk_kernel_math_matches_autograd_of_the_oracle(T):
    g = torch.Generator().manual_seed(T)
    B, H, N = 2, 2, 8
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale)  # noqa: E731
    r, k, v = rnd(B, T, H, N, scale=0.5), rnd(B, T, H, N, scale=0.5), rnd(B, T, H, N)
    w = rnd(B, T, H, N) - 0.5
    w[..., : N // 2] += 2.5                                            # strong decays: exp(-e^3) per token
    u, s0 = rnd(H, N, scale=0.5), rnd(B, H, N, N, scale=0.3)
    dy, dsT = rnd(B, T, H, N), rnd(B, H, N, N)

    leaves = [x.clone().requires_grad_() for x in (r, w, k, v, u, s0)]
    y_ref, sT_ref = ops.wkv6_naive(*leaves)
    torch.autograd.backward([y_ref, sT_ref], [dy, dsT])

    lw = log_decay(w, floor=-torch.inf)
    y, sT, _ = kernel_forward(r, lw, k, v, u, s0)
    y = y.permute(0, 2, 3, 1, 4).reshape(B, -1, H, N)[:, :T]
    torch.testing.assert_close(y, y_ref.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sT, sT_ref.detach(), rtol=1e-10, atol=1e-10)

    dr, dlw, dk, dv, du, ds0 = kernel_backward(r, lw, k, v, u, s0, dy, dsT)
    dw = decay_grad(dlw, w, floor=-torch.inf)
    for name, got, leaf in zip("r w k v u s0".split(), (dr, dw, dk, dv, du, ds0), leaves):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-9, atol=1e-9, msg=lambda m, n=name: f"d{n}: {m}")


def test_decay_gradient_has_no_cancellation_in_fp32():
    """Decays of ~1 (w = -8) and ~2e-9 (w = +3) per token: the true dw is tiny at both ends. The mirror run in
    fp32 must still match float64 autograd to 1e-5 (a reverse sum of r*dr - k*dk, the textbook identity, cancels
    O(1) terms and misses by ~1e-3 here: measured on the H200 with the first version of the kernel)."""
    g = torch.Generator().manual_seed(5)
    B, T, H, N = 2, 50, 2, 16
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale)  # noqa: E731
    r, k, v = rnd(B, T, H, N, scale=0.5), rnd(B, T, H, N, scale=0.5), rnd(B, T, H, N)
    w = torch.where(torch.rand(B, T, H, N, generator=g, dtype=torch.float64) < 0.5, -8.0, 3.0)
    u, s0 = rnd(H, N, scale=0.5), rnd(B, H, N, N, scale=0.3)
    dy, dsT = rnd(B, T, H, N), rnd(B, H, N, N)
    leaves = [x.clone().requires_grad_() for x in (r, w, k, v, u, s0)]
    torch.autograd.backward(list(ops.wkv6_naive(*leaves)), [dy, dsT])
    f32 = [x.float() for x in (r, log_decay(w), k, v, u, s0, dy, dsT)]
    _, dlw, *_ = kernel_backward(*f32)
    dw = decay_grad(dlw.double(), w)
    rel = rel_rms(dw, leaves[1].grad)
    assert rel <= 1e-5, rel


@pytest.mark.parametrize("big", [8.0, 100.0])
def test_floored_log_decay_keeps_fp32_exact_and_finite(big):
    """One near-zero decay per chunk (w = 8: log-decay -2981; w = 100: -exp(w) overflows fp32 to -inf) among slow
    ones (w = -7): without the floor the fp32 prefix sums lose ~1e-4 (w = 8, differences of two large sums) or give
    inf - inf = NaN (w = 100); with it, y and every gradient stay within 1e-5 of float64 autograd of the unfloored op
    (what passes through such a token is scaled by <= e^-22 either way)."""
    g = torch.Generator().manual_seed(2)
    B, T, H, N = 1, 64, 2, 16
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale)  # noqa: E731
    r, k, v = rnd(B, T, H, N, scale=0.5), rnd(B, T, H, N, scale=0.5), rnd(B, T, H, N)
    w = torch.full((B, T, H, N), -7.0, dtype=torch.float64)
    w[:, 3::C] = big
    u, s0 = rnd(H, N, scale=0.5), rnd(B, H, N, N, scale=0.3)
    dy, dsT = rnd(B, T, H, N), rnd(B, H, N, N)
    leaves = [x.clone().requires_grad_() for x in (r, w, k, v, u, s0)]
    y_ref, sT_ref = ops.wkv6_naive(*leaves)
    torch.autograd.backward([y_ref, sT_ref], [dy, dsT])
    f32 = [x.float() for x in (r, log_decay(w), k, v, u, s0)]
    y, sT, _ = kernel_forward(*f32)
    y = y.permute(0, 2, 3, 1, 4).reshape(B, -1, H, N)[:, :T]
    dr, dlw, dk, dv, du, ds0 = kernel_backward(*f32, dy.float(), dsT.float())
    got = dict(y=y, sT=sT, dr=dr, dw=decay_grad(dlw.double(), w), dk=dk, dv=dv, du=du, ds0=ds0)
    ref = dict(y=y_ref, sT=sT_ref, **{f"d{n}": x.grad for n, x in zip("r w k v u s0".split(), leaves)})
    errors = {name: rel_rms(got[name], ref[name].detach()) for name in got}
    assert max(errors.values()) <= 1e-5, errors
