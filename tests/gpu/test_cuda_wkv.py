"""GPU checks of the CUDA WKV kernels against the float64 torch oracle (infctx.ops *_naive on float64 copies).

Every test is skipped with a reason when no CUDA GPU is visible. Tolerance: RMS(diff)/RMS(ref) <= 5e-3 for
bf16 inputs, <= 1e-5 for fp32 inputs, on y, sT and every gradient including ds0 with a random incoming dsT.
"""

from __future__ import annotations

import pytest
import torch

from infctx import ops
from infctx.ops._common import rel_rms

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")]

TOL = {torch.bfloat16: 5e-3, torch.float32: 1e-5}
NAIVE = {5: "wkv5_naive", 6: "wkv6_naive", 7: "wkv7_naive"}


def make_inputs(version: int, B: int, T: int, H: int, N: int, dtype: torch.dtype, seed: int) -> dict:
    """Random inputs in the ranges a model produces: RWKV-7 gets a = -kappa, b = kappa * alpha (kappa unit-norm),
    so the transition stays contractive over long T, as in the real model."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda *shape, scale=1.0: torch.randn(*shape, generator=g, device="cuda") * scale  # noqa: E731
    x = dict(r=rnd(B, T, H, N, scale=0.5), k=rnd(B, T, H, N, scale=0.5), v=rnd(B, T, H, N))
    if version == 7:
        kappa = torch.nn.functional.normalize(rnd(B, T, H, N), dim=-1)
        alpha = torch.sigmoid(rnd(B, T, H, N))
        x.update(w=rnd(B, T, H, N, scale=1.5) - 0.5, a=-kappa, b=kappa * alpha)
        order = ("r", "w", "k", "v", "a", "b")
    else:
        wshape = (B, T, H, N) if version == 6 else (H, N)
        x.update(w=rnd(*wshape, scale=0.7) - 1.0, u=rnd(H, N, scale=0.5))
        order = ("r", "w", "k", "v", "u")
    out = {name: x[name].to(dtype).contiguous() for name in order}
    out["s0"] = rnd(B, H, N, N, scale=0.3)
    return out


def run(fn, inputs: dict, gy: torch.Tensor, gs: torch.Tensor, double: bool = False) -> dict:
    """Forward + backward with upstream grads (gy, gs); returns y, sT and the gradient of every input."""
    leaves = {n: (t.double() if double else t.clone()).requires_grad_(True) for n, t in inputs.items()}
    y, sT = fn(*leaves.values())
    torch.autograd.backward([y, sT], [gy.to(y.dtype), gs.to(sT.dtype)])
    return {"y": y.detach(), "sT": sT.detach(), **{f"d{n}": t.grad for n, t in leaves.items()}}


def check_against_reference(version: int, B: int, T: int, H: int, N: int, dtype: torch.dtype, seed: int = 0,
                            ref_device: str = "cuda", knob: dict | None = None) -> dict:
    """`knob`: keyword arguments of the op (wkv7's `split`; wkv5/6's `kernel` and `rows_per_block`)."""
    inputs = make_inputs(version, B, T, H, N, dtype, seed)
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    gy = torch.randn(B, T, H, N, generator=g, device="cuda")
    gs = torch.randn(B, H, N, N, generator=g, device="cuda")
    op = ops.get_wkv(version, "cuda")
    got = run(lambda *xs: op(*xs, **(knob or {})), inputs, gy, gs)
    naive = getattr(ops, NAIVE[version])
    ref = run(naive, {n: t.to(ref_device) for n, t in inputs.items()}, gy.to(ref_device).double(),
              gs.to(ref_device).double(), double=True)
    errors = {name: rel_rms(got[name].float().cpu(), ref[name].cpu()) for name in ref}
    bad = {n: e for n, e in errors.items() if not e <= TOL[dtype]}  # `not <=` also catches NaN
    assert not bad, f"wkv{version} {dtype} B={B} T={T} H={H} N={N}: rel RMS over {TOL[dtype]:g}: {bad}"
    return errors


# B>1, T=1, T multiple of 16, T not multiple of 16; B*H >= 32, >= 64, >= 128 switch the kernels' tilings
SHAPES = [(2, 37, 3), (3, 1, 2), (1, 64, 2), (2, 100, 1), (2, 19, 40), (4, 20, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}H{}".format(*s))
@pytest.mark.parametrize("version", [5, 6, 7])
def test_matches_float64_reference(version, shape, dtype):
    check_against_reference(version, *shape, N=64, dtype=dtype)


@pytest.mark.parametrize("rows", [0, 8, 16, 64])
@pytest.mark.parametrize("version", [5, 6])
def test_sequential_kernel_every_row_split(version, rows):
    """The sequential wkv5/6 kernel (the default is the chunked one), under each block tiling (rows of a head per
    block: atomics or not, shared or global scratch; 0 = by B*H), is exact."""
    knob = {"kernel": "sequential", "rows_per_block": rows}
    check_against_reference(version, 2, 37, 3, 64, torch.float32, knob=knob)
    check_against_reference(version, 2, 21, 2, 64, torch.bfloat16, knob=knob)
    check_against_reference(version, 4, 20, 64, 64, torch.float32, knob=knob)


@pytest.mark.parametrize("version", [5, 6])
def test_chunked_kernel_extreme_decays(version):
    """The chunked kernel forms in-chunk decays pairwise: decays of ~1 (w = -8) and ~2e-9 per token (w = +3) stay
    exact in fp32 (no ratio of cumulative decays that could overflow)."""
    inputs = make_inputs(version, 2, 50, 2, 64, torch.float32, seed=13)
    g = torch.Generator(device="cuda").manual_seed(14)
    inputs["w"] = torch.where(torch.rand(inputs["w"].shape, generator=g, device="cuda") < 0.5, -8.0, 3.0)
    gy = torch.randn(inputs["r"].shape, generator=g, device="cuda")
    gs = torch.randn(inputs["s0"].shape, generator=g, device="cuda")
    got = run(ops.get_wkv(version, "cuda"), inputs, gy, gs)
    ref = run(getattr(ops, NAIVE[version]), inputs, gy.double(), gs.double(), double=True)
    errors = {name: rel_rms(got[name], ref[name]) for name in ref}
    assert max(errors.values()) <= 1e-5, errors


def test_chunked_kernel_floored_decay():
    """wkv6, one near-zero decay per chunk among slow ones: w = 8 (log-decay -2981) and w = 100 (-exp(w) = -inf in
    fp32) stay finite and within 1e-5 of float64 (the kernel floors the log-decay at -22; see
    tests/test_wkv56_chunk_math.py for the same check of its math on CPU)."""
    inputs = make_inputs(6, 1, 64, 2, 64, torch.float32, seed=15)
    w = torch.full_like(inputs["w"], -7.0)
    w[:, 3::32], w[:, 19::32] = 8.0, 100.0
    inputs["w"] = w.contiguous()
    g = torch.Generator(device="cuda").manual_seed(16)
    gy = torch.randn(inputs["r"].shape, generator=g, device="cuda")
    gs = torch.randn(inputs["s0"].shape, generator=g, device="cuda")
    got = run(ops.get_wkv(6, "cuda"), inputs, gy, gs)
    ref = run(ops.wkv6_naive, inputs, gy.double(), gs.double(), double=True)
    errors = {name: rel_rms(got[name], ref[name]) for name in ref}
    assert max(errors.values()) <= 1e-5, errors


@pytest.mark.parametrize("split", [2, 4, 8])
@pytest.mark.parametrize("shape", [(2, 37, 3), (2, 21, 32), (4, 33, 64)], ids=lambda s: "B{}T{}H{}".format(*s))
def test_wkv7_every_split(shape, split):
    """Each wkv7 split (threads per state row/column), under each forward block grouping (B*H < 32, < 128, >= 128)."""
    check_against_reference(7, *shape, N=64, dtype=torch.float32, knob={"split": split})
    check_against_reference(7, *shape, N=64, dtype=torch.bfloat16, knob={"split": split})


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("shape", [(2, 37, 3), (4, 33, 64)], ids=lambda s: "B{}T{}H{}".format(*s))
def test_wkv7_every_forward_grouping(shape, groups):
    """Each forward grouping (blocks per head), forced where the auto rule picks another (B*H = 6: 4, 256: 1)."""
    for dtype in (torch.float32, torch.bfloat16):
        check_against_reference(7, *shape, N=64, dtype=dtype, knob={"groups": groups, "span": 0})


def off_by_one_element(x: torch.Tensor) -> torch.Tensor:
    """x's values in a view that starts one element into its buffer (not 16-byte aligned); differentiable."""
    buf = torch.zeros(x.numel() + 1, dtype=x.dtype, device=x.device)
    return torch.cat([buf[:1], x.flatten()])[1:].view(x.shape)


