"""RWKV-7's chunked form with a hand-written backward: the algorithm a tensor-core (mma) wkv7 kernel implements,
in PyTorch (any float dtype). Not an op of the registry: the torch backend's `wkv7_chunked` runs the same forward
under autograd. Checked in float64 against autograd of the per-token oracle (tests/test_wkv7_chunk_math.py); its
precision with tf32 / bf16 matmul operands is measured by infctx.bench.wkv7_precision.

One chunk of L tokens from state S0 (rows = values, columns = keys), with c_t = sum_{i<=t} log d_i, c'_t = c_{t-1},
E = e^c, E' = e^c', and every product below an L x L or L x N matrix product or a triangular solve:
    r_in = r E,  a_ex = a E',  b_src = b / E,  k_src = k / E,  b_end = b e^{c_L - c},  k_end = k e^{c_L - c}
    Mb = tril(a_ex b_src^T, -1),  Mk = tril(a_ex k_src^T, -1),  Pb = tril(r_in b_src^T),  Pk = tril(r_in k_src^T)
    (I - Mb) U = a_ex S0^T + Mk V                          (row t of U: u_t = S_{t-1} a_t)
    y = r_in S0^T + Pb U + Pk V,   S_end = S0 diag(e^{c_L}) + U^T b_end + V^T k_end
Backward from dy and dS_end: dU = Pb^T dy + b_end dS_end^T, G = (I - Mb)^-T dU; then every input gradient is a
product with G, U, V, dy, dS_end or S0 (chunk_backward), and d log d comes from the gradients of E, E' and e^{c_L}
by reverse cumulative sums. RWKV-7's decay is >= 0.545 per token, so 1/E <= 1.83^L stays finite for chunk sizes a
kernel would use (16 or 32) and no difference of large logs appears.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._chunk import ChunkDecay, from_chunks, to_chunks
from ._common import wkv7_log_decay


def chunk_terms(lw, r, k, v, a, b):
    """The decay-scaled inputs and the strictly/inclusively lower-triangular pair matrices of one chunk."""
    d = ChunkDecay(lw)
    E, Eb, after = d.upto, d.before, d.after
    t = dict(E=E, Eb=Eb, after=after, total=d.total, r_in=r * E, a_ex=a * Eb, b_src=b / E, k_src=k / E,
             b_end=b * after, k_end=k * after)
    t["Mb"] = (t["a_ex"] @ t["b_src"].mT).tril(-1)
    t["Mk"] = (t["a_ex"] @ t["k_src"].mT).tril(-1)
    t["Pb"] = (t["r_in"] @ t["b_src"].mT).tril()
    t["Pk"] = (t["r_in"] @ t["k_src"].mT).tril()
    t["T"] = torch.eye(lw.shape[-2], dtype=lw.dtype, device=lw.device) - t["Mb"]
    return t


def chunk_forward(S0, lw, r, k, v, a, b):
    t = chunk_terms(lw, r, k, v, a, b)
    U = torch.linalg.solve_triangular(t["T"], t["a_ex"] @ S0.mT + t["Mk"] @ v, upper=False, unitriangular=True)
    y = t["r_in"] @ S0.mT + t["Pb"] @ U + t["Pk"] @ v
    S_end = S0 * t["total"][..., None, :] + U.mT @ t["b_end"] + v.mT @ t["k_end"]
    return y, S_end, U


def chunk_backward(S0, lw, r, k, v, a, b, dy, dS_end):
    """Gradients of one chunk w.r.t. S0, lw, r, k, v, a, b, by hand (recomputing the forward's terms)."""
    t = chunk_terms(lw, r, k, v, a, b)
    _, _, U = chunk_forward(S0, lw, r, k, v, a, b)
    G = torch.linalg.solve_triangular(t["T"].mT, t["Pb"].mT @ dy + t["b_end"] @ dS_end.mT, upper=True,
                                      unitriangular=True)
    dMb, dMk = (G @ U.mT).tril(-1), (G @ v.mT).tril(-1)
    dPb, dPk = (dy @ U.mT).tril(), (dy @ v.mT).tril()
    dS0 = dy.mT @ t["r_in"] + dS_end * t["total"][..., None, :] + G.mT @ t["a_ex"]
    dv = t["Pk"].mT @ dy + t["k_end"] @ dS_end.mT + t["Mk"].mT @ G
    d_r_in = dy @ S0 + dPb @ t["b_src"] + dPk @ t["k_src"]
    d_a_ex = G @ S0 + dMb @ t["b_src"] + dMk @ t["k_src"]
    d_b_src = dMb.mT @ t["a_ex"] + dPb.mT @ t["r_in"]
    d_k_src = dMk.mT @ t["a_ex"] + dPk.mT @ t["r_in"]
    d_b_end, d_k_end = U @ dS_end, v @ dS_end
    d_total = (S0 * dS_end).sum(-2)
    # log-decay: c enters E (r_in), 1/E (b_src, k_src) and e^{c_L - c} (b_end, k_end); c' enters a_ex; c_L the
    # end factors and the total decay.
    ends = t["b_end"] * d_b_end + t["k_end"] * d_k_end
    dc = t["r_in"] * d_r_in - t["b_src"] * d_b_src - t["k_src"] * d_k_src - ends
    dcb = t["a_ex"] * d_a_ex
    dcL = ends.sum(-2) + t["total"] * d_total
    rev = lambda x: x.flip(-2).cumsum(-2).flip(-2)  # noqa: E731  sum over t >= i
    dlw = rev(dc) + F.pad(rev(dcb)[..., 1:, :], (0, 0, 0, 1)) + dcL[..., None, :]
    grads = dict(r=d_r_in * t["E"], k=d_k_src / t["E"] + d_k_end * t["after"], v=dv, a=d_a_ex * t["Eb"],
                 b=d_b_src / t["E"] + d_b_end * t["after"])
    return dS0, dlw, grads


def chunked_forward(r, w, k, v, a, b, s0, L):
    """The whole sequence chunk by chunk: y, sT and the chunk start states (what a kernel would save)."""
    B, T, H, N = r.shape
    lw = wkv7_log_decay(w)
    xs = [to_chunks(x, L) for x in (lw, r, k, v, a, b)]  # [B,H,n,L,N], zero padding is neutral
    S, ys, starts = s0, [], []
    for i in range(xs[0].shape[2]):
        starts.append(S)
        y, S, _ = chunk_forward(S, *(x[:, :, i] for x in xs))
        ys.append(y)
    return from_chunks(torch.stack(ys, 2), T), S, starts, xs


def chunked_backward(r, w, k, v, a, b, s0, dy, dsT, L):
    """Every gradient by hand: chunks in reverse, each from its saved start state and the next chunk's dS0."""
    T = r.shape[1]
    _, _, starts, xs = chunked_forward(r, w, k, v, a, b, s0, L)
    dys = to_chunks(dy, L)
    dS, per_chunk = dsT, []
    for i in reversed(range(len(starts))):
        dS, dlw, g = chunk_backward(starts[i], *(x[:, :, i] for x in xs), dys[:, :, i], dS)
        per_chunk.append(dict(g, lw=dlw))
    per_chunk.reverse()
    out = {n: from_chunks(torch.stack([c[n] for c in per_chunk], 2), T) for n in ("lw", "r", "k", "v", "a", "b")}
    out["w"] = out.pop("lw") * -math.exp(-0.5) * torch.sigmoid(w) * torch.sigmoid(-w)
    out["s0"] = dS
    return out
