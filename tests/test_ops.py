"""WKV ops: the naive recurrence against hand-written formulas, the chunked form against the naive one
(values and every gradient, including the initial state with an incoming state gradient), gradcheck, dtypes
and the backend registry."""

from __future__ import annotations

import pkgutil
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from infctx.ops import (get_wkv, registry, resolve_backend, wkv5_chunked, wkv5_naive, wkv6_chunked, wkv6_naive,
                        wkv7_chunked, wkv7_naive)
from infctx.ops.fla_ops import fla_available

NAIVE = {5: wkv5_naive, 6: wkv6_naive, 7: wkv7_naive}
CHUNKED = {5: wkv5_chunked, 6: wkv6_chunked, 7: wkv7_chunked}


def make_inputs(version: int, B: int, T: int, H: int, N: int, dtype=torch.float64, seed: int = 0) -> list:
    """Inputs shaped like the models produce them: RWKV-7 a = -kk, b = kk * rate with kk unit-norm;
    RWKV-5/6 decay logits spread from slow to strong (w up to 2.5, i.e. per-token decay down to e^-12)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    r, k, v = rnd(B, T, H, N), rnd(B, T, H, N, scale=0.5), rnd(B, T, H, N)
    s0 = rnd(B, H, N, N, scale=0.3).float() if dtype != torch.float64 else rnd(B, H, N, N, scale=0.3)
    if version == 7:
        w = rnd(B, T, H, N, scale=2.0)
        kk = F.normalize(torch.randn(B, T, H, N, generator=g, dtype=torch.float64), dim=-1)
        rate = torch.rand(B, T, H, N, generator=g, dtype=torch.float64)
        return [r, w, k, v, (-kk).to(dtype), (kk * rate).to(dtype), s0]
    w_shape = (B, T, H, N) if version == 6 else (H, N)
    w = (torch.rand(*w_shape, generator=g, dtype=torch.float64) * 7.5 - 5.0).to(dtype)
    return [r, w, k, v, rnd(H, N), s0]


def forward_backward(fn, inputs, dy, dsT):
    """Run fn and backprop sum(y*dy) + sum(sT*dsT); returns y, sT and the gradient of every input."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    y, sT = fn(*leaves)
    ((y.to(dy.dtype) * dy).sum() + (sT * dsT).sum()).backward()
    return y.detach(), sT.detach(), [x.grad for x in leaves]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


# --- the naive op against explicit formulas (numpy loops, no shared code) -----------------------------------------

def test_wkv7_naive_two_tokens_by_hand():
    B, T, H, N = 1, 2, 1, 3
    inputs = make_inputs(7, B, T, H, N)
    y, sT = wkv7_naive(*inputs)
    r, w, k, v, a, b = (x.numpy()[0, :, 0] for x in inputs[:-1])
    S = inputs[-1].numpy()[0, 0]
    for t in range(T):
        d = np.exp(-np.exp(-0.5) / (1 + np.exp(-w[t])))
        Sa = [sum(S[i, j] * a[t, j] for j in range(N)) for i in range(N)]
        S = np.array([[S[i, j] * d[j] + Sa[i] * b[t, j] + v[t, i] * k[t, j] for j in range(N)] for i in range(N)])
        y_t = [sum(S[i, j] * r[t, j] for j in range(N)) for i in range(N)]
        np.testing.assert_allclose(y[0, t, 0].numpy(), y_t, rtol=1e-12)
    np.testing.assert_allclose(sT[0, 0].numpy(), S, rtol=1e-12)


@pytest.mark.parametrize("version", [5, 6])
def test_wkv56_naive_two_tokens_by_hand(version):
    B, T, H, N = 1, 2, 1, 3
    r, w, k, v, u, s0 = make_inputs(version, B, T, H, N)
    y, sT = NAIVE[version](r, w, k, v, u, s0)
    r, w, k, v, u, S = (x.numpy() for x in (r, w, k, v, u, s0[0, 0]))
    for t in range(T):
        w_t = w[0, t, 0] if version == 6 else w[0]
        y_t = [sum(S[i, j] * r[0, t, 0, j] for j in range(N))
               + v[0, t, 0, i] * sum(u[0, j] * k[0, t, 0, j] * r[0, t, 0, j] for j in range(N)) for i in range(N)]
        np.testing.assert_allclose(y[0, t, 0].numpy(), y_t, rtol=1e-12)
        S = np.array([[S[i, j] * np.exp(-np.exp(w_t[j])) + v[0, t, 0, i] * k[0, t, 0, j] for j in range(N)]
                      for i in range(N)])
    np.testing.assert_allclose(sT[0, 0].numpy(), S, rtol=1e-12)


def test_wkv5_is_wkv6_with_constant_decay():
    r, w, k, v, u, s0 = make_inputs(5, 2, 9, 2, 8)
    y5, s5 = wkv5_naive(r, w, k, v, u, s0)
    y6, s6 = wkv6_naive(r, w.expand(r.shape), k, v, u, s0)
    assert torch.equal(y5, y6) and torch.equal(s5, s6)