@pytest.mark.parametrize("version", [5, 6, 7])
def test_inputs_that_start_mid_row(version):
    """The kernels read rows as 16-byte vectors: inputs (and the incoming gradient) that start mid-row are copied
    first, with the same result."""
    B, T, H, N = 2, 40, 3, 64
    inputs = make_inputs(version, B, T, H, N, torch.bfloat16, seed=21)
    assert off_by_one_element(inputs["r"]).data_ptr() % 16 != 0
    g = torch.Generator(device="cuda").manual_seed(22)
    gy, gs = torch.randn(B, T, H, N, generator=g, device="cuda"), torch.randn(B, H, N, N, generator=g, device="cuda")
    op = ops.get_wkv(version, "cuda")

    def shifted(*xs):
        y, sT = op(*[off_by_one_element(x) if x.dim() == 4 and x.shape[1] == T else x for x in xs])
        return off_by_one_element(y), sT

    got, ref = run(shifted, inputs, gy, gs), run(op, inputs, gy, gs)
    for name in ref:  # every kernel these calls take (wkv7 sequential, wkv5/6 chunked) is deterministic
        assert torch.equal(got[name], ref[name]), name


@pytest.mark.parametrize("knob", [dict(kernel="chunked"), dict(kernel="sequential", rows_per_block=16),
                                  dict(kernel="sequential", rows_per_block=8)], ids=["chunked", "seq-rows16", "seq-rows8"])
