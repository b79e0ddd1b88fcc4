"""`make bench-data`: build a binidx from >= 200 MB of generated mixed English / CJK / code JSONL with the World
tokenizer; report MB/s and tokens/s per core for 1 worker and for all cores, peak RSS, and where a single core's
time goes. Writes bench/results/data.json and data.md.

Each build runs in a fresh child process so its peak RSS (and its workers') is measured alone; building a quarter
of the input too shows whether peak memory depends on input size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WORDS = ("the of and to in is was for that with as on by at from his her they which this have are were be had not "
         "but an or their one all been has more when who will would there what about up out into than them can only "
         "other new some time could these two may then first any like now such our over also most even made after "
         "many did way where well between years river market library garden lantern silver morning evening").split()
CJK = ("的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天而能好"
       "都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现分将外但身些与高意进"
       "把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打便位因重被走电四第门相次东政海口")
KANA = "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをんアイウエオカキクケコ"
CODE = [
    "def f{0}(x, y):\n    return x * {0} + y\n",
    "for (int i = 0; i < {0}; ++i) {{ a[i] = b[i] + c * {0}; }}\n",
    "import numpy as np\narr = np.zeros(({0}, 3), dtype=np.float32)\n",
    "    if self.value_{0} is None:\n        raise ValueError(\"missing value {0}\")\n",
    "const x{0} = await fetch(`/api/items/${{id}}?page={0}`);\n",
]


def generate(path: Path, size_mb: float, seed: int = 0) -> int:
    """Mixed JSONL of about size_mb MB: 50% English-like prose, 25% Chinese/Japanese, 25% code. Returns bytes."""
    rng = np.random.default_rng(seed)
    target = int(size_mb * 1e6)
    words = np.array(WORDS)
    cjk = np.array(list(CJK + KANA + "，。、"))
    written = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        while written < target:
            lines = []
            kinds = rng.random(512)
            for k in kinds:
                if k < 0.5:
                    text = " ".join(words[rng.integers(0, len(words), rng.integers(50, 900))]).capitalize() + "."
                elif k < 0.75:
                    text = "".join(cjk[rng.integers(0, len(cjk), rng.integers(50, 700))]) + "。"
                else:
                    n = int(rng.integers(5, 60))
                    text = "".join(CODE[int(c)].format(int(v)) for c, v in
                                   zip(rng.integers(0, len(CODE), n), rng.integers(0, 1000, n)))
                lines.append(json.dumps({"text": text, "meta": {"id": written}}, ensure_ascii=False))
            block = "\n".join(lines) + "\n"
            f.write(block)
            written += len(block.encode("utf-8"))
    os.replace(tmp, path)
    return path.stat().st_size


def _child(args: list[str]) -> None:
    """Run one build and print its timing and peak RSS (self and workers) as JSON."""
    src, out, workers = args[0], args[1], int(args[2])
    from infctx.data.builder import BuildConfig, build

    t0 = time.perf_counter()
    r = build(BuildConfig(inputs=[src], output=out, tokenizer="world", workers=workers, force=True, progress=False))
    seconds = time.perf_counter() - t0
    print(json.dumps({
        "seconds": seconds, "startup_seconds": r.meta["startup_seconds"], "tokens": r.meta["num_tokens"], "docs": r.meta["num_docs"],
        "bytes": r.meta["input_bytes"],
        "rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }))


def run_build(src: Path, out: Path, workers: int) -> dict:
    proc = subprocess.run([sys.executable, "-m", "infctx.bench.data", "_child", str(src), str(out), str(workers)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench build failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    mb = row["bytes"] / 1e6
    steady = row["seconds"] - row["startup_seconds"]
    row.update(workers=workers, input_mb=round(mb, 1), mb_s=mb / row["seconds"], mb_s_per_core=mb / row["seconds"] / workers,
               tokens_s_per_core=row["tokens"] / row["seconds"] / workers,
               steady_mb_s_per_core=mb / steady / workers, steady_tokens_s_per_core=row["tokens"] / steady / workers)
    return row


def phase_breakdown(src: Path, limit_mb: float = 20.0) -> dict:
    """One core, in this process: JSON parsing + UTF-8 encoding vs the compiled tokenizer, on the first MBs."""
    from infctx.data.tokenizers import WorldTokenizer

    lines = []
    with open(src, "rb") as f:
        size = 0
        for line in f:
            lines.append(line)
            size += len(line)
            if size > limit_mb * 1e6:
                break
    tok = WorldTokenizer()
    tok.encode_batch([b"warm up"])
    t0 = time.perf_counter()
    segs = [json.loads(line)["text"].encode("utf-8") for line in lines]
    t1 = time.perf_counter()
    ids, _ = tok.encode_batch(segs)
    t2 = time.perf_counter()
    return {"sample_mb": size / 1e6, "json_utf8_mb_s": size / 1e6 / (t1 - t0), "tokenizer_mb_s": size / 1e6 / (t2 - t1),
            "text_bytes_per_token": sum(map(len, segs)) / len(ids)}


def markdown(res: dict) -> str:
    rows = ["| input | workers | seconds (startup) | MB/s | MB/s per core | tokens/s per core | "
            "after startup: MB/s per core | tokens/s per core | peak RSS main | peak RSS worker |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["builds"]:
        worker_rss = f"{r['rss_worker_mb']:.0f} MB" if r["workers"] > 1 else "(in main)"
        rows.append(f"| {r['input_mb']} MB | {r['workers']} | {r['seconds']:.1f} ({r['startup_seconds']:.1f}) | "
                    f"{r['mb_s']:.1f} | {r['mb_s_per_core']:.1f} | {r['tokens_s_per_core'] / 1e6:.2f} M | "
                    f"{r['steady_mb_s_per_core']:.1f} | {r['steady_tokens_s_per_core'] / 1e6:.2f} M | "
                    f"{r['rss_main_mb']:.0f} MB | {worker_rss} |")
    p = res["phases"]
    return "\n".join([
        "# Data builder benchmark (`make bench-data`)", "",
        f"Machine: {res['machine']}, {res['cores']} cores, numba {'on' if res['compiled'] else 'OFF'}. "
        f"Input: generated mixed JSONL (50% English-like prose, 25% Chinese/Japanese, 25% code), "
        f"World tokenizer, {res['tokens']:,} tokens, {res['docs']:,} documents.", "",
        *rows, "",
        f"One core, {p['sample_mb']:.0f} MB sample: JSON parse + UTF-8 encode {p['json_utf8_mb_s']:.0f} MB/s, "
        f"compiled trie tokenizer {p['tokenizer_mb_s']:.0f} MB/s, {p['text_bytes_per_token']:.2f} text bytes per token.",
        "", "Startup = loading the World vocabulary and starting workers, paid once per build.",
        f"Target: >= 50 MB/s of JSONL per core (1 worker, whole build). Met: {'yes' if res['target_met'] else 'no'}.",
        f"Load average during the run: {res['load_average']}.", ""])


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "_child":
        _child(argv[1:])
        return 0
    p = argparse.ArgumentParser(prog="python -m infctx.bench.data", description=__doc__)
    p.add_argument("--size-mb", type=float, default=200.0, help="generated JSONL size (default 200)")
    p.add_argument("--workers", type=int, nargs="+", help="worker counts for the full-size build (default: 1 and all cores)")
    p.add_argument("--work-dir", default="bench/work")
    p.add_argument("--out-dir", default="bench/results")
    args = p.parse_args(argv)
    from infctx.data.trie import COMPILED

    work, out = Path(args.work_dir), Path(args.out_dir)
    src = work / f"mixed-{args.size_mb:g}mb.jsonl"
    small = work / f"mixed-{args.size_mb / 4:g}mb.jsonl"
    for path, mb in ((src, args.size_mb), (small, args.size_mb / 4)):
        if not path.is_file():
            print(f"generating {path} ...", file=sys.stderr)
            generate(path, mb)
    cores = os.cpu_count() or 1
    builds = []
    counts = args.workers or sorted({1, cores})
    for path, workers in [(small, max(counts))] + [(src, w) for w in counts]:
        row = run_build(path, work / f"built-{workers}", workers)
        print(f"{row['input_mb']} MB, {workers} worker(s): {row['mb_s']:.1f} MB/s ({row['mb_s_per_core']:.1f} per core), "
              f"{row['tokens_s_per_core'] / 1e6:.2f} M tokens/s per core, peak RSS {row['rss_main_mb']:.0f} MB main / "
              f"{row['rss_worker_mb']:.0f} MB worker", file=sys.stderr)
        builds.append(row)
    one = next(b for b in builds if b["workers"] == 1)
    res = {"machine": platform.processor() or platform.machine(), "cores": cores, "compiled": COMPILED,
           "size_mb": args.size_mb, "tokens": one["tokens"], "docs": one["docs"], "builds": builds,
           "phases": phase_breakdown(src), "target_mb_s_per_core": 50.0,
           "target_met": one["mb_s_per_core"] >= 50.0, "load_average": [round(x, 2) for x in os.getloadavg()]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "data.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "data.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
