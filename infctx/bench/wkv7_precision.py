"""How precise would a tensor-core (mma) wkv7 be? The exact chunked form with every matmul's operands rounded.

Issue 3's 6 Mtok/s target points at a chunked wkv7 on tensor cores, whose operands are bf16 or tf32 (fp32
accumulation). The question that decides the kernel's design is whether the 5e-3 contract (RMS(diff)/RMS(ref)
against float64, y, sT and every gradient incl. ds0) survives that rounding over long sequences, where the state is
fed back into a matmul once per chunk. This runs two exact chunked forms, `infctx.ops.wkv7_chunked` under autograd
and `infctx.ops.wkv7_chunk_grad` (the kernel's algorithm, backward by hand), unchanged, under a TorchFunctionMode
that rounds both operands of every matmul to the chosen format and multiplies in fp32; autograd's backward matmuls
round their operands the same way. Triangular solves stay fp32 (a kernel does those 16x16 solves on CUDA cores).

    python -m infctx.bench.wkv7_precision [--T 4096 16384] [--chunk 16] [--out bench/results/wkv7-mma-precision]

CPU only, minutes: the float64 oracle is the per-token recurrence.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from infctx.bench.kernels import make_inputs
from infctx.ops import wkv7_chunked, wkv7_naive
from infctx.ops._common import rel_rms
from infctx.ops.wkv7_chunk_grad import chunked_backward, chunked_forward

FORMATS = ("fp32", "tf32", "bf16", "bf16+tf32-state")
# "bf16+tf32-state": products with an N x N operand (the carried state, a chunk's transition) in tf32, the
# token-side ones (chunk x N by N x chunk, ...) in bf16 at twice the tensor-core rate
NAMES = ("r", "w", "k", "v", "a", "b", "s0")
STATE_N = 64  # head size of the study (a state is N x N)


def round_to(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """x (fp32) rounded to nearest in `fmt`, returned as fp32: tf32 keeps 10 mantissa bits, bf16 7."""
    if fmt == "fp32":
        return x
    if fmt == "bf16":
        return x.to(torch.bfloat16).float()
    if fmt == "tf32":  # add half of the dropped 13 bits' range, then clear them (ties away from zero)
        bits = x.contiguous().view(torch.int32)
        return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)
    raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")


class _RoundedMatmul(torch.autograd.Function):
    """a @ b with both operands rounded to `fmt`, fp32 products; the backward's two matmuls round alike."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, fmt: str) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        ctx.fmt = fmt
        return torch.matmul(round_to(a, fmt), round_to(b, fmt))

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        a, b = ctx.saved_tensors
        ra, rb, rg = round_to(a, ctx.fmt), round_to(b, ctx.fmt), round_to(g.contiguous(), ctx.fmt)
        da = torch.matmul(rg, rb.mT)
        db = torch.matmul(ra.mT, rg)
        return _sum_to(da, a.shape), _sum_to(db, b.shape), None


def _sum_to(g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Undo matmul's batch broadcasting."""
    return g.sum_to_size(shape) if g.shape != shape else g


class RoundedMatmuls(TorchFunctionMode):
    """Within this mode every fp32 `@` / torch.matmul rounds its operands to `fmt` (see _RoundedMatmul)."""

    def __init__(self, fmt: str):
        super().__init__()
        self.fmt = fmt

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__) and not kwargs and \
                all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in args[:2]):
            return _RoundedMatmul.apply(args[0], args[1], self.format_of(args[0], args[1]))
        return func(*args, **kwargs)

    def format_of(self, a: torch.Tensor, b: torch.Tensor) -> str:
        if self.fmt != "bf16+tf32-state":
            return self.fmt
        state_sized = any(t.dim() >= 2 and t.shape[-1] == t.shape[-2] == STATE_N for t in (a, b))
        return "tf32" if state_sized else "bf16"