@pytest.mark.parametrize("version", [5, 6])
def test_wkv56_gradients_are_deterministic(version, knob):
    """Every gradient comes out as the same bits on every run, where sums cross blocks too: du (and wkv5's dw) over
    every chunk of a head (chunked kernel), and dr/dk/dw/du over the 4 or 8 blocks that share a head (sequential
    kernel with 16 or 8 value rows per block). Each block stores its share and the host sums them in a fixed order;
    no atomics."""
    inputs = make_inputs(version, 2, 300, 3, 64, torch.bfloat16, seed=31)
    g = torch.Generator(device="cuda").manual_seed(32)
    gy = torch.randn(2, 300, 3, 64, generator=g, device="cuda")
    gs = torch.randn(2, 3, 64, 64, generator=g, device="cuda")
    op = ops.get_wkv(version, "cuda")
    first, second = (run(lambda *xs: op(*xs, **knob), inputs, gy, gs) for _ in range(2))
    for name in first:
        assert torch.equal(first[name], second[name]), name


def call_extension_forward(version: int, bad: str = "") -> None:
    """One direct forward call into the extension (bypassing the op's Python checks) with every buffer sized for
    its input, or with the state (bad="state") or the checkpoints (bad="checkpoints") one element row short."""
    from infctx.ops.cuda_build import load_extension

    B, T, H, N = 2, 20, 2, 64
    x = make_inputs(version, B, T, H, N, torch.float32, seed=1)
    ext = load_extension(version, N, x["r"].device)
    nc = -(-T // ext.chunk_len())
    f32 = lambda *shape: torch.zeros(*shape, device="cuda")  # noqa: E731
    s0 = f32(B, H, N, N - 1) if bad == "state" else x["s0"]
    ckpt = f32(B, H, nc - 1 if bad == "checkpoints" else nc, N, N)
    y, sT = torch.empty_like(x["r"]), f32(B, H, N, N)
    if version == 7:
        ext.forward(*(x[n] for n in ("r", "w", "k", "v", "a", "b")), s0, y, sT, ckpt, f32(B, T, H, N), 0, 0)
    else:
        ext.forward(*(x[n] for n in ("r", "w", "k", "v", "u")), s0, y, sT, ckpt, 0)
    torch.cuda.synchronize()


@pytest.mark.parametrize("version", [5, 6, 7])
def test_extension_forward_with_buffers_of_the_right_size(version):
    call_extension_forward(version)


@pytest.mark.parametrize("version", [5, 6, 7])
def test_bindings_refuse_wrong_buffer_sizes(version):
    """A direct call with a state or checkpoint buffer of the wrong size is refused with one line (the kernels index
    those buffers from the input's shape). Run in a child process, so that a crash there fails this test only: on
    the H200 image of 2026-12-01 a TORCH_CHECK thrown inside an extension killed the process (cuda/wkv_error.h)."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, tests.gpu.test_cuda_wkv as t\n"
            "for bad in ('state', 'checkpoints'):\n"
            "    try:\n"
            f"        t.call_extension_forward({version}, bad)\n"
            "    except RuntimeError as err:\n"
            "        print('refused', bad, '|', str(err).splitlines()[0])\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for bad in ("state", "checkpoints"):
        assert f"refused {bad} | wkv: the {bad}" in done.stdout, done.stdout


@pytest.mark.parametrize("split", [0, 2, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 45, 2), (2, 5, 128)], ids=lambda s: "B{}T{}H{}".format(*s))
def test_wkv7_head_size_128(shape, dtype, split):
    check_against_reference(7, *shape, N=128, dtype=dtype, knob={"split": split})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 37, 3), (3, 1, 2), (1, 64, 2), (2, 19, 40), (2, 1000, 4)],
                         ids=lambda s: "B{}T{}H{}".format(*s))
@pytest.mark.parametrize("N", [64, 128])
def test_wkv7_chunked_forward(shape, dtype, N):
    """The chunked tensor-core forward (fp32-grade products) feeds the sequential backward: y, sT and every gradient
    within the same contracts as the sequential forward (fp32 1e-5, bf16 5e-3)."""
    check_against_reference(7, *shape, N=N, dtype=dtype, knob={"forward": "chunked", "span": 0})


def test_wkv7_chunked_forward_equals_sequential_forward():
    """Both forwards write the same y, sT, checkpoints and sa (fp32 inputs, T not a multiple of 16, non-zero s0)."""
    from infctx.ops.cuda_build import load_extension
    from infctx.ops.cuda_wkv import _forward7

    x = make_inputs(7, 2, 45, 3, 64, torch.float32, seed=5)
    ext = load_extension(7, 64, torch.device("cuda"))
    seq = [x[n] for n in ("r", "w", "k", "v", "a", "b")]
    outs = [_forward7(ext, seq, x["s0"], 0, 0, kernel) for kernel in ("sequential", "chunked")]
    for name, want, got in zip(("y", "sT", "ckpt", "sa"), *outs):
        assert rel_rms(got, want) < 5e-6, name


@pytest.mark.parametrize("forward", ["sequential", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 37, 3), (3, 1, 2), (1, 64, 2), (2, 19, 40), (2, 1000, 4)],
                         ids=lambda s: "B{}T{}H{}".format(*s))
def test_wkv7_chunked_backward(shape, dtype, forward):
    """The chunked tensor-core backward (head size 64), after either forward, against float64."""
    check_against_reference(7, *shape, N=64, dtype=dtype, knob={"forward": forward, "backward": "chunked"})


def test_wkv7_chunked_backward_long_sequence_no_drift():
    """T = 16384 in bf16 through the chunked forward and backward against float64 (1024 chunks of state carried)."""
    check_against_reference(7, 1, 16384, 1, 64, torch.bfloat16, seed=3,
                            knob={"forward": "chunked", "backward": "chunked"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_wkv7_chunked_state_gradient_pass(dtype):
    """The chunked state-gradient pass (tensor cores) gives ds0 for a random dy and dsT against float64."""
    from infctx.ops.cuda_build import load_extension

    B, T, H, N = 2, 45, 3, 64
    inputs = make_inputs(7, B, T, H, N, dtype, seed=3)
    g = torch.Generator(device="cuda").manual_seed(4)
    gy = torch.randn(B, T, H, N, generator=g, device="cuda")
    gs = torch.randn(B, H, N, N, generator=g, device="cuda")
    ref = run(ops.wkv7_naive, inputs, gy.double(), gs.double(), double=True)
    ext = load_extension(7, N, torch.device("cuda"))
    nc = -(-T // ext.chunk_len())
    dckpt, rows = torch.empty(B, H, nc, N, N, device="cuda"), torch.empty(B, T, H, N, device="cuda")
    ds0, packet = torch.empty(B, H, N, N, device="cuda"), torch.empty(B * H * nc, ext.packet_floats(), device="cuda")
    seq = [inputs[n] for n in ("r", "w", "k", "v", "a", "b")]
    ext.backward_state_chunked(*seq, gy.to(dtype).contiguous(), gs, dckpt, rows, ds0, packet)
    assert rel_rms(ds0, ref["ds0"]) <= TOL[dtype]
    assert torch.equal(dckpt[:, :, -1], gs)  # the gradient at the last chunk's end is dsT itself


def test_wkv7_decay_near_one_and_strong():
    """Backstepping divides by the decay: check the extremes of sigmoid (w = +-12) against the oracle in fp32."""
    inputs = make_inputs(7, 2, 50, 2, 64, torch.float32, seed=11)
    B, T, H, N = inputs["r"].shape
    g = torch.Generator(device="cuda").manual_seed(12)
    extremes = torch.where(torch.rand(B, T, H, N, generator=g, device="cuda") < 0.5, -12.0, 12.0)
    gy, gs = torch.randn(B, T, H, N, generator=g, device="cuda"), torch.randn(B, H, N, N, generator=g, device="cuda")
    inputs["w"] = extremes.contiguous()
    got = run(ops.get_wkv(7, "cuda"), inputs, gy, gs)
    ref = run(ops.wkv7_naive, inputs, gy.double(), gs.double(), double=True)
    errors = {name: rel_rms(got[name], ref[name]) for name in ref if ref[name].abs().max() > 0}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-5, f"worst {worst}: {errors[worst]:.2e}; all: " + ", ".join(
        f"{k} {v:.1e}" for k, v in errors.items())


@pytest.mark.parametrize("version", [5, 6, 7])
def test_long_sequence_no_drift(version):
    """T = 16384 in bf16 against the float64 oracle: catches drift from the checkpoint/recompute scheme."""
    check_against_reference(version, 1, 16384, 1, 64, torch.bfloat16, seed=3)


@pytest.mark.parametrize("version", [5, 6, 7])
def test_chained_segments_equal_one_call(version):
    """Kernel calls over segments, state carried (and its gradient flowing back), equal one call."""
    B, H, N, cuts = 2, 2, 64, [0, 20, 36, 37, 64, 90]
    T = cuts[-1]
    inputs = make_inputs(version, B, T, H, N, torch.float32, seed=7)
    g = torch.Generator(device="cuda").manual_seed(8)
    gy, gs = torch.randn(B, T, H, N, generator=g, device="cuda"), torch.randn(B, H, N, N, generator=g, device="cuda")
    op = ops.get_wkv(version, "cuda")
    whole = run(op, inputs, gy, gs)

    def chained(*args):
        *xs, s = args
        seq = [name for name, t in zip(inputs, xs) if t.dim() == 4]
        ys = []
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            part = [t[:, lo:hi].contiguous() if name in seq else t for name, t in zip(inputs, xs)]
            y, s = op(*part, s)
            ys.append(y)
        return torch.cat(ys, dim=1), s

    parts = run(chained, inputs, gy, gs)
    errors = {name: rel_rms(parts[name], whole[name]) for name in whole}
    # The forward is the same arithmetic either way (y, sT agree to 1e-6). wkv7's backward rebuilds states by
    # backstepping from end-of-chunk checkpoints, which sit elsewhere when a call starts mid-sequence: gradients
    # then agree to fp32 rounding, the bound the float64-reference tests use.
    grad_tol = 1e-5 if version == 7 else 1e-6
    assert all(e <= (1e-6 if name in ("y", "sT") else grad_tol) for name, e in errors.items()), errors


SPAN_SHAPES = [(1, 256, 2, 64), (2, 192, 3, 64), (2, 128, 2, 128), (1, 1024, 8, 64)]  # B, T, H, span


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SPAN_SHAPES, ids=lambda s: "B{}T{}H{}L{}".format(*s))
def test_wkv7_span_path(shape, dtype):
    """wkv7's span path (T cut into spans that run as batch rows, tied by N x N transfers; math in
    tests/test_wkv7_span_math.py): span rows B*H*T/span < 32 and >= 128 switch its forward grouping; one span too."""
    B, T, H, span = shape
    check_against_reference(7, B, T, H, 64, dtype, knob={"span": span})


@pytest.mark.parametrize("split", [0, 8])
def test_wkv7_span_path_head_size_128(split):
    check_against_reference(7, 1, 256, 2, 128, torch.float32, knob={"span": 64, "split": split})
    check_against_reference(7, 2, 128, 1, 128, torch.bfloat16, knob={"span": 64, "split": split})


@pytest.mark.parametrize("span", [64, 1024])
def test_wkv7_span_path_long_sequence_no_drift(span):
    """T = 16384 in bf16 on the span path: 256 (or 16) spans tied by the scan."""
    check_against_reference(7, 1, 16384, 1, 64, torch.bfloat16, seed=3, knob={"span": span})


def test_wkv7_span_path_chained_and_auto():
    """Segments of 128/256 tokens on the span path, state carried, equal one sequential call; the auto rule takes
    the span path for few heads and long T."""
    from infctx.ops import cuda_wkv

    assert cuda_wkv.auto_span(1, 16384, 32) == 512 and cuda_wkv.auto_span(4, 4096, 32) == 0
    B, H, N, cuts = 1, 2, 64, [0, 128, 384, 512]
    inputs = make_inputs(7, B, cuts[-1], H, N, torch.float32, seed=9)
    g = torch.Generator(device="cuda").manual_seed(10)
    gy = torch.randn(B, cuts[-1], H, N, generator=g, device="cuda")
    gs = torch.randn(B, H, N, N, generator=g, device="cuda")
    op = ops.get_wkv(7, "cuda")
    whole = run(lambda *xs: op(*xs, span=0), inputs, gy, gs)

    def chained(*xs):
        *seq, s = xs
        ys = []
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            y, s = op(*(t[:, lo:hi].contiguous() for t in seq), s, span=64)
            ys.append(y)
        return torch.cat(ys, dim=1), s

    parts = run(chained, inputs, gy, gs)
    errors = {name: rel_rms(parts[name], whole[name]) for name in whole}
    assert all(e <= 1e-5 for e in errors.values()), errors


def test_bad_inputs_give_one_clear_line():
    inputs = make_inputs(7, 1, 8, 2, 64, torch.float32, seed=0)
    op = ops.get_wkv(7, "cuda")
    args = list(inputs.values())
    with pytest.raises(ValueError, match="not contiguous"):
        op(args[0].transpose(1, 2).contiguous().transpose(1, 2), *args[1:])
    with pytest.raises(ValueError, match="float16"):
        op(*[t.half() for t in args[:6]], args[6])
    with pytest.raises(ValueError, match="head size 32"):
        op(*[t[..., :32].contiguous() for t in args[:6]], None)
    with pytest.raises(ValueError, match="span=100 must be 0"):
        op(*args, span=100)


def test_auto_picks_cuda_on_gpu():
    assert ops.resolve_backend("auto", "cuda", version=7) == "cuda"
    assert ops.resolve_backend("auto", "cpu", version=7) == "torch"


def test_second_load_uses_the_cache():
    from infctx.ops import cuda_build

    cuda_build.load_extension(7, 64)  # built by the tests above
    cfg = cuda_build.BuildConfig()
    key = cuda_build.build_key(7, 64, torch.cuda.get_device_capability())
    assert (cfg.cache_dir / f"infctx_wkv7_n64_{key}" / "BUILD_OK").is_file()


@pytest.mark.parametrize("N", [64, 128])
def test_preflight_shared_memory_table_matches_the_build(N):
    """cuda_build.SMEM_NEEDED (checked before a build, so written by hand) lists each wkv7 head size whose largest
    block needs more than the 99 KiB every sm_80+ GPU allows, with the figure the built extension reports."""
    from infctx.ops import cuda_build

    need = cuda_build.load_extension(7, N).smem_bytes()
    listed = cuda_build.SMEM_NEEDED.get((7, N))
    assert listed == (need if need > 99 * 1024 else None), (N, need, listed)
