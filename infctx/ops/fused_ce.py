"""Fused, chunked LM head + cross-entropy (+ RWKV-LM's L2Wrap) that never keeps the logits and needs no recompute.

Why: the plain way to train the head, logits = h @ W^T then F.cross_entropy, keeps [tokens, vocab] logits for the
backward (gigabytes at V = 65536), and the usual fix, checkpointing it in chunks, recomputes the head matmul and the
softmax in the backward and makes fp32 copies of the logits. Here the forward does all of it, one chunk of tokens at a
time: logits_c = h_c @ W^T (in the autocast / input dtype), per row logsumexp and the loss in fp32, the gradient wrt
the logits g_c = w * (softmax - onehot) [+ L2Wrap's term] written over logits_c in place, then dh_c = g_c @ W (kept
for the backward) and dW += g_c^T @ h_c (both fp32, fp64 for fp64). The backward only scales dh and dW by the
incoming gradient. Memory: one chunk of logits at a time, plus dh [N, D] and dW [V, D] in fp32 until the backward.

On CUDA the per-row pass (max, sum-exp, loss, gradient in place) is a Triton kernel (infctx.ops._fused_ce_triton,
imported lazily); without triton or CUDA, or for float64, the same pass is F.cross_entropy's own forward and backward
in fp32 (fp64 for fp64), so on the CPU the fp32 results equal the checkpointed path's bit for bit when both run the
head as one chunk and the incoming gradient is a power of two (else only the order of roundings differs).

The gradients are stored divided by `scale`, the largest power of two not above max |weight| (1 when every weight is
0), and multiplied back in the backward: weights are typically 1 / (tokens counted), so w * softmax would otherwise sit
near the bottom of fp16's range; the scaling keeps the stored gradient O(1) in any dtype and, a power of two, is exact.

L2Wrap (infctx.bptt.L2Wrap, RWKV-LM's corrected form): the loss is unchanged; the logits gradient gets
l2_factor * max_logit added at each row's argmax, and like every other term it is scaled by the incoming gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_LOW = (torch.float16, torch.bfloat16)
_triton_rows = None  # the Triton row pass once imported; False when triton is unavailable


def _triton():
    global _triton_rows
    if _triton_rows is None:
        try:
            from ._fused_ce_triton import ce_rows
            _triton_rows = ce_rows
        except Exception:  # no triton (CPU wheels) or a broken install: the torch row pass
            _triton_rows = False
    return _triton_rows or None


def triton_available() -> bool:
    return _triton() is not None


def compute_dtype(h: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype of the head matmul, as autocast would pick it for h @ W^T (fp64 is never autocast)."""
    dt = torch.promote_types(h.dtype, weight.dtype)
    dev = h.device.type
    if dt in (torch.float32, *_LOW) and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return dt


def _acc_dtype(cd: torch.dtype) -> torch.dtype:
    return torch.float64 if cd == torch.float64 else torch.float32


def _use_triton(logits: Tensor, backend: str) -> bool:
    if backend == "torch":
        return False
    ok = logits.is_cuda and logits.dtype in (torch.float32, *_LOW) and _triton() is not None
    if backend == "triton" and not ok:
        raise RuntimeError("linear_cross_entropy(backend='triton') needs triton, a CUDA tensor and fp32/bf16/fp16 logits")
    return ok


def _rows_torch(logits: Tensor, targets: Tensor, weights: Tensor, inv_scale: Tensor | None, l2: float,
                grad: bool) -> Tensor:
    """The row pass in torch ops, in fp32 (fp64 for fp64 logits); same contract as the Triton ce_rows. It is
    F.cross_entropy's own forward and backward (on a local graph), so that its results equal the checkpointed path's
    to the last bit wherever the matmuls do (the scaling is by a power of two)."""
    acc = _acc_dtype(logits.dtype)
    x = logits.to(acc)
    if not grad:
        return F.cross_entropy(x, targets, reduction="none")
    with torch.enable_grad():
        xg = x.detach().requires_grad_()
        ce = F.cross_entropy(xg, targets, reduction="none")
        (g,) = torch.autograd.grad(ce, xg, weights.to(acc) * inv_scale)
    if l2:  # L2Wrap's term, rounded as infctx.bptt.L2Wrap rounds it (max * factor), then scaled exactly
        mx, ids = x.max(dim=-1, keepdim=True)
        g.scatter_add_(1, ids, (mx * l2) * inv_scale)
    logits.copy_(g)
    return ce.detach()


def _rows(logits, targets, weights, inv_scale, l2, grad, backend) -> Tensor:
    if _use_triton(logits, backend):
        return _triton()(logits, targets, weights, inv_scale, l2, grad)
    return _rows_torch(logits, targets, weights, inv_scale, l2, grad)


_MM_OUT_DTYPE: dict[str, bool] = {}  # device type -> whether torch.mm(..., out_dtype=torch.float32) runs there


