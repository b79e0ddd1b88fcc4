"""`infctx data build`: inputs -> tokenised binidx (+ loss-mask sidecar) + metadata JSON.

Work units (sources.py) are tokenised in worker processes and written strictly in input order, so the output is
byte-identical for any worker count. Everything is written under temporary names and renamed at the end, metadata
last: a build that was interrupted leaves no file that looks finished, and a finished one is reused when its
fingerprint (inputs, tokenizer, format, dtype) matches.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing as mp
import os
import sys
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from infctx.data import binidx, sources
from infctx.data.primes import magic_prime_info
from infctx.data.records import BAD_JSON, BAD_UTF8, EMPTY, BadRecord, RecordFormat
from infctx.data.sources import InputSpec, Unit
from infctx.data.tokenizers import Tokenizer, get_tokenizer

META_VERSION = 1


class BuildError(Exception):
    """A build that must stop: bad input under --strict, a token id outside the vocabulary, unreadable input."""


@dataclass
class BuildConfig:
    """One output dataset. output is the path prefix (<output>.bin/.idx, <output>.mask.bin/.idx,
    <output>.meta.json). vocab_size: declared vocabulary (default: the tokenizer's); every id must be below it."""

    inputs: list[InputSpec]
    output: str
    tokenizer: str = "world"
    vocab_size: int | None = None
    format: RecordFormat = field(default_factory=RecordFormat)
    ctx_lens: list[int] = field(default_factory=lambda: [4096])
    workers: int = 0  # 0 = all cores
    strict: bool = False
    chunk_bytes: int = 4 << 20
    progress: bool = True
    force: bool = False
    start_method: str = "auto"  # worker processes: auto (fork where the OS has it: instant start) | fork | spawn

    def __post_init__(self) -> None:
        self.inputs = [i if isinstance(i, InputSpec) else InputSpec(**(i if isinstance(i, dict) else {"path": i}))
                       for i in (self.inputs if isinstance(self.inputs, list) else [self.inputs])]
        if isinstance(self.format, dict):
            self.format = RecordFormat(**self.format)
        if not self.inputs:
            raise ValueError("build: no inputs given")
        if self.chunk_bytes < 1:
            raise ValueError("build: chunk_bytes must be positive")


@dataclass
class BuildResult:
    output: str
    meta: dict
    reused: bool


@dataclass
class _Ctx:
    """What a worker needs to turn a unit into token arrays."""

    tokenizer: Tokenizer
    fmt: RecordFormat
    vocab_size: int
    dtype: str


@dataclass
class _Chunk:
    tokens: np.ndarray
    sizes: np.ndarray
    mask: np.ndarray | None
    doc_lines: np.ndarray  # line (or row) of each document, to name the culprit of a later error
    errors: list[tuple[int, str, str]]  # (line, kind, detail)
    docs: int
    size: int
    bad_token: tuple[int, int] | None = None  # (line, id) of the first id >= vocab_size


def meta_path(prefix: str) -> str:
    return f"{prefix}.meta.json"


def mask_prefix(prefix: str) -> str:
    return f"{prefix}.mask"


def _documents(ctx: _Ctx, unit: Unit, errors: list):
    """(line, [(utf8 bytes, trained)]) for each good record of a unit; bad ones go to `errors`."""
    if unit.kind == "lines":
        line = unit.first_line - 1
        try:  # one decode per block is cheaper than one per line; a block with bad UTF-8 goes line by line
            lines = unit.payload.decode("utf-8", "surrogatepass").split("\n")
        except UnicodeDecodeError:
            lines = unit.payload.split(b"\n")
        for raw in lines:
            line += 1
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except UnicodeDecodeError as err:
                errors.append((line, BAD_UTF8, f"byte 0x{raw[err.start]:02x} at column {err.start + 1}"))
                continue
            except ValueError as err:
                errors.append((line, BAD_JSON, str(err)))
                continue
            yield from _encoded(ctx, line, record, errors)
    elif unit.kind == "rows":
        for n, row in enumerate(unit.payload):
            yield from _encoded(ctx, unit.first_line + n, row, errors)
    else:
        yield from _text_docs(unit, errors)


def _encoded(ctx: _Ctx, line: int, record, errors: list):
    try:
        segs = ctx.fmt.segments(record)
        yield line, [(_utf8(text), trained) for text, trained in segs]
    except BadRecord as err:
        errors.append((line, err.kind, err.detail))


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise BadRecord(BAD_UTF8, f"lone surrogate U+{ord(text[err.start]):04X} at character {err.start}") from None


def _text_docs(unit: Unit, errors: list):
    """Documents of a plain-text unit: the whole file, or its paragraphs / lines (each checked for UTF-8 alone)."""
    data: bytes = unit.payload
    if unit.text_split == "document":
        pieces = [(unit.first_line, data)]
    else:
        sep = b"\n\n" if unit.text_split == "paragraph" else b"\n"
        pieces, line = [], unit.first_line
        for piece in data.split(sep):
            lead = len(piece) - len(piece.lstrip(b"\n"))
            pieces.append((line + lead, piece.strip(b"\n")))
            line += piece.count(b"\n") + sep.count(b"\n")
    for line, piece in pieces:
        try:
            piece.decode("utf-8")
        except UnicodeDecodeError as err:
            errors.append((line + piece.count(b"\n", 0, err.start), BAD_UTF8,
                           f"byte 0x{piece[err.start]:02x}; text files must be UTF-8"))
            continue
        if piece.strip():
            yield line, [(piece, True)]
        elif unit.text_split == "document":
            errors.append((line, EMPTY, "the file has no text"))


def process_unit(ctx: _Ctx, unit: Unit) -> _Chunk:
    """Tokenise a unit: one tokenizer call for all its segments, then documents assembled with numpy
    (segments concatenated, EOD appended, per-token mask from the segment flags)."""
    errors: list = []
    doc_lines, seg_bytes, seg_trained, seg_per_doc = [], [], [], []
    for line, segs in _documents(ctx, unit, errors):
        doc_lines.append(line)
        seg_per_doc.append(len(segs))
        for data, trained in segs:
            seg_bytes.append(data)
            seg_trained.append(trained)
    ndocs = len(doc_lines)
    ids, counts = ctx.tokenizer.encode_batch(seg_bytes) if seg_bytes else (np.zeros(0, np.int32), np.zeros(0, np.int64))
    seg_doc = np.repeat(np.arange(ndocs), seg_per_doc)
    sizes = np.bincount(seg_doc, weights=counts, minlength=ndocs).astype(np.int64) + 1
    ends = np.cumsum(sizes)
    is_eod = np.zeros(int(ends[-1]) if ndocs else 0, dtype=bool)
    is_eod[ends - 1] = True
    body = ~is_eod
    tokens = np.empty(len(is_eod), dtype=ctx.dtype)
    tokens[body] = ids
    tokens[is_eod] = ctx.tokenizer.eod_id
    bad = None
    if len(ids) and int(ids.max()) >= ctx.vocab_size:
        k = int(np.argmax(ids >= ctx.vocab_size))
        doc = int(np.searchsorted(np.cumsum(sizes - 1), k, side="right"))
        bad = (doc_lines[doc], int(ids[k]))
    mask = None
    if ctx.fmt.has_mask:
        flags = np.array(seg_trained, dtype=np.uint8)
        mask = np.empty(len(tokens), dtype=np.uint8)
        mask[body] = np.repeat(flags, counts)
        last_seg = np.cumsum(seg_per_doc) - 1
        mask[is_eod] = flags[last_seg] if ndocs else 0  # the end token is learned where the document's last part is
    return _Chunk(tokens, sizes, mask, np.array(doc_lines, dtype=np.int64), errors, ndocs, unit.size, bad)


# Worker processes keep their context here (set once by the pool initializer, so it is not re-sent per task).
_WORKER_CTX: list[_Ctx] = []


def _init_worker(ctx: _Ctx) -> None:
    _WORKER_CTX[:] = [ctx]


def _work(unit: Unit) -> _Chunk:
    return process_unit(_WORKER_CTX[0], unit)


def _ordered_results(ctx: _Ctx, units, workers: int, start_method: str = "auto"):
    """Yield (unit, chunk) in input order, with at most a few units in flight (memory stays flat).
    An input of a single unit is done in this process: starting workers would cost more than it saves."""
    units = iter(units)
    head = list(itertools.islice(units, 2))
    units = itertools.chain(head, units)
    if workers <= 1 or len(head) < 2:
        for unit in units:
            yield unit, process_unit(ctx, unit)
        return
    if start_method == "auto":
        start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    pool = mp.get_context(start_method).Pool(workers, initializer=_init_worker, initargs=(ctx,))
    try:
        pending: deque = deque()
        for unit in units:
            pending.append((unit, pool.apply_async(_work, (unit,))))
            if len(pending) >= 2 * workers + 2:
                u, res = pending.popleft()
                yield u, res.get()
        while pending:
            u, res = pending.popleft()
            yield u, res.get()
    finally:
        pool.terminate()
        pool.join()


def config_fingerprint(cfg: BuildConfig, tokenizer: Tokenizer, vocab: int) -> str:
    key = {
        "meta_version": META_VERSION,
        "tokenizer": tokenizer.fingerprint(),
        "vocab_size": vocab,
        "format": asdict(cfg.format),
        "chunk_bytes": cfg.chunk_bytes,
        "inputs": [[asdict(s), sources.fingerprint(s)] for s in cfg.inputs],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _reusable(prefix: str, fp: str, has_mask: bool) -> dict | None:
    try:
        meta = json.loads(Path(meta_path(prefix)).read_text())
    except (OSError, ValueError):
        return None
    if meta.get("fingerprint") != fp or not binidx.exists(prefix) or (has_mask and not binidx.exists(mask_prefix(prefix))):
        return None
    return meta


def build(cfg: BuildConfig) -> BuildResult:
    t0 = time.time()
    tokenizer = get_tokenizer(cfg.tokenizer)
    vocab = cfg.vocab_size or tokenizer.vocab_size
    if tokenizer.eod_id >= vocab:
        raise BuildError(f"build {cfg.output}: end-of-document id {tokenizer.eod_id} >= declared vocab_size {vocab}")
    fp = config_fingerprint(cfg, tokenizer, vocab)
    has_mask = cfg.format.has_mask
    if not cfg.force and (meta := _reusable(cfg.output, fp, has_mask)):
        _say(cfg, f"{cfg.output}: up to date ({meta['num_tokens']:,} tokens, {meta['num_docs']:,} docs), reused")
        return BuildResult(cfg.output, meta, True)

    dtype = np.dtype(binidx.token_dtype(vocab))
    ctx = _Ctx(tokenizer, cfg.format, vocab, dtype.name)
    workers = cfg.workers if cfg.workers > 0 else (os.cpu_count() or 1)
    writer = binidx.IndexedDatasetWriter(cfg.output, dtype)
    mwriter = binidx.IndexedDatasetWriter(mask_prefix(cfg.output), np.uint8) if has_mask else None
    counts: Counter = Counter()
    examples: list[str] = []
    bar = _progress(cfg)
    in_bytes = 0
    try:
        unit_iter = (u for spec in cfg.inputs for u in sources.units(spec, cfg.chunk_bytes))
        t_first = time.time()
        for unit, chunk in _ordered_results(ctx, unit_iter, workers, cfg.start_method):
            for line, kind, detail in chunk.errors:
                where = f"{unit.source}:{line}" if unit.kind != "rows" else f"{unit.source} row {line}"
                if cfg.strict:
                    raise BuildError(f"{where}: {kind}: {detail} (stopped by --strict; fix or drop the record)")
                counts[kind] += 1
                if len(examples) < 10:
                    examples.append(f"{where}: {kind}: {detail}")
            if chunk.bad_token:
                line, tid = chunk.bad_token
                raise BuildError(f"{unit.source}:{line}: token id {tid} >= declared vocab_size {vocab}; "
                                 f"use the tokenizer the vocabulary belongs to or raise vocab_size")
            writer.add(chunk.tokens, chunk.sizes)
            if mwriter is not None:
                mwriter.add(chunk.mask, chunk.sizes)
            in_bytes += chunk.size
            if bar is not None:
                bar.update(chunk.size)
                bar.set_postfix(docs=f"{writer.num_docs:,}", tokens=f"{writer.num_tokens:,}",
                                docs_s=f"{writer.num_docs / max(time.time() - t0, 1e-9):,.0f}", refresh=False)
        if bar is not None:
            bar.close()
        writer.finalize(rename=False)
        if mwriter is not None:
            mwriter.finalize(rename=False)
    except BaseException:
        if bar is not None:
            bar.close()
        writer.abort()
        if mwriter is not None:
            mwriter.abort()
        raise
    seconds = time.time() - t0
    meta = {
        "format": "MMIDIDX", "meta_version": META_VERSION,
        "tokenizer": tokenizer.name, "tokenizer_fingerprint": tokenizer.fingerprint(),
        "vocab_size": vocab, "eod_id": tokenizer.eod_id, "dtype": dtype.name,
        "num_tokens": writer.num_tokens, "num_docs": writer.num_docs,
        "mask": mask_prefix(cfg.output) if has_mask else None,
        "record_format": asdict(cfg.format),
        "inputs": [asdict(s) for s in cfg.inputs],
        "fingerprint": fp,
        "magic_prime": {str(c): magic_prime_info(writer.num_tokens, c) for c in cfg.ctx_lens},
        "skipped": dict(counts),
        "input_bytes": in_bytes, "build_seconds": round(seconds, 3), "workers": workers,
        "startup_seconds": round(t_first - t0, 3),  # tokenizer load and fingerprint, before any input is read
    }
    tmp_meta = meta_path(cfg.output) + ".tmp"
    Path(tmp_meta).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    if mwriter is not None:
        mwriter.commit()
    writer.commit()
    os.replace(tmp_meta, meta_path(cfg.output))
    skipped = sum(counts.values())
    _say(cfg, f"{cfg.output}: {writer.num_docs:,} docs, {writer.num_tokens:,} tokens ({dtype.name}) from "
              f"{in_bytes / 1e6:,.1f} MB in {seconds:.1f} s ({in_bytes / 1e6 / max(seconds, 1e-9):,.1f} MB/s)"
              + (f"; skipped {skipped} bad record(s): " + ", ".join(f"{k} x{v}" for k, v in counts.items()) if skipped else ""))
    for ex in examples:
        _say(cfg, f"  {ex}")
    return BuildResult(cfg.output, meta, False)


def _say(cfg: BuildConfig, msg: str) -> None:
    if cfg.progress:
        print(msg, file=sys.stderr)


def _progress(cfg: BuildConfig):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(desc=f"tokenising {Path(cfg.output).name}", unit="B", unit_scale=True, unit_divisor=1000,
                file=sys.stderr, dynamic_ncols=True)


def load_configs(path: str | os.PathLike) -> list[BuildConfig]:
    """A YAML file with one build (its fields at the top level) or several under `builds:`; entries may share
    settings given at the top level next to `builds`."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise BuildError(f"data config {path} not found") from None
    if not isinstance(raw, dict):
        raise BuildError(f"data config {path}: expected a mapping at the top level")
    shared = {k: v for k, v in raw.items() if k != "builds"}
    entries = raw.get("builds", [{}])
    try:
        return [BuildConfig(**{**shared, **entry}) for entry in entries]
    except TypeError as err:
        raise BuildError(f"data config {path}: {err}") from None


def build_from_config(path: str | os.PathLike, **overrides) -> list[BuildResult]:
    results = []
    for cfg in load_configs(path):
        for k, v in overrides.items():
            setattr(cfg, k, v)
        results.append(build(cfg))
    return results
