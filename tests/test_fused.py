"""The fused (torch.compile'd) regions of infctx.model.fused equal the plain PyTorch path, forward and backward: every
region alone, and whole RWKV-5/6/7 models with a non-zero carried state (gradients into every parameter and into the
carried shift rows and WKV state), through two segments of different lengths and through full BPTT.

Compile backends. Inductor on this 2-core CPU costs ~35 s cold for one RWKV-7 model (one g++ build per region,
forward and backward), so the broad matrix runs through `aot_eager_decomp_partition`: the graph inductor itself
receives (dynamo fullgraph capture, AOT autograd joint graph, inductor's decompositions, min-cut partitioner choosing
what backward saves or recomputes), minus code generation. The production path (fused.compiled = real inductor) runs
on a whole RWKV-7 model here, and on the GPU (triton) in the gpu-marked test at the end.

A fallback to eager would make every comparison pass vacuously, so the tests count compiled graphs per region and
make hitting dynamo's recompile limit an error.
"""

from __future__ import annotations

import collections
import functools

import pytest
import torch

from infctx.bptt import BPTTConfig, BPTTEngine
from infctx.model import RWKV, ModelConfig, fused
from model_helpers import one_thread, tiny_model  # noqa: F401 (autouse fixture)

B, T, C, H, N, V = 2, 5, 64, 4, 16, 97
GRAPH_BACKEND = "aot_eager_decomp_partition"
TOL = {torch.float32: 2e-5, torch.float64: 1e-11}  # max |fused - plain| / max |plain|, per tensor


# ---- fixtures: an isolated dynamo cache, and regions compiled through the graph-level backend ----------------------

