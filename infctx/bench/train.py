"""`make bench-train`: full training steps (segmented BPTT forward + backward + AdamW) of RWKV-7 on one GPU.

Per row (model, sequence length T, BPTT mode, batch B) it reports tokens/s, MFU, the allocator's peak memory and,
for short rows, where one profiled step spends its GPU time (WKV kernels / matmuls / elementwise+other / copies).
Writes bench/results/train.json, train.md and two PNG plots; the Markdown holds the issue-7 targets with pass/fail.

Precision is the trainer's bf16-mixed: fp32 weights and AdamW (fused), bf16 autocast. MFU counts model FLOPs only,
6 x (non-embedding parameters) x tokens/s over the GPU's dense bf16 peak: the extra forward of full BPTT and the
checkpointed head recompute are real work MFU does not credit.

Batch: "fill" measures the activation memory of one segment per batch row (two one-segment steps at B=1 and B=2)
and takes the largest B whose segment plus carried boundary states fit 85% of the GPU; BPTT memory does not grow
with T, so the same B fills memory at every length. `--max-step-tokens` caps B x T of the longest row so a run fits
a time budget: all lengths then share the smaller B (ratios stay like for like) and 4k rows at the filling batch
are added for the throughput targets.

Fusion lever: `--fuse off compile` measures every row twice, with ModelConfig.fuse off (plain PyTorch) and compile
(the non-WKV elementwise regions through torch.compile, infctx.model.fused), on fresh models of identical weights and
the same batch (the first setting's fill), and adds a before/after table (tokens/s and peak memory ratios). Compile
time is kept out of the measurements: a fused row first runs one untimed step of its shape.

Head + cross-entropy lever: `--ce fused checkpointed` measures every row with BPTTConfig.fused_ce on (infctx.ops.fused_ce:
gradients computed in the forward, no stored logits, no recompute) and off (checkpointed chunks: the head and softmax
run again in the backward), and adds a before/after table the same way.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from infctx.bptt import BPTTConfig, BPTTEngine
from infctx.fileio import write_text_atomic
from infctx.model import RWKV, ModelConfig

GIB = 2**30

# Dense bf16 tensor-core peak per GPU (NVIDIA datasheets, without sparsity), matched against the device name in order.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                    ("H800", 989.0), ("A100", 312.0))

KERNEL_CLASSES = (  # first match wins; anything unmatched is "elementwise" (pointwise, norms, reductions, CE)
    ("wkv", re.compile(r"wkv|rwkv|(?<!::)\(anonymous namespace\)::(fwd|bwd|span_scan|span_outer)_kernel", re.I)),
    ("matmul", re.compile(r"gemm|gemv|cutlass|cublas|nvjet|xmma|wgmma|splitk|sm\d+_xmma", re.I)),
    ("copy", re.compile(r"memcpy|memset", re.I)),
)
SHARE_KEYS = ("wkv", "matmul", "elementwise", "copy")
TARGET_LENS = (4096, 16384, 2**20)  # the lengths issue 7's targets compare


@dataclass(frozen=True)
class ModelSpec:
    name: str
    n_layer: int
    n_embd: int
    vocab_size: int = 65536

    def config(self, backend: str, fuse: str = "off") -> ModelConfig:
        return ModelConfig(version=7, n_layer=self.n_layer, n_embd=self.n_embd, vocab_size=self.vocab_size,
                           wkv_backend=backend, fuse=fuse)


MODELS = {"0.1b": ModelSpec("0.1b", 12, 768), "1.5b": ModelSpec("1.5b", 24, 2048)}


@dataclass
class BenchConfig:
    models: tuple[ModelSpec, ...] = (MODELS["0.1b"], MODELS["1.5b"])
    seq_lens: tuple[int, ...] = (4096, 16384, 65536, 262144, 1048576)
    modes: tuple[str, ...] = ("truncated", "full")
    segment_len: int = 4096
    batch: int | None = None  # None = fill memory (measured); an int fixes B for every row
    max_step_tokens: int | None = None  # cap on B x T per step (time budget); None = no cap
    budget_s: float = 1e9  # wall-clock budget of the whole run; rows that would not fit are skipped, not cut
    min_time_s: float = 2.0  # time at least this long (or max_steps steps) per row
    max_steps: int = 5
    profile_max_len: int = 16384  # profile one step of rows with T up to this ...
    profile_max_tokens: int = 2**17  # ... and B x T up to this (a profiled step is slow to record and parse)
    backend: str = "cuda"
    fuses: tuple[str, ...] = ("off",)  # ModelConfig.fuse settings to measure, each on every row ("off", "compile")
    ces: tuple[str, ...] = ("fused",)  # head+CE paths to measure, each on every row ("fused", "checkpointed")
    device: str = "cuda"
    amp: bool = True  # bf16 autocast (the trainer's bf16-mixed)
    peak_tflops: float | None = None  # None = from the GPU name
    mem_fraction: float = 0.85
    seed: int = 0


# ---- arithmetic ------------------------------------------------------------------------------------------------

def parse_len(text: str) -> int:
    """'4k' -> 4096, '1M' -> 1048576, '300' -> 300."""
    m = re.fullmatch(r"(\d+)([kKmM]?)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"sequence length {text!r}: use an integer with an optional k or M suffix")
    return int(m.group(1)) * {"": 1, "k": 2**10, "m": 2**20}[m.group(2).lower()]


def fmt_len(n: int) -> str:
    for unit, size in (("M", 2**20), ("k", 2**10)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def peak_tflops_for(gpu_name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in gpu_name.lower():
            return tflops
    return None


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, matmul parameters = all but the embedding table, which is a lookup)."""
    total = sum(p.numel() for p in model.parameters())
    return total, total - model.emb.weight.numel()


