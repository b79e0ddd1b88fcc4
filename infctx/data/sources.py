"""Inputs: local JSONL (.gz / .zst too), plain text, Hugging Face datasets; each cut into work units.

A unit is a self-contained piece of work for one tokenizer process, numbered by where it came from (file and first
line, or dataset and first row) so errors can be reported as file:line. Unit boundaries depend only on the input
and `chunk_bytes`, never on the worker count: that is what makes the output deterministic.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

JSONL_EXT = (".jsonl", ".json", ".ndjson")
TEXT_EXT = (".txt", ".text", ".md")
COMPRESSED = (".gz", ".zst")
TEXT_SPLITS = ("document", "paragraph", "line")


@dataclass
class InputSpec:
    """path: file, glob, directory, a datasets.save_to_disk folder, or a Hugging Face dataset name / builder
    ("json", "parquet", ...) for kind hf. kind: auto | jsonl | text | hf | hf_disk.
    text_split (plain text): document = one document per file, paragraph = split at blank lines, line = per line."""

    path: str
    kind: str = "auto"
    split: str = "train"
    name: str | None = None
    data_files: list[str] | None = None
    streaming: bool = False
    text_split: str = "document"

    def __post_init__(self) -> None:
        if self.kind not in ("auto", "jsonl", "text", "hf", "hf_disk"):
            raise ValueError(f"input {self.path}: kind must be auto, jsonl, text, hf or hf_disk (got {self.kind!r})")
        if self.text_split not in TEXT_SPLITS:
            raise ValueError(f"input {self.path}: text_split must be one of {', '.join(TEXT_SPLITS)}")


@dataclass
class Unit:
    """One piece of work. kind 'lines': JSONL bytes; 'text': plain-text bytes; 'rows': dataset rows (dicts)."""

    kind: str
    source: str
    first_line: int  # 1-based line (files) or 0-based row (datasets) of the first record
    payload: object
    size: int  # input bytes, for the progress bar
    text_split: str = "document"


def _base_ext(path: str) -> str:
    p = path.lower()
    for c in COMPRESSED:
        if p.endswith(c):
            p = p[: -len(c)]
    return os.path.splitext(p)[1]


def _is_hf_disk(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def resolve(spec: InputSpec) -> list[tuple[str, str]]:
    """(kind, path) pairs for an input spec: globs and directories expand to their files, sorted."""
    if spec.kind == "hf":
        return [("hf", spec.path)]
    p = Path(spec.path)
    if spec.kind == "hf_disk" or (spec.kind == "auto" and _is_hf_disk(p)):
        if not p.is_dir():
            raise FileNotFoundError(f"input {spec.path}: no such save_to_disk folder")
        return [("hf_disk", spec.path)]
    if any(ch in spec.path for ch in "*?["):
        files = sorted(glob.glob(spec.path, recursive=True))
    elif p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and _base_ext(str(f)) in JSONL_EXT + TEXT_EXT)
    elif p.is_file():
        files = [spec.path]
    elif spec.kind == "auto" and not p.suffix:
        return [("hf", spec.path)]  # a dataset name
    else:
        raise FileNotFoundError(f"input {spec.path}: no such file (or pattern matched nothing)")
    if not files:
        raise FileNotFoundError(f"input {spec.path}: no input files found")
    out = []
    for f in files:
        kind = spec.kind
        if kind == "auto":
            ext = _base_ext(f)
            if ext not in JSONL_EXT + TEXT_EXT:
                raise ValueError(f"input {f}: unknown extension; set kind: jsonl or kind: text for this input")
            kind = "jsonl" if ext in JSONL_EXT else "text"
        out.append((kind, f))
    return out


def open_binary(path: str) -> io.BufferedIOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _blocks(path: str, chunk_bytes: int, sep: bytes) -> Iterator[tuple[int, bytes]]:
    """(first line, block) with blocks cut right after the last `sep` so no record spans two blocks."""
    line = 1
    rest = b""
    with open_binary(path) as f:
        while True:
            data = f.read(chunk_bytes)
            if not data:
                break
            data = rest + data
            cut = data.rfind(sep)
            if cut < 0:
                rest = data
                continue
            block, rest = data[: cut + len(sep)], data[cut + len(sep):]
            yield line, block
            line += block.count(b"\n")
    if rest:
        yield line, rest


def units(spec: InputSpec, chunk_bytes: int, rows_per_unit: int = 2048) -> Iterator[Unit]:
    for kind, path in resolve(spec):
        if kind == "jsonl":
            for line, block in _blocks(path, chunk_bytes, b"\n"):
                yield Unit("lines", path, line, block, len(block))
        elif kind == "text" and spec.text_split == "document":
            with open_binary(path) as f:
                data = f.read()
            yield Unit("text", path, 1, data, len(data), "document")
        elif kind == "text":
            sep = b"\n\n" if spec.text_split == "paragraph" else b"\n"
            for line, block in _blocks(path, chunk_bytes, sep):
                yield Unit("text", path, line, block, len(block), spec.text_split)
        else:
            yield from _dataset_units(spec, kind, path, rows_per_unit)


def load_hf(spec: InputSpec, kind: str, path: str):
    import datasets

    if kind == "hf_disk":
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if spec.split not in ds:
                raise ValueError(f"input {path}: no split {spec.split!r} (has {', '.join(ds)})")
            ds = ds[spec.split]
        return ds
    return datasets.load_dataset(path, name=spec.name, data_files=spec.data_files, split=spec.split,
                                 streaming=spec.streaming)


def _dataset_units(spec: InputSpec, kind: str, path: str, rows_per_unit: int) -> Iterator[Unit]:
    ds = load_hf(spec, kind, path)
    label = f"{path}[{spec.split}]"
    batch: list[dict] = []
    first = 0
    for row in ds:
        batch.append(row)
        if len(batch) == rows_per_unit:
            yield Unit("rows", label, first, batch, sum(_row_size(r) for r in batch))
            first += len(batch)
            batch = []
    if batch:
        yield Unit("rows", label, first, batch, sum(_row_size(r) for r in batch))


def _row_size(row: dict) -> int:
    return sum(len(v) for v in row.values() if isinstance(v, str))


def fingerprint(spec: InputSpec) -> list:
    """What identifies this input's content cheaply: file paths, sizes and mtimes, or the dataset fingerprint."""
    out = []
    for kind, path in resolve(spec):
        if kind in ("jsonl", "text"):
            st = os.stat(path)
            out.append([kind, os.path.abspath(path), st.st_size, st.st_mtime_ns])
        elif kind == "hf_disk":
            files = sorted(f for f in Path(path).rglob("*") if f.is_file())
            h = hashlib.sha256()
            for f in files:
                st = f.stat()
                h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns};".encode())
            out.append([kind, os.path.abspath(path), spec.split, h.hexdigest()[:16]])
        else:
            ds_fp = None
            if not spec.streaming:
                ds_fp = getattr(load_hf(spec, kind, path), "_fingerprint", None)
            files = [[f, os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in (spec.data_files or []) if os.path.isfile(f)]
            out.append([kind, path, spec.name, spec.split, files or spec.data_files, ds_fp])
    return out
