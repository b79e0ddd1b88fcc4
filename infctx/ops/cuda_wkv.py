"""WKV ops on our CUDA kernels (cuda/), registered as backend "cuda" for RWKV-5/6/7.

Same signature and semantics as the torch ops (CONTRACTS.md): sequence tensors [B,T,H,N] in bf16 or fp32,
state fp32 [B,H,N(value),N(key)], returns (y, sT); differentiable w.r.t. every input including s0, and the
gradient of sT flows back (so segmented full BPTT is exact). The forward saves the state every `chunk_len` (16)
tokens. RWKV-7's backward backsteps S within a chunk from them; with few heads and long T, RWKV-7 runs on the span
path (`_WKV7Spans`: spans as batch rows, tied by N x N transfers). RWKV-5/6 run by default on the chunk-parallel
kernels (every chunk at once, a scan over chunks between), or on the sequential ones that recompute each chunk.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import registry
from .cuda_build import HEAD_SIZES, CudaBuildError, load_extension, preflight

DTYPES = (torch.bfloat16, torch.float32)
KERNELS_56 = ("auto", "chunked", "sequential")
SEQUENTIAL_BELOW_T = 16  # "auto" runs wkv5/6 shorter than one chunk (wkv::CK) on the sequential kernel
MAX_CHUNKED_HEADS = 65535  # the chunked kernels put B*H on the grid's y axis


def validate_inputs(version: int, seq: dict[str, Tensor], params: dict[str, Tensor], s0: Tensor | None) -> None:
    """One clear ValueError line for anything the kernels cannot take. Checks run in an order that works on
    CPU tensors too (shape, dtype, layout, then device), so the messages are testable without a GPU.
    bf16 and fp32 may be mixed (the op casts to r's dtype); anything else is refused."""
    r = seq["r"]
    if r.dim() != 4:
        raise ValueError(f"wkv{version} cuda: r has shape {tuple(r.shape)}, expected [B,T,H,N]")
    B, T, H, N = r.shape
    if T == 0 or B == 0:
        raise ValueError(f"wkv{version} cuda: empty input {tuple(r.shape)}; need B >= 1 and T >= 1")
    if N not in HEAD_SIZES[version]:
        sizes = ", ".join(map(str, HEAD_SIZES[version]))
        raise ValueError(f"wkv{version} cuda: head size {N} is not supported (supported: {sizes}); "
                         "use wkv_backend='torch' for other head sizes")
    expected = {**{name: (B, T, H, N) for name in seq}, **{name: (H, N) for name in params}}
    for name, t in {**seq, **params}.items():
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"wkv{version} cuda: {name} has shape {tuple(t.shape)}, expected {expected[name]}")
        if t.dtype not in DTYPES:
            raise ValueError(f"wkv{version} cuda: {name} is {t.dtype}; the kernels take bfloat16 or float32 "
                             "(use the torch backend for float64)")
        if not t.is_contiguous():
            raise ValueError(f"wkv{version} cuda: {name} is not contiguous; call .contiguous() before the op")
    if s0 is not None:
        if tuple(s0.shape) != (B, H, N, N):
            raise ValueError(f"wkv{version} cuda: s0 has shape {tuple(s0.shape)}, expected {(B, H, N, N)}")
        if s0.dtype != torch.float32:
            raise ValueError(f"wkv{version} cuda: s0 is {s0.dtype}; the state is float32 (s0.float())")
    for name, t in {**seq, **params, **({"s0": s0} if s0 is not None else {})}.items():
        if t.device != r.device or r.device.type != "cuda":
            raise ValueError(f"wkv{version} cuda: {name} is on {t.device}; every input must be on one CUDA device")


def _like_r(r: Tensor, *xs: Tensor) -> list[Tensor]:
    """Cast bf16/fp32 companions to r's dtype (differentiably); the kernels take one element type."""
    return [x if x.dtype == r.dtype else x.to(r.dtype) for x in xs]


def _state_in(s0: Tensor | None, r: Tensor) -> Tensor:
    B, _, H, N = r.shape
    return torch.zeros(B, H, N, N, device=r.device) if s0 is None else s0.contiguous()