def _mm_wide(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """a @ b returned in `acc` (fp32 / fp64): for a low-precision product straight from the GEMM's fp32 accumulator
    where torch can (CUDA's mm out_dtype), else rounded to the input dtype first, then widened."""
    if a.dtype == acc:
        return torch.mm(a, b)
    dev = a.device.type
    if acc == torch.float32 and a.dtype in _LOW and _MM_OUT_DTYPE.get(dev, dev == "cuda"):
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            _MM_OUT_DTYPE[dev] = True
            return out
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_OUT_DTYPE[dev] = False
    return torch.mm(a, b).to(acc)


def _run(h: Tensor, weight: Tensor, targets: Tensor, weights: Tensor, l2: float, chunk: int, cd: torch.dtype,
         need_dh: bool, need_dw: bool, backend: str):
    """(loss, dh / scale or None, dW / scale or None, scale or None); no gradient work unless need_dh or need_dw."""
    grad = need_dh or need_dw
    N, D = h.shape
    V = weight.shape[0]
    acc = _acc_dtype(cd)
    hc, wc = h.to(cd), weight.to(cd)
    targets = targets.to(device=h.device, dtype=torch.long).contiguous()
    weights = weights.to(device=h.device, dtype=acc).contiguous()
    loss = torch.zeros((), device=h.device, dtype=acc)
    dh = dw = scale = inv_scale = None
    if grad:
        scale = _pow2_scale(weights)
        inv_scale = 1.0 / scale
        dh = torch.empty(N, D, device=h.device, dtype=acc) if need_dh else None
    for a in range(0, N, chunk):
        b = min(N, a + chunk)
        logits = torch.mm(hc[a:b], wc.t())  # [n, V] in cd
        ce = _rows(logits, targets[a:b], weights[a:b], inv_scale, l2, grad, backend)
        loss += (ce.to(acc) * weights[a:b]).sum()
        if need_dh:
            dh[a:b] = _mm_wide(logits, wc, acc)
        if need_dw:
            if dw is None:
                dw = _mm_wide(logits.t(), hc[a:b], acc)
            elif cd == acc:
                dw.addmm_(logits.t(), hc[a:b])
            else:
                dw += _mm_wide(logits.t(), hc[a:b], acc)
        del logits
    if need_dw and dw is None:  # N == 0
        dw = torch.zeros(V, D, device=h.device, dtype=acc)
    return loss, dh, dw, scale


def _pow2_scale(weights: Tensor) -> Tensor:
    """A power of two within a factor 2 of max |weight| (1 if every weight is 0 or there are none): dividing the stored
    gradients by it and multiplying back is exact."""
    wmax = weights.abs().max() if weights.numel() else weights.new_zeros(())
    scale = torch.ldexp(torch.ones_like(wmax), torch.frexp(wmax).exponent - 1)
    return torch.where(wmax > 0, scale, torch.ones_like(wmax))


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i * CE(h_i @ W^T, t_i) with L2Wrap's gradient; the gradients are computed in the forward."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, weights: Tensor, l2_factor: float, chunk: int,
                cd: torch.dtype, backend: str) -> Tensor:
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(h.device.type, enabled=False):
            loss, dh, dw, scale = _run(h, weight, targets, weights, l2_factor, chunk, cd, need_dh, need_dw, backend)
        ctx.save_for_backward(dh, dw, scale)
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        dh, dw, scale = ctx.saved_tensors
        f = grad_output.to(scale.dtype) * scale if scale is not None else None
        gh = (dh * f).to(ctx.h_dtype) if dh is not None else None
        gw = (dw * f).to(ctx.w_dtype) if dw is not None else None
        return gh, gw, None, None, None, None, None, None


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, weights: Tensor, l2_factor: float = 0.0,
                         chunk_tokens: int = 4096, backend: str = "auto") -> Tensor:
    """sum_i weights[i] * cross_entropy(h[i] @ weight^T, targets[i]) as a 0-dim fp32 tensor (fp64 for fp64 inputs).

    h [N, D] (or [..., D]), weight [V, D] (an nn.Linear's weight, no bias), targets [N] valid ids (masked positions:
    any valid id with weight 0), weights [N] per-token floats. l2_factor > 0 adds RWKV-LM's L2Wrap gradient
    (infctx.bptt.L2Wrap: loss unchanged). chunk_tokens rows of logits exist at a time. Gradients are computed in the
    forward only when grad mode is on and h or weight requires grad; otherwise only the loss, chunked.
    backend: "auto" (Triton row pass on CUDA when available, else torch), "torch" or "triton"."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"linear_cross_entropy: backend must be 'auto', 'torch' or 'triton' (got {backend!r})")
    if weight.dim() != 2 or h.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: h {tuple(h.shape)} and weight {tuple(weight.shape)} do not match")
    h2 = h.reshape(-1, h.shape[-1])
    targets, weights = targets.reshape(-1), weights.reshape(-1)
    if targets.shape[0] != h2.shape[0] or weights.shape[0] != h2.shape[0]:
        raise ValueError(f"linear_cross_entropy: {h2.shape[0]} rows of h but {targets.shape[0]} targets and "
                         f"{weights.shape[0]} weights")
    chunk = max(1, int(chunk_tokens)) if chunk_tokens else max(1, h2.shape[0])
    cd = compute_dtype(h, weight)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(h2, weight, targets, weights, float(l2_factor), chunk, cd, backend)
    with torch.no_grad(), torch.autocast(h.device.type, enabled=False):
        return _run(h2, weight, targets, weights, 0.0, chunk, cd, False, False, backend)[0]