@pytest.fixture(scope="module", autouse=True)
def fresh_dynamo():
    """Start and end with empty dynamo caches; recompile-limit hits raise instead of silently running eagerly."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def graph_backend():
    """Regions compiled through GRAPH_BACKEND (one wrapper per region, kept for the module), and a Counter of the
    graphs compiled per region."""
    from torch._dynamo.backends.registry import lookup_backend  # importing dynamo takes seconds: only when used

    counts: collections.Counter[str] = collections.Counter()
    inner = lookup_backend(GRAPH_BACKEND)

    def backend(name, gm, example_inputs):
        counts[name] += 1
        return inner(gm, example_inputs)

    @functools.cache
    def compiled(region):
        return torch.compile(region, fullgraph=True, backend=functools.partial(backend, region.__name__))

    return compiled, counts


@pytest.fixture
def graph_compiles(graph_backend, monkeypatch):
    """fused.compiled through GRAPH_BACKEND for one test, from empty dynamo caches (so graph counts do not depend on
    which tests ran before); returns the per-region Counter of graphs compiled during the test."""
    compiled, counts = graph_backend
    torch._dynamo.reset()
    counts.clear()
    monkeypatch.setattr(fused, "compiled", compiled)
    return counts


# ---- helpers -----------------------------------------------------------------------------------------------------

def assert_close_rel(got: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype, what
    scale = ref.abs().max().item()
    err = (got - ref).abs().max().item()
    assert err <= tol * max(scale, 1e-30), f"{what}: max|fused - plain| = {err:.3g} vs max|plain| = {scale:.3g}"


def _leaves(args) -> list[torch.Tensor]:
    out = []
    for a in args:
        if isinstance(a, (tuple, list)):
            out += _leaves(a)
        elif isinstance(a, torch.Tensor):
            out.append(a)
    return out


def _with_fresh_leaves(args):
    """Same values, new leaf tensors requiring grad (so the plain and fused runs collect separate .grad)."""
    if isinstance(args, (tuple, list)):
        return type(args)(_with_fresh_leaves(a) for a in args)
    if isinstance(args, torch.Tensor):
        return args.detach().clone().requires_grad_()
    return args


CASTING_REGIONS = ("v7_shift_mix", "v7_value_residual", "v7_gates", "v7_out", "v5_shift_mix", "v6_shift_mix",
                   "gated_out")  # take out_dtype last: the dtype of the matmul / WKV op their outputs feed


def region_args(name: str, dtype: torch.dtype, seed: int, out_dtype: torch.dtype | None = None) -> tuple:
    """Inputs of one region at the tiny model's shapes (B=2, T=5, C=64, H=4 x N=16, LoRA 32, v5/v6 FFN 224);
    out_dtype (default: dtype) for the regions that take one."""
    args = _region_inputs(name, dtype, seed)
    return (*args, out_dtype or dtype) if name in CASTING_REGIONS else args


def _region_inputs(name: str, dtype: torch.dtype, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape, s=0.5: torch.randn(*shape, generator=g, dtype=dtype) * s  # noqa: E731
    act, row, mix = (lambda: t(B, T, C)), (lambda: t(B, C)), (lambda: torch.rand(1, 1, C, generator=g, dtype=dtype))
    lora = lambda d=32: (t(C, d, s=0.3), t(d, C, s=0.3))  # noqa: E731
    norm = lambda: (1 + t(C, s=0.2), t(C, s=0.2), 1e-5)  # noqa: E731  a LayerNorm the region applies first
    if name == "v7_shift_mix":
        return act(), norm(), row(), tuple(mix() for _ in range(6))
    if name == "v5_shift_mix":
        return act(), norm(), row(), tuple(mix() for _ in range(4))
    if name == "v6_shift_mix":
        return (act(), norm(), row(), mix(), t(C, 5 * 32, s=0.3), t(5, 32, C, s=0.3), tuple(mix() for _ in range(5)),
                (t(1, 1, C), *lora(64)))
    if name == "v7_value_residual":
        return act(), act(), act(), t(1, 1, C), *lora()
    if name == "v7_gates":
        return act(), act(), act(), act(), (t(1, 1, C), *lora()), (t(1, 1, C), *lora()), lora(), mix(), mix(), H
    if name == "v7_out":
        return t(B, T, H, N), act(), act(), act(), act(), t(H, N), 1 + t(C), t(C), 64e-5
    if name == "gated_out":
        return t(B, T, H, N, s=4.0), act(), 1 + t(C), t(C), 1e-5 * 64, 8.0
    if name == "v7_channel_mix":
        return act(), norm(), row(), mix(), t(4 * C, C, s=0.2), t(C, 4 * C, s=0.2)
    if name in ("v5_channel_mix", "v6_channel_mix"):
        return act(), norm(), row(), mix(), mix(), t(224, C, s=0.2), t(C, C, s=0.2), t(C, 224, s=0.2)
    raise KeyError(name)


REGIONS = ("v7_shift_mix", "v7_value_residual", "v7_gates", "v7_out", "v7_channel_mix",
           "v5_shift_mix", "v6_shift_mix", "gated_out", "v5_channel_mix", "v6_channel_mix")


def run_region(fn, args, seed: int):
    """Outputs, and the gradient of sum(outputs * fixed random cotangents) into every tensor input."""
    args = _with_fresh_leaves(args)
    out = fn(*args)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed + 1)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs], [a.grad for a in _leaves(args)]


# ---- config --------------------------------------------------------------------------------------------------------

def test_fuse_modes():
    x = torch.zeros(1, 1, 1)
    assert [fused.compiles(m, x) for m in ("off", "compile", "auto")] == [False, True, False]  # auto: CPU -> eager
    assert fused.runner("off", x) is not fused.runner("compile", x)
    assert ModelConfig().fuse == "off"
    with pytest.raises(ValueError, match="ModelConfig.fuse must be one of 'off', 'compile', 'auto'"):
        ModelConfig(fuse="on")


# ---- each region alone -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=("f32", "f64"))
@pytest.mark.parametrize("name", REGIONS)
def test_region_matches_plain(name, dtype, graph_compiles):
    region = getattr(fused, name)
    args = region_args(name, dtype, seed=REGIONS.index(name))
    ref_out, ref_grads = run_region(region, args, seed=1)
    got_out, got_grads = run_region(fused.compiled(region), args, seed=1)
    assert graph_compiles[name] > 0, f"{name} was not compiled"
    for i, (a, b) in enumerate(zip(got_out, ref_out, strict=True)):
        assert_close_rel(a, b, TOL[dtype], f"{name} output {i}")
    for i, (a, b) in enumerate(zip(got_grads, ref_grads, strict=True)):
        assert b is not None and b.abs().max() > 0, f"{name}: input {i} gets no gradient (test would be vacuous)"
        assert_close_rel(a, b, TOL[dtype], f"{name} grad of input {i}")


@pytest.mark.parametrize("name", CASTING_REGIONS)
def test_region_out_dtype_rounds_only_the_outputs(name):
    """A region asked for bf16 outputs computes in its inputs' dtype and rounds once at the end: its outputs are
    exactly the fp32 outputs rounded (what the consuming matmul / WKV op would have cast them to). The gate g of
    v7_gates is a matmul result and keeps the matmul's dtype."""
    region = getattr(fused, name)
    seed = REGIONS.index(name)
    wide = region(*region_args(name, torch.float32, seed))
    narrow = region(*region_args(name, torch.float32, seed, out_dtype=torch.bfloat16))
    wide, narrow = (o if isinstance(o, tuple) else (o,) for o in (wide, narrow))
    kept = {4} if name == "v7_gates" else set()  # g
    if name.endswith("shift_mix"):
        kept = {len(wide) - 1}  # the carried row keeps the activations' dtype
    for i, (a, b) in enumerate(zip(narrow, wide, strict=True)):
        want = b if i in kept else b.to(torch.bfloat16)
        assert a.dtype == want.dtype and torch.equal(a, want), f"{name} output {i}"


