"""infctx.ops.fused_ce: the fused, chunked head + cross-entropy (+ L2Wrap) against plain F.cross_entropy on h @ W^T
(float64, values and gradients, any chunking), the gradient-free path, and BPTTEngine with fused_ce on vs off.

The GPU tests at the end (marked gpu, skipped with a reason without CUDA) check the Triton row pass in bf16 and fp32
against a float64 reference on the same inputs: RMS(diff)/RMS(ref) <= 5e-3 for bf16, <= 1e-5 for fp32."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from infctx.bptt import BPTTConfig, BPTTEngine, L2Wrap
from infctx.ops import fused_ce
from infctx.ops._common import rel_rms
from infctx.ops.fused_ce import linear_cross_entropy
from model_helpers import one_thread, tiny_model  # noqa: F401 (autouse fixture)

D, V = 16, 53


def _inputs(N: int, seed: int = 0, dtype=torch.float64, device="cpu", d: int = D, v: int = V, zero_every: int = 3,
            logit_std: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) * (logit_std / math.sqrt(d))
    targets = torch.randint(0, v, (N,), generator=g)
    weights = torch.rand(N, generator=g, dtype=torch.float64)
    weights[::zero_every] = 0.0  # masked positions: weight 0 (their target stays a valid id)
    weights = weights / weights.sum().clamp_min(1e-30)
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32
    cast = lambda t, dt: t.to(device=device, dtype=dt)  # noqa: E731
    return cast(h, dtype), cast(w, dtype), targets.to(device), cast(weights, wdtype)


def _reference(h, w, targets, weights, l2, grad_out):
    """Plain F.cross_entropy on the whole h @ W^T, L2Wrap through infctx.bptt.L2Wrap; float64 leaves."""
    h = h.detach().double().requires_grad_()
    w = w.detach().double().requires_grad_()
    logits = h @ w.t()
    ce = F.cross_entropy(logits, targets, reduction="none")
    loss = (ce * weights.double()).sum()
    if l2:
        loss = L2Wrap.apply(loss, logits, l2)
    loss.backward(torch.tensor(grad_out, dtype=torch.float64, device=h.device))
    return loss.detach(), h.grad, w.grad


def _fused(h, w, targets, weights, l2, grad_out, chunk, **kw):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = linear_cross_entropy(h, w, targets, weights, l2, chunk, **kw)
    loss.backward(torch.tensor(grad_out, dtype=loss.dtype, device=h.device))
    return loss.detach(), h.grad, w.grad


def _close(got, ref, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(got.double(), ref.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("N", (1, 13, 40))
@pytest.mark.parametrize("l2", (0.0, 0.05))
def test_matches_cross_entropy_float64(N, l2):
    """Every chunking (1 row, one not dividing N, exactly N, more than N, 0 = all) gives the plain loss and gradients,
    including L2Wrap's added gradient and the scaling of all of it by the incoming gradient."""
    h, w, targets, weights = _inputs(N, seed=N)
    ref = _reference(h, w, targets, weights, l2, 0.7)
    for chunk in (1, 7, N, 64, 0):
        for got, want in zip(_fused(h, w, targets, weights, l2, 0.7, chunk, backend="torch"), ref):
            _close(got, want)


def test_l2wrap_changes_only_the_gradient():
    h, w, targets, weights = _inputs(29, seed=3)
    plain = _fused(h, w, targets, weights, 0.0, 1.0, 8)
    wrapped = _fused(h, w, targets, weights, 0.05, 1.0, 8)
    assert wrapped[0].item() == pytest.approx(plain[0].item(), rel=1e-14)
    assert (wrapped[1] - plain[1]).abs().max() > 1e-4 and (wrapped[2] - plain[2]).abs().max() > 1e-4


def test_leading_dims_and_one_sided_gradients():
    """h [B, T, D] with targets/weights [B, T]; a frozen head (only dh) and a detached h (only dW)."""
    h, w, targets, weights = _inputs(24, seed=4)
    _, ref_dh, ref_dw = _reference(h, w, targets, weights, 0.01, 1.3)
    h3 = h.view(2, 12, D).clone().requires_grad_()
    loss = linear_cross_entropy(h3, w, targets.view(2, 12), weights.view(2, 12), 0.01, 5)
    loss.backward(torch.tensor(1.3, dtype=torch.float64))
    assert h3.grad.shape == (2, 12, D)
    _close(h3.grad.view(24, D), ref_dh)
    wt = w.clone().requires_grad_()
    linear_cross_entropy(h, wt, targets, weights, 0.01, 5).backward(torch.tensor(1.3, dtype=torch.float64))
    _close(wt.grad, ref_dw)