def _grad_in(g: Tensor | None, like: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.zeros(like.shape, device=like.device, dtype=dtype) if g is None else g.to(dtype).contiguous()


def _chunks(ext, r: Tensor) -> int:
    """Number of chunks (one saved state each) of a [B,T,H,N] input."""
    return -(-r.shape[1] // ext.chunk_len())


def _no_scratch(r: Tensor) -> Tensor:
    """The extension allocates its recompute scratch itself when its tile needs one in global memory."""
    return torch.empty(0, device=r.device)


def _forward7(ext, seq: list[Tensor], s0: Tensor, split: int, groups: int,
              kernel: str = "sequential") -> tuple[Tensor, ...]:
    """The wkv7 forward on [B,T,H,N] inputs (r, w, k, v, a, b) from s0: (y, sT, ckpt, sa), by the sequential kernel
    or (kernel="chunked") the chunked tensor-core one, which gives the same outputs."""
    r = seq[0]
    B, T, H, N = r.shape
    y, sT = torch.empty_like(r), torch.empty(B, H, N, N, device=r.device)
    nc = _chunks(ext, r)
    ckpt = torch.empty(B, H, nc, N, N, device=r.device)
    sa = torch.empty(B, T, H, N, device=r.device)
    if kernel == "chunked":
        packet = torch.empty(B * H * nc, ext.packet_floats(), device=r.device)
        ext.forward_chunked(*seq, s0, y, sT, ckpt, sa, packet)
    else:
        ext.forward(*seq, s0, y, sT, ckpt, sa, split, groups)
    return y, sT, ckpt, sa


def _backward7(ext, seq: list[Tensor], dy: Tensor | None, dsT: Tensor | None, ckpt: Tensor, sa: Tensor,
               split: int) -> tuple[list[Tensor], Tensor]:
    """The ordinary wkv7 backward kernel: the six input gradients (like the inputs) and ds0."""
    r = seq[0]
    B, _, H, N = r.shape
    grads = [torch.empty_like(r) for _ in range(6)]
    ds0 = torch.empty(B, H, N, N, device=r.device)
    dy = _aligned(_grad_in(dy, r, r.dtype))
    ext.backward(*seq, dy, _grad_in(dsT, ds0, torch.float32), ckpt, sa, *grads, ds0, split)
    return grads, ds0


def _backward7_chunked(ext, seq: list[Tensor], dy: Tensor | None, dsT: Tensor | None, s0: Tensor, ckpt: Tensor,
                       sa: Tensor) -> tuple[list[Tensor], Tensor]:
    """The chunked tensor-core backward (head size 64): the state-gradient pass over chunks in reverse, then
    every chunk's input gradients at once. Same results as `_backward7`."""
    r = seq[0]
    B, T, H, N = r.shape
    nc = _chunks(ext, r)
    grads = [torch.empty_like(r) for _ in range(6)]
    ds0, dckpt = torch.empty(B, H, N, N, device=r.device), torch.empty(B, H, nc, N, N, device=r.device)
    gsa = torch.empty(B, T, H, N, device=r.device)
    dy = _aligned(_grad_in(dy, r, r.dtype))
    packet = torch.empty(B * H * nc, ext.packet_floats(), device=r.device)
    ext.backward_state_chunked(*seq, dy, _grad_in(dsT, ds0, torch.float32), dckpt, gsa, ds0, packet)
    del packet
    ext.backward_grads_chunked(*seq, dy, s0, ckpt, dckpt, sa, gsa, *grads)
    return grads, ds0


class _WKV7(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w, k, v, a, b, s0, split, groups, kernel, backward):
        ext = load_extension(7, r.shape[3], r.device)
        state = _state_in(s0, r)
        y, sT, ckpt, sa = _forward7(ext, [r, w, k, v, a, b], state, split, groups, kernel)
        # the chunked backward starts chunk 0 from s0; the sequential one backsteps from the checkpoints alone
        ctx.save_for_backward(r, w, k, v, a, b, ckpt, sa, state if backward == "chunked" else None)
        ctx.has_s0, ctx.split, ctx.backward_kernel = s0 is not None, split, backward
        return y, sT

    @staticmethod
    def backward(ctx, dy, dsT):
        *seq, ckpt, sa, state = ctx.saved_tensors
        ext = load_extension(7, seq[0].shape[3], seq[0].device)
        if ctx.backward_kernel == "chunked":
            grads, ds0 = _backward7_chunked(ext, seq, dy, dsT, state, ckpt, sa)
        else:
            grads, ds0 = _backward7(ext, seq, dy, dsT, ckpt, sa, ctx.split)
        return (*grads, ds0 if ctx.has_s0 else None, None, None, None, None)


def _grads56(version: int, r: Tensor, w: Tensor) -> tuple[Tensor, ...]:
    """The buffers both wkv5/6 backward kernels fill: dr, dw, dk, dv like the inputs (wkv5's dw: fp32 sums per
    (b, h), [B,H,N]), du fp32 [B,H,N] per (b, h), ds0 fp32 [B,H,N,N]."""
    B, _, H, N = r.shape
    dr, dk, dv = (torch.empty_like(r) for _ in range(3))
    dw = torch.empty_like(w) if version == 6 else torch.empty(B, H, N, device=r.device)
    return dr, dw, dk, dv, torch.empty(B, H, N, device=r.device), torch.empty(B, H, N, N, device=r.device)


def _param_grads56(version: int, dw: Tensor, du: Tensor, w: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(b, h) sums of the per-head parameters' gradients (du; wkv5's dw) summed over b, in their dtype."""
    return (dw.sum(0).to(w.dtype) if version == 5 else dw), du.sum(0).to(u.dtype)


class _WKV56(torch.autograd.Function):
    """RWKV-5 (w [H,N]) and RWKV-6 (w [B,T,H,N]) share one Function; `version` picks the extension."""

    @staticmethod
    def forward(ctx, version, r, w, k, v, u, s0, rows):
        B, T, H, N = r.shape
        ext = load_extension(version, N, r.device)
        nc = _chunks(ext, r)
        y, sT = torch.empty_like(r), torch.empty(B, H, N, N, device=r.device)
        ckpt = torch.empty(B, H, nc, N, N, device=r.device)
        ext.forward(r, w, k, v, u, _state_in(s0, r), y, sT, ckpt, rows)
        ctx.save_for_backward(r, w, k, v, u, ckpt)
        ctx.version, ctx.has_s0, ctx.rows = version, s0 is not None, rows
        return y, sT

    @staticmethod
    def backward(ctx, dy, dsT):
        r, w, k, v, u, ckpt = ctx.saved_tensors
        ext = load_extension(ctx.version, r.shape[3], r.device)
        dr, dw, dk, dv, du, ds0 = _grads56(ctx.version, r, w)
        ext.backward(r, w, k, v, u, _aligned(_grad_in(dy, r, r.dtype)), _grad_in(dsT, ds0, torch.float32), ckpt,
                     _no_scratch(r), dr, dw, dk, dv, du, ds0, ctx.rows)
        dw, du = _param_grads56(ctx.version, dw, du, w, u)
        return None, dr, dw, dk, dv, du, ds0 if ctx.has_s0 else None, None


class _WKV7Spans(torch.autograd.Function):
    """RWKV-7 over spans of `span` tokens, all at once: every span is one batch row of the ordinary kernels (a
    view, no copy). Spans are tied together by N x N matrices only: the transfer pass gives each span's own state
    U_c and transition P_c (S_end = S_start P_c + U_c) and q_t = P_{<=t} r_t; a scan gives the state at every span
    start; then the ordinary forward runs every span from its start state. The backward runs the gradient at span
    ends back through P_c^T and sum_t dy_t q_t^T, then the ordinary backward runs every span at once. The math is
    tests/test_wkv7_span_math.py."""

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, s0, split, groups, kernel, span):
        B, T, H, N = r.shape
        ns = T // span
        ext = load_extension(7, N, r.device)
        seq = [x.view(B * ns, span, H, N) for x in (r, w, k, v, a, b)]
        own, trans = (torch.empty(B, ns, H, N, N, device=r.device) for _ in range(2))
        q = torch.empty(B, T, H, N, device=r.device)
        ext.transfer(*seq, own.view(B * ns, H, N, N), trans.view(B * ns, H, N, N), q.view(B * ns, span, H, N), split,
                     groups)
        starts = torch.empty_like(own)
        ext.span_scan(_state_in(s0, r), trans, own, starts)
        del own
        y, ends, ckpt, sa = _forward7(ext, seq, starts.view(B * ns, H, N, N), split, groups, kernel)
        ctx.save_for_backward(r, w, k, v, a, b, ckpt, sa, trans, q)
        ctx.has_s0, ctx.split, ctx.span = s0 is not None, split, span
        return y.view(B, T, H, N), ends.view(B, ns, H, N, N)[:, -1].contiguous()

    @staticmethod
    def backward(ctx, dy, dsT):
        r, w, k, v, a, b, ckpt, sa, trans, q = ctx.saved_tensors
        B, T, H, N = r.shape
        span = ctx.span
        ns = T // span
        ext = load_extension(7, N, r.device)
        dy = _aligned(_grad_in(dy, r, r.dtype))
        ends = torch.empty(B, ns, H, N, N, device=r.device)
        ext.span_scan_back(_grad_in(dsT, ends[:, 0], torch.float32), trans, q, dy, ends)
        seq = [x.view(B * ns, span, H, N) for x in (r, w, k, v, a, b, dy, sa)]
        grads, ds0 = _backward7(ext, seq[:6], seq[6], ends.view(B * ns, H, N, N), ckpt, seq[7], ctx.split)
        grads = [g.view(B, T, H, N) for g in grads]
        return (*grads, ds0.view(B, ns, H, N, N)[:, 0].contiguous() if ctx.has_s0 else None, None, None, None, None)


def forward_groups(N: int) -> tuple[int, ...]:
    """The forward blocks per head the wkv7 kernels are built for (cuda/wkv7.cu with_groups)."""
    return tuple(sorted({1, 2, 4, N // 16}))


SPAN_MIN_BH = 128  # B*H at which one block per head already fills the GPU: no span path (auto)
SPAN_TARGET_ROWS = 1024  # span rows (B*H*spans) the auto rule aims for
SPAN_LENGTHS = (1024, 512, 256, 128, 64)  # span lengths the auto rule picks from, longest first


def auto_span(B: int, T: int, H: int) -> int:
    """Tokens per span for span=None, when B*H < SPAN_MIN_BH: the longest of SPAN_LENGTHS that divides T (into
    >= 2 spans) and gives >= SPAN_TARGET_ROWS span rows, else the shortest that divides T; 0 (the sequential
    kernels over the whole T) when B*H >= SPAN_MIN_BH or none divides T."""
    if B * H >= SPAN_MIN_BH:
        return 0
    fits = [L for L in SPAN_LENGTHS if T % L == 0 and T > L]
    return next((L for L in fits if B * H * (T // L) >= SPAN_TARGET_ROWS), fits[-1] if fits else 0)


def wkv7_cuda(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, s0: Tensor | None = None, *,
              split: int = 0, groups: int = 0, span: int | None = None,
              forward: str = "sequential", backward: str = "sequential") -> tuple[Tensor, Tensor]:
    """RWKV-7 WKV on the CUDA kernel; see infctx.ops.wkv7_naive for the math. Tuning knobs (every value gives the
    same result): `split` = threads that share one state row/column (0 = the measured default: 2 for N=64, 4 for
    N=128; else 2, 4 or 8); `groups` = forward blocks per head (0 = by B*H; else 1, 2, 4 or N/16); `span` = tokens
    per span of the span path for long T with few heads (None: the rule of `auto_span`; 0: off; else a multiple
    of 64 that divides T); `forward` = the forward kernel: "sequential" (per token; `split` and `groups` tune it)
    or "chunked" (chunks of 16 on tensor cores with fp32-grade products, cuda/wkv7_chunked.cuh; same outputs, both
    feed the same backward; slower than "sequential" on every shape measured so far, see
    bench/results/kernels-notes.md); `backward` = the backward kernel: "sequential" (backsteps within 16-token
    chunks from the forward's checkpoints) or "chunked" (tensor cores, head size 64, after either forward; the
    whole T in one pass, no span path; slower than "sequential" on every shape measured so far)."""
    validate_inputs(7, dict(r=r, w=w, k=k, v=v, a=a, b=b), {}, s0)
    return _wkv7(r, w, k, v, a, b, s0, split, span, groups, forward, backward)


def _wkv7(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, s0: Tensor | None, split: int,
          span: int | None, groups: int = 0, forward: str = "sequential",
          backward: str = "sequential") -> tuple[Tensor, Tensor]:
    """The span path or the sequential kernels over the whole T, by `span` (see wkv7_cuda)."""
    B, T, H, N = r.shape
    if backward == "chunked" and (N != 64 or span):
        raise ValueError(f"wkv7 cuda: backward='chunked' runs head size 64 over the whole T (got head size {N}, "
                         f"span={span}); use backward='sequential', or span=0 or None")
    if span is None:  # the chunked backward has no span path
        span = 0 if backward == "chunked" else auto_span(B, T, H)
    if span < 0 or span % 64 or (span and T % span):
        raise ValueError(f"wkv7 cuda: span={span} must be 0 (off) or a multiple of 64 that divides T={T}")
    if groups not in (0, *forward_groups(N)):
        raise ValueError(f"wkv7 cuda: groups={groups} must be 0 (auto) or one of "
                         f"{', '.join(map(str, forward_groups(N)))} (forward blocks per head)")
    for name, kernel in (("forward", forward), ("backward", backward)):
        if kernel not in ("sequential", "chunked"):
            raise ValueError(f"wkv7 cuda: {name}={kernel!r} must be 'sequential' or 'chunked'")
    seq = [_aligned(x) for x in (r, *_like_r(r, w, k, v, a, b))]
    if span:
        return _WKV7Spans.apply(*seq, s0, split, groups, forward, span)
    return _WKV7.apply(*seq, s0, split, groups, forward, backward)


def _aligned(t: Tensor) -> Tensor:
    """The kernels read rows 16 bytes at a time; a view that starts mid-row gets copied."""
    return t if t.data_ptr() % 16 == 0 else t.clone()


class _WKV56Chunked(torch.autograd.Function):
    """RWKV-5/6 on the chunk-parallel kernels (cuda/wkv56_chunked.cuh): saves each chunk's start state, total
    decay and 16 x 16 pair scores; the backward passes the state gradient back over chunks, then computes every
    chunk at once."""

    @staticmethod
    def forward(ctx, version, r, w, k, v, u, s0):
        B, T, H, N = r.shape
        ext = load_extension(version, N, r.device)
        nc = _chunks(ext, r)
        y, sT = torch.empty_like(r), torch.empty(B, H, N, N, device=r.device)
        states = torch.empty(B, H, nc, N, N, device=r.device)
        decay = torch.empty(B, H, nc, N, device=r.device)
        scores = torch.empty(B, H, nc, ext.chunk_len(), ext.chunk_len(), device=r.device)
        ext.forward_chunked(r, w, k, v, u, _state_in(s0, r), y, sT, states, decay, scores)
        ctx.save_for_backward(r, w, k, v, u, states, decay, scores)
        ctx.version, ctx.has_s0 = version, s0 is not None
        return y, sT

    @staticmethod
    def backward(ctx, dy, dsT):
        r, w, k, v, u, states, decay, scores = ctx.saved_tensors
        ext = load_extension(ctx.version, r.shape[3], r.device)
        dr, dw, dk, dv, du, ds0 = _grads56(ctx.version, r, w)
        dy, dsT = _aligned(_grad_in(dy, r, r.dtype)), _grad_in(dsT, ds0, torch.float32)
        ext.backward_chunked(r, w, k, v, u, dy, dsT, states, decay, scores, torch.empty_like(states),
                             dr, dw, dk, dv, du, ds0)
        dw, du = _param_grads56(ctx.version, dw, du, w, u)
        return None, dr, dw, dk, dv, du, ds0 if ctx.has_s0 else None


def _wkv56(version: int, r: Tensor, w: Tensor, k: Tensor, v: Tensor, u: Tensor, s0: Tensor | None,
           rows_per_block: int, kernel: str) -> tuple[Tensor, Tensor]:
    if kernel not in KERNELS_56:
        raise ValueError(f"wkv{version} cuda: kernel={kernel!r}; choose one of {', '.join(KERNELS_56)}")
    if rows_per_block and kernel == "chunked":
        raise ValueError(f"wkv{version} cuda: rows_per_block={rows_per_block} tiles the sequential kernel only; "
                         "pass kernel='sequential' with it")
    if kernel == "auto":  # below one chunk the chunked kernel is launch-bound: sequential measured 1.1-2.2x faster
        short, wide = r.shape[1] < SEQUENTIAL_BELOW_T, r.shape[0] * r.shape[2] > MAX_CHUNKED_HEADS
        kernel = "sequential" if rows_per_block or short or wide else "chunked"
    r, k, v = (_aligned(x) for x in (r, *_like_r(r, k, v)))
    w, u = _like_r(r, w, u)
    w = _aligned(w) if version == 6 else w
    if kernel == "sequential":
        return _WKV56.apply(version, r, w, k, v, u, s0, rows_per_block)
    if r.shape[0] * r.shape[2] > MAX_CHUNKED_HEADS:
        raise ValueError(f"wkv{version} cuda: B*H = {r.shape[0] * r.shape[2]} exceeds {MAX_CHUNKED_HEADS} (the chunked "
                         "kernel's grid height); use a smaller batch or kernel='sequential'")
    return _WKV56Chunked.apply(version, r, w, k, v, u, s0)


def wkv6_cuda(r: Tensor, w: Tensor, k: Tensor, v: Tensor, u: Tensor, s0: Tensor | None = None, *,
              rows_per_block: int = 0, kernel: str = "auto") -> tuple[Tensor, Tensor]:
    """RWKV-6 WKV on the CUDA kernels; w [B,T,H,N] raw decay logits, u [H,N]. `kernel`: "chunked" (parallel over
    chunks of 16 tokens), "sequential" (one pass over T per head; `rows_per_block` = value rows of a head per
    block, 0 = by B*H) or "auto" (the measured default: sequential below 16 tokens or with rows_per_block, else
    chunked). All give the same result."""
    validate_inputs(6, dict(r=r, w=w, k=k, v=v), dict(u=u), s0)
    return _wkv56(6, r, w, k, v, u, s0, rows_per_block, kernel)


def wkv5_cuda(r: Tensor, w: Tensor, k: Tensor, v: Tensor, u: Tensor, s0: Tensor | None = None, *,
              rows_per_block: int = 0, kernel: str = "auto") -> tuple[Tensor, Tensor]:
    """RWKV-5 WKV on the CUDA kernels; w [H,N] raw decay logits (constant over time), u [H,N]; `kernel` and
    `rows_per_block` as in wkv6_cuda."""
    validate_inputs(5, dict(r=r, k=k, v=v), dict(w=w, u=u), s0)
    return _wkv56(5, r, w, k, v, u, s0, rows_per_block, kernel)


@functools.lru_cache(maxsize=None)
def availability(version: int, head_size: int = 64) -> str | None:
    """None when the kernel for `version` builds and loads here, else the one-line reason."""
    try:
        preflight(version, head_size)
        load_extension(version, head_size)
    except CudaBuildError as err:
        return str(err)
    return None


for _version, _fn in ((5, wkv5_cuda), (6, wkv6_cuda), (7, wkv7_cuda)):
    registry.register(_version, "cuda", _fn, lambda head_size, version=_version: availability(version, head_size))
