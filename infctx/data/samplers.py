"""Training datasets over binidx: fixed-length (input_ids, targets, mask) samples for any ctx_len.

Every dataset is indexed by a *global* sample index g = 0, 1, 2, ... and is a pure function of it (plus the seed),
so resuming is "start at g" and splitting across ranks is "rank r takes g = r, r + W, ...": see RankView, or let
the trainer's sampler choose the indices. Files are memory-mapped and opened lazily in each DataLoader worker;
a sample reads only its own ctx_len + 1 tokens.

Each sample is dict(input_ids=LongTensor[T], targets=LongTensor[T], mask=FloatTensor[T]) with T = ctx_len,
input_ids = tokens[:-1], targets = tokens[1:], and mask[t] = 1 where predicting targets[t] counts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from infctx.data import binidx
from infctx.data.primes import magic_prime

MODES = ("stream", "document", "sft")


class _Lazy:
    """A binidx opened on first use in each process (pickles as its path, not as mapped memory)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._ds: binidx.MMapIndexedDataset | None = None

    @property
    def ds(self) -> binidx.MMapIndexedDataset:
        if self._ds is None:
            self._ds = binidx.MMapIndexedDataset(self.prefix)
        return self._ds

    def __getstate__(self):
        return {"prefix": self.prefix, "_ds": None}


def _mask_reader(prefix: str, required: bool) -> _Lazy | None:
    mprefix = f"{prefix}.mask"
    if binidx.exists(mprefix):
        return _Lazy(mprefix)
    if required:
        raise FileNotFoundError(f"{prefix}: no loss-mask sidecar {mprefix}.bin/.idx; SFT mode needs data built from "
                                "prompt/completion, chat or completion_template records")
    return None


def _eod_id(prefix: str) -> int:
    try:
        return int(json.loads(Path(f"{prefix}.meta.json").read_text())["eod_id"])
    except (OSError, ValueError, KeyError):
        return 0


def _sample(tokens: np.ndarray, ctx_len: int, pad_id: int, tok_mask: np.ndarray | None) -> dict:
    """Pad a span of <= ctx_len + 1 tokens and shift it into inputs / targets / target-aligned mask."""
    n = len(tokens)
    buf = np.full(ctx_len + 1, pad_id, dtype=np.int64)
    buf[:n] = tokens
    mask = np.zeros(ctx_len, dtype=np.float32)
    mask[: max(n - 1, 0)] = 1.0
    if tok_mask is not None:
        mask[: max(n - 1, 0)] *= tok_mask[1:n]
    t = torch.from_numpy(buf)
    return {"input_ids": t[:-1], "targets": t[1:], "mask": torch.from_numpy(mask)}


class StreamDataset(Dataset):
    """RWKV-LM's stream order: the token stream is cut into ctx_len-aligned slots and sample g reads slot
    (factor * (g + 1)^3) mod p with p the magic prime and factor = int(p * (sqrt(5) - 1) / 2), exactly as
    RWKV-LM's trainer does (its ii = g + 1). Since p % 3 == 2 the cube permutes residues mod p, so g = 0 .. p - 1
    visit every slot 0 .. p - 1 exactly once; len() is one such epoch and later g repeat the order."""

    def __init__(self, prefix: str, ctx_len: int, magic: int | None = None, use_mask: bool = False) -> None:
        self.prefix, self.ctx_len = str(prefix), int(ctx_len)
        self.data = _Lazy(self.prefix)
        self.masks = _mask_reader(self.prefix, required=use_mask) if use_mask else None
        tokens = self.data.ds.num_tokens
        self.magic_prime = magic if magic is not None else magic_prime(tokens, self.ctx_len)
        if self.magic_prime is None:
            raise ValueError(f"{prefix}: {tokens} tokens are too few for ctx_len {ctx_len} in stream mode "
                             f"(need at least {3 * self.ctx_len}); use a smaller ctx_len or more data")
        if self.magic_prime % 3 != 2 or self.magic_prime * self.ctx_len + 1 > tokens:
            raise ValueError(f"{prefix}: magic prime {self.magic_prime} does not fit {tokens} tokens at ctx_len {ctx_len}")
        self.factor = int(self.magic_prime * (math.sqrt(5) - 1) / 2)
        self.pad_id = _eod_id(self.prefix)

    def __len__(self) -> int:
        return self.magic_prime

    def slot(self, g: int) -> int:
        ii = g + 1
        return (self.factor * ii * ii * ii) % self.magic_prime

    def __getitem__(self, g: int) -> dict:
        start = self.slot(int(g)) * self.ctx_len
        end = start + self.ctx_len + 1
        tokens = self.data.ds.tokens[start:end]
        tok_mask = None if self.masks is None else np.asarray(self.masks.ds.tokens[start:end], dtype=np.float32)
        return _sample(tokens, self.ctx_len, self.pad_id, tok_mask)


