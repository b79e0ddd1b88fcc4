"""The span decomposition behind the CUDA wkv7 path for long sequences with few heads (cuda_wkv._WKV7Spans),
mirrored step by step in float64 with the per-token oracle `wkv7_naive` standing in for the CUDA kernels, and
checked against autograd of the oracle over the whole sequence.

The sequence is cut into spans of L tokens, and every span becomes one batch row of the ordinary kernels:
- transfer: from S = 0 the span gives its own state U_c; from S = I with v = 0, its transition P_c (S_end =
  S_start P_c + U_c) and q_t = P_{<=t} r_t, so that y_t = S_start q_t + (the U-run's y_t);
- scan: S_{c+1} = S_c P_c + U_c, span by span (only N x N matrix products, no per-token work);
- the ordinary forward on every span at once, from its S_c;
- backward: the gradient at span starts runs back as G_c = G_{c+1} P_c^T + sum_t dy_t q_t^T (G_ns = dsT), and the
  ordinary backward runs on every span at once with G_{c+1} as its incoming state gradient.
The last test runs cuda_wkv._WKV7Spans itself on CPU over a PyTorch stand-in of the extension, so that its views
and buffer plumbing are checked without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from infctx import ops
from infctx.ops._common import wkv7_log_decay


def spans(x, L):
    """[B,T,H,...] -> [B*ns, L, H, ...]: every span a batch row (a view, as in the CUDA path)."""
    return x.reshape(x.shape[0] * (x.shape[1] // L), L, *x.shape[2:])


def span_forward(r, w, k, v, a, b, s0, L):
    B, T, H, N = r.shape
    ns = T // L
    seq = [spans(x, L) for x in (r, w, k, v, a, b)]
    _, U = ops.wkv7_naive(*seq, torch.zeros(B * ns, H, N, N, dtype=r.dtype))
    eye = torch.eye(N, dtype=r.dtype).expand(B * ns, H, N, N)
    q, P = ops.wkv7_naive(*seq[:3], torch.zeros_like(seq[3]), *seq[4:], eye)
    U, P = U.view(B, ns, H, N, N), P.view(B, ns, H, N, N)
    starts = torch.empty_like(U)
    S = TorchSpanExtension.span_scan(s0, P, U, starts)
    y, ends = ops.wkv7_naive(*seq, starts.reshape(B * ns, H, N, N))
    return y.reshape(B, T, H, N), ends.view(B, ns, H, N, N), S, starts, P, q.reshape(B, T, H, N)


def span_backward(r, w, k, v, a, b, s0, dy, dsT, L):
    B, T, H, N = r.shape
    ns = T // L
    *_, starts, P, q = span_forward(r, w, k, v, a, b, s0, L)
    ends = torch.empty_like(P)
    G = TorchSpanExtension.span_scan_back(dsT, P, q, dy, ends)
    leaves = [spans(x, L).clone().requires_grad_() for x in (r, w, k, v, a, b)]
    start = starts.reshape(B * ns, H, N, N).clone().requires_grad_()
    y, sT = ops.wkv7_naive(*leaves, start)
    torch.autograd.backward([y, sT], [spans(dy, L), ends.reshape(B * ns, H, N, N)])
    grads = [x.grad.reshape(B, T, H, N) for x in leaves]
    return grads, start.grad.view(B, ns, H, N, N)[:, 0], G


def inputs(B, T, H, N, seed):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * scale  # noqa: E731
    kappa = torch.nn.functional.normalize(rnd(B, T, H, N), dim=-1)
    return dict(r=rnd(B, T, H, N, scale=0.5), w=rnd(B, T, H, N) - 0.5, k=rnd(B, T, H, N, scale=0.5),
                v=rnd(B, T, H, N), a=-kappa, b=kappa * torch.sigmoid(rnd(B, T, H, N)), s0=rnd(B, H, N, N, scale=0.3))


@pytest.mark.parametrize("B,T,H,L", [(1, 48, 2, 16), (2, 64, 1, 32), (2, 40, 2, 40)])
def test_span_decomposition_matches_autograd_of_the_oracle(B, T, H, L):
    x = inputs(B, T, H, 8, seed=T + L)
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(B, T, H, 8, generator=g, dtype=torch.float64)
    dsT = torch.randn(B, H, 8, 8, generator=g, dtype=torch.float64)
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    y_ref, sT_ref = ops.wkv7_naive(*leaves.values())
    torch.autograd.backward([y_ref, sT_ref], [dy, dsT])

    y, ends, S, *_ = span_forward(*x.values(), L)
    torch.testing.assert_close(y, y_ref.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ends[:, -1], sT_ref.detach(), rtol=1e-10, atol=1e-10)  # the last span's end
    torch.testing.assert_close(S, sT_ref.detach(), rtol=1e-10, atol=1e-10)           # and the scan's

    grads, ds0, G0 = span_backward(*x.values(), dy, dsT, L)
    for name, got in zip("rwkvab", grads):
        torch.testing.assert_close(got, leaves[name].grad, rtol=1e-9, atol=1e-9, msg=lambda m, n=name: f"d{n}: {m}")
    torch.testing.assert_close(ds0, leaves["s0"].grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(G0, leaves["s0"].grad, rtol=1e-9, atol=1e-9)  # the reverse scan's own ds0


def test_auto_span_rule():
    """Few heads and long T take the span path with the longest span that still gives ~1024 span rows; B*H >= 128
    or a T no span length divides stays on the sequential kernels."""
    from infctx.ops.cuda_wkv import auto_span

    assert auto_span(1, 16384, 32) == 512      # 32 spans x 32 heads
    assert auto_span(8, 4096, 12) == 256       # 16 x 96
    assert auto_span(1, 16384, 1) == 64        # too few rows at any length: the shortest, 256 spans
    assert auto_span(4, 4096, 32) == 0         # B*H = 128
    assert auto_span(1, 100, 4) == 0 and auto_span(1, 64, 4) == 0  # nothing divides T into >= 2 spans


class TorchSpanExtension:
    """The wkv7 extension's entry points in plain PyTorch with the CUDA kernels' buffer contracts (out-parameters,
    checkpoints every chunk_len tokens, sa_t = S_{t-1} a_t, the backward rebuilding each span's start state by
    backstepping its first chunk), so that `_WKV7Spans`'s views and buffer plumbing run on CPU."""

    CK = 16

    def chunk_len(self):
        return self.CK

    @staticmethod
    def _run(r, w, k, v, a, b, S):
        """Token by token from S: (y, S_T, states after every token, sa)."""
        d = torch.exp(wkv7_log_decay(w))
        ys, states, sas = [], [], []
        for t in range(r.shape[1]):
            sa = torch.einsum("bhij,bhj->bhi", S, a[:, t])
            S = (S * d[:, t, :, None, :] + sa[..., None] * b[:, t, :, None, :]
                 + v[:, t, :, :, None] * k[:, t, :, None, :])
            ys.append(torch.einsum("bhij,bhj->bhi", S, r[:, t]))
            states.append(S)
            sas.append(sa)
        return torch.stack(ys, 1), S, torch.stack(states, 1), torch.stack(sas, 1)

    def transfer(self, r, w, k, v, a, b, u, p, q, split, groups):
        Bv, _, H, N = r.shape
        _, U, _, _ = self._run(r, w, k, v, a, b, torch.zeros(Bv, H, N, N))
        y, P, _, _ = self._run(r, w, k, torch.zeros_like(v), a, b, torch.eye(N).expand(Bv, H, N, N))
        u.copy_(U), p.copy_(P), q.copy_(y)

    @staticmethod
    def span_scan(s0, p, u, starts):
        """Fills starts[:, c] = S_c; returns S_ns (the kernel does not write it)."""
        S = s0
        for c in range(p.shape[1]):
            starts[:, c] = S
            S = S @ p[:, c] + u[:, c]
        return S

    @staticmethod
    def span_scan_back(dsT, p, q, dy, ends):
        """Fills ends[:, c] = G_{c+1}; returns G_0 (the kernel does not write it)."""
        B, ns, H, N, _ = p.shape
        L = q.shape[1] // ns
        V = torch.einsum("bcthi,bcthj->bchij", dy.view(B, ns, L, H, N).to(q.dtype), q.view(B, ns, L, H, N))
        G = dsT
        for c in reversed(range(ns)):
            ends[:, c] = G
            G = G @ p[:, c].mT + V[:, c]
        return G

    def forward(self, r, w, k, v, a, b, s0, y, sT, ckpt, sa, split, groups):
        out, S, states, sas = self._run(r, w, k, v, a, b, s0)
        y.copy_(out), sT.copy_(S), sa.copy_(sas)
        ckpt.copy_(states[:, self.CK - 1::self.CK].permute(0, 2, 1, 3, 4))

    def backward(self, r, w, k, v, a, b, dy, dsT, ckpt, sa, dr, dw, dk, dv, da, db, ds0, split):
        S = ckpt[:, :, 0]                                       # end of the first chunk: backstep to its start
        d = torch.exp(wkv7_log_decay(w))
        for t in reversed(range(self.CK)):
            S = (S - sa[:, t, :, :, None] * b[:, t, :, None, :] - v[:, t, :, :, None] * k[:, t, :, None, :]) \
                / d[:, t, :, None, :]
        leaves = [x.detach().clone().requires_grad_() for x in (r, w, k, v, a, b, S)]
        with torch.enable_grad():  # called from inside an autograd Function's backward
            y, sT = ops.wkv7_naive(*leaves)
            torch.autograd.backward([y, sT], [dy, dsT])
        for out, leaf in zip((dr, dw, dk, dv, da, db, ds0), leaves):
            out.copy_(leaf.grad)


