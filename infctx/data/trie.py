"""Greedy longest-match over a byte trie: the RWKV World tokenizer's algorithm, compiled with numba when present.

The trie is a double array: node s has its children at slots base(s) + byte, and a slot belongs to s only if its
check field says so. Each slot packs (parent slot + 1, token id + 1, own base) into one int64, so every step of the
walk is one add and one memory load, and one compiled loop tokenises a whole batch of documents. Without numba
the same functions run as plain Python (correct, but about 100x slower to build and to run).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

try:
    import numba
except ImportError:  # optional accelerator
    numba = None

BASE_BITS, TOKEN_BITS = 24, 17
CHECK_SHIFT = BASE_BITS + TOKEN_BITS  # check field: bits 41..62
BASE_MASK, TOKEN_MASK = (1 << BASE_BITS) - 1, (1 << TOKEN_BITS) - 1


def _jit(fn):
    return numba.njit(cache=True, nogil=True)(fn) if numba is not None else fn


def _encode_segments(buf, seg_ends, da, out, out_ends):
    """Tokenise buf[seg_ends[s-1]:seg_ends[s]] for every segment s into out; out_ends[s] = tokens so far.
    Returns the token count, or -(position+1) of a byte no token starts with."""
    root_base = da[0] & 0xFFFFFF
    n_tok = 0
    pos = 0
    for s in range(seg_ends.shape[0]):
        end = seg_ends[s]
        i = pos
        while i < end:
            node = 0
            base = root_base
            best_tok = -1
            best_len = 0
            j = i
            while j < end:
                slot = base + buf[j]
                e = da[slot]
                if (e >> 41) != node + 1:
                    break
                node = slot
                base = e & 0xFFFFFF
                j += 1
                tok = (e >> 24) & 0x1FFFF
                if tok != 0:
                    best_tok = tok - 1
                    best_len = j - i
            if best_len == 0:
                return -(i + 1)
            out[n_tok] = best_tok
            n_tok += 1
            i += best_len
        out_ends[s] = n_tok
        pos = end
    return n_tok


def _build_double_array(child_start, child_byte, child_node, node_token):
    """Place nodes breadth first, each at the lowest base where all its children's slots are free."""
    n_nodes = node_token.shape[0]
    size = 2 * n_nodes + 1024
    check = np.zeros(size, dtype=np.int64)  # parent slot + 1, 0 = free
    base = np.zeros(size, dtype=np.int64)
    tok = np.zeros(size, dtype=np.int64)
    slot_of = np.zeros(n_nodes, dtype=np.int64)
    check[0] = -1  # the root's slot is taken
    queue = np.zeros(n_nodes, dtype=np.int64)
    head, tail = 0, 1
    first_free = 1
    top = 1
    while head < tail:
        node = queue[head]
        head += 1
        a, b = child_start[node], child_start[node + 1]
        if a == b:
            continue
        while check[first_free] != 0:
            first_free += 1
        c0 = child_byte[a]
        p = first_free
        while True:
            bs = p - c0
            if bs >= 1:
                ok = True
                for k in range(a, b):
                    if check[bs + child_byte[k]] != 0:
                        ok = False
                        break
                if ok:
                    break
            p += 1
            while check[p] != 0:
                p += 1
        if bs + 256 >= size:
            grow = size
            check = np.concatenate((check, np.zeros(grow, dtype=np.int64)))
            base = np.concatenate((base, np.zeros(grow, dtype=np.int64)))
            tok = np.concatenate((tok, np.zeros(grow, dtype=np.int64)))
            size += grow
        s = slot_of[node]
        base[s] = bs
        for k in range(a, b):
            t = bs + child_byte[k]
            child = child_node[k]
            check[t] = s + 1
            tok[t] = node_token[child] + 1
            slot_of[child] = t
            queue[tail] = child
            tail += 1
            if t + 1 > top:
                top = t + 1
    used = max(top, int(base.max()) + 256)
    check[0] = 0
    return (check[:used] << 41) | (tok[:used] << 24) | base[:used]


def _prefix_nodes(flat, offsets, ids):
    """Trie nodes of lexicographically sorted keys: node n > 0 has parent[n], byte[n], token[n] (-1 if no key
    ends there). A key shares its first lcp bytes with the previous key, so only its deeper prefixes are new."""
    n_keys = offsets.shape[0] - 1
    cap = flat.shape[0] + 1
    parent = np.zeros(cap, dtype=np.int64)
    byte = np.zeros(cap, dtype=np.int64)
    token = np.full(cap, -1, dtype=np.int64)
    path = np.zeros(1024, dtype=np.int64)  # node at each depth along the previous key
    n = 1
    prev_a, prev_b = 0, 0
    for k in range(n_keys):
        a, b = offsets[k], offsets[k + 1]
        lcp = 0
        while lcp < b - a and lcp < prev_b - prev_a and flat[a + lcp] == flat[prev_a + lcp]:
            lcp += 1
        for d in range(lcp, b - a):
            parent[n] = path[d]
            byte[n] = flat[a + d]
            path[d + 1] = n
            n += 1
        token[path[b - a]] = ids[k]
        prev_a, prev_b = a, b
    return parent[:n], byte[:n], token[:n]


encode_segments = _jit(_encode_segments)
prefix_nodes = _jit(_prefix_nodes)
build_double_array = _jit(_build_double_array)
COMPILED = numba is not None


@dataclass(frozen=True)
class ByteTrie:
    """Double-array trie over token byte strings (see the module docstring for the slot layout)."""

    da: np.ndarray  # int64[slots]

    @classmethod
    def build(cls, tokens: dict[bytes, int]) -> "ByteTrie":
        keys = sorted(tokens)
        for key in keys:
            if not 0 <= tokens[key] < TOKEN_MASK or not 0 < len(key) < 1024:
                raise ValueError(f"ByteTrie: token {key!r} (id {tokens[key]}) is empty, too long or out of range")
        flat = np.frombuffer(b"".join(keys), dtype=np.uint8)
        offsets = np.zeros(len(keys) + 1, dtype=np.int64)
        np.cumsum([len(k) for k in keys], out=offsets[1:])
        parent, byte, node_token = prefix_nodes(flat, offsets, np.array([tokens[k] for k in keys], dtype=np.int64))
        order = np.argsort(parent[1:], kind="stable") + 1  # children grouped by parent, bytes already ascending
        child_start = np.zeros(len(parent) + 1, dtype=np.int64)
        np.cumsum(np.bincount(parent[1:], minlength=len(parent)), out=child_start[1:])
        child_byte, child_node = byte[order], order.astype(np.int64)
        da = build_double_array(child_start, child_byte, child_node, node_token)
        if len(da) >= 1 << 22:
            raise ValueError("ByteTrie: vocabulary too large for the packed double array")
        return cls(da)

    def encode_batch(self, segments: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (int32, concatenated) and per-segment token counts; matches never cross segments."""
        buf = np.frombuffer(b"".join(segments), dtype=np.uint8)
        ends = np.cumsum([len(s) for s in segments], dtype=np.int64)
        out = np.empty(len(buf), dtype=np.int32)
        out_ends = np.empty(len(segments), dtype=np.int64)
        n = encode_segments(buf, ends, self.da, out, out_ends)
        if n < 0:
            raise ValueError(f"tokenizer: byte 0x{buf[-n - 1]:02x} at offset {-n - 1} starts no token of the vocabulary")
        counts = np.diff(out_ends, prepend=0) if len(segments) else out_ends
        return out[:n], counts