def document_spans(doc_start: np.ndarray, doc_end: np.ndarray, ctx_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of every sample in document mode, in stream order. A sample starts at a document start
    and takes whole documents while they fit in ctx_len + 1 tokens (documents already end with EOD); a document
    too long for one sample is cut into ctx_len steps and its tail is packed with the documents after it."""
    req = ctx_len + 1
    starts: list[int] = []
    lengths: list[int] = []
    n = len(doc_start)
    d = 0
    cursor = int(doc_start[0]) if n else 0
    while d < n:
        j = int(np.searchsorted(doc_end, cursor + req, side="right"))
        if j > d:  # documents d .. j-1 fit entirely
            starts.append(cursor)
            lengths.append(int(doc_end[j - 1]) - cursor)
            d = j
            if d < n:
                cursor = int(doc_start[d])
        else:  # cut the long document d into full samples, leave its tail for packing
            k = (int(doc_end[d]) - cursor - 1) // ctx_len
            if int(doc_end[d]) - (cursor + k * ctx_len) <= 1:
                k -= 1
            starts.extend(range(cursor, cursor + k * ctx_len, ctx_len))
            lengths.extend([req] * k)
            cursor += k * ctx_len
    s, l = np.array(starts, dtype=np.int64), np.array(lengths, dtype=np.int64)
    keep = l >= 2
    return s[keep], l[keep]


class DocumentDataset(Dataset):
    """Document mode (and SFT mode with use_mask=True: targets count only where the mask sidecar says so).
    Samples are shuffled per epoch with `seed` (epoch e uses permutation seed + e) unless shuffle=False;
    bucket_size > 0 sorts each block of that many consecutive samples by length, longest first, so a batch drawn
    from consecutive indices has similar lengths and trims well."""

    def __init__(self, prefix: str, ctx_len: int, use_mask: bool = False, shuffle: bool = True, seed: int = 0,
                 bucket_size: int = 0) -> None:
        self.prefix, self.ctx_len = str(prefix), int(ctx_len)
        self.shuffle, self.seed, self.bucket_size = shuffle, int(seed), int(bucket_size)
        self.data = _Lazy(self.prefix)
        self.masks = _mask_reader(self.prefix, required=True) if use_mask else None
        ds = self.data.ds
        starts, sizes, doc_idx = ds.item_starts(), np.asarray(ds.sizes, dtype=np.int64), np.asarray(ds.doc_idx)
        first, last = doc_idx[:-1], doc_idx[1:] - 1
        nonempty = last >= first
        first, last = first[nonempty], last[nonempty]
        self.starts, self.lengths = document_spans(starts[first], starts[last] + sizes[last], self.ctx_len)
        if len(self.starts) == 0:
            raise ValueError(f"{prefix}: no document has 2 or more tokens; nothing to train on")
        self.pad_id = _eod_id(self.prefix)
        self._order_epoch, self._order = -1, np.arange(0)

    def __len__(self) -> int:
        return len(self.starts)

    def order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            n = len(self.starts)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            if self.bucket_size > 1:
                for a in range(0, n, self.bucket_size):
                    block = order[a: a + self.bucket_size]
                    order[a: a + self.bucket_size] = block[np.argsort(-self.lengths[block], kind="stable")]
            self._order_epoch, self._order = epoch, order
        return self._order

    def span(self, g: int) -> tuple[int, int]:
        epoch, k = divmod(int(g), len(self.starts))
        i = self.order(epoch)[k]
        return int(self.starts[i]), int(self.lengths[i])

    def __getitem__(self, g: int) -> dict:
        start, length = self.span(g)
        tokens = self.data.ds.tokens[start: start + length]
        tok_mask = None
        if self.masks is not None:
            tok_mask = np.asarray(self.masks.ds.tokens[start: start + length], dtype=np.float32)
        return _sample(tokens, self.ctx_len, self.pad_id, tok_mask)


class BlendDataset(Dataset):
    """Several datasets mixed with weights. A fixed schedule of `period` slots gives dataset i round(w_i * period)
    slots spread evenly (its k-th at position (k + 0.5) / n_i); global sample g maps to block g // period, so each
    component is read in its own order, index by index, and the mix is exact over every period."""

    def __init__(self, datasets: Sequence[Dataset], weights: Sequence[float], period: int = 10000) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("blend: give one weight per dataset")
        w = np.asarray(weights, dtype=np.float64)
        if (w <= 0).any():
            raise ValueError(f"blend: weights must be positive (got {list(weights)})")
        self.datasets = list(datasets)
        self.counts = np.maximum(np.round(w / w.sum() * period).astype(np.int64), 1)
        self.period = int(self.counts.sum())
        pos = np.concatenate([(np.arange(c) + 0.5) / c for c in self.counts])
        which = np.concatenate([np.full(c, i) for i, c in enumerate(self.counts)])
        rank = np.concatenate([np.arange(c) for c in self.counts])
        order = np.lexsort((which, pos))
        self.which, self.rank = which[order], rank[order]

    def __len__(self) -> int:
        return self.period * max(math.ceil(len(d) / c) for d, c in zip(self.datasets, self.counts))

    def locate(self, g: int) -> tuple[int, int]:
        block, p = divmod(int(g), self.period)
        i = int(self.which[p])
        return i, block * int(self.counts[i]) + int(self.rank[p])

    def __getitem__(self, g: int) -> dict:
        i, local = self.locate(g)
        return self.datasets[i][local]


class RankView(Dataset):
    """The samples of one rank, from a resume point: item i is global sample start + i * world_size + rank."""

    def __init__(self, dataset: Dataset, rank: int = 0, world_size: int = 1, start: int = 0,
                 num_samples: int | None = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        self.dataset, self.rank, self.world_size = dataset, rank, world_size
        self.num_samples = num_samples if num_samples is not None else len(dataset)
        self.set_start(start)

    def set_start(self, sample_index: int) -> None:
        """Resume after `sample_index` global samples (all ranks together) were consumed."""
        self.start = int(sample_index)

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0) // self.world_size

    def __getitem__(self, i: int) -> dict:
        return self.dataset[self.start + int(i) * self.world_size + self.rank]


def parse_blend(spec: str | Sequence[str]) -> tuple[list[str], list[float]]:
    """'a' -> ([a], [1]); 'a@0.7,b@0.3' (or a list of such items) -> ([a, b], [0.7, 0.3])."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    prefixes, weights = [], []
    for item in items:
        item = item.strip()
        prefix, _, w = item.rpartition("@") if "@" in item else (item, "", "1")
        prefixes.append(prefix)
        weights.append(float(w))
    return prefixes, weights


def make_dataset(prefix: str | Sequence[str], mode: str = "stream", ctx_len: int = 4096, seed: int = 0,
                 shuffle: bool = True, bucket_size: int = 0, weights: Sequence[float] | None = None) -> Dataset:
    """The dataset the trainer uses: mode stream | document | sft over one binidx prefix, or a blend given as
    'a@0.7,b@0.3' / a list of prefixes with `weights`."""
    if mode not in MODES:
        raise ValueError(f"data mode must be one of {', '.join(MODES)} (got {mode!r})")
    prefixes, parsed = parse_blend(prefix)
    weights = list(weights) if weights is not None else parsed
    for p in prefixes:
        if not binidx.exists(p):
            raise FileNotFoundError(f"binidx {p}.bin/.idx not found; build it with `infctx data build`")

    def one(p: str, k: int) -> Dataset:
        if mode == "stream":
            return StreamDataset(p, ctx_len)
        return DocumentDataset(p, ctx_len, use_mask=mode == "sft", shuffle=shuffle, seed=seed + 1000 * k,
                               bucket_size=bucket_size)

    parts = [one(p, k) for k, p in enumerate(prefixes)]
    return parts[0] if len(parts) == 1 else BlendDataset(parts, weights)