def test_no_grad_computes_only_the_loss(monkeypatch):
    h, w, targets, weights = _inputs(21, seed=5)
    ref_loss = _reference(h, w, targets, weights, 0.0, 1.0)[0]
    seen = []
    real = fused_ce._rows_torch
    monkeypatch.setattr(fused_ce, "_rows_torch", lambda *a: seen.append(a[-1]) or real(*a))
    monkeypatch.setattr(fused_ce, "_mm_wide", lambda *a: pytest.fail("a gradient product without grad"))
    hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.no_grad():
        loss = linear_cross_entropy(hg, wg, targets, weights, 0.05, 4)
    assert loss.grad_fn is None and not loss.requires_grad
    _close(loss, ref_loss)
    loss = linear_cross_entropy(h, w, targets, weights, 0.05, 4)  # grad on, but nothing requires it
    assert loss.grad_fn is None
    _close(loss, ref_loss)
    assert seen == [False] * 12  # 6 chunks per call, all gradient-free


def test_float32_and_low_precision_dtypes():
    """fp32 inputs: an fp32 head, against float64. bf16 autocast and fp16 (with weights far below fp16's normal range:
    the stored gradients are scaled by max |weight|) against float64 on the same rounded inputs, within what rounding
    the logits to bf16/fp16 costs (the checkpointed path pays the same). The L2Wrap factor is RWKV-LM's 1e-4 / N: a
    large one would make the few rows whose rounded logits have another argmax dominate the comparison."""
    N = 37
    h, w, targets, weights = _inputs(N, seed=6)
    ref = _reference(h, w, targets, weights, 0.01, 0.5)
    got = _fused(h.float(), w.float(), targets, weights.float(), 0.01, 0.5, 8)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    for g, r in zip(got, ref):
        _close(g, r, rtol=1e-5, atol=1e-7)

    hb, wb = h.bfloat16().float(), w.bfloat16().float()  # autocast rounds these exactly so
    ref = _reference(hb, wb, targets, weights, 1e-4 / N, 0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_ce.compute_dtype(hb, wb) == torch.bfloat16
        got = _fused(hb, wb, targets, weights.float(), 1e-4 / N, 0.5, 8)
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    for g, r in zip(got, ref):
        assert rel_rms(g, r) < 1e-2

    tiny = weights * 1e-6  # w * softmax would underflow fp16 without the scaling
    hh, wh = h.half(), w.half()
    ref = _reference(hh, wh, targets, tiny, 1e-10 / N, 1e4)
    got = _fused(hh, wh, targets, tiny.float(), 1e-10 / N, 1e4, 8)
    assert got[1].dtype == torch.float16
    for g, r in zip(got, ref):
        assert rel_rms(g, r) < 2e-3


def test_argument_errors():
    h, w, targets, weights = _inputs(4)
    with pytest.raises(ValueError, match="backend"):
        linear_cross_entropy(h, w, targets, weights, backend="cuda")
    with pytest.raises(ValueError, match="do not match"):
        linear_cross_entropy(h, w[:, :3], targets, weights)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(h, w, targets[:3], weights)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="triton"):
            linear_cross_entropy(h.float(), w.float(), targets, weights.float(), backend="triton")


# ---- BPTTEngine: fused_ce on vs off -------------------------------------------------------------------------------
B, T, VM = 2, 23, 97


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VM, (B, T + 1), generator=g)
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[0, :5] = 0
    mask[1, -4:] = 0
    return tokens[:, :-1], tokens[:, 1:], mask


def _engine_run(model, cfg, inputs, targets, mask, state=None):
    model.zero_grad(set_to_none=True)
    result = BPTTEngine(model, cfg).forward_backward(inputs, targets, mask, state=state, loss_scale=1.5)
    return result, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode,every", (("full", 1), ("truncated", 1), ("truncated", 2)))
@pytest.mark.parametrize("l2wrap", (False, True))
def test_engine_fused_matches_checkpointed(mode, every, l2wrap, monkeypatch):
    model = tiny_model(7, seed=11, dtype=torch.float64)
    inputs, targets, mask = _batch(1)
    with torch.no_grad():
        _, warm = model(inputs[:, :7])
    calls = {"fused": 0, "old": 0}
    real_head_ce = BPTTEngine._head_ce
    monkeypatch.setattr(BPTTEngine, "_head_ce", lambda self, *a: calls.__setitem__("old", calls["old"] + 1)
                        or real_head_ce(self, *a))
    real_fused = linear_cross_entropy
    monkeypatch.setattr("infctx.model.rwkv.linear_cross_entropy",
                        lambda *a, **k: calls.__setitem__("fused", calls["fused"] + 1) or real_fused(*a, **k))
    for ce_chunk in (0, 5):
        kw = dict(segment_len=6, mode=mode, truncate_every=every, l2wrap=l2wrap, ce_chunk=ce_chunk)
        ref, ref_grads = _engine_run(model, BPTTConfig(**kw, fused_ce=False), inputs, targets, mask, warm)
        assert calls == {"fused": 0, "old": calls["old"]} and calls["old"] > 0
        calls["old"] = 0
        got, grads = _engine_run(model, BPTTConfig(**kw), inputs, targets, mask, warm)
        assert calls["fused"] > 0 and calls["old"] == 0
        calls["fused"] = 0
        assert got.loss == pytest.approx(ref.loss, rel=1e-12)
        assert grads.keys() == ref_grads.keys() and "head.weight" in grads and "emb.weight" in grads
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")
        for x, y in zip(got.final_state.tensors(), ref.final_state.tensors()):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