def test_matmul_dtype_follows_autocast():
    x = torch.zeros(2, 3)
    assert fused.matmul_dtype(x) == torch.float32
    assert fused.matmul_dtype(x.double()) == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused.matmul_dtype(x) == torch.bfloat16
        assert fused.matmul_dtype(x.double()) == torch.float64  # autocast leaves fp64 alone


# ---- whole models ------------------------------------------------------------------------------------------------

VERSION_REGIONS = {
    7: ("v7_shift_mix", "v7_value_residual", "v7_gates", "v7_out", "v7_channel_mix"),
    6: ("v6_shift_mix", "gated_out", "v6_channel_mix"),
    5: ("v5_shift_mix", "gated_out", "v5_channel_mix"),
}


def _carried_state(model, seed: int):
    g = torch.Generator().manual_seed(seed)
    return model.zero_state(B).map(lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.5)


def _segments(model, lengths, state0, seed: int) -> dict:
    """Consecutive segments carrying the state (graph kept), then backward of a loss on every segment's logits and
    on the final state: gradients reach the start state through every segment boundary."""
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(seed)
    s0 = state0.clone().requires_grad_()
    state, logits, loss = s0, [], 0.0
    for n in lengths:
        out, state = model(torch.randint(0, V, (B, n), generator=g), state)
        logits.append(out)
        loss = loss + (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
    loss = loss + sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum() for t in state.tensors())
    loss.backward()
    return dict(logits=[x.detach() for x in logits], state=[t.detach() for t in state.tensors()],
                grads={n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                state_grads=list(s0.grads()))


def assert_runs_equal(got: dict, ref: dict, tol: float) -> None:
    for i, (a, b) in enumerate(zip(got["logits"], ref["logits"], strict=True)):
        assert_close_rel(a, b, tol, f"logits of segment {i}")
    for what, a, b in zip(("att_shift", "wkv", "ffn_shift"), got["state"], ref["state"]):
        assert_close_rel(a, b, tol, f"final state {what}")
    assert got["grads"].keys() == ref["grads"].keys()
    for name, b in ref["grads"].items():
        assert_close_rel(got["grads"][name], b, tol, f"grad {name}")
    for what, a, b in zip(("att_shift", "wkv", "ffn_shift"), got["state_grads"], ref["state_grads"]):
        assert b is not None and b.abs().max() > 0, f"no gradient into the carried {what}"
        assert_close_rel(a, b, tol, f"grad into the carried {what}")


@pytest.mark.parametrize(("version", "dtype"), [(5, torch.float32), (6, torch.float32), (7, torch.float32),
                                               (7, torch.float64)], ids=("5-f32", "6-f32", "7-f32", "7-f64"))
def test_model_fused_matches_plain(version, dtype, graph_compiles):
    """Segments of 5, 3 and 4 tokens from a non-zero state: fused == plain; the second length recompiles each
    region once with a symbolic time dimension, the third compiles nothing (no recompile per segment length)."""
    plain = tiny_model(version, seed=version, dtype=dtype)
    fast = tiny_model(version, seed=version, dtype=dtype, fuse="compile")
    state0 = _carried_state(plain, seed=version)
    ref = _segments(plain, (5, 3), state0, seed=version)
    assert_runs_equal(_segments(fast, (5, 3), state0, seed=version), ref, TOL[dtype])
    regions = VERSION_REGIONS[version]
    assert {r: graph_compiles[r] for r in regions} == dict.fromkeys(regions, 2)  # T=5 static, then T symbolic
    assert sum(graph_compiles.values()) == 2 * len(regions)
    _segments(fast, (4, 7), state0, seed=version + 1)
    assert sum(graph_compiles.values()) == 2 * len(regions)  # later lengths reuse the symbolic graph


def test_full_bptt_fused_matches_plain(graph_compiles):
    """The training path, RWKV-7: full BPTT (gradient-free forward + recompute, a shorter last segment) from a
    trainable non-zero state, fused == plain in loss, every parameter gradient and the start state's gradient."""
    version = 7
    g = torch.Generator().manual_seed(10 + version)
    inputs, targets = torch.randint(0, V, (B, 11), generator=g), torch.randint(0, V, (B, 11), generator=g)
    results = []
    for fuse in ("off", "compile"):
        model = tiny_model(version, seed=version, fuse=fuse)
        state = _carried_state(model, seed=version).requires_grad_()
        res = BPTTEngine(model, BPTTConfig(segment_len=4, mode="full")).forward_backward(inputs, targets, state=state)
        results.append((res.loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                        state.grads()))
    (ref_loss, ref_grads, ref_sg), (loss, grads, sg) = results
    # gradient-free pass (its first segment's state requires grad, later ones not), recompute, shorter last segment
    assert set(graph_compiles) == set(VERSION_REGIONS[version])
    assert all(n <= 4 for n in graph_compiles.values()), dict(graph_compiles)  # well under the recompile limit
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, b in ref_grads.items():
        assert_close_rel(grads[name], b, TOL[torch.float32], f"grad {name}")
    for what, a, b in zip(("att_shift", "wkv", "ffn_shift"), sg, ref_sg):
        assert_close_rel(a, b, TOL[torch.float32], f"grad into the start {what}")


# ---- the production path: real inductor ----------------------------------------------------------------------------

def test_inductor_v7_model_matches_plain():
    """fused.compiled as shipped (inductor, C++ on CPU): a whole RWKV-7 from a non-zero state, fp32, one length."""
    torch._dynamo.reset()  # drop the graph-backend entries: this test compiles through the real fused.compiled
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    plain = tiny_model(7, seed=7)
    fast = tiny_model(7, seed=7, fuse="compile")
    state0 = _carried_state(plain, seed=7)
    assert_runs_equal(_segments(fast, (5,), state0, seed=7), _segments(plain, (5,), state0, seed=7),
                      TOL[torch.float32])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs >= len(VERSION_REGIONS[7])


# ---- GPU: the same comparison with triton kernels, fp32 and bf16 autocast -------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("amp", (False, True), ids=("fp32", "bf16"))
@pytest.mark.parametrize("version", (5, 6, 7))
def test_cuda_full_bptt_fused_matches_plain(version, amp):
    """Full BPTT on CUDA (torch WKV backend, segments 16+16+2) from a trainable non-zero state: inductor-fused ==
    plain in loss, every parameter gradient and the start state's gradient (relative RMS error; bf16 autocast
    rounds at different points on the two paths, hence its looser bound)."""
    torch._dynamo.reset()
    g = torch.Generator(device="cuda").manual_seed(version)
    inputs = torch.randint(0, V, (2, 34), generator=g, device="cuda")
    targets = torch.randint(0, V, (2, 34), generator=g, device="cuda")
    results = []
    for fuse in ("off", "auto"):  # auto == compile on CUDA
        torch.manual_seed(0)
        cfg = ModelConfig(version=version, n_layer=2, n_embd=128, vocab_size=V, head_size=64, wkv_backend="torch",
                          fuse=fuse)
        model = RWKV(cfg).cuda()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        gs = torch.Generator(device="cuda").manual_seed(1)
        state = model.zero_state(2).map(
            lambda t: torch.randn(t.shape, generator=gs, device="cuda", dtype=t.dtype) * 0.5).requires_grad_()
        engine = BPTTEngine(model, BPTTConfig(segment_len=16, mode="full"))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            res = engine.forward_backward(inputs, targets, state=state)
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
        grads.update({f"state.{w}": t.float() for w, t in zip(("att_shift", "wkv", "ffn_shift"), state.grads())})
        results.append((res.loss, grads))
    (ref_loss, ref), (loss, got) = results
    bound = 5e-2 if amp else 1e-4
    assert loss == pytest.approx(ref_loss, rel=bound)
    assert got.keys() == ref.keys()
    rel = {n: ((got[n] - r).pow(2).mean().sqrt() / r.pow(2).mean().sqrt().clamp(min=1e-12)).item()
           for n, r in ref.items()}
    assert sum(1 for r in ref.values() if r.abs().max() > 0) > len(ref) // 2  # real gradients
    bad = {n: e for n, e in rel.items() if not e <= bound}
    assert not bad, bad
