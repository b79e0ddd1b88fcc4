"""Tokenizers: World equals the rwkv package's reference TRIE_TOKENIZER token for token; HF and bytes backends."""

import random

import pytest

from infctx.data.tokenizers import WORLD_VOCAB, ByteTokenizer, HFTokenizer, WorldTokenizer, get_tokenizer

TORTURE = [
    "",
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "中文分词测试：你好，世界。我们今天去北京天安门。",
    "日本語のテキスト、ひらがなとカタカナ。한국어 텍스트 ㅎㅏㄴ 한글",
    "emoji 🤖🎉👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️ 🇯🇵 𝕳𝖊𝖑𝖑𝖔 𠀀𠀁",
    "combining: e\u0301 a\u0308 n\u0303 Z\u0351\u0352\u0353 \u0915\u094d\u0937 ก\u0e34\u0e4a",
    "RTL: שָׁלוֹם עולם مرحبا بالعالم \u202eevil\u202c \u200f\u200e",
    "controls: \x00\x01\x07\x08\t\x0b\x0c\r\x1b[31m\x7f \x80\x85\x9f end",
    "zero width \u200b\u200c\u200d\ufeff BOM and \ufffd replacement \ue000 private use",
    " " * 300 + "\n" * 40 + "\t" * 17 + "#" * 200 + "-" * 90,
    "def f(x):\r\n    return {'a': [1, 2, 3]}  # code\r\n\tif x >= 0x7fff: pass\n",
    "Ünïcödé ÀÉÎÕÜ ß ẞ İı ǅ ﬁ ﬀ Ⅻ ½ ² ∑∫√∞≠≤ ⟨a|b⟩ ℵ₀",
    "mixed中English混合テキスト😀with🚀symbols\u0301and\u200dZWJ",
]


def _random_strings(n, seed=0):
    rng = random.Random(seed)
    ranges = [(0x20, 0x7E), (0x00, 0x1F), (0x80, 0x2FF), (0x370, 0x6FF), (0x900, 0xE7F), (0x3040, 0x30FF),
              (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xE000, 0xF8FF), (0xFE00, 0xFFFD), (0x1F300, 0x1FAFF),
              (0x20000, 0x2A6DF), (0x10000, 0x10FFFF)]
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(1, 200)):
            lo, hi = rng.choice(ranges)
            cp = rng.randint(lo, hi)
            if 0xD800 <= cp <= 0xDFFF:
                cp = 0x41
            chars.append(chr(cp))
            if rng.random() < 0.3:
                chars.append(" ")
        out.append("".join(chars))
    return out


@pytest.fixture(scope="module")
def world():
    return WorldTokenizer()


@pytest.fixture(scope="module")
def reference():
    rwkv_tokenizer = pytest.importorskip("rwkv.rwkv_tokenizer")
    return rwkv_tokenizer.TRIE_TOKENIZER(str(WORLD_VOCAB))


def test_world_matches_reference_on_torture_set(world, reference):
    for text in TORTURE + _random_strings(300):
        assert world.encode(text) == reference.encode(text), repr(text[:80])
        assert world.decode(world.encode(text)) == text


def test_world_matches_reference_on_invalid_utf8_bytes(world, reference):
    for data in [b"\xff\xfe\x00abc", b"\xe4\xbd", b"ok\xe4\xbd\xa0\xe5", b"\xc0\xaf\xed\xa0\x80", bytes(range(256))]:
        assert world.encode_bytes(data) == reference.encodeBytes(data)
        assert world.decode_bytes(world.encode_bytes(data)) == data


def test_lone_surrogates_are_rejected_like_the_reference(world, reference):
    with pytest.raises(UnicodeEncodeError):
        reference.encode("a\ud800b")
    with pytest.raises(ValueError, match="lone surrogate"):
        world.encode("a\ud800b")


def test_world_batch_never_matches_across_segments(world):
    ids, counts = world.encode_batch([b"hello ", b"world", b""])
    assert counts.tolist() == [len(world.encode("hello ")), len(world.encode("world")), 0]
    assert ids.tolist() == world.encode("hello ") + world.encode("world")
    assert (world.vocab_size, world.eod_id, world.name) == (65536, 0, "world")
    assert world.encode("\n\n") == [261]  # a known multi-byte token id of rwkv_vocab_v20230424


def test_hf_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, "hello": 2, "world": 3, "!": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    hf = get_tokenizer(str(path))
    assert isinstance(hf, HFTokenizer) and hf.vocab_size == 5 and hf.eod_id == 0
    assert hf.encode("hello world!") == [2, 3, 4]
    ids, counts = hf.encode_batch([b"world", b"hello zzz"])
    assert ids.tolist() == [3, 2, 1] and counts.tolist() == [1, 2]
    assert get_tokenizer(f"hf:{tmp_path}").encode("hello") == [2]


def test_bytes_tokenizer():
    b = get_tokenizer("bytes")
    assert isinstance(b, ByteTokenizer) and b.vocab_size == 256 and b.eod_id == 0
    assert b.encode("aé") == [97, 0xC3, 0xA9] and b.decode([97, 0xC3, 0xA9]) == "aé"
    with pytest.raises(ValueError, match="unknown spec"):
        get_tokenizer("nope")


def _greedy_oracle(vocab, data):
    """Brute-force greedy longest match: at each position the longest vocabulary entry that is a prefix."""
    longest = max(map(len, vocab))
    out, i = [], 0
    while i < len(data):
        for n in range(min(longest, len(data) - i), 0, -1):
            if data[i: i + n] in vocab:
                out.append(vocab[data[i: i + n]])
                i += n
                break
        else:
            raise AssertionError("no match")
    return out


def test_trie_against_brute_force_and_the_uncompiled_path():
    import numpy as np

    from infctx.data import trie

    rng = random.Random(5)
    vocab = {bytes([b]): b for b in range(256)}
    while len(vocab) < 600:
        vocab.setdefault(bytes(rng.choice(b"abcd ") for _ in range(rng.randint(2, 7))), len(vocab))
    t = trie.ByteTrie.build(vocab)
    segments = [bytes(rng.choice(b"abcd e") for _ in range(rng.randint(0, 80))) for _ in range(40)]
    ids, counts = t.encode_batch(segments)
    expect = [_greedy_oracle(vocab, s) for s in segments]
    assert ids.tolist() == [x for e in expect for x in e] and counts.tolist() == [len(e) for e in expect]
    # the plain-Python fallback (no numba) runs the same functions uncompiled
    keys = sorted(vocab)
    flat = np.frombuffer(b"".join(keys), dtype=np.uint8)
    offsets = np.concatenate([[0], np.cumsum([len(k) for k in keys])]).astype(np.int64)
    tids = np.array([vocab[k] for k in keys], dtype=np.int64)
    for a, b in zip(trie._prefix_nodes(flat, offsets, tids), trie.prefix_nodes(flat, offsets, tids)):
        assert np.array_equal(a, b)
    buf = np.frombuffer(b"".join(segments[:5]), dtype=np.uint8)
    ends = np.cumsum([len(s) for s in segments[:5]]).astype(np.int64)
    out, out_ends = np.empty(len(buf), np.int32), np.empty(5, np.int64)
    n = trie._encode_segments(buf, ends, t.da, out, out_ends)
    assert out[:n].tolist() == [x for e in expect[:5] for x in e]
