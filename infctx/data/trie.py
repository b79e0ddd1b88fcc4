"""Greedy longest-match over a byte trie: the RWKV World tokenizer's algorithm, compiled with numba when present.

The trie is flat arrays (a hash table of edges, plus a dense table for the first two bytes), so one compiled
loop tokenises a whole batch of documents without touching Python objects. Without numba the same function runs as
plain Python (correct, ~100x slower).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

try:
    import numba
except ImportError:  # optional accelerator
    numba = None


def _encode_segments(buf, seg_ends, l1_node, l2_node, node_token, edges, out, out_ends):
    """Tokenise buf[seg_ends[s-1]:seg_ends[s]] for every segment s into out; out_ends[s] = tokens so far.
    Returns the token count, or -(position+1) of a byte no token starts with."""
    mask = edges.shape[0] - 1
    n_tok = 0
    pos = 0
    for s in range(seg_ends.shape[0]):
        end = seg_ends[s]
        i = pos
        while i < end:
            b0 = buf[i]
            node = l1_node[b0]
            if node < 0:
                return -(i + 1)
            best_tok = node_token[node]
            best_len = 1
            j = i + 1
            if j < end:
                node = l2_node[(np.int64(b0) << 8) | buf[j]]
                if node >= 0:
                    j += 1
                    if node_token[node] >= 0:
                        best_tok = node_token[node]
                        best_len = 2
                    while j < end:
                        key = (np.int64(node) << 8) | buf[j]
                        h = ((key * 2654435761) >> 16) & mask
                        e = edges[h]
                        while e >= 0 and (e >> 34) != key:
                            h = (h + 1) & mask
                            e = edges[h]
                        if e < 0:
                            break
                        node = (e >> 17) & 0x1FFFF
                        j += 1
                        if e & 0x1FFFF:
                            best_tok = (e & 0x1FFFF) - 1
                            best_len = j - i
            if best_tok < 0:
                return -(i + 1)
            out[n_tok] = best_tok
            n_tok += 1
            i += best_len
        out_ends[s] = n_tok
        pos = end
    return n_tok


encode_segments = numba.njit(cache=True, nogil=True)(_encode_segments) if numba is not None else _encode_segments
COMPILED = numba is not None


def _fill_edges(entries, edges):
    """Open-addressing insert with the kernel's hash (of the entry's key, bits 34+) and linear probing."""
    mask = edges.shape[0] - 1
    for e in range(entries.shape[0]):
        h = (((entries[e] >> 34) * 2654435761) >> 16) & mask
        while edges[h] >= 0:
            h = (h + 1) & mask
        edges[h] = entries[e]


fill_edges = numba.njit(cache=True)(_fill_edges) if numba is not None else _fill_edges


@dataclass(frozen=True)
class ByteTrie:
    """Flat trie over token byte strings. Node 0 is the root; node_token[n] is the id ending at n or -1.
    Edges live in one int64 hash table (load factor <= 0.5), each entry packing key = node * 256 + byte (bits 34+),
    the child node (bits 17-33) and the child's token id + 1 (bits 0-16, 0 = none): one memory load per step."""

    l1_node: np.ndarray  # int32[256]: child of the root per byte
    l2_node: np.ndarray  # int32[65536]: node reached by two bytes, -1 if none
    node_token: np.ndarray  # int32[nodes]
    edges: np.ndarray  # int64[2^k], -1 = empty slot

    @classmethod
    def build(cls, tokens: dict[bytes, int]) -> "ByteTrie":
        children: list[dict[int, int]] = [{}]
        node_token = [-1]
        keys: list[int] = []
        for key, tid in tokens.items():
            node = 0
            for b in key:
                nxt = children[node].get(b)
                if nxt is None:
                    nxt = len(children)
                    children[node][b] = nxt
                    children.append({})
                    node_token.append(-1)
                    keys.append(node << 8 | b)
                node = nxt
            node_token[node] = tid
        if len(children) >= 1 << 17 or max(tokens.values(), default=0) >= (1 << 17) - 1:
            raise ValueError("ByteTrie: vocabulary too large for the packed edge table (< 131071 ids and nodes)")
        node_tok = np.array(node_token, dtype=np.int64)
        child = np.arange(1, len(children), dtype=np.int64)  # node n was created by edge n - 1
        entries = (np.array(keys, dtype=np.int64) << 34) | (child << 17) | (node_tok[child] + 1)
        edges = np.full(1 << max(int(2 * len(keys)).bit_length(), 8), -1, dtype=np.int64)
        fill_edges(entries, edges)
        l1 = np.full(256, -1, dtype=np.int32)
        l2 = np.full(65536, -1, dtype=np.int32)
        for b0, n1 in children[0].items():
            l1[b0] = n1
            for b1, n2 in children[n1].items():
                l2[(b0 << 8) | b1] = n2
        return cls(l1, l2, node_tok.astype(np.int32), edges)

    def encode_batch(self, segments: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (int32, concatenated) and per-segment token counts; matches never cross segments."""
        buf = np.frombuffer(b"".join(segments), dtype=np.uint8)
        ends = np.cumsum([len(s) for s in segments], dtype=np.int64)
        out = np.empty(len(buf), dtype=np.int32)
        out_ends = np.empty(len(segments), dtype=np.int64)
        n = encode_segments(buf, ends, self.l1_node, self.l2_node, self.node_token, self.edges, out, out_ends)
        if n < 0:
            raise ValueError(f"tokenizer: byte 0x{buf[-n - 1]:02x} at offset {-n - 1} starts no token of the vocabulary")
        counts = np.diff(out_ends, prepend=0) if len(segments) else out_ends
        return out[:n], counts