# --- chunked == naive: values and every gradient ------------------------------------------------------------------

@pytest.mark.parametrize("N", [64, 128])
@pytest.mark.parametrize("version", [5, 6, 7])
def test_chunked_matches_naive_with_all_gradients(version, N):
    B, T, H = 2, 45, 1  # 45 is not a multiple of any chunk length used
    inputs = make_inputs(version, B, T, H, N)
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(B, T, H, N, generator=g, dtype=torch.float64)
    dsT = torch.randn(B, H, N, N, generator=g, dtype=torch.float64)
    y0, s0, g0 = forward_backward(NAIVE[version], inputs, dy, dsT)
    y1, s1, g1 = forward_backward(CHUNKED[version], inputs, dy, dsT)
    torch.testing.assert_close(y1, y0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s1, s0, rtol=1e-9, atol=1e-9)
    names = ["r", "w", "k", "v", "a", "b", "s0"] if version == 7 else ["r", "w", "k", "v", "u", "s0"]
    for name, got, want in zip(names, g1, g0):
        assert want.abs().max() > 0, name
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8, msg=f"d{name} differs")


@pytest.mark.parametrize("version", [5, 6, 7])
def test_chunk_length_and_padding_do_not_change_results(version):
    inputs = make_inputs(version, 2, 23, 2, 16)
    ref = NAIVE[version](*inputs)
    for L in (1, 4, 7, 16, 64):
        y, sT = CHUNKED[version](*inputs, chunk_len=L)
        torch.testing.assert_close(y, ref[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(sT, ref[1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("version", [5, 6, 7])
def test_fp32_chunked_tracks_float64_oracle_over_long_sequence(version):
    inputs = make_inputs(version, 2, 300, 2, 64, dtype=torch.float32)
    y, sT = CHUNKED[version](*inputs)
    y_ref, s_ref = NAIVE[version](*(x.double() for x in inputs))
    assert y.dtype == torch.float32 and sT.dtype == torch.float32
    assert rel_err(y, y_ref) < 2e-6 and rel_err(sT, s_ref) < 2e-6  # the fp32 naive op itself is ~1e-6 off


def test_wkv6_chunked_exact_under_extreme_decay():
    """Per-token log decays down to -e^7.5 = -1800 must neither overflow nor lose precision (no clamping)."""
    inputs = make_inputs(6, 2, 50, 1, 16)
    inputs[1] = inputs[1] * 3.0
    inputs = [x.float() for x in inputs]
    y, sT = wkv6_chunked(*inputs)
    y_ref, s_ref = wkv6_naive(*(x.double() for x in inputs))
    assert rel_err(y, y_ref) < 1e-6 and rel_err(sT, s_ref) < 1e-6


@pytest.mark.parametrize("fn", [wkv7_naive, wkv7_chunked, wkv6_naive, wkv6_chunked, wkv5_naive, wkv5_chunked])
def test_bf16_inputs_keep_fp32_state(fn):
    version = int(fn.__name__[3])
    inputs = make_inputs(version, 2, 19, 2, 16, dtype=torch.bfloat16)
    y, sT = fn(*inputs)
    assert y.dtype == torch.bfloat16 and sT.dtype == torch.float32
    y_ref, s_ref = NAIVE[version](*(x.double() for x in inputs))  # same bf16 values, exact math
    assert rel_err(sT, s_ref) < 1e-5  # the state never passed through bf16
    assert rel_err(y, y_ref) < 5e-3   # only the output rounding to bf16


def test_empty_sequence_returns_initial_state():
    inputs = make_inputs(7, 2, 0, 1, 8)
    for fn in (wkv7_naive, wkv7_chunked):
        y, sT = fn(*inputs)
        assert y.shape == (2, 0, 1, 8) and torch.equal(sT, inputs[-1])


def test_s0_none_means_zeros():
    inputs = make_inputs(6, 2, 10, 1, 8)
    zeros = torch.zeros_like(inputs[-1])
    for fn in (wkv6_naive, wkv6_chunked):
        torch.testing.assert_close(fn(*inputs[:-1], None), fn(*inputs[:-1], zeros))


# --- gradcheck in float64 --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", [5, 6, 7])
@pytest.mark.parametrize("kind", ["naive", "chunked"])
def test_gradcheck(version, kind):
    inputs = [x.requires_grad_() for x in make_inputs(version, 2, 5, 1, 3)]
    fn = NAIVE[version] if kind == "naive" else (lambda *xs: CHUNKED[version](*xs, chunk_len=2))
    assert torch.autograd.gradcheck(fn, inputs)


# --- registry ---------------------------------------------------------------------------------------------------------

def test_registry_builtin_backends():
    for version in (5, 6, 7):
        assert get_wkv(version, "torch") is CHUNKED[version]
        assert get_wkv(version, "torch-naive") is NAIVE[version]
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("torch-naive", torch.device("cpu")) == "torch-naive"


def test_registry_unknown_names_fail_with_one_line():
    with pytest.raises(ValueError, match=r"unknown backend 'tensorflow'.*known backends: .*torch, torch-naive") as err:
        get_wkv(7, "tensorflow")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="version 4"):
        get_wkv(4, "torch")
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("tensorflow", "cpu")


def test_registry_unavailable_backend_and_auto(monkeypatch):
    reg = registry.Registry()
    monkeypatch.setattr(registry, "REGISTRY", reg)
    registry.register(7, "torch", wkv7_chunked)
    registry.register(7, "cuda", wkv7_naive, available=lambda head_size: "no CUDA device")
    with pytest.raises(RuntimeError, match="'cuda' for RWKV-7 is unavailable: no CUDA device"):
        get_wkv(7, "cuda")
    assert resolve_backend("auto", "cuda") == "torch"
    registry.register(7, "cuda", wkv7_naive)
    assert resolve_backend("auto", "cuda") == "cuda"
    assert resolve_backend("auto", "cpu") == "torch"
    registry.register(7, "cuda", wkv7_naive,
                      available=lambda head_size: None if head_size in (64, 128) else f"head size {head_size}")
    assert resolve_backend("auto", "cuda", 7, head_size=64) == "cuda"
    assert resolve_backend("auto", "cuda", 7, head_size=32) == "torch"
    with pytest.raises(RuntimeError, match="head size 32"):
        resolve_backend("cuda", "cuda", 7, head_size=32)


def test_fla_backend_reports_why_it_is_unavailable():
    reason = fla_available()
    if reason is None:
        assert callable(get_wkv(7, "fla"))
    else:
        with pytest.raises(RuntimeError, match=re.escape(f"'fla' for RWKV-7 is unavailable: {reason}")):
            get_wkv(7, "fla")


# --- on a GPU: the torch ops run there unchanged, and fla agrees with the oracle ----------------------------------

def _gpu_vs_oracle(fn, version, dtype, B=2, T=100, H=2, N=64):
    """Relative errors of y, sT and every gradient of fn on the GPU against the float64 naive op on the CPU."""
    inputs = make_inputs(version, B, T, H, N, dtype=dtype)
    g = torch.Generator().manual_seed(2)
    dy = torch.randn(B, T, H, N, generator=g, dtype=torch.float64)
    dsT = torch.randn(B, H, N, N, generator=g, dtype=torch.float64)
    ref = forward_backward(NAIVE[version], [x.double() for x in inputs], dy, dsT)
    got = forward_backward(fn, [x.cuda() for x in inputs], dy.float().cuda(), dsT.float().cuda())
    return rel_err(got[0].cpu(), ref[0]), rel_err(got[1].cpu(), ref[1]), \
        [rel_err(a.cpu(), b) for a, b in zip(got[2], ref[2])]


@pytest.mark.gpu
@pytest.mark.parametrize("version", [5, 6, 7])
def test_chunked_on_gpu_matches_oracle(version):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    err_y, err_s, err_g = _gpu_vs_oracle(CHUNKED[version], version, torch.float32)
    assert err_y < 1e-5 and err_s < 1e-5 and max(err_g) < 1e-4, (err_y, err_s, err_g)


@pytest.mark.gpu
@pytest.mark.parametrize("version", [5, 6, 7])
def test_fla_matches_oracle(version):
    """fla's kernels run tf32/bf16 matmuls inside, so ~1e-3 relative error in fp32 (measured on an H100:
    <= 8e-4 for y, <= 4e-3 for gradients). The first call autotunes Triton kernels for minutes."""
    reason = fla_available()
    if reason is not None:
        pytest.skip(reason)
    err_y, err_s, err_g = _gpu_vs_oracle(get_wkv(version, "fla"), version, torch.float32)
    assert err_y < 1e-2 and err_s < 1e-2 and max(err_g) < 1e-2, (err_y, err_s, err_g)


def test_registry_broken_optional_backend_is_named_not_fatal(monkeypatch):
    def broken(name):
        raise ImportError("no module named 'wkv_ext'")

    reg = registry.Registry()
    monkeypatch.setattr(registry, "REGISTRY", reg)
    monkeypatch.setattr(registry.pkgutil, "iter_modules", lambda path: [pkgutil.ModuleInfo(None, "cuda_fake", False)])
    monkeypatch.setattr(registry.importlib, "import_module", broken)
    registry.register(7, "torch", wkv7_chunked)
    assert get_wkv(7, "torch") is wkv7_chunked
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'.*infctx\.ops\.cuda_fake failed to import: no module"):
        get_wkv(7, "cuda")
    assert resolve_backend("auto", "cuda") == "torch"