def test_engine_state_gradient_and_evaluate():
    """A trainable carried-in state gets the same gradient through h; evaluate gives the same loss."""
    model = tiny_model(7, seed=12, dtype=torch.float64)
    inputs, targets, mask = _batch(2)
    with torch.no_grad():
        _, warm = model(inputs[:, :9])
    out = {}
    for fused in (False, True):
        s0 = warm.clone().requires_grad_()
        cfg = BPTTConfig(segment_len=7, fused_ce=fused, ce_chunk=4)
        result, _ = _engine_run(model, cfg, inputs, targets, mask, s0)
        ev = BPTTEngine(model, cfg).evaluate(inputs, targets, mask, warm)
        out[fused] = (result.loss, [g.clone() for g in s0.grads()], ev.loss)
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-12)
    assert out[True][2] == pytest.approx(out[False][2], rel=1e-12) == pytest.approx(out[False][0], rel=1e-12)
    for x, y in zip(out[True][1], out[False][1]):
        assert y.abs().max() > 0
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-13)


def test_engine_fp32_single_chunk_is_bitwise_equal():
    """On the CPU the torch row pass is F.cross_entropy's own forward and backward and the scale a power of two: with
    the head in one chunk, fp32 losses and gradients equal the checkpointed path's exactly (tests that compare a
    fused run with a checkpointed one, e.g. a ZeRO-3 engine against a plain model, rely on this)."""
    model = tiny_model(7, seed=15)
    inputs, targets, mask = _batch(4)
    out = {}
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        res = BPTTEngine(model, BPTTConfig(segment_len=8, fused_ce=fused)).forward_backward(inputs, targets, mask.float())
        out[fused] = (res.loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert out[True][0] == out[False][0]
    assert all(torch.equal(out[True][1][n], g) for n, g in out[False][1].items())


def test_engine_runs_the_fused_head_through_the_module():
    """The fused op runs inside LMHead's forward, so hooks on the head (DeepSpeed ZeRO-3's gathers) fire; a head
    replaced by another module keeps the checkpointed path, and both paths give the same loss and gradients."""
    model = tiny_model(7, seed=13)
    inputs, targets = (torch.randint(0, model.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
                       for _ in range(2))
    on, off = BPTTEngine(model, BPTTConfig(segment_len=4)), BPTTEngine(model, BPTTConfig(segment_len=4, fused_ce=False))
    assert on._fused_head() and not off._fused_head()
    calls = []
    hook = model.head.register_forward_pre_hook(lambda mod, args: calls.append(len(args)))
    try:
        fused = on.forward_backward(inputs, targets)
    finally:
        hook.remove()
    # 3 segments: the no-grad pass over the first two, then 3 with grad; each call with (h, targets, weights, l2, chunk)
    assert calls == [5] * 5, calls
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    plain = off.forward_backward(inputs, targets)
    plain_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert abs(fused.loss - plain.loss) <= 1e-6 * plain.loss
    assert fused_grads.keys() == plain_grads.keys() and "head.weight" in plain_grads
    for n, g in plain_grads.items():
        assert torch.allclose(fused_grads[n], g, rtol=1e-5, atol=1e-7), n
    replaced = tiny_model(7, seed=13)
    replaced.head = torch.nn.Linear(replaced.cfg.n_embd, replaced.cfg.vocab_size, bias=False)
    assert not BPTTEngine(replaced, BPTTConfig(segment_len=4))._fused_head()


def test_lm_head_keeps_the_linear_contract():
    model = tiny_model(6, seed=2)
    h = torch.randn(2, 3, model.cfg.n_embd)
    assert torch.equal(model.head(h), h @ model.head.weight.T)
    assert list(model.state_dict()).count("head.weight") == 1 and "head.bias" not in model.state_dict()
    with pytest.raises(ValueError, match="weights"):
        model.head(h, torch.zeros(2, 3, dtype=torch.long))


# ---- GPU: the Triton row pass ---------------------------------------------------------------------------------------
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
TOL = {torch.bfloat16: 5e-3, torch.float32: 1e-5}


def _require_triton():
    assert fused_ce.triton_available(), "triton could not be imported: the fused CE op would use its torch row pass"
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 tolerance is for true fp32 GEMMs (torch's default)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
@pytest.mark.parametrize("vocab", (65536, 50277))
def test_triton_rows_match_float64(dtype, vocab):
    """The kernel alone on identical logits (so the argmax is the same): ce, the loss-only pass leaving the logits
    alone, and the in-place gradient, with an L2Wrap factor large enough that its term at the argmax dominates there."""
    _require_triton()
    from infctx.ops._fused_ce_triton import ce_rows
    g = torch.Generator(device="cuda").manual_seed(vocab)
    n = 300
    x = (torch.randn(n, vocab, generator=g, device="cuda") * 3).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g, device="cuda")
    weights = torch.rand(n, generator=g, device="cuda")
    weights[::4] = 0
    weights /= weights.sum()
    inv = 1 / weights.max()
    l2 = 0.05 / n
    ref = x.double()  # becomes the float64 gradient
    ref_ce = fused_ce._rows_torch(ref, targets, weights.double(), inv.double(), l2, True)
    untouched = x.clone()
    ce_only = ce_rows(untouched, targets, weights, None, 0.0, False)
    assert torch.equal(untouched, x) and rel_rms(ce_only, ref_ce) < 1e-6
    logits = x.clone()
    ce = ce_rows(logits, targets, weights, inv, l2, True)
    assert ce.dtype == torch.float32 and rel_rms(ce, ref_ce) < 1e-6
    assert rel_rms(logits, ref) < TOL[dtype]
    arg = x.argmax(dim=-1, keepdim=True)  # first occurrence, as L2Wrap's max() and the kernel take it
    at_max, want = logits.double().gather(1, arg), ref.gather(1, arg)
    assert rel_rms(at_max, want) < TOL[dtype]
    no_l2 = torch.softmax(x.double(), -1).gather(1, arg) * (weights.double() * inv)[:, None]
    assert (want - no_l2).abs().min() > 0.5 * (want.abs().min())  # the L2Wrap term is what is compared there


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
@pytest.mark.parametrize("vocab", (65536, 50277))
@pytest.mark.parametrize("l2", (False, True))
def test_triton_fused_matches_float64(dtype, vocab, l2):
    """loss, dh, dW of the whole op (chunk not dividing N) on the same inputs as a float64 reference. Logits of std 1:
    bf16's rounding of the logits alone costs ~|logit| * 2^-9 in each softmax term (~2.5e-3 rel RMS at std 1-2, 6e-3
    at std 4, for the checkpointed path as well)."""
    _require_triton()
    N, d = 1000, 256
    h, w, targets, weights = _inputs(N, seed=vocab + int(l2), dtype=dtype, device="cuda", d=d, v=vocab, logit_std=1.0)
    factor = 1e-4 / N if l2 else 0.0
    ref = _reference(h, w, targets, weights, factor, 0.8)
    got = _fused(h, w, targets, weights, factor, 0.8, 384)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    for name, x, y in zip(("loss", "dh", "dW"), got, ref):
        err = rel_rms(x, y)
        assert err < TOL[dtype], f"{name}: rel RMS {err:.2e}"


@gpu
@needs_cuda
def test_triton_under_autocast_matches_float64():
    """fp32 parameters under bf16 autocast (as in training): a bf16 head matmul, fp32 gradients, close to float64 on
    the bf16-rounded inputs; and the L2Wrap difference of dW matches the reference's."""
    _require_triton()
    N, d, vocab = 1500, 512, 65536
    h, w, targets, weights = _inputs(N, seed=7, dtype=torch.float32, device="cuda", d=d, v=vocab, logit_std=1.0)
    h, w = h.bfloat16().float(), w.bfloat16().float()
    factor = 1e-4 / N
    ref = _reference(h, w, targets, weights, factor, 1.0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = _fused(h, w, targets, weights, factor, 1.0, 512)
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    for name, x, y in zip(("loss", "dh", "dW"), got, ref):
        err = rel_rms(x, y)
        assert err < TOL[torch.bfloat16], f"{name}: rel RMS {err:.2e}"


@gpu
@needs_cuda
def test_engine_on_cuda_fused_matches_checkpointed():
    """BPTTEngine on CUDA under bf16 autocast (torch WKV backend): fused_ce on vs off agree within bf16 rounding."""
    _require_triton()
    model = tiny_model(7, seed=14, vocab_size=50277).cuda()
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 50277, (2, 65), generator=g).cuda()
    out = {}
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            res = BPTTEngine(model, BPTTConfig(segment_len=16, l2wrap=True, fused_ce=fused, ce_chunk=48)
                             ).forward_backward(tokens[:, :-1], tokens[:, 1:])
        out[fused] = (res.loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-3)
    for name, ref in out[False][1].items():
        err = rel_rms(out[True][1][name], ref)
        assert err < 2e-2, f"{name}: rel RMS {err:.2e}"
