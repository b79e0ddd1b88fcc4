#!/usr/bin/env bash
# One device command for the GPU checks: bash bench/device_run.sh [STAGE ...] [-- BENCH_TRAIN_ARGS ...]
# Stages (run in the order given; default: all): kernels tests doctor bench-kernels train-check bench-train (ab-kernels,
# ncu only when named)
#   kernels       build every CUDA WKV extension in parallel processes (later stages hit ~/.cache/infctx/cuda)
#   tests         python3 -m pytest -v -m gpu -rs ${PYTEST_ARGS:-tests/}   (the GPU suite; -v: a kill keeps results)
#   doctor        infctx doctor (toolchain, kernel builds, tiny fwd+bwd against float64)
#   bench-kernels python3 -m infctx.bench.kernels $BENCH_KERNELS_ARGS   (bench/results/kernels.{json,md}); fla's
#                 Triton autotune of chunk_rwkv6 alone took ~4 min on a fresh H200 (2026-12-01)
#   train-check   recipes/rwkv7-0.1b-pretrain.yaml + recipes/rwkv7-0.1b-zero3-check.yaml (ZeRO-3, 1 GPU, 300 steps)
#                 on a World-tokenized corpus of the machine's Python sources; summary, export to .pth, generate
#   bench-train   python3 -m infctx.bench.train, 0.1B, 4k..1M, full+truncated, within BENCH_TRAIN_BUDGET_S (270)
#   ab-kernels    this tree's kernels beside another tree's (AB_TREE, default .after/base: `git archive REF | tar -x -C
#                 .after/base`, carried), one GPU, no fla: both built in parallel (AB_SPECS, default [(7, 64)]), then
#                 `infctx.bench.kernels $AB_ARGS` (default --versions 7 --no-fla --reps 20) this / other / this
#                 (AB_ROUNDS=2: this / other / this / other / this), and bench/results/ab/kernels-ab.md side by side
#                 (means, other / this, the spread between runs of one tree, and a verdict only outside that spread)
#   ncu           Nsight Compute counters (occupancy, stalls, shared-memory wavefronts) of one wkv7 forward and
#                 backward launch per shape in NCU_SHAPES (B,T,H ...; default 16,1024,32 4,4096,32), sequential
#                 kernels (span 0; NCU_FORWARD / NCU_BACKWARD=chunked: the chunked ones), kernels matching
#                 NCU_KERNELS (regex, default fwd_kernel|bwd_kernel)
# Env: OUT (files to bring back; default /tmp/device_run_out), BUDGET_S (570: whole script; a stage that no longer
# fits is skipped, the last one's timeout is cut), PY (python3), TRAIN_ARGS (extra `infctx fit` overrides),
# <STAGE>_S (a stage's time, e.g. TESTS_S=120, BENCH_TRAIN_S=300), CHECK_CORPUS_MB (64), SKIP_WHEELS=1 (don't pip install .whl/*.whl), KERNELS_VERBOSE=0 (no compiler output).
# $OUT gets at most 8 files: <stage>.log per stage (6), summary.txt, results.tgz (new bench/results files, the
# train-check run's metrics.csv/config/summary, corpus metadata). Needs carry [".whl"] (../shared/device/wheels.sh).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
STAGES=() EXTRA=()
while (($#)); do [ "$1" = -- ] && { shift; EXTRA=("$@"); break; }; STAGES+=("$1"); shift; done
((${#STAGES[@]})) || STAGES=(kernels tests doctor bench-kernels train-check bench-train)
OUT=${OUT:-/tmp/device_run_out} PY=${PY:-python3} T0=$(date +%s) BUDGET_S=${BUDGET_S:-570}
mkdir -p "$OUT"; SUM=$OUT/summary.txt; MARK=$(mktemp); export PYTHONUNBUFFERED=1; exec 3>&1
say() { echo "$*" | tee -a "$SUM"; }
say "device_run: stages ${STAGES[*]} | budget ${BUDGET_S}s | $(date -u +%FT%TZ) | $(uname -n)"
if [ -z "${SKIP_WHEELS:-}" ] && compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$SUM" 2>&1 || say "pip install of .whl FAILED (see above)"
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi -L >>"$SUM" 2>&1
$PY - 2>&1 <<'EOF' | tee -a "$SUM"
import importlib, sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| gpus", torch.cuda.device_count(), torch.cuda.get_device_name() if torch.cuda.is_available() else "-")
for m in ("lightning", "deepspeed", "jsonargparse", "typeshed_client", "datasets", "fla", "numba", "triton"):
    try: print(f"  {m} {getattr(importlib.import_module(m), '__version__', '?')}")
    except Exception as e: print(f"  {m} MISSING: {type(e).__name__}: {e}")
EOF
tmo() { local left=$((STAGE_END - $(date +%s))); ((left < 5)) && left=5; timeout -k 10 "$left" "$@"; }
pack() {  # new result files -> $OUT/results.tgz (written elsewhere first: a kill mid-write leaves the old one)
  local f; f=$(find bench/results runs/rwkv7-0.1b-zero3-check data/built/check -maxdepth 2 -type f -newer "$MARK" \
    \( -name '*.json' -o -name '*.md' -o -name '*.png' -o -name '*.csv' -o -name '*.yaml' -o -name '*.txt' \) 2>/dev/null)
  [ -n "$f" ] && tar czf /tmp/device_run_results.tgz $f && cp /tmp/device_run_results.tgz "$OUT/results.tgz"
}

st_kernels() {  # -c, not a heredoc: the spawned build workers re-import __main__, which stdin cannot give them
  tmo $PY -c '
import os, sys
from infctx.ops import cuda_build as cb
ok = True
for (v, n), err, s in cb.build_all(cfg=cb.BuildConfig(verbose=os.environ.get("KERNELS_VERBOSE", "1") == "1")):
    status = "ok" if err is None else "FAIL " + err
    print(f"wkv{v} N={n}: {status} ({s:.0f}s)", flush=True)
    ok &= err is None
sys.exit(0 if ok else 1)
'
}
# *_ARGS are split like shell words (eval), so PYTEST_ARGS='tests/ -k "not fla"' works
st_tests() { eval "set -- ${PYTEST_ARGS:-tests/}"; tmo $PY -m pytest -v -m gpu -rs --durations=15 -p no:cacheprovider "$@"; }
st_doctor() { tmo $PY -m infctx.cli doctor; }
st_bench_kernels() { eval "set -- ${BENCH_KERNELS_ARGS:-}"; tmo $PY -m infctx.bench.kernels "$@"; }
st_ncu() {
  local ncu; ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -1)
  [ -n "$ncu" ] || { echo "ncu: not found"; return 1; }
  tmo "$ncu" --clock-control none --target-processes all -k "regex:${NCU_KERNELS:-fwd_kernel|bwd_kernel}" \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section SchedulerStats \
    --section WarpStateStats --section InstructionStats --section MemoryWorkloadAnalysis_Tables \
    --section SourceCounters --metrics \
smsp__inst_executed_op_shared_ld.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum,\
l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum,smsp__inst_executed_op_shfl.sum \
    $PY -c '
import os, sys, torch
from infctx.bench.kernels import make_inputs, ours
for shape in sys.argv[1:]:
    B, T, H = map(int, shape.split(","))
    x = make_inputs(7, B, T, H, 64)
    y, s = ours(7, span=0, forward=os.environ.get("NCU_FORWARD", "sequential"),
               backward=os.environ.get("NCU_BACKWARD", "sequential"))(x)
    torch.autograd.backward([y, s], [torch.randn_like(y), torch.randn_like(s)])
    torch.cuda.synchronize()
    print("ncu: ran", shape, flush=True)
' ${NCU_SHAPES:-16,1024,32 4,4096,32}
}
st_ab_kernels() {
  local other=${AB_TREE:-.after/base} out=$PWD/bench/results/ab n=0 tree dir
  [ -d "$other/infctx" ] || { echo "ab-kernels: no tree at $other (git archive REF | tar -x -C $other)"; return 2; }
  other=$(cd "$other" && pwd)
  local build="import os, sys
from infctx.ops import cuda_build as cb
done = cb.build_all(specs=${AB_SPECS:-[(7, 64)]}, cfg=cb.BuildConfig(verbose=False))
for (v, n), err, s in done: print(os.getcwd(), 'wkv', v, 'N', n, err or 'built', round(s))
sys.exit(any(err for _, err, _ in done))"
  (cd "$other" && PYTHONPATH=$other:$PYTHONPATH tmo $PY -c "$build") &
  tmo $PY -c "$build"; local rc=$?
  wait $! || return; ((rc == 0)) || return $rc
  eval "set -- ${AB_ARGS:---versions 7 --no-fla --reps 20}"
  local runs=() order=(this) r
  for ((r = 0; r < ${AB_ROUNDS:-1}; r++)); do order+=(other this); done
  for tree in "${order[@]}"; do
    n=$((n + 1)); dir=$PWD; [ $tree = other ] && dir=$other
    (cd "$dir" && PYTHONPATH=$dir:$PYTHONPATH tmo $PY -m infctx.bench.kernels "$@" --out-dir "$out/$n-$tree") || return
    runs+=("$tree=$out/$n-$tree/kernels.json")
  done
  $PY -m infctx.bench.kernels --compare "${runs[@]}" --out-dir "$out"
}
st_bench_train() {
  local b=$((STAGE_T - 60)); ((b > ${BENCH_TRAIN_BUDGET_S:-270})) && b=${BENCH_TRAIN_BUDGET_S:-270}
  eval "set -- ${BENCH_TRAIN_ARGS:-}"
  tmo $PY -m infctx.bench.train --out bench/results --models 0.1b --seq-lens 4k 16k 64k 256k 1M \
    --modes truncated full --max-step-tokens 1M --budget-s "$b" "$@" ${EXTRA[@]+"${EXTRA[@]}"}
}
st_train_check() {
  local D=data/built/check RUN=runs/rwkv7-0.1b-zero3-check rc s
  mkdir -p "$D"
  if [ ! -f $D/train.bin ] || [ ! -f $D/val.bin ]; then
    tmo $PY - "$D" "${CHECK_CORPUS_MB:-64}" <<'EOF' || return
import json, os, sys, sysconfig
out, cap = sys.argv[1], int(float(sys.argv[2]) * 2**20)  # every 50th file -> val; the sample corpus as a fallback
n = size = 0
roots = sorted({sysconfig.get_paths()[k] for k in ("stdlib", "purelib", "platlib")})
walk = ((d, f) for r in roots for d, sub, fs in os.walk(r) if not sub.sort() for f in sorted(fs))  # sorted walk
with open(f"{out}/train.jsonl", "w") as tr, open(f"{out}/val.jsonl", "w") as va:
    for d, f in walk:
        if size >= cap: break
        try:
            p = os.path.join(d, f)
            text = open(p, "rb").read().decode("utf-8", "replace") if f.endswith(".py") and \
                200 <= os.path.getsize(p) <= 2**20 else None
        except OSError:
            continue
        if text:
            (va if n % 50 == 49 else tr).write(json.dumps({"text": text}) + "\n")
            n, size = n + 1, size + len(text)
    while size < cap // 4:  # too few sources here: repeat the bundled sample
        for i, line in enumerate(open("data/sample/train.jsonl")):
            (va if i % 50 == 49 else tr).write(line); size += len(line)
print(f"corpus: {n} Python files from {roots}, {size / 2**20:.1f} MiB")
EOF
    for s in train val; do
      tmo $PY -m infctx.cli data build $D/$s.jsonl --output $D/$s --tokenizer world --ctx-len 4096 || return
    done
  fi
  rm -rf "$RUN"; eval "set -- ${TRAIN_ARGS:-}"
  tmo $PY -m infctx.cli fit --config recipes/rwkv7-0.1b-pretrain.yaml --config recipes/rwkv7-0.1b-zero3-check.yaml \
    --trainer.default_root_dir "$RUN" "$@"
  rc=$?
  $PY - "$RUN/metrics.csv" <<'EOF' | tee "$RUN/summary.txt" | tee -a "$SUM" >&3
import csv, statistics as st, sys
rows = list(csv.DictReader(open(sys.argv[1])))
tr = [r for r in rows if r.get("train/loss")]
va = [(int(r["step"]), float(r["val/loss"])) for r in rows if r.get("val/loss")]
if not tr: sys.exit("train-check: no training rows in " + sys.argv[1])
col = lambda k, rs=tr: [float(r[k]) for r in rs if r.get(k)]
loss, tok, mem, gn = col("train/loss"), col("train/tokens_per_s"), col("train/peak_mem_gb"), col("train/grad_norm")
print(f"train-check: {len(tr)} steps; loss first {loss[0]:.3f} last {loss[-1]:.3f} (mean of first/last 10: "
      f"{st.mean(loss[:10]):.3f} -> {st.mean(loss[-10:]):.3f}); median tokens/s {st.median(tok[5:] or tok):,.0f} "
      f"(steps 6+; max {max(tok):,.0f}); peak memory {max(mem):.2f} GiB; grad_norm "
      f"{gn[0] if gn else float('nan'):.3g} -> {gn[-1] if gn else float('nan'):.3g}; val/loss {va or 'none'}")
print("  loss fell" if st.mean(loss[-10:]) < st.mean(loss[:10]) - 0.5 else "  LOSS DID NOT FALL by 0.5")
for r in tr[:: max(1, len(tr) // 12)] + ([tr[-1]] if (len(tr) - 1) % max(1, len(tr) // 12) else []):
    print(f"  step {r['step']:>4} loss {float(r['train/loss']):.3f} lr {float(r['train/lr']):.2e} "
          f"tok/s {float(r['train/tokens_per_s']):,.0f} mem {float(r['train/peak_mem_gb']):.2f} GiB")
EOF
  if ((rc == 0)); then
    tmo $PY -m infctx.cli export "$RUN" --output $D/check.pth && du -sh "$RUN"/checkpoints/* $D/check.pth &&
      tmo $PY -m infctx.cli generate --model $D/check.pth --prompt "import os" --max-tokens 48 --temperature 0 \
        | tee "$RUN/generate.txt"
    say "  train-check: export + generate rc=$?"
  fi
  return $rc
}

for stage in "${STAGES[@]}"; do
  case $stage in
    kernels) want=300 min=60 ;; tests) want=300 min=60 ;; doctor) want=120 min=20 ;;
    bench-kernels) want=420 min=60 ;; train-check) want=330 min=200 ;; bench-train) want=340 min=120 ;;
    ncu) want=240 min=60 ;; ab-kernels) want=300 min=120 ;;
    *) say "[$stage] unknown stage (kernels tests doctor bench-kernels train-check bench-train ab-kernels ncu)"; continue ;;
  esac
  v=${stage//-/_}_S; v=${v^^}; want=${!v:-$want}  # e.g. TESTS_S=120 caps the tests stage at 120 s
  left=$((T0 + BUDGET_S - $(date +%s) - 10)); STAGE_T=$((want < left ? want : left))
  ((STAGE_T < min)) && { say "[$stage] SKIPPED: ${left}s of BUDGET_S=$BUDGET_S left, it needs >= ${min}s"; continue; }
  start=$(date +%s); STAGE_END=$((start + STAGE_T))
  { echo "== $stage: timeout ${STAGE_T}s, $(date -u +%FT%TZ)"; "st_${stage//-/_}"; } >>"$OUT/$stage.log" 2>&1
  rc=$?; took=$(($(date +%s) - start))
  say "[$stage] rc=$rc in ${took}s (limit ${STAGE_T}s)$( ((rc == 124 || rc == 137)) && echo ' TIMED OUT')"
  pack
done
say "device_run: done in $(($(date +%s) - T0))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
