"""`infctx data inspect PREFIX`: header, counts, a length histogram and a few decoded documents."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from infctx.data import binidx


def describe(prefix: str, docs: int = 3, chars: int = 300, tokenizer: str | None = None) -> str:
    ds = binidx.MMapIndexedDataset(prefix)
    meta_file = Path(f"{prefix}.meta.json")
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    sizes = np.asarray(ds.sizes, dtype=np.int64)
    lines = [
        f"{prefix}: MMIDIDX v1, dtype {ds.dtype.name}",
        f"  items {len(ds):,}  documents {ds.num_docs:,}  tokens {ds.num_tokens:,}",
    ]
    if len(sizes):
        q = np.percentile(sizes, [0, 50, 90, 99, 100]).astype(int)
        lines.append(f"  item length: mean {sizes.mean():,.1f}  min {q[0]:,}  p50 {q[1]:,}  p90 {q[2]:,}  "
                     f"p99 {q[3]:,}  max {q[4]:,}")
        edges = 2 ** np.arange(0, int(np.ceil(np.log2(max(sizes.max(), 1)))) + 2)
        hist, _ = np.histogram(sizes, bins=edges)
        top = max(hist.max(), 1)
        lines.append("  length histogram (tokens):")
        for lo, hi, n in zip(edges[:-1], edges[1:], hist):
            if n:
                lines.append(f"    [{lo:>9,}, {hi:>9,})  {n:>10,}  {'#' * max(1, int(40 * n / top))}")
    if meta:
        lines.append(f"  tokenizer {meta.get('tokenizer')}  vocab {meta.get('vocab_size')}  eod {meta.get('eod_id')}  "
                     f"mask sidecar {'yes' if meta.get('mask') else 'no'}")
        for ctx, info in (meta.get("magic_prime") or {}).items():
            lines.append(f"  ctx_len {ctx}: slots {info['slots']:,}  magic_prime {info['magic_prime']}")
        if meta.get("skipped"):
            lines.append(f"  skipped at build: {meta['skipped']}")
    spec = tokenizer or meta.get("tokenizer")
    if spec and docs:
        from infctx.data.tokenizers import get_tokenizer

        tok = get_tokenizer(spec)
        masks = binidx.MMapIndexedDataset(f"{prefix}.mask") if binidx.exists(f"{prefix}.mask") else None
        for d in range(min(docs, ds.num_docs)):
            ids = ds.document(d)
            text = tok.decode(ids)
            extra = f", {int(np.asarray(masks.document(d)).sum())} in loss" if masks is not None else ""
            lines.append(f"--- document {d} ({len(ids):,} tokens{extra}) ---")
            lines.append(text[:chars] + (" ..." if len(text) > chars else ""))
    return "\n".join(lines)
