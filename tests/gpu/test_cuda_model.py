"""Whole model on the GPU: segmented full-BPTT loss and every parameter gradient with the "cuda" WKV backend
match the "torch" backend (same weights, same data), for RWKV-5/6/7. Skipped with a reason without a GPU."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")]


def _grads(version: int, backend: str, state_dict: dict | None, inputs, targets, mask):
    from infctx.bptt import BPTTConfig, BPTTEngine
    from infctx.model import RWKV, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(version=version, n_layer=2, n_embd=128, vocab_size=97, head_size=64, wkv_backend=backend)
    model = RWKV(cfg).cuda()
    if state_dict is None:
        with torch.no_grad():  # move every weight off its structured init so no gradient is trivially zero
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    else:
        model.load_state_dict(state_dict)
    engine = BPTTEngine(model, BPTTConfig(segment_len=16, mode="full"))
    result = engine.forward_backward(inputs, targets, mask)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return model.state_dict(), result.loss, grads


@pytest.mark.parametrize("version", [5, 6, 7])
def test_segmented_full_bptt_cuda_matches_torch(version):
    pytest.importorskip("infctx.bptt", reason="infctx.bptt (the BPTT engine) is not in this tree yet")
    g = torch.Generator(device="cuda").manual_seed(version)
    B, T = 2, 50  # 4 segments of 16 (the last one 2 tokens)
    inputs = torch.randint(0, 97, (B, T), generator=g, device="cuda")
    targets = torch.randint(0, 97, (B, T), generator=g, device="cuda")
    mask = torch.rand(B, T, generator=g, device="cuda") > 0.2
    sd, loss_cuda, g_cuda = _grads(version, "cuda", None, inputs, targets, mask)
    _, loss_torch, g_torch = _grads(version, "torch", sd, inputs, targets, mask)
    assert math.isclose(loss_cuda, loss_torch, rel_tol=1e-5), (loss_cuda, loss_torch)
    assert g_cuda.keys() == g_torch.keys()
    errors = {}
    for name, ref in g_torch.items():
        diff = (g_cuda[name] - ref).double().pow(2).mean().sqrt().item()
        errors[name] = diff / max(ref.double().pow(2).mean().sqrt().item(), 1e-12)
    assert sum(1 for n in g_torch if g_torch[n].abs().max() > 0) > len(g_torch) // 2  # the test sees real gradients
    bad = {n: e for n, e in errors.items() if not e <= 1e-4}
    assert not bad, bad
