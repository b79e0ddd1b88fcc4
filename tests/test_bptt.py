"""Segmented BPTT engine: full mode == unsegmented forward/backward (loss and every gradient, float64), truncated ==
manual detach, padding segments change nothing, scaled backward callables, L2Wrap, and flat saved-activation memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from infctx.bptt import BPTTConfig, BPTTEngine
from infctx.model import State
from model_helpers import one_thread, tiny_model  # noqa: F401 (autouse fixture)

B, T, V = 2, 23, 97


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, T + 1), generator=g)
    mask = torch.ones(B, T)
    mask[0, :6] = 0  # a prompt: the first targets of row 0 do not count
    mask[1, :2] = 0
    mask[1, -3:] = 0  # and padding at the end of row 1
    targets = tokens[:, 1:].clone()
    targets[1, -3:] = -1  # pad id outside the vocabulary where the mask is 0
    return tokens[:, :-1], targets, mask


def _reference(model, inputs, targets, mask, state=None, l2wrap=False):
    """Plain unsegmented forward + backward of the masked token-mean CE (plus L2Wrap's gradient as a surrogate loss)."""
    model.zero_grad(set_to_none=True)
    logits, final = model(inputs, state)
    ce = F.cross_entropy(logits.reshape(-1, V), targets.clamp(min=0).reshape(-1), reduction="none")
    loss = (ce * mask.reshape(-1).to(ce.dtype)).sum() / mask.sum()
    objective = loss
    if l2wrap:  # d/dlogits of factor * 0.5 * max^2 is factor * max at the argmax: exactly L2Wrap's added gradient
        objective = loss + 1e-4 / (B * T) * 0.5 * (logits.max(dim=-1).values ** 2).sum()
    objective.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, final


def _engine_grads(model, cfg, inputs, targets, mask, backward=None, **kw):
    model.zero_grad(set_to_none=True)
    engine = BPTTEngine(model, cfg) if backward is None else BPTTEngine(model, cfg, backward)
    result = engine.forward_backward(inputs, targets, mask, **kw)
    return result, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_equal(got, ref, rtol=1e-9, atol=1e-12):
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("version", (5, 6, 7))
def test_full_mode_equals_unsegmented(version):
    model = tiny_model(version, seed=20 + version, dtype=torch.float64)
    inputs, targets, mask = _batch(version)
    ref_loss, ref_grads, ref_final = _reference(model, inputs, targets, mask)
    n_params = sum(1 for n, _ in model.named_parameters() if n not in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"))
    assert len(ref_grads) == n_params  # every used parameter has a gradient (v0/v1/v2 of layer 0 are unused)
    for seg_len, ce_chunk in ((5, 0), (8, 6), (T, 4096), (1, 0)):
        cfg = BPTTConfig(segment_len=seg_len, mode="full", ce_chunk=ce_chunk)
        result, grads = _engine_grads(model, cfg, inputs, targets, mask)
        assert result.loss == pytest.approx(ref_loss, rel=1e-12)
        assert result.n_tokens == mask.sum().item() and result.n_segments == -(-T // seg_len)
        _assert_grads_equal(grads, ref_grads)
        for x, y in zip(result.final_state.tensors(), ref_final.tensors()):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_full_mode_with_incoming_state_and_state_gradient():
    """A non-zero carried-in state, and a trainable one (state tuning): its gradient matches too."""
    model = tiny_model(7, seed=1, dtype=torch.float64)
    inputs, targets, mask = _batch(3)
    with torch.no_grad():
        _, warm = model(torch.randint(0, V, (B, 11), generator=torch.Generator().manual_seed(9)))
    ref_state = warm.clone().requires_grad_()
    ref_loss, ref_grads, _ = _reference(model, inputs, targets, mask, state=ref_state)
    eng_state = warm.clone().requires_grad_()
    result, grads = _engine_grads(model, BPTTConfig(segment_len=7), inputs, targets, mask, state=eng_state)
    assert result.loss == pytest.approx(ref_loss, rel=1e-12)
    _assert_grads_equal(grads, ref_grads)
    for x, y in zip(eng_state.grads(), ref_state.grads()):
        assert y.abs().max() > 0
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


def test_l2wrap_gradient_matches_rwkv_lm():
    model = tiny_model(7, seed=2, dtype=torch.float64)
    inputs, targets, mask = _batch(4)
    _, ref_plain, _ = _reference(model, inputs, targets, mask)
    ref_loss, ref_grads, _ = _reference(model, inputs, targets, mask, l2wrap=True)
    result, grads = _engine_grads(model, BPTTConfig(segment_len=6, l2wrap=True, ce_chunk=4), inputs, targets, mask)
    assert result.loss == pytest.approx(ref_loss, rel=1e-12)  # L2Wrap changes the gradient, not the loss
    assert (ref_grads["head.weight"] - ref_plain["head.weight"]).abs().max() > 1e-8  # it does change the gradient
    _assert_grads_equal(grads, ref_grads)


def test_scaled_backward_callable_and_padding_segments():
    """A backward that scales its input (as DeepSpeed does for accumulation / fp16) scales every gradient by exactly that
    factor; zero-weight padding segments run forward+backward through all parameters but add nothing."""
    model = tiny_model(6, seed=3, dtype=torch.float64)
    inputs, targets, mask = _batch(5)
    ref_loss, ref_grads, _ = _reference(model, inputs, targets, mask)
    calls = []

    def scaled_backward(t):
        calls.append(t.detach().clone())
        (t * 0.25).backward()

    cfg = BPTTConfig(segment_len=6)
    result, grads = _engine_grads(model, cfg, inputs, targets, mask, backward=scaled_backward, loss_scale=2.0, min_segments=7)
    assert result.n_segments == 7 and len(calls) == 7  # 4 real + 3 padding segments
    assert result.loss == pytest.approx(ref_loss, rel=1e-12)
    _assert_grads_equal(grads, {n: g * 0.5 for n, g in ref_grads.items()})


def _call_pattern(model, cfg, inputs, targets, mask, **kw) -> str:
    """The engine's sequence of model forwards (F: with grad, f: without) and backward calls (B)."""
    events = []
    hook = model.emb.register_forward_hook(lambda *_: events.append("F" if torch.is_grad_enabled() else "f"))
    BPTTEngine(model, cfg, lambda t: (events.append("B"), t.backward())).forward_backward(inputs, targets, mask, **kw)
    hook.remove()
    return "".join(events)


def test_padding_segments_repeat_the_call_pattern_of_real_ones():
    """Under ZeRO-3 every forward and backward gathers parameters, so a rank padded up to n segments must call them in
    the same order as a rank with n real segments, or the ranks' collectives would not line up."""
    model = tiny_model(7, seed=1)
    inputs, targets, mask = _batch(2)
    cfg = BPTTConfig(segment_len=6)  # T=23: 4 real segments
    real = _call_pattern(model, cfg, inputs, targets, mask)
    assert real == "fff" + "FB" * 4
    short = _call_pattern(model, cfg, inputs[:, :12], targets[:, :12], mask[:, :12], min_segments=4)  # 2 real + 2 pad
    assert short == real


@pytest.mark.parametrize("every", (1, 2, 3))
def test_truncated_padding_repeats_the_window_pattern(every):
    """Truncated mode: real (2) + padding segments make the same forward/backward sequence as 5 real segments, for any
    window length (a window may mix real and padding segments), and the padding adds no gradient."""
    model = tiny_model(7, seed=1, dtype=torch.float64)
    inputs, targets, mask = _batch(2)
    cfg = BPTTConfig(segment_len=5, mode="truncated", truncate_every=every)  # T=23: 5 real segments
    real = _call_pattern(model, cfg, inputs, targets, mask)
    assert real == ("F" * every + "B") * (5 // every) + ("F" * (5 % every) + "B" if 5 % every else "")
    assert _call_pattern(model, cfg, inputs[:, :10], targets[:, :10], mask[:, :10], min_segments=5) == real
    _, plain = _engine_grads(model, cfg, inputs[:, :10], targets[:, :10], mask[:, :10])
    result, padded = _engine_grads(model, cfg, inputs[:, :10], targets[:, :10], mask[:, :10], min_segments=5)
    assert result.n_segments == 5
    _assert_grads_equal(padded, plain)


@pytest.mark.parametrize("every", (1, 2))
def test_truncated_equals_manual_detach(every):
    model = tiny_model(7, seed=4, dtype=torch.float64)
    inputs, targets, mask = _batch(6)
    seg = 6
    model.zero_grad(set_to_none=True)
    state, total, logits = None, 0.0, []
    for j, a in enumerate(range(0, T, seg)):
        if j % every == 0 and state is not None:
            state = state.detach()
        out, state = model(inputs[:, a:a + seg], state)
        logits.append(out)
    logits = torch.cat(logits, 1)
    ce = F.cross_entropy(logits.reshape(-1, V), targets.clamp(min=0).reshape(-1), reduction="none")
    loss = (ce * mask.reshape(-1)).sum() / mask.sum()
    loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    result, grads = _engine_grads(model, BPTTConfig(segment_len=seg, mode="truncated", truncate_every=every), inputs, targets, mask)
    assert result.loss == pytest.approx(loss.item(), rel=1e-12)
    _assert_grads_equal(grads, ref_grads)
    _, full_grads = _engine_grads(model, BPTTConfig(segment_len=seg), inputs, targets, mask)
    assert (full_grads["blocks.0.att.w0"] - grads["blocks.0.att.w0"]).abs().max() > 1e-8  # truncation does cut


def test_evaluate_matches_and_leaves_gradients_alone():
    model = tiny_model(5, seed=5, dtype=torch.float64)
    inputs, targets, mask = _batch(7)
    ref_loss, _, ref_final = _reference(model, inputs, targets, mask)
    model.zero_grad(set_to_none=True)
    result = BPTTEngine(model, BPTTConfig(segment_len=4)).evaluate(inputs, targets, mask)
    assert result.loss == pytest.approx(ref_loss, rel=1e-12) and result.n_segments == 6
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(result.final_state.wkv, ref_final.wkv)


class _SavedBytes:
    """Tracks the bytes of tensors autograd holds for backward (parameters excluded), live and peak."""

    def __init__(self, model):
        self.params = {p.data_ptr() for p in model.parameters()}
        self.live = self.peak = 0

    def pack(self, t):
        n = 0 if t.data_ptr() in self.params else t.numel() * t.element_size()
        self.live += n
        self.peak = max(self.peak, self.live)
        return _Held(t, n, self)

    @staticmethod
    def unpack(held):
        return held.t


class _Held:
    def __init__(self, t, n, tracker):
        self.t, self.n, self.tracker = t, n, tracker

    def __del__(self):
        self.tracker.live -= self.n


def _peak_saved(model, n_seg, seg_len, mode_seg_len):
    inputs = torch.randint(0, V, (B, n_seg * seg_len), generator=torch.Generator().manual_seed(n_seg))
    tracker = _SavedBytes(model)
    engine = BPTTEngine(model, BPTTConfig(segment_len=mode_seg_len or n_seg * seg_len, ce_chunk=8))
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
        engine.forward_backward(inputs, inputs)
    return tracker.peak


def test_full_mode_saved_activation_memory_is_flat():
    model = tiny_model(7, seed=6)
    seg = 8
    full = {n: _peak_saved(model, n, seg, seg) for n in (1, 3, 4, 16)}
    whole = {n: _peak_saved(model, n, seg, None) for n in (1, 16)}  # the same sequences without segmenting
    # the first/last segments lack a carried-in gradient or a grad-requiring state; from three segments on the peak
    # is one middle segment's graph, whatever the count
    assert 0 < full[1] <= full[3] == full[4] == full[16], full
    assert whole[16] > 5 * full[16] and whole[16] > 5 * whole[1], (whole, full)  # the measure does see growth


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="mode"):
        BPTTConfig(segment_len=4, mode="tbptt")
    with pytest.raises(ValueError, match="segment_len"):
        BPTTConfig(segment_len=0)
    model = tiny_model(7)
    engine = BPTTEngine(model, BPTTConfig(segment_len=4))
    x = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="mask shape"):
        engine.forward_backward(x, x, torch.ones(2, 7))
    with pytest.raises(ValueError, match="batch"):
        engine.forward_backward(x, x, state=State.zeros(model.cfg, 3))