@pytest.mark.parametrize("L", [64, 0], ids=["spans", "sequential"])
def test_span_function_plumbing_with_a_torch_extension(monkeypatch, L):
    """cuda_wkv._WKV7Spans (and, span=0, _WKV7) on CPU over the torch stand-in of the extension: y, sT and every
    gradient (ds0 with a random dsT) match autograd of the oracle over the whole sequence (fp32 buffers, as on
    the GPU)."""
    from infctx.ops import cuda_wkv

    monkeypatch.setattr(cuda_wkv, "load_extension", lambda *a, **k: TorchSpanExtension())
    B, T, H, N = 2, 128, 2, 8
    x = {n: t.float() for n, t in inputs(B, T, H, N, seed=4).items()}
    g = torch.Generator().manual_seed(5)
    dy, dsT = torch.randn(B, T, H, N, generator=g), torch.randn(B, H, N, N, generator=g)

    def grads(fn):
        leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
        y, sT = fn(*leaves.values())
        torch.autograd.backward([y, sT], [dy, dsT])
        return dict(y=y.detach(), sT=sT.detach(), **{f"d{n}": t.grad for n, t in leaves.items()})

    got = grads(lambda *xs: cuda_wkv._wkv7(*xs, split=0, span=L))
    ref = grads(lambda *xs: ops.wkv7_naive(*(t.double() for t in xs)))
    for name in ref:
        err = ((got[name].double() - ref[name]).norm() / ref[name].norm()).item()
        assert err <= 1e-5, (name, err)