def throughput(tokens: int, seconds: float, params: int, peak_tflops: float | None) -> tuple[float, float | None]:
    """(tokens/s, MFU = 6 * params * tokens/s / peak); MFU is None when the peak is unknown."""
    tok_s = tokens / seconds
    return tok_s, (6.0 * params * tok_s / (peak_tflops * 1e12) if peak_tflops else None)


def classify_kernel(name: str) -> str:
    for cls, pattern in KERNEL_CLASSES:
        if pattern.search(name):
            return cls
    return "elementwise"


def time_shares(kernels: list[tuple[str, float]]) -> dict[str, float]:
    """Fraction of summed kernel time per class, from (kernel name, microseconds) pairs."""
    sums = dict.fromkeys(SHARE_KEYS, 0.0)
    for name, us in kernels:
        sums[classify_kernel(name)] += us
    total = sum(sums.values())
    return {k: (v / total if total else 0.0) for k, v in sums.items()}


def state_bytes_per_row(cfg: ModelConfig) -> int:
    """One boundary State for one batch row: fp32 shift vectors (weights are fp32) + fp32 WKV matrices."""
    return cfg.n_layer * (2 * cfg.n_embd * 4 + cfg.n_head * cfg.head_size**2 * 4)


def fill_batch(base: float, per_row: float, state_row: float, n_segments: int, capacity: float) -> int:
    """Largest B with base + B * (one segment's activations + the boundary states of n_segments) <= capacity."""
    return max(1, int((capacity - base) // (per_row + n_segments * state_row)))


# ---- rows ------------------------------------------------------------------------------------------------------

def plan_rows(cfg: BenchConfig, fill: int) -> list[dict]:
    """Rows for one model. Every length runs at one batch B = min(fill, max_step_tokens // longest T), so lengths
    compare like for like (the constant-memory claim); when the cap lowers B, 4k rows at the filling batch are
    added for the throughput targets. Order: the lengths the targets read (4k, 16k, 1M) first, cheapest first
    within each group, so a tight budget drops 64k/256k first."""
    B = fill if cfg.max_step_tokens is None else max(1, min(fill, cfg.max_step_tokens // max(cfg.seq_lens)))
    at_fill = B == fill and cfg.batch is None
    rows = [dict(T=T, mode=mode, B=B, fill=at_fill) for T in cfg.seq_lens for mode in cfg.modes]
    if B < fill:
        rows += [dict(T=4096, mode=mode, B=fill, fill=cfg.batch is None) for mode in cfg.modes]
    return sorted(rows, key=lambda r: (r["T"] not in TARGET_LENS, r["B"] * r["T"], r["T"], r["mode"]))


class Bench:
    """One model (one fuse setting, one head+CE path) with its optimizer and engine; measures rows on it."""

    def __init__(self, spec: ModelSpec, cfg: BenchConfig, fuse: str = "off", ce: str = "fused"):
        self.spec, self.cfg, self.fuse, self.ce = spec, cfg, fuse, ce
        self.device = torch.device(cfg.device)
        torch.manual_seed(cfg.seed)  # the same weights for every fuse setting
        with self.device:
            self.model = RWKV(spec.config(cfg.backend, fuse))
        self.params_total, self.params = count_params(self.model)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5, weight_decay=0.0,
                                     fused=self.device.type == "cuda")
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed)

    def step(self, B: int, T: int, mode: str) -> None:
        tokens = torch.randint(0, self.spec.vocab_size, (B, T + 1), device=self.device, generator=self.gen)
        engine = BPTTEngine(self.model, BPTTConfig(segment_len=self.cfg.segment_len, mode=mode,
                                                   fused_ce=self.ce == "fused"))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp):
            engine.forward_backward(tokens[:, :-1], tokens[:, 1:])
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed_step(self, B: int, T: int, mode: str) -> float:
        self.sync()
        t0 = time.perf_counter()
        self.step(B, T, mode)
        self.sync()
        return time.perf_counter() - t0

    def peak_step(self, B: int, T: int, mode: str) -> float:
        torch.cuda.reset_peak_memory_stats(self.device)
        self.step(B, T, mode)
        return torch.cuda.max_memory_allocated(self.device)

    def fill(self) -> dict:
        """Measure one segment's memory per batch row and the B that fills the GPU at the longest length."""
        L = self.cfg.segment_len
        self.step(1, L, "truncated")  # warm-up: optimizer state, cuBLAS handles, kernel build
        p1, p2 = self.peak_step(1, L, "truncated"), self.peak_step(2, L, "truncated")
        per_row, base = p2 - p1, 2 * p1 - p2
        capacity = self.cfg.mem_fraction * torch.cuda.get_device_properties(self.device).total_memory
        n_seg = -(-max(self.cfg.seq_lens) // L) if "full" in self.cfg.modes else 0
        state_row = state_bytes_per_row(self.model.cfg)
        B = fill_batch(base, per_row, state_row, n_seg, capacity)
        return dict(base_gib=base / GIB, per_row_gib=per_row / GIB, fill_batch=B)

    def measure(self, row: dict, peak_tflops: float | None, remaining_s: float) -> dict:
        B, T, mode = row["B"], row["T"], row["mode"]
        T_warm = min(T, 2 * self.cfg.segment_len)
        if self.fuse != "off":  # compile this shape's graphs (gradient-free pass and recompute) outside the timing
            self.step(B, T_warm, mode)
        warm = self.timed_step(B, T_warm, mode)
        est_step = warm * T / T_warm
        profile = self.cfg.device == "cuda" and T <= self.cfg.profile_max_len and B * T <= self.cfg.profile_max_tokens
        if est_step * (1 + profile) > remaining_s:
            return dict(skipped=f"budget: one step estimated {est_step:.0f}s, {remaining_s:.0f}s left")
        steps = max(1, min(self.cfg.max_steps, math.ceil(self.cfg.min_time_s / max(est_step, 1e-9))))
        if est_step * (steps + profile) > remaining_s:
            steps = 1
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        seconds = sum(self.timed_step(B, T, mode) for _ in range(steps))
        out = dict(steps=steps, seconds=seconds, tokens=B * T * steps, segments=-(-T // self.cfg.segment_len))
        out["tokens_per_s"], out["mfu"] = throughput(out["tokens"], seconds, self.params, peak_tflops)
        out["step_s"] = seconds / steps
        if self.device.type == "cuda":
            out["peak_gib"] = torch.cuda.max_memory_allocated(self.device) / GIB
        if profile:
            out["profile"] = self.profile(B, T, mode)
        return out

    def profile(self, B: int, T: int, mode: str) -> dict:
        """Kernel time shares of one step, and kernel time over the profiled step's wall time (GPU busy)."""
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        self.sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            wall = self.timed_step(B, T, mode)
        # GPU-side record_function ranges (e.g. "Optimizer.step#AdamW.step") span kernels already counted
        kernels = [(e.name, e.time_range.elapsed_us()) for e in prof.events()
                   if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
        if not kernels:
            return dict(error="the profiler recorded no CUDA kernels")
        busy = sum(us for _, us in kernels) / 1e6
        top: dict[str, list[float]] = {}
        for name, us in kernels:
            top.setdefault(name, [0.0, 0])
            top[name][0] += us
            top[name][1] += 1
        ranked = sorted(top.items(), key=lambda kv: -kv[1][0])[:25]
        return dict(shares=time_shares(kernels), gpu_busy=busy / wall, n_kernels=len(kernels),
                    top=[dict(name=n[:160], cls=classify_kernel(n), ms=us / 1e3, calls=c) for n, (us, c) in ranked],
                    ops=top_ops(prof))


def top_ops(prof, n: int = 40) -> list[dict]:
    """The operators (by name and input shapes) whose own kernels took the most GPU time: where the elementwise
    time of a step comes from (which casts, copies, norms), which kernel names alone do not say."""
    rows = [e for e in prof.key_averages(group_by_input_shape=True) if e.self_device_time_total > 0]
    rows.sort(key=lambda e: -e.self_device_time_total)
    return [dict(op=e.key[:120], shapes=str(e.input_shapes)[:160], ms=e.self_device_time_total / 1e3, calls=e.count)
            for e in rows[:n]]


def run(cfg: BenchConfig, on_update=lambda res: None, res: dict | None = None) -> dict:
    """Measure every model's rows within cfg.budget_s (split evenly over the models still to run); `on_update`
    gets the result after each row, so a run cut short still leaves its numbers on disk."""
    start = time.perf_counter()
    cuda = cfg.device == "cuda"
    gpu = torch.cuda.get_device_name(cfg.device) if cuda else "cpu"
    peak = cfg.peak_tflops or (peak_tflops_for(gpu) if cuda else None)
    merging = bool(res and res.get("rows"))
    res = res or dict(rows=[], models={})
    stamp = dict(gpu=gpu, date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), torch=torch.__version__,
                 cuda=torch.version.cuda, git=_git_describe())
    settings = dict(segment_len=cfg.segment_len, backend=cfg.backend, amp_bf16=cfg.amp, fuse=list(cfg.fuses),
                    ce=list(cfg.ces), optimizer="AdamW (fp32 state" + (", fused)" if cuda else ")"),
                    max_step_tokens=cfg.max_step_tokens, batch=cfg.batch or "fill", budget_s=cfg.budget_s)
    run_tag = {}  # merged rows carry the number of the run that measured them
    if merging:  # the header keeps the first run's settings
        res.setdefault("merged_runs", []).append(dict(stamp, settings=settings))
        run_tag = dict(run=len(res["merged_runs"]))
    else:
        res.update(stamp, peak_bf16_tflops=peak, settings=settings)
    if cfg.batch is None and not cuda:
        raise ValueError("BenchConfig.batch: measuring the memory-filling batch needs a CUDA device; give a batch")
    runs = [(spec, fuse, ce) for spec in cfg.models for fuse in cfg.fuses for ce in cfg.ces]
    B_fill: dict[str, int] = {}
    for i, (spec, fuse, ce) in enumerate(runs):
        now = time.perf_counter()
        run_deadline = now + (cfg.budget_s - (now - start)) / (len(runs) - i)
        bench = Bench(spec, cfg, fuse, ce)
        if merging and cfg.batch and spec.name in res["models"]:  # keep the first run's model info (fill batch)
            B_fill[spec.name] = cfg.batch
        if spec.name not in B_fill:  # a model's first setting measures the batch; the others reuse it
            info = dict(n_layer=spec.n_layer, n_embd=spec.n_embd, vocab=spec.vocab_size,
                        params_total=bench.params_total, params_matmul=bench.params,
                        seq_lens=list(cfg.seq_lens), max_step_tokens=cfg.max_step_tokens,
                        budget_s=round(run_deadline - now, 1),
                        state_row_mib=state_bytes_per_row(bench.model.cfg) / 2**20)
            if cfg.batch is None:
                info.update(bench.fill())
            B_fill[spec.name] = cfg.batch or info["fill_batch"]
            res["models"][spec.name] = info
            on_update(res)
        for row in plan_rows(cfg, B_fill[spec.name]):
            row = dict(model=spec.name, fuse=fuse, ce=ce, **row, **run_tag)
            print(f"train {spec.name} T={fmt_len(row['T'])} B={row['B']} {row['mode']} fuse={fuse} ce={ce} ...",
                  flush=True)
            try:
                row.update(bench.measure(row, peak, run_deadline - time.perf_counter()))
            except torch.cuda.OutOfMemoryError:
                row["error"] = "out of memory"
                bench.opt.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
            res["rows"] = [r for r in res["rows"] if _key(r) != _key(row)] + [row]
            print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
            on_update(res)
        del bench
        if cuda:
            torch.cuda.empty_cache()
    return res


# A row's settings, each with the value of rows written before the option existed: fuse off (the plain path), the
# checkpointed head+CE chunks.
SETTINGS = {"fuse": "off", "ce": "checkpointed"}


def _setting(row: dict, name: str) -> str:
    return row.get(name, SETTINGS[name])


def _fuse(row: dict) -> str:
    return _setting(row, "fuse")


def _ce(row: dict) -> str:
    return _setting(row, "ce")


def _key(row: dict) -> tuple:
    """(model, T, mode, B, then one value per SETTINGS name, in its order)."""
    return row["model"], row["T"], row["mode"], row["B"], *(_setting(row, name) for name in SETTINGS)


def _tag(row: dict) -> str:
    """'B=4', plus the settings that differ from the defaults: 'B=4, fuse=compile, ce=checkpointed'."""
    return (f"B={row['B']}" + (f", fuse={_fuse(row)}" if _fuse(row) != "off" else "")
            + (f", ce={_ce(row)}" if _ce(row) != "fused" else ""))


def _git_describe() -> str | None:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ---- targets and report -----------------------------------------------------------------------------------------

def _find(rows: list[dict], **want) -> dict | None:
    """The measured row matching `want` with the most tokens/s (4k rows of both modes are the same step)."""
    get = lambda r, k: _setting(r, k) if k in SETTINGS else r.get(k)  # noqa: E731
    hits = [r for r in rows if "tokens_per_s" in r and all(get(r, k) == v for k, v in want.items())]
    return max(hits, key=lambda r: r["tokens_per_s"], default=None)


def targets(res: dict) -> list[dict]:
    """Issue 7's targets as rows (target, measured, threshold, verdict pass/fail/not measured)."""
    rows, out = res["rows"], []

    def verdict(value, ok) -> str:
        return "not measured" if value is None else ("pass" if ok else "fail")

    r = _find(rows, model="0.1b", T=4096)
    v = r["tokens_per_s"] if r else None
    out.append(dict(target="0.1B tokens/s at 4k", measured=v and f"{v:,.0f} ({_tag(r)})", threshold=">= 200,000",
                    verdict=verdict(v, v is not None and v >= 200e3)))
    r = _find(rows, model="1.5b", T=4096)
    v = r["mfu"] if r and r.get("mfu") is not None else None
    out.append(dict(target="1.5B MFU at 4k", measured=v and f"{v:.1%} ({_tag(r)})", threshold=">= 45%",
                    verdict=verdict(v, v is not None and v >= 0.45)))
    for model in ("0.1b", "1.5b"):
        for mode, need in (("truncated", 0.95), ("full", 0.7)):
            long = _find(rows, model=model, T=2**20, mode=mode)
            base = long and _find(rows, model=model, T=4096, B=long["B"], fuse=_fuse(long), ce=_ce(long))
            v = long["tokens_per_s"] / base["tokens_per_s"] if long and base else None
            out.append(dict(target=f"{model} {mode} BPTT tokens/s at 1M / at 4k (same B)",
                            measured=v and f"{v:.3f} ({_tag(long)})", threshold=f">= {need}",
                            verdict=verdict(v, v is not None and v >= need)))
            mid = long and _find(rows, model=model, T=16384, mode=mode, B=long["B"], fuse=_fuse(long), ce=_ce(long))
            v = long["peak_gib"] / mid["peak_gib"] if long and mid and "peak_gib" in long else None
            out.append(dict(target=f"{model} {mode} peak memory at 1M / at 16k (same B)",
                            measured=v and f"{v:.3f} ({long['peak_gib']:.1f} / {mid['peak_gib']:.1f} GiB)",
                            threshold="<= 1.1", verdict=verdict(v, v is not None and v <= 1.1)))
    out.append(four_m_target(res))
    return out


def four_m_target(res: dict) -> dict:
    """1.5B full BPTT on one 4M-token sequence: measured if such a row ran; otherwise not measured, with the
    prediction from the 1M row (same activations, 768 more boundary states; time x4 at the 1M rate)."""
    rows = [r for r in res["rows"] if r["model"] == "1.5b" and r["mode"] == "full" and r["B"] == 1]
    big = [r for r in rows if r["T"] >= 4 * 2**20]
    done = [r for r in big if "tokens_per_s" in r]
    t = dict(target="1.5B trains one 4M-token sequence, full BPTT", threshold="completes")
    if done:
        r = done[0]
        return dict(t, measured=f"{r['step_s']:.0f} s/step, {r['peak_gib']:.1f} GiB", verdict="pass")
    if big:
        return dict(t, measured=big[0].get("error") or big[0].get("skipped"), verdict="fail"
                    if "error" in big[0] else "not measured")
    one_m = next((r for r in rows if r["T"] == 2**20 and "peak_gib" in r), None)
    if one_m is None:
        return dict(t, measured=None, verdict="not measured")
    extra = (4 * 2**20 - 2**20) // res["settings"]["segment_len"] * res["models"]["1.5b"]["state_row_mib"] / 1024
    return dict(t, measured=f"not run; predicted from the 1M row: {one_m['peak_gib'] + extra:.1f} GiB peak, "
                f"{4 * one_m['step_s']:.0f} s/step", verdict="not measured")


def _pct(profile: dict | None, key: str) -> str:
    return f"{profile['shares'][key]:.0%}" if profile and "shares" in profile else ""


def markdown(res: dict) -> str:
    s = res["settings"]
    peak = res.get("peak_bf16_tflops")
    lines = [f"# Training-step benchmark ({res['gpu']}, {res['date']})", "",
             f"torch {res['torch']} (CUDA {res['cuda']}), code {res.get('git') or 'unknown revision'}. RWKV-7, "
             f"segment_len {s['segment_len']}, WKV backend `{s['backend']}`, "
             f"{'bf16 autocast over fp32 weights' if s['amp_bf16'] else 'fp32'}, {s['optimizer']}. A step = "
             "BPTTEngine.forward_backward over the whole sequence + optimizer step, on random tokens. "
             f"MFU = 6 x matmul params x tokens/s / {peak or '?'} TFLOP/s (dense bf16 peak of this GPU); "
             "full BPTT's extra forward is not credited. Peak = torch allocator peak (params, grads and AdamW "
             "state included). Batch: `fill` = measured to fill 85% of memory"
             + (f", capped so B x T <= {s['max_step_tokens']:,} tokens per step (time budget)"
                if s["max_step_tokens"] else "") + "; `fill` marks rows at the memory-filling batch.",
             "", "| model | params (matmul) | base GiB | act. GiB per batch row | fill B |", "|---|---|---|---|---|"]
    gib = lambda m, k: f"{m[k]:.2f}" if k in m else "—"  # noqa: E731
    for name, m in res["models"].items():
        lines.append(f"| {name} (L{m['n_layer']} D{m['n_embd']} V{m['vocab']}) | {m['params_total'] / 1e6:.1f}M "
                     f"({m['params_matmul'] / 1e6:.1f}M) | {gib(m, 'base_gib')} | {gib(m, 'per_row_gib')} | "
                     f"{m.get('fill_batch', s['batch'])} |")
    lines += ["", "| model | T | mode | B | segments | fuse | head+CE | s/step | tokens/s | MFU | peak GiB | WKV | "
              "matmul | elementwise | copy | GPU busy |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(res["rows"], key=lambda r: (r["model"], r["T"], r["B"], r["mode"], _fuse(r) != "off",
                                                _ce(r) != "fused")):
        run = f" (run {r['run']})" if "run" in r else ""
        head = f"| {r['model']} | {fmt_len(r['T'])} | {r['mode']}{run} | {r['B']}{' fill' if r.get('fill') else ''} |"
        if "tokens_per_s" not in r:
            lines.append(f"{head} | {_fuse(r)} | {_ce(r)} | {r.get('error') or r.get('skipped')} |||||||||")
            continue
        p = r.get("profile")
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else ""
        mem = f"{r['peak_gib']:.2f}" if "peak_gib" in r else ""
        busy = f"{p['gpu_busy']:.0%}" if p and "gpu_busy" in p else ""
        lines.append(f"{head} {r['segments']} | {_fuse(r)} | {_ce(r)} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {mfu} | "
                     f"{mem} | {_pct(p, 'wkv')} | {_pct(p, 'matmul')} | {_pct(p, 'elementwise')} | "
                     f"{_pct(p, 'copy')} | {busy} |")
    for n, m in enumerate(res.get("merged_runs", []), 1):
        lines.append(f"\nRows marked (run {n}) were added later with --merge: {m['date']}, {m['gpu']}, code "
                     f"{m.get('git') or 'unknown revision'}, batch {m['settings']['batch']}, "
                     f"fuse {'/'.join(m['settings']['fuse'])}, head+CE {'/'.join(m['settings']['ce'])}.")
    lines += ["", "Kernel shares: one profiled step (torch.profiler, CUDA kernel time by name: WKV = our wkv "
              "kernels, matmul = cuBLAS/CUTLASS/nvjet, copy = memcpy/memset, elementwise = everything else incl. "
              "norms, reductions and cross-entropy, and the compiled regions' fused kernels); GPU busy = summed "
              "kernel time / the profiled step's wall time.",
              "", "## Targets (issue 7, stated for H100)", "", "| target | measured | threshold | result |",
              "|---|---|---|---|"]
    for t in targets(res):
        lines.append(f"| {t['target']} | {t['measured'] or '—'} | {t['threshold']} | {t['verdict']} |")
    for title, field, base, alt in LEVERS:
        rows = lever(res, field, base, alt)
        if not rows:
            continue
        lines += ["", f"## {title} ({field}: {alt} vs {base}, same rows)", "",
                  f"| model | T | mode | B | other setting | tokens/s {base} | tokens/s {alt} | speedup | peak GiB {base} | "
                  f"peak GiB {alt} | peak ratio |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        peak = lambda v: f"{v:.2f}" if v is not None else ""  # noqa: E731
        for r in rows:
            ratio = f"{r['peak_ratio']:.3f}" if r["peak_ratio"] is not None else ""
            lines.append(f"| {r['model']} | {fmt_len(r['T'])} | {r['mode']} | {r['B']} | {r['other']} | "
                         f"{r['tok_s_base']:,.0f} | {r['tok_s_alt']:,.0f} | {r['speedup']:.3f} | {peak(r['peak_base'])} | "
                         f"{peak(r['peak_alt'])} | {ratio} |")
    return "\n".join(lines) + "\n"


LEVERS = (("Fusion lever", "fuse", "off", "compile"), ("Head + cross-entropy lever", "ce", "checkpointed", "fused"))


def lever(res: dict, field: str, base: str, alt: str) -> list[dict]:
    """Rows measured with `field` (fuse or ce) at both `base` and `alt`, everything else equal: tokens/s speedup of
    alt over base and its peak-memory ratio."""
    at = 4 + list(SETTINGS).index(field)  # the field's place in _key
    done = {_key(r): r for r in res["rows"] if "tokens_per_s" in r}
    out = []
    for key, on in sorted(done.items()):
        off = done.get(key[:at] + (base,) + key[at + 1:])
        if key[at] != alt or off is None:
            continue
        other = ", ".join(f"{name}={_setting(on, name)}" for name in SETTINGS if name != field)
        p_off, p_on = off.get("peak_gib"), on.get("peak_gib")
        out.append(dict(model=key[0], T=key[1], mode=key[2], B=key[3], other=other, tok_s_base=off["tokens_per_s"],
                        tok_s_alt=on["tokens_per_s"], speedup=on["tokens_per_s"] / off["tokens_per_s"],
                        peak_base=p_off, peak_alt=p_on,
                        peak_ratio=p_on / p_off if p_off and p_on is not None else None))
    return out


def plots(res: dict, out_dir: Path) -> list[Path]:
    """tokens/s and peak memory vs sequence length, one line per (model, mode, batch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, label, fname in (("tokens_per_s", "tokens / s", "train_tokens_per_s.png"),
                              ("peak_gib", "peak GPU memory (GiB)", "train_peak_memory.png")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        groups: dict[str, list[dict]] = {}
        for r in res["rows"]:
            if key in r:
                groups.setdefault(f"{r['model']} {r['mode']} {_tag(r)}", []).append(r)
        for name, rs in sorted(groups.items()):
            rs.sort(key=lambda r: r["T"])
            ax.plot([r["T"] for r in rs], [r[key] for r in rs], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs length — {res['gpu']}", fontsize=9)
        ax.grid(True, alpha=0.3)
        if groups:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / fname
        tmp = path.with_name(path.stem + ".tmp.png")
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        os.replace(tmp, path)
        written.append(path)
    return written


def save(res: dict, out_dir: Path, with_plots: bool = False) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "train.json", json.dumps(res, indent=1) + "\n")
    write_text_atomic(out_dir / "train.md", markdown(res))
    if with_plots:
        try:
            plots(res, out_dir)
        except ImportError as err:
            print(f"bench-train: plots skipped ({err}); rerun with --replot where matplotlib is installed")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infctx.bench.train", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="output folder")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    p.add_argument("--seq-lens", nargs="+", type=parse_len, default=list(BenchConfig.seq_lens), metavar="LEN",
                   help="e.g. 4k 16k 1M")
    p.add_argument("--modes", nargs="+", choices=("truncated", "full"), default=list(BenchConfig.modes))
    p.add_argument("--batch", type=int, help="fixed batch for every row (default: fill memory)")
    p.add_argument("--max-step-tokens", type=parse_len, help="cap B x T per step, e.g. 1M")
    p.add_argument("--budget-s", type=float, default=BenchConfig.budget_s, help="wall-clock budget for the run")
    p.add_argument("--segment-len", type=int, default=BenchConfig.segment_len)
    p.add_argument("--backend", default=BenchConfig.backend, help="WKV backend (default cuda)")
    p.add_argument("--fuse", nargs="+", choices=("off", "compile"), default=list(BenchConfig.fuses),
                   help="ModelConfig.fuse settings, each measured on every row; 'off compile' = before/after")
    p.add_argument("--ce", nargs="+", choices=("fused", "checkpointed"), default=list(BenchConfig.ces),
                   help="head+CE paths, each measured on every row; 'checkpointed fused' = before/after")
    p.add_argument("--profile-max-tokens", type=parse_len, default=BenchConfig.profile_max_tokens,
                   help="profile rows with B x T up to this")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak, if the GPU name is not in the table")
    p.add_argument("--merge", action="store_true", help="keep the rows of an existing train.json in --out")
    p.add_argument("--replot", action="store_true", help="only rewrite train.md and the plots from train.json")
    args = p.parse_args(argv)
    if args.replot or args.merge:
        src = args.out / "train.json"
        if not src.exists():
            print(f"bench-train: {src} does not exist; run the benchmark first (without --replot/--merge)")
            return 1
        prior = json.loads(src.read_text())
        if args.replot:
            save(prior, args.out, with_plots=True)
            print(markdown(prior))
            return 0
    if not torch.cuda.is_available():
        print("bench-train: no CUDA GPU visible (torch.cuda.is_available() is False); run it on a GPU machine")
        return 1
    cfg = BenchConfig(models=tuple(MODELS[m] for m in args.models), seq_lens=tuple(args.seq_lens),
                      modes=tuple(args.modes), segment_len=args.segment_len, batch=args.batch,
                      max_step_tokens=args.max_step_tokens, budget_s=args.budget_s, backend=args.backend,
                      fuses=tuple(args.fuse), ces=tuple(args.ce),
                      profile_max_tokens=args.profile_max_tokens,
                      peak_tflops=args.peak_tflops)
    res = run(cfg, lambda r: save(r, args.out), res=prior if args.merge else None)
    save(res, args.out, with_plots=True)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
