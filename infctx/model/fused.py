"""The elementwise-heavy parts of the RWKV blocks as pure functions ("regions"), run eagerly or through torch.compile.

Why: outside the WKV op and the big matmuls, a block is dozens of small pointwise ops (token-shift lerps, LoRA gates,
GroupNorm + bonus + gate, relu^2). Eagerly each is its own kernel and its own saved activation; compiled, inductor
fuses each region into a few kernels and its partitioner saves fewer, cheaper-to-recompute tensors (issue 7's levers).

Every region is a plain function of tensors, called the same way on both paths: `run(region, *args)` where
`run = runner(cfg.fuse, x)`. Eagerly it is the reference path (the exact ops the model always ran); compiled it is the
same function through `torch.compile(fullgraph=True)`. The WKV op (a custom autograd Function) is never inside a
region: the modules call it between regions.

Compile policy (torch's automatic dynamic shapes, `dynamic=None`): a region first compiles for the shapes it sees,
static (the best kernels for the segment length that dominates training). When a second sequence length appears
(the shorter last segment) it recompiles once with the time dimension symbolic, and that graph serves every later
length, so nothing recompiles per segment. T=1 (generation) gets its own graph. Grad mode, dtype, autocast and
inputs' requires_grad are guards too: full BPTT's gradient-free forward, its recompute and a segment whose carried
state needs no gradient are separate graphs (tests/test_fused.py: at most 4 per region for full BPTT with a shorter
last segment). Past torch._dynamo.config.recompile_limit (default 8) graphs dynamo would run a region eagerly, so
each region is its own Python function: dynamo keeps its cache, and that limit, per code object, and a helper shared
by several call sites would share it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from infctx.model.common import token_shift
from infctx.model.config import FUSE_MODES  # noqa: F401 (the values `mode` takes; validated by ModelConfig)
from infctx.ops.fused_ce import compute_dtype


def compiles(mode: str, x: Tensor) -> bool:
    """Whether `mode` (ModelConfig.fuse) runs the regions compiled for activations like x."""
    return mode == "compile" or (mode == "auto" and x.is_cuda)


def runner(mode: str, x: Tensor) -> Callable[..., object]:
    """The caller for a module's regions: `run(region, *args)`, eager or compiled per `mode` and x's device."""
    return _run_compiled if compiles(mode, x) else _run_eager


def matmul_dtype(x: Tensor) -> torch.dtype:
    """The dtype the matmuls (and the WKV op, which takes r's dtype) compute in for activations like x: autocast's
    dtype where autocast is on for x's device, else x's. Regions whose outputs only feed those return them in it:
    the same values the consumer would have cast them to, without an fp32 copy in memory and a cast kernel each
    way (forward and backward)."""
    return compute_dtype(x, x)


def _run_eager(region: Callable, *args):
    return region(*args)


def _run_compiled(region: Callable, *args):
    return compiled(region)(*args)


@functools.cache
def compiled(region: Callable) -> Callable:
    """torch.compile of a region, created on first use (importing dynamo costs seconds, so not at import time).
    A memo, not a switch: which path runs is decided per call by `runner`. fullgraph, so a graph break fails loudly
    instead of silently splitting the fusion. Inductor's mix-order reduction (one launch for a LayerNorm backward's
    row and column sums) is off: with LayerNorm inside a region it returned a [C] gradient for a [1,1,C] mix
    parameter on CUDA (torch 2.11; pytorch/pytorch#178080, and #193061 for wrong gradients of the same pass)."""
    return torch.compile(region, fullgraph=True, options={"triton.mix_order_reduction": False})


# ---- shared math (plain helpers; inlined into whichever region calls them) ------------------------------------------

Norm = tuple[Tensor, Tensor, float]  # a LayerNorm's (weight, bias, eps), applied at the start of a region


def normed(x: Tensor, norm: Norm | None) -> Tensor:
    """x through the block's LayerNorm when the region owns it (norm given), else x (already normalised)."""
    return x if norm is None else F.layer_norm(x, x.shape[-1:], norm[0], norm[1], norm[2])


def lerp_prev(x: Tensor, xx: Tensor, m: Tensor) -> Tensor:
    """RWKV-6/7 token-shift mix, xx = shift(x) - x: m is the weight of the previous token."""
    return x + xx * m


def lerp_cur(x: Tensor, prev: Tensor, m: Tensor) -> Tensor:
    """RWKV-5 token-shift mix: m is the weight of the current token."""
    return x * m + prev * (1 - m)


def head_norm(y: Tensor, n_head: int, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """ln_x: GroupNorm with one group per head over y [B,T,...] (any trailing shape of H*N values), as [B,T,H*N]."""
    B, T = y.shape[:2]
    return F.group_norm(y.reshape(B * T, -1), n_head, weight, bias, eps).view(B, T, -1)


def relu_sq_ffn(xk: Tensor, key_w: Tensor, value_w: Tensor) -> Tensor:
    """value(relu(key(xk))^2), the channel-mix core of every version."""
    return F.linear(torch.relu(F.linear(xk, key_w)) ** 2, value_w)


# ---- RWKV-7 time mix ------------------------------------------------------------------------------------------------

def v7_shift_mix(x: Tensor, norm: Norm | None, prev: Tensor, mixes: Sequence[Tensor],
                 out_dtype: torch.dtype) -> tuple[Tensor, ...]:
    """x [B,T,C] (normalised here by `norm`, if given), prev [B,C] (the carried last row of the previous segment)
    -> x + (shift(x) - x) * m per mix, in out_dtype (each feeds only matmuls), and the last row to carry."""
    x = normed(x, norm)
    xx = token_shift(x, prev) - x
    return (*(lerp_prev(x, xx, m).to(out_dtype) for m in mixes), x[:, -1])


def v7_value_residual(v: Tensor, v_first: Tensor, xv: Tensor, v0: Tensor, v1: Tensor, v2: Tensor,
                      out_dtype: torch.dtype) -> Tensor:
    """Layers > 0: v pulled towards layer 0's value by a LoRA sigmoid gate; in out_dtype (the WKV op's)."""
    return (v + (v_first - v) * torch.sigmoid(v0 + (xv @ v1) @ v2)).to(out_dtype)


def v7_gates(
    xw: Tensor, xa: Tensor, xg: Tensor, k: Tensor, w_lora: Sequence[Tensor], a_lora: Sequence[Tensor],
    g_lora: Sequence[Tensor], k_k: Tensor, k_a: Tensor, n_head: int, out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Decay logit, in-context learning rate, gate and the key mixes -> (w, k, a, b, g) for the WKV op.

    w_lora = (w0, w1, w2), a_lora = (a0, a1, a2), g_lora = (g1, g2). w is the raw decay logit (the op applies
    exp(-e^-0.5 sigmoid(w))); a = -kk and b = kk * a as [B,T,H,N]; w, k, g as [B,T,C]. w, k, a, b in out_dtype
    (the WKV op's)."""
    B, T, C = k.shape
    heads = lambda t: t.view(B, T, n_head, C // n_head)  # noqa: E731
    w0, w1, w2 = w_lora
    a0, a1, a2 = a_lora
    g1, g2 = g_lora
    w = w0 + torch.tanh(xw @ w1) @ w2
    a = torch.sigmoid(a0 + (xa @ a1) @ a2)
    g = torch.sigmoid(xg @ g1) @ g2
    kk = F.normalize(heads(k * k_k), dim=-1, p=2.0)
    k = k * (1 + (a - 1) * k_a)
    return w.to(out_dtype), k.to(out_dtype), (-kk).to(out_dtype), (kk * heads(a)).to(out_dtype), g


def v7_out(
    y: Tensor, r: Tensor, k: Tensor, v: Tensor, g: Tensor, r_k: Tensor, ln_w: Tensor, ln_b: Tensor, eps: float,
    out_dtype: torch.dtype,
) -> Tensor:
    """After the WKV op (y [B,T,H,N]): (ln_x(y) + bonus) * g, the bonus being (r . k * r_k per head) * v; [B,T,C]
    in out_dtype (it feeds the output projection)."""
    B, T, H, N = y.shape
    heads = lambda t: t.view(B, T, H, N)  # noqa: E731
    out = head_norm(y, H, ln_w, ln_b, eps)
    out = out + ((heads(r) * heads(k) * r_k).sum(dim=-1, keepdim=True) * heads(v)).view(B, T, H * N)
    return (out * g).to(out_dtype)


# ---- RWKV-5/6 time mix ----------------------------------------------------------------------------------------------

def v5_shift_mix(x: Tensor, norm: Norm | None, prev: Tensor, mixes: Sequence[Tensor],
                 out_dtype: torch.dtype) -> tuple[Tensor, ...]:
    """RWKV-5's static mixes: x * m + shift(x) * (1 - m) per mix, in out_dtype (each feeds a projection), and the
    last row of (normalised) x to carry."""
    x = normed(x, norm)
    xx = token_shift(x, prev)
    return (*(lerp_cur(x, xx, m).to(out_dtype) for m in mixes), x[:, -1])


def v6_shift_mix(
    x: Tensor, norm: Norm | None, prev: Tensor, maa_x: Tensor, maa_w1: Tensor, maa_w2: Tensor, maas: Sequence[Tensor],
    decay: Sequence[Tensor], out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """RWKV-6's data-dependent mixes and decay -> (w, xk, xv, xr, xg), all in out_dtype (the projections' and the
    WKV op's), and the last row of (normalised) x to carry.

    maas = (time_maa_w, _k, _v, _r, _g); decay = (time_decay, time_decay_w1, time_decay_w2)."""
    B, T, C = x.shape
    x = normed(x, norm)
    xx = token_shift(x, prev) - x
    xxx = torch.tanh(lerp_prev(x, xx, maa_x) @ maa_w1).view(B * T, 5, -1).transpose(0, 1)
    lora = torch.bmm(xxx, maa_w2).view(5, B, T, C).unbind(dim=0)
    xw, xk, xv, xr, xg = (lerp_prev(x, xx, maa + m) for maa, m in zip(maas, lora))
    time_decay, decay_w1, decay_w2 = decay
    w = time_decay + torch.tanh(xw @ decay_w1) @ decay_w2
    return (*(t.to(out_dtype) for t in (w, xk, xv, xr, xg)), x[:, -1])


def gated_out(y: Tensor, gate: Tensor, ln_w: Tensor, ln_b: Tensor, eps: float, divisor: float,
              out_dtype: torch.dtype) -> Tensor:
    """RWKV-5/6 after the WKV op (y [B,T,H,N], gate = the gate projection): ln_x(y / divisor) * silu(gate), in
    out_dtype (it feeds the output projection)."""
    return (head_norm(y / divisor, y.shape[2], ln_w, ln_b, eps) * F.silu(gate)).to(out_dtype)


# ---- channel mix ----------------------------------------------------------------------------------------------------

def v7_channel_mix(x: Tensor, norm: Norm | None, prev: Tensor, x_k: Tensor, key_w: Tensor,
                   value_w: Tensor) -> tuple[Tensor, Tensor]:
    """RWKV-7 FFN with the carried shift row: value(relu(key(x + (shift(x) - x) * x_k))^2), and the last row of
    (normalised) x to carry."""
    x = normed(x, norm)
    return relu_sq_ffn(lerp_prev(x, token_shift(x, prev) - x, x_k), key_w, value_w), x[:, -1]


def _gated_ffn(xk: Tensor, xr: Tensor, key_w: Tensor, rec_w: Tensor, value_w: Tensor) -> Tensor:
    return torch.sigmoid(F.linear(xr, rec_w)) * relu_sq_ffn(xk, key_w, value_w)


def v6_channel_mix(x: Tensor, norm: Norm | None, prev: Tensor, maa_k: Tensor, maa_r: Tensor, key_w: Tensor,
                   rec_w: Tensor, value_w: Tensor) -> tuple[Tensor, Tensor]:
    """RWKV-6 FFN: sigmoid(receptance(xr)) * value(relu(key(xk))^2), mixes weighting the previous token, and the
    last row of (normalised) x to carry. shift(x) - x is formed once per mix, as the reference path always did, so
    gradients sum in the same order."""
    x = normed(x, norm)
    sx = token_shift(x, prev)
    return _gated_ffn(lerp_prev(x, sx - x, maa_k), lerp_prev(x, sx - x, maa_r), key_w, rec_w, value_w), x[:, -1]


def v5_channel_mix(x: Tensor, norm: Norm | None, prev: Tensor, mix_k: Tensor, mix_r: Tensor, key_w: Tensor,
                   rec_w: Tensor, value_w: Tensor) -> tuple[Tensor, Tensor]:
    """RWKV-5 FFN: as RWKV-6's, mixes weighting the current token."""
    x = normed(x, norm)
    xx = token_shift(x, prev)
    return _gated_ffn(lerp_cur(x, xx, mix_k), lerp_cur(x, xx, mix_r), key_w, rec_w, value_w), x[:, -1]