def run(op, x: dict, gy: torch.Tensor, gs: torch.Tensor, double: bool = False) -> dict[str, torch.Tensor]:
    """y, sT and the gradients of <y, gy> + <sT, gs> into every input (ds0 included)."""
    leaves = {n: (x[n].detach().double() if double else x[n].detach().float()).requires_grad_() for n in NAMES}
    y, sT = op(*(leaves[n] for n in NAMES[:-1]), leaves["s0"])
    torch.autograd.backward([y, sT], [gy.to(y.dtype), gs.to(sT.dtype)])
    return dict(y=y.detach(), sT=sT.detach(), **{"d" + n: leaves[n].grad for n in NAMES})


def run_hand(x: dict, gy: torch.Tensor, gs: torch.Tensor, chunk: int) -> dict[str, torch.Tensor]:
    """The same outputs from infctx.ops.wkv7_chunk_grad: the kernel's own algorithm, backward written by hand."""
    xs = [x[n].detach().float() for n in NAMES]
    y, sT, _, _ = chunked_forward(*xs, chunk)
    grads = chunked_backward(*xs, gy, gs, chunk)
    return dict(y=y, sT=sT, **{"d" + n: grads[n] for n in NAMES})


ALGORITHMS = {  # name -> run(x, gy, gs, chunk)
    "autograd": lambda x, gy, gs, chunk: run(lambda *xs: wkv7_chunked(*xs, chunk_len=chunk), x, gy, gs),
    "hand": run_hand,
}


def measure(T: int, chunk: int, H: int = 2, seed: int = 0) -> dict:
    """Worst and per-tensor relative RMS errors of each operand format at length T, bf16 inputs, fp32 state."""
    x = make_inputs(7, 1, T, H, STATE_N, seed=seed, device="cpu")
    g = torch.Generator().manual_seed(seed + 1)
    gy, gs = torch.randn(1, T, H, STATE_N, generator=g), torch.randn(1, H, STATE_N, STATE_N, generator=g)
    ref = run(wkv7_naive, x, gy, gs, double=True)
    out = dict(T=T, chunk=chunk, H=H, formats={})
    for algo, go in ALGORITHMS.items():
        for fmt in FORMATS:
            with RoundedMatmuls(fmt):
                got = go(x, gy, gs, chunk)
            errors = {name: rel_rms(got[name], ref[name]) for name in ref}
            key = f"{algo}/{fmt}"
            out["formats"][key] = dict(worst=max(errors.values()), worst_of=max(errors, key=errors.get), errors=errors)
            print(f"T={T} {key}: worst {out['formats'][key]['worst']:.2e} ({out['formats'][key]['worst_of']})",
                  flush=True)
    return out


def markdown(res: dict) -> str:
    lines = [f"# wkv7 chunked form with rounded matmul operands ({res['date']})", "",
             "RMS(diff)/RMS(ref) against the float64 per-token oracle; bf16 inputs (the kernel benchmark's "
             "distribution), fp32 state, B=1, H=2, N=64, random dy and dsT. Every matmul rounds both operands; "
             f"products in fp32; chunks of {res['rows'][0]['chunk']}. Algorithms: `autograd` = `wkv7_chunked` "
             "under autograd, `hand` = `infctx.ops.wkv7_chunk_grad` (the kernel's algorithm, hand-written "
             "backward). Contract: 5e-3.", "",
             "| T | algorithm / operands | worst | of | y | sT | ds0 |", "|---|---|---|---|---|---|---|"]
    for row in res["rows"]:
        for fmt, f in row["formats"].items():
            e = f["errors"]
            lines.append(f"| {row['T']} | {fmt} | {f['worst']:.2e} | {f['worst_of']} | {e['y']:.1e} | "
                         f"{e['sT']:.1e} | {e['ds0']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path("bench/results/wkv7-mma-precision"))
    args = p.parse_args(argv)
    res = dict(date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), torch=torch.__version__,
               rows=[measure(T, args.chunk) for T in args.T])
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in (("precision.json", json.dumps(res, indent=1)), ("precision.md", markdown(res))):
        tmp = args.out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.out / name)
    print(markdown(res))


if __name__ == "__main__":
    main()
