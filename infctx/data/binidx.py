"""Megatron / GPT-NeoX "MMIDIDX" binidx files: the on-disk format RWKV-LM trains from.

`.idx` layout (little endian): magic b"MMIDIDX\\x00\\x00", uint64 version (1), uint8 dtype code, uint64 item count N,
uint64 doc_idx length D, int32 sizes[N], int64 byte pointers[N] into `.bin`, int64 doc_idx[D].
`.bin` is the raw token stream. Everything is memory-mapped: a reader never loads a whole file.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8
DTYPE_CODES: dict[int, type] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float32, 7: np.float64, 8: np.uint16,
}
_BLOCK = 1 << 20  # documents per block when streaming index arrays to disk


def dtype_code(dtype) -> int:
    dtype = np.dtype(dtype)
    for code, candidate in DTYPE_CODES.items():
        if np.dtype(candidate) == dtype:
            return code
    raise ValueError(f"binidx: dtype {dtype} has no MMIDIDX code")


def token_dtype(vocab_size: int) -> type:
    """uint16 when every id fits in 16 bits (as RWKV-LM writes), int32 otherwise."""
    return np.uint16 if vocab_size <= 65536 else np.int32


def _map(path: Path, dtype, offset: int = 0, count: int | None = None) -> np.ndarray:
    if path.stat().st_size <= offset or count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=count if count is not None else None)


class MMapIndexedDataset:
    """Reader. Items are token sequences (one per document in files we write); doc_idx groups items into
    documents the way Megatron's writer records them (`end_document`)."""

    def __init__(self, path_prefix: str | os.PathLike) -> None:
        self.prefix = str(path_prefix)
        idx_path, bin_path = Path(self.prefix + ".idx"), Path(self.prefix + ".bin")
        for p in (idx_path, bin_path):
            if not p.is_file():
                raise FileNotFoundError(f"binidx: {p} not found (build it with `infctx data build`)")
        with open(idx_path, "rb") as f:
            head = f.read(HEADER_SIZE)
        if len(head) < HEADER_SIZE or head[: len(MAGIC)] != MAGIC:
            raise ValueError(f"binidx: {idx_path} is not an MMIDIDX index (bad magic)")
        version, code, n, d = struct.unpack("<QBQQ", head[len(MAGIC):])
        if version != VERSION:
            raise ValueError(f"binidx: {idx_path} has version {version}; only version 1 is supported")
        if code not in DTYPE_CODES:
            raise ValueError(f"binidx: {idx_path} has unknown dtype code {code}")
        need = HEADER_SIZE + 4 * n + 8 * n + 8 * d
        if idx_path.stat().st_size < need:
            raise ValueError(f"binidx: {idx_path} is truncated ({idx_path.stat().st_size} bytes, header says {need})")
        self.dtype = np.dtype(DTYPE_CODES[code])
        self.sizes = _map(idx_path, np.int32, HEADER_SIZE, n)
        self.pointers = _map(idx_path, np.int64, HEADER_SIZE + 4 * n, n)
        self.doc_idx = _map(idx_path, np.int64, HEADER_SIZE + 12 * n, d)
        self.tokens = _map(bin_path, self.dtype)
        if n and int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize > bin_path.stat().st_size:
            raise ValueError(f"binidx: {bin_path} is shorter than its index says; rebuild it")

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"binidx: item {i} out of range [0, {len(self)})")
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start: start + int(self.sizes[i])]

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Megatron semantics: `length` tokens from `offset` past the start of item `idx`, crossing items freely
        (RWKV-LM reads its samples as get(0, slot * ctx_len, ctx_len + 1))."""
        start = int(self.pointers[idx]) // self.dtype.itemsize + offset
        if length is None:
            length = int(self.sizes[idx]) - offset
        return self.tokens[start: start + length]

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_docs(self) -> int:
        return max(len(self.doc_idx) - 1, 0)

    def document(self, d: int) -> np.ndarray:
        """All items of document d, concatenated (a copy only when the document has several items)."""
        a, b = int(self.doc_idx[d]), int(self.doc_idx[d + 1])
        if b - a == 1:
            return self[a]
        if b == a:
            return np.zeros(0, dtype=self.dtype)
        start = int(self.pointers[a]) // self.dtype.itemsize
        end = int(self.pointers[b - 1]) // self.dtype.itemsize + int(self.sizes[b - 1])
        return self.tokens[start:end]

    def item_starts(self) -> np.ndarray:
        """Token offset of every item in the flat stream (int64)."""
        return np.asarray(self.pointers, dtype=np.int64) // self.dtype.itemsize


def exists(path_prefix: str | os.PathLike) -> bool:
    return Path(f"{path_prefix}.bin").is_file() and Path(f"{path_prefix}.idx").is_file()


class IndexedDatasetWriter:
    """Streams documents to `<prefix>.bin` and writes `<prefix>.idx` at the end; both are written under temporary
    names, and `finalize(rename=True)` moves them into place, so an interrupted build leaves no half files.
    Each added document becomes one item and one doc_idx entry, as RWKV-LM's make_data does."""

    def __init__(self, path_prefix: str | os.PathLike, dtype) -> None:
        self.prefix = str(path_prefix)
        self.dtype = np.dtype(dtype)
        self.code = dtype_code(self.dtype)
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self.tmp_bin = f"{self.prefix}.bin.tmp"
        self.tmp_idx = f"{self.prefix}.idx.tmp"
        self.tmp_sizes = f"{self.prefix}.sizes.tmp"
        self._bin = open(self.tmp_bin, "wb")
        self._sizes = open(self.tmp_sizes, "wb")
        self.num_docs = 0
        self.num_tokens = 0

    def add(self, tokens: np.ndarray, sizes: np.ndarray) -> None:
        """Append documents given as one flat token array and their lengths."""
        tokens = np.asarray(tokens)
        sizes = np.asarray(sizes, dtype=np.int64)
        if int(sizes.sum()) != len(tokens):
            raise ValueError("binidx writer: sizes do not add up to the token count")
        if len(sizes) and int(sizes.max()) > np.iinfo(np.int32).max:
            raise ValueError("binidx writer: a document longer than 2^31-1 tokens does not fit the int32 sizes")
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes())
        self._sizes.write(sizes.astype(np.int32).tobytes())
        self.num_docs += len(sizes)
        self.num_tokens += len(tokens)

    def add_document(self, tokens) -> None:
        arr = np.asarray(tokens)
        self.add(arr, np.array([len(arr)]))

    def finalize(self, rename: bool = True) -> None:
        """Write the index from the streamed sizes (block by block: memory stays flat for any doc count)."""
        self._bin.close()
        self._sizes.close()
        n = self.num_docs
        sizes = _map(Path(self.tmp_sizes), np.int32)
        with open(self.tmp_idx, "wb") as f:
            f.write(MAGIC + struct.pack("<QBQQ", VERSION, self.code, n, n + 1))
            for a in range(0, n, _BLOCK):
                f.write(np.asarray(sizes[a: a + _BLOCK]).tobytes())
            base = 0
            for a in range(0, n, _BLOCK):
                block = np.asarray(sizes[a: a + _BLOCK], dtype=np.int64) * self.dtype.itemsize
                ptr = np.cumsum(block) - block + base
                f.write(ptr.tobytes())
                base += int(block.sum())
            for a in range(0, n + 1, _BLOCK):
                f.write(np.arange(a, min(a + _BLOCK, n + 1), dtype=np.int64).tobytes())
        del sizes
        os.remove(self.tmp_sizes)
        if rename:
            self.commit()

    def commit(self) -> None:
        os.replace(self.tmp_bin, self.prefix + ".bin")
        os.replace(self.tmp_idx, self.prefix + ".idx")

    def abort(self) -> None:
        for f in (self._bin, self._sizes):
            f.close()
        for p in (self.tmp_bin, self.tmp_idx, self.tmp_sizes):
            if os.path.exists(p):
                os.remove(p)
