"""The rounded-operand study of a tensor-core wkv7 (infctx.bench.wkv7_precision): its rounding is the format's,
its matmul interception changes nothing in fp32 and reaches every matmul (forward and backward) otherwise."""

from __future__ import annotations

import pytest
import torch

from infctx.bench import wkv7_precision as wp
from infctx.ops import wkv7_chunked


def test_round_to_formats():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10_000, generator=g) * torch.logspace(-6, 6, 10_000)
    tf = wp.round_to(x, "tf32")
    assert (tf.view(torch.int32) & 0x1FFF).eq(0).all()               # 10 mantissa bits left
    assert ((tf - x).abs() <= x.abs() * 2.0**-11).all()               # within half a tf32 ulp
    assert torch.equal(wp.round_to(tf, "tf32"), tf)                   # representable values stay
    assert torch.equal(wp.round_to(x, "bf16"), x.to(torch.bfloat16).float())
    assert wp.round_to(x, "fp32") is x
    with pytest.raises(ValueError, match="format must be one of"):
        wp.round_to(x, "fp16")


def test_rounded_matmul_gradients_match_plain_in_fp32_with_broadcasting():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 4, 5, 6, generator=g, requires_grad=True)
    b = torch.randn(4, 6, 2, generator=g, requires_grad=True)  # broadcast over the leading batch dimension
    gy = torch.randn(3, 4, 5, 2, generator=g)
    (a @ b).backward(gy)
    want = a.grad.clone(), b.grad.clone()
    a.grad = b.grad = None
    with wp.RoundedMatmuls("fp32"):
        (a @ b).backward(gy)
    torch.testing.assert_close((a.grad, b.grad), want, rtol=1e-6, atol=1e-6)


def _study_inputs(T: int):
    x = wp.make_inputs(7, 1, T, 2, 64, seed=3, device="cpu")
    g = torch.Generator().manual_seed(4)
    return x, torch.randn(1, T, 2, 64, generator=g), torch.randn(1, 2, 64, 64, generator=g)


def test_fp32_mode_reproduces_the_chunked_op_and_lower_formats_reach_every_gradient():
    x, gy, gs = _study_inputs(48)
    op = lambda *xs: wkv7_chunked(*xs, chunk_len=16)  # noqa: E731
    plain = wp.run(op, x, gy, gs)
    with wp.RoundedMatmuls("fp32"):
        same = wp.run(op, x, gy, gs)
    for name in plain:
        assert torch.equal(same[name], plain[name]), name
    ref = wp.run(wp.wkv7_naive, x, gy, gs, double=True)
    worst = {}
    for fmt in ("tf32", "bf16"):
        with wp.RoundedMatmuls(fmt):
            got = wp.run(op, x, gy, gs)
        errors = {name: wp.rel_rms(got[name], ref[name]) for name in ref}
        assert min(errors.values()) > 1e-5, (fmt, errors)  # every output and gradient went through rounding
        worst[fmt] = max(errors.values())
    assert 1e-5 < worst["tf32"] < worst["bf16"] / 4  # 3 more mantissa bits: ~8x smaller errors


def test_mixed_format_rounds_state_sized_products_to_tf32_only():
    mode = wp.RoundedMatmuls("bf16+tf32-state")
    S, A, tok, tokT = torch.zeros(2, 64, 64), torch.zeros(64, 64), torch.zeros(2, 16, 64), torch.zeros(2, 64, 16)
    assert mode.format_of(S, A) == mode.format_of(tok, S) == "tf32"  # state x transition, tokens x state
    assert mode.format_of(tok, tokT) == mode.format_of(tokT, tok) == "bf16"  # 16x64 @ 64x16, 64x16 @ 16x64
    assert wp.RoundedMatmuls("tf32").format_of(tok, tokT) == "tf32"


def test_the_kernels_algorithm_meets_the_fp32_contract_and_is_rounded_too():
    """The hand-written algorithm (wkv7_chunk_grad) in fp32 is within the kernels' fp32 contract (1e-5) of float64,
    and under tf32 operands its errors grow to the autograd form's size (the mode reaches its matmuls)."""
    x, gy, gs = _study_inputs(48)
    ref = wp.run(wp.wkv7_naive, x, gy, gs, double=True)
    worst = {}
    for fmt in ("fp32", "tf32"):
        with wp.RoundedMatmuls(fmt):
            got = wp.run_hand(x, gy, gs, chunk=16)
        worst[fmt] = max(wp.rel_rms(got[name], ref[name]) for name in ref)
    assert worst["fp32"] <= 1e-5 and worst["tf32"] > 30 * worst["fp32"], worst
