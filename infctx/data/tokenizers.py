"""Tokenizers behind one small interface: RWKV World (our compiled trie), any Hugging Face tokenizer.json, raw bytes.

Every tokenizer has .encode(str) -> list[int], .decode(list[int]) -> str, .vocab_size, .eod_id, .name and
.encode_batch(list[bytes]) -> (ids, counts) which the builder uses on whole chunks of UTF-8 documents.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

import numpy as np

from infctx.data.trie import ByteTrie

WORLD_VOCAB = Path(__file__).with_name("rwkv_vocab_v20230424.txt")


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"text is not valid Unicode: lone surrogate {text[err.start]!r} at character {err.start} "
                         "cannot be encoded as UTF-8") from None


class Tokenizer:
    name: str
    vocab_size: int
    eod_id: int

    def encode(self, text: str) -> list[int]:
        ids, _ = self.encode_batch([_utf8(text)])
        return ids.tolist()

    def encode_batch(self, segments: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Identifies the exact vocabulary, so a changed tokenizer invalidates built data."""
        raise NotImplementedError


def _literal(text: str) -> str | bytes | None:
    """A quoted token without backslashes is its own content; None asks for a real parse."""
    if "\\" in text:
        return None
    if text[:1] in "'\"" and text[-1:] == text[:1] and len(text) >= 2:
        return text[1:-1]
    if text[:2] in ("b'", 'b"') and text[-1:] == text[1:2] and len(text) >= 3:
        return text[2:-1].encode("ascii")
    return None


@lru_cache(maxsize=2)
def _load_world(path: str) -> tuple[tuple[bytes, ...], ByteTrie, str]:
    """Parse the vocab (lines `id repr(token) byte_length`) into an id -> bytes table and the trie."""
    raw = Path(path).read_bytes()
    lines = [l for l in raw.decode("utf-8").splitlines() if l.strip()]
    try:
        ids = [int(l[: l.index(" ")]) for l in lines]
        lengths = [int(l[l.rindex(" "):]) for l in lines]
        toks = [_literal(l[l.index(" ") + 1: l.rindex(" ")]) for l in lines]
        escaped = [i for i, t in enumerate(toks) if t is None]
        # the lines with escapes: one literal_eval of them all is ~4x faster than one per line
        for i, tok in zip(escaped, ast.literal_eval("[" + ",".join(
                lines[i][lines[i].index(" "): lines[i].rindex(" ")] for i in escaped) + ",]")):
            toks[i] = tok
    except (ValueError, SyntaxError):
        raise ValueError(f"{path}: malformed vocabulary (expected lines `id repr(token) byte_length`)") from None
    table: dict[int, bytes] = {}
    for lineno, (tid, tok, n) in enumerate(zip(ids, toks, lengths), 1):
        tok = tok.encode("utf-8") if isinstance(tok, str) else tok
        if not isinstance(tok, bytes) or len(tok) != n:
            raise ValueError(f"{path}:{lineno}: token length does not match its declared {n} bytes")
        table[tid] = tok
    size = max(table) + 1
    id2tok = tuple(table.get(i, b"") for i in range(size))
    trie = ByteTrie.build({tok: tid for tid, tok in sorted(table.items())})
    return id2tok, trie, hashlib.sha256(raw).hexdigest()[:16]


class WorldTokenizer(Tokenizer):
    """RWKV World (rwkv_vocab_v20230424): greedy longest match over UTF-8 bytes; id 0 is end-of-document."""

    def __init__(self, vocab_file: str | Path = WORLD_VOCAB) -> None:
        self.id2tok, self.trie, self._hash = _load_world(str(vocab_file))
        self.name = "world"
        self.vocab_size = 65536
        self.eod_id = 0

    def encode_batch(self, segments):
        return self.trie.encode_batch(segments)

    def encode_bytes(self, data: bytes) -> list[int]:
        return self.trie.encode_batch([data])[0].tolist()

    def decode_bytes(self, ids) -> bytes:
        try:
            return b"".join(self.id2tok[int(i)] for i in ids)
        except IndexError:
            raise ValueError(f"tokenizer world: id out of range 0..{len(self.id2tok) - 1}") from None

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def fingerprint(self):
        return f"world:{self._hash}"


class ByteTokenizer(Tokenizer):
    """One token per UTF-8 byte (ids 0..255); byte 0 (NUL) doubles as end-of-document."""

    name = "bytes"
    vocab_size = 256
    eod_id = 0

    def encode_batch(self, segments):
        ids = np.frombuffer(b"".join(segments), dtype=np.uint8).astype(np.int32)
        return ids, np.array([len(s) for s in segments], dtype=np.int64)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def fingerprint(self):
        return "bytes"


class HFTokenizer(Tokenizer):
    """Any Hugging Face `tokenizer.json` (GPT-NeoX 20B included) through the `tokenizers` package. The
    end-of-document id is the first of <|endoftext|>, </s>, <eos> the vocabulary has, else 0."""

    EOD_NAMES = ("<|endoftext|>", "</s>", "<eos>")

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _HF

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer: {path} not found (give a path to a Hugging Face tokenizer.json)")
        self.path = path
        self._tok = _HF.from_file(str(path))
        self.name = f"hf:{path}"
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        ids = [self._tok.token_to_id(t) for t in self.EOD_NAMES]
        self.eod_id = next((i for i in ids if i is not None), 0)
        self._hash = hashlib.sha256(path.read_bytes()).hexdigest()[:16]

    def __getstate__(self):
        return {"path": str(self.path)}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def encode_batch(self, segments):
        texts = [s.decode("utf-8") for s in segments]
        encs = self._tok.encode_batch(texts, add_special_tokens=False) if texts else []
        counts = np.array([len(e.ids) for e in encs], dtype=np.int64)
        ids = np.fromiter((i for e in encs for i in e.ids), dtype=np.int32, count=int(counts.sum()))
        return ids, counts

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def fingerprint(self):
        return f"hf:{self._hash}"


def get_tokenizer(spec: str) -> Tokenizer:
    """'world', 'bytes', or a Hugging Face tokenizer.json path (optionally prefixed 'hf:')."""
    if spec == "world":
        return WorldTokenizer()
    if spec in ("bytes", "byte"):
        return ByteTokenizer()
    path = spec[3:] if spec.startswith("hf:") else spec
    if spec.startswith("hf:") or path.endswith(".json") or Path(path).is_dir():
        return HFTokenizer(path)
    raise ValueError(f"tokenizer: unknown spec {spec!r}; use 'world', 'bytes' or a path to a tokenizer.json")
