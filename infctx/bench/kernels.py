"""`make bench-kernels`: forward+backward time of our CUDA WKV kernels next to fla's chunked Triton kernels.

bf16 inputs, fp32 state in and out (initial_state and output_final_state on for fla too), N = 64, the shapes
of issue 3. RWKV-7 is compared with fla `chunk_rwkv7` (w passed as log-decay), RWKV-5/6 with fla
`chunk_rwkv6` (RWKV-5's constant decay expanded over time); wkv5/6 time both our kernels, the chunk-parallel
default (`ours`) and the sequential one (`ours-seq`); wkv7 times the default (`ours`) and one pass over the whole
T (`ours-seq`), and with --sweep also the chunked tensor-core forward (`ours-chunked`, and with the span path where it
applies: `ours-chunked-spans`) and backward (`ours-chunked-bwd`; both chunked: `ours-chunked-both`). Writes
bench/results/kernels.json and kernels.md.
Timing: CUDA events around fwd+bwd, median of `reps` after `warmup` runs; peak memory is the allocator's peak
during one fwd+bwd above what the inputs already hold.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from infctx.fileio import write_text_atomic
from infctx.ops._common import rel_rms

SHAPES = ((1, 16384, 32), (4, 4096, 32), (8, 4096, 12), (16, 1024, 32))
LOG_DECAY7 = -math.exp(-0.5)


@dataclass
class BenchConfig:
    out_dir: Path = Path("bench/results")
    versions: tuple[int, ...] = (7, 6, 5)
    shapes: tuple[tuple[int, int, int], ...] = SHAPES
    head_size: int = 64
    warmup: int = 3
    reps: int = 10
    with_fla: bool = True
    sweep: bool = False  # also each forced tiling (wkv7: split, wkv5/6: rows per block) and wkv7's chunked kernels
    profile: bool = False  # also record the GPU time per kernel of each of our variants (torch profiler)


def make_inputs(version: int, B: int, T: int, H: int, N: int, seed: int = 0,
                device: str = "cuda") -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *s, scale=1.0: torch.randn(*s, generator=g, device=device) * scale  # noqa: E731
    x = dict(r=rnd(B, T, H, N, scale=0.5), k=rnd(B, T, H, N, scale=0.5), v=rnd(B, T, H, N))
    if version == 7:
        kappa = torch.nn.functional.normalize(rnd(B, T, H, N), dim=-1)
        x.update(w=rnd(B, T, H, N) - 0.5, a=-kappa, b=kappa * torch.sigmoid(rnd(B, T, H, N)))
        order = ("r", "w", "k", "v", "a", "b")
    else:
        x.update(w=rnd(*((B, T, H, N) if version == 6 else (H, N)), scale=0.7) - 1.0, u=rnd(H, N, scale=0.5))
        order = ("r", "w", "k", "v", "u")
    out = {n: x[n].to(torch.bfloat16).requires_grad_(True) for n in order}
    out["s0"] = rnd(B, H, N, N, scale=0.3).requires_grad_(True)
    return out


SPAN_SWEEP = (128, 256, 512, 1024)  # wkv7 span lengths timed by --sweep
GROUPS_SWEEP = (1, 2, 4)  # wkv7 forward blocks per head timed by --sweep (sequential kernels)
SWEEP = {7: ("s", "split", (2, 4, 8)), 6: ("r", "rows_per_block", (8, 16, 64)), 5: ("r", "rows_per_block", (8, 16, 64))}


def ours(version: int, tiling: int = 0, kernel: str = "chunked", span: int | None = None, groups: int = 0,
         forward: str = "sequential", backward: str = "sequential") -> Callable:
    """Our kernel; tiling != 0 forces the tuning knob (wkv7: threads per state row, wkv5/6: rows per block of
    the sequential kernel); `kernel` picks wkv5/6's chunk-parallel or sequential kernel, `span` wkv7's span
    length (None: auto, 0: the whole T in one pass), `groups` wkv7's forward blocks per head, `forward` and
    `backward` wkv7's forward and backward kernels (sequential, chunked)."""
    from infctx import ops

    op = ops.get_wkv(version, "cuda")
    knobs = {SWEEP[version][1]: tiling}
    if version != 7:
        knobs["kernel"] = "sequential" if tiling else kernel
    else:
        knobs.update(span=span, groups=groups, forward=forward, backward=backward)
    return lambda x: op(*x.values(), **knobs)


def fla(version: int) -> Callable:
    """fla's kernel on our inputs: decay logits turned into fla's log-decay inside the timed region."""
    if version == 7:
        from fla.ops.rwkv7 import chunk_rwkv7

        def run7(x):
            logw = LOG_DECAY7 * torch.sigmoid(x["w"].float())
            return chunk_rwkv7(x["r"], logw.to(x["r"].dtype), x["k"], x["v"], x["a"], x["b"], scale=1.0,
                               initial_state=x["s0"], output_final_state=True)
        return run7
    from fla.ops.rwkv6 import chunk_rwkv6

    def run56(x):
        w = x["w"] if x["w"].dim() == 4 else x["w"].expand_as(x["r"])
        logw = -torch.exp(w.float())
        return chunk_rwkv6(x["r"], x["k"], x["v"], logw.to(x["r"].dtype), x["u"], scale=1.0,
                           initial_state=x["s0"], output_final_state=True)
    return run56


def measure(fn: Callable, x: dict, cfg: BenchConfig) -> dict:
    y0, s0 = fn(x)
    gy, gs = torch.randn_like(y0), torch.randn_like(s0)
    del y0, s0

    def fwd_bwd():
        for t in x.values():
            t.grad = None
        y, s = fn(x)
        torch.autograd.backward([y, s], [gy, gs])

    def fwd():
        with torch.no_grad():
            fn(x)

    def timed(step) -> float:
        for _ in range(cfg.warmup):
            step()
        times = []
        for _ in range(cfg.reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    ms = timed(fwd_bwd)
    ms_fwd = timed(fwd)
    for t in x.values():
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return dict(ms_fwd=round(ms_fwd, 4), ms_fwd_bwd=round(ms, 4), peak_mib=round(peak, 1))


def kernel_times(fn: Callable, x: dict, steps: int = 3) -> list[dict]:
    """GPU time per CUDA kernel over `steps` fwd+bwd (torch profiler), largest first: where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    y0, s0 = fn(x)
    gy, gs = torch.randn_like(y0), torch.randn_like(s0)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            for t in x.values():  # as in measure(): no gradient accumulation kernels in the table
                t.grad = None
            y, s = fn(x)
            torch.autograd.backward([y, s], [gy, gs])
        torch.cuda.synchronize()
    rows = [dict(kernel=e.key[:90], ms_per_step=round(e.device_time_total / 1e3 / steps, 4), calls=e.count // steps)
            for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r["ms_per_step"])[:10]


def agreement(version: int) -> float:
    """RMS(y_ours - y_fla)/RMS(y_fla) on a small shape: proves both compute the same function."""
    x = make_inputs(version, 1, 256, 4, 64, seed=5)
    with torch.no_grad():
        a, _ = ours(version)(x)
        b, _ = fla(version)({**x, "s0": x["s0"].transpose(-1, -2).contiguous()})  # fla's state is [key, value]
    return rel_rms(a, b)


def shape_rows(version: int, B: int, T: int, H: int, times: dict[str, dict], cfg: BenchConfig) -> list[dict]:
    """One row per impl timed on this shape; ours get their speedup once fla has been timed."""
    rows = []
    for name, t in times.items():
        row = dict(version=version, impl=name, B=B, T=T, H=H, N=cfg.head_size, **t)
        if "ms_fwd_bwd" in t:
            row["mtok_s"] = round(B * T / t["ms_fwd_bwd"] / 1e3, 3)
        if name.startswith("ours") and "ms_fwd_bwd" in times.get("fla", {}) and "ms_fwd_bwd" in t:
            row["speedup_vs_fla"] = round(times["fla"]["ms_fwd_bwd"] / t["ms_fwd_bwd"], 3)
        rows.append(row)
    return rows


def run(cfg: BenchConfig, on_update: Callable[[dict], None] = lambda res: None) -> dict:
    """Time every (version, shape, impl); `on_update` gets the partial result after each row (so a run cut
    short still leaves its numbers on disk)."""
    res = dict(gpu=torch.cuda.get_device_name(), date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               torch=torch.__version__, cuda=torch.version.cuda, fla_core=None, fla_error=None,
               y_agreement_vs_fla={}, dtype="bf16 inputs, fp32 state in/out", rows=[], profiles={})
    impls: dict[str, Callable] = {"ours": ours}
    if cfg.with_fla:
        try:
            import importlib.metadata as md

            import fla as fla_pkg  # noqa: F401

            impls["fla"] = fla
            res["fla_core"] = md.version("fla-core")
        except ImportError as err:
            res["fla_error"] = f"fla-core not importable ({err}); `pip install fla-core` for the comparison"
    for version in cfg.versions:
        variants = dict(impls)
        if version != 7:  # the sequential wkv5/6 kernel beside the chunked default, in the same run
            variants["ours-seq"] = functools.partial(ours, kernel="sequential")
        else:  # wkv7 without the span path, and (sweep) with each span length
            variants["ours-seq"] = functools.partial(ours, span=0)
            if cfg.sweep:  # also the opt-in chunked tensor-core kernels (forward also with the span path)
                variants["ours-chunked"] = functools.partial(ours, span=0, forward="chunked")
                variants["ours-chunked-spans"] = functools.partial(ours, forward="chunked")
                variants["ours-chunked-bwd"] = functools.partial(ours, span=0, backward="chunked")
                variants["ours-chunked-both"] = functools.partial(ours, span=0, forward="chunked", backward="chunked")
                variants.update({f"ours-L{n}": functools.partial(ours, span=n) for n in SPAN_SWEEP})
                variants.update({f"ours-seq-g{n}": functools.partial(ours, span=0, groups=n) for n in GROUPS_SWEEP})
        if cfg.sweep:
            tag, _, values = SWEEP[version]
            variants.update({f"ours-{tag}{n}": functools.partial(ours, tiling=n) for n in values})
        for B, T, H in cfg.shapes:
            times, first = {}, len(res["rows"])  # this shape's rows are res["rows"][first:]
            for name, make_fn in variants.items():
                print(f"wkv{version} {name} B={B} T={T} H={H} ...", flush=True)
                x = make_inputs(version, B, T, H, cfg.head_size)
                try:
                    times[name] = measure(make_fn(version), x, cfg)
                except torch.cuda.OutOfMemoryError:
                    times[name] = dict(error="out of memory")
                del x
                torch.cuda.empty_cache()
                if cfg.profile and name.startswith("ours") and "error" not in times[name]:
                    x = make_inputs(version, B, T, H, cfg.head_size)
                    res["profiles"][f"wkv{version} {name} ({B},{T},{H})"] = kernel_times(make_fn(version), x)
                    del x
                res["rows"][first:] = shape_rows(version, B, T, H, times, cfg)
                print(json.dumps(res["rows"][-1]), flush=True)
                on_update(res)  # after every impl: a run cut short mid-shape keeps what it timed
        if "fla" in impls:
            res["y_agreement_vs_fla"][f"wkv{version}"] = agreement(version)
            on_update(res)
    return res


def markdown(res: dict) -> str:
    lines = [f"# WKV kernel benchmark ({res['gpu']}, {res['date']})", "",
             f"torch {res['torch']} (CUDA {res['cuda']}), fla-core {res['fla_core']}; {res['dtype']}; forward+backward, "
             "median of CUDA-event timings. `speedup` = fla time / our time (wkv7 vs chunk_rwkv7, wkv5/6 vs "
             "chunk_rwkv6).", ""]
    if res["fla_error"]:
        lines += [f"fla: {res['fla_error']}", ""]
    if res["y_agreement_vs_fla"]:
        agree = ", ".join(f"{k} {v:.1e}" for k, v in res["y_agreement_vs_fla"].items())
        lines += [f"Output agreement with fla (rel. RMS of y, bf16): {agree}", ""]
    lines += ["| op | impl | B | T | H | fwd ms | fwd+bwd ms | Mtok/s | peak MiB | speedup vs fla |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| wkv{r['version']} | {r['impl']} | {r['B']} | {r['T']} | {r['H']} | {r['error']} |||||")
            continue
        lines.append(f"| wkv{r['version']} | {r['impl']} | {r['B']} | {r['T']} | {r['H']} | {r['ms_fwd']:.3f} | "
                     f"{r['ms_fwd_bwd']:.3f} | {r['mtok_s']:.2f} | {r['peak_mib']:.0f} | "
                     f"{r.get('speedup_vs_fla', '')} |")
    for title, kernels in res.get("profiles", {}).items():
        lines += ["", f"GPU time per kernel, {title}, per fwd+bwd:", "", "| kernel | ms | calls |", "|---|---|---|"]
        lines += [f"| `{k['kernel']}` | {k['ms_per_step']:.3f} | {k['calls']} |" for k in kernels]
    return "\n".join(lines) + "\n"


def compare_markdown(runs: list[tuple[str, dict]]) -> str:
    """Side by side, the fwd+bwd times of several kernel-benchmark results (kernels.json) of two trees, e.g. "this",
    "other", "this" timed in turn on one GPU (bench/device_run.sh ab-kernels); per row the mean of each label, the
    second label's time over the first's (> 1: the first label's kernels are faster), the spread between runs of one
    label (range over mean: the noise between identical builds) and whether the ratio is outside that spread."""
    labels = list(dict.fromkeys(label for label, _ in runs))
    if len(labels) != 2:
        raise ValueError(f"bench-kernels --compare: give results of exactly two labels (got {labels or 'none'})")
    key = lambda r: (r["version"], r["impl"], r["B"], r["T"], r["H"])  # noqa: E731
    rows = list(dict.fromkeys(key(r) for _, res in runs for r in res["rows"] if "error" not in r))
    times = [{key(r): r for r in res["rows"] if "error" not in r} for _, res in runs]
    first = runs[0][1]
    lines = [f"# WKV kernels side by side ({first['gpu']}, {first['date']})", "",
             f"fwd / fwd+bwd ms per run, in the order timed; means and `{labels[1]} / {labels[0]}` of fwd+bwd; spread ="
             " the largest (max - min) / mean of fwd+bwd over one label's runs (needs two runs of a label); the verdict"
             f" is `{labels[0]} faster` or `{labels[0]} slower` only where the ratio is further from 1 than the spread;"
             f" fwd {labels[1]} / {labels[0]}: the same ratio of the forward alone (where both trees share the forward,"
             " any distance from 1 there is the run order's bias, not the kernels).",
             "", "| op | impl | B | T | H | " + " | ".join(label for label, _ in runs)
             + f" | {labels[0]} mean | {labels[1]} mean | {labels[1]} / {labels[0]} | spread | verdict"
             + f" | fwd {labels[1]} / {labels[0]} |",
             "|---|---|---|---|---|" + "---|" * (len(runs) + 6)]
    for k in rows:
        cells, timed, fwd = [], {label: [] for label in labels}, {label: [] for label in labels}
        for (label, _), t in zip(runs, times):
            r = t.get(k)
            cells.append(f"{r['ms_fwd']:.3f} / {r['ms_fwd_bwd']:.3f}" if r else "—")
            if r:
                timed[label].append(r["ms_fwd_bwd"])
                fwd[label].append(r["ms_fwd"])
        m = [statistics.fmean(timed[label]) if timed[label] else math.nan for label in labels]
        f = [statistics.fmean(fwd[label]) if fwd[label] else math.nan for label in labels]
        ratio = m[1] / m[0]
        spreads = [(max(ts) - min(ts)) / statistics.fmean(ts) for ts in timed.values() if len(ts) >= 2]
        spread = max(spreads) if spreads else math.nan
        if math.isnan(ratio) or math.isnan(spread):
            verdict = "—"
        elif abs(ratio - 1) <= spread:
            verdict = "within spread"
        else:
            verdict = f"{labels[0]} faster" if ratio > 1 else f"{labels[0]} slower"
        lines.append(f"| wkv{k[0]} | {k[1]} | {k[2]} | {k[3]} | {k[4]} | " + " | ".join(cells)
                     + f" | {m[0]:.3f} | {m[1]:.3f} | {ratio:.3f} | "
                     + ("—" if math.isnan(spread) else f"{spread:.1%}") + f" | {verdict} | {f[1] / f[0]:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infctx.bench.kernels", description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", type=Path, default=BenchConfig.out_dir)
    p.add_argument("--versions", type=int, nargs="+", default=list(BenchConfig.versions))
    p.add_argument("--reps", type=int, default=BenchConfig.reps)
    p.add_argument("--no-fla", action="store_true", help="skip the fla comparison")
    p.add_argument("--sweep", action="store_true",
                   help="also time every tiling of our kernels and wkv7's chunked forward and backward")
    p.add_argument("--profile", action="store_true", help="also record the GPU time per kernel of our variants")
    p.add_argument("--shapes", nargs="+", default=None, metavar="B,T,H", help="shapes to time (default: issue 3's)")
    p.add_argument("--compare", nargs="+", metavar="LABEL=KERNELS_JSON",
                   help="no timing: write OUT_DIR/kernels-ab.md, these results side by side (two labels)")
    args = p.parse_args(argv)
    if args.compare:
        return compare(args.compare, args.out_dir)
    if not torch.cuda.is_available():
        print("bench-kernels: no CUDA GPU visible (torch.cuda.is_available() is False); run it on a GPU machine")
        return 1
    cfg = BenchConfig(out_dir=args.out_dir, versions=tuple(args.versions), reps=args.reps, with_fla=not args.no_fla,
                      sweep=args.sweep, profile=args.profile,
                      shapes=tuple(tuple(map(int, x.split(","))) for x in args.shapes) if args.shapes else SHAPES)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)

    def save(res: dict) -> None:
        write_text_atomic(cfg.out_dir / "kernels.json", json.dumps(res, indent=1) + "\n")
        write_text_atomic(cfg.out_dir / "kernels.md", markdown(res))

    res = run(cfg, save)
    save(res)
    print(markdown(res))
    return 0


def compare(specs: list[str], out_dir: Path) -> int:
    runs = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not label:
            print(f"bench-kernels --compare: '{spec}' is not LABEL=PATH (e.g. this=bench/results/ab/1-this/kernels.json)")
            return 2
        try:
            runs.append((label, json.loads(Path(path).read_text())))
        except (OSError, ValueError) as err:
            print(f"bench-kernels --compare: {path}: cannot read a kernels.json ({err}); run bench-kernels there first")
            return 2
    try:
        text = compare_markdown(runs)
    except ValueError as err:
        print(err)
        return 2
    write_text_atomic(out_dir / "kernels-ab.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
