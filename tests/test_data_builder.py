"""The dataset builder: inputs, record formats, masks, bad input, determinism, reuse, metadata."""

import gzip
import json

import numpy as np
import pytest

from infctx.data.binidx import MMapIndexedDataset
from infctx.data.builder import BuildConfig, BuildError, build, load_configs
from infctx.data.records import RecordFormat
from infctx.data.sources import InputSpec


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def docs_of(prefix):
    ds = MMapIndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def byte_doc(text):  # the oracle for the bytes tokenizer: UTF-8 bytes, then EOD 0
    return list(text.encode("utf-8")) + [0]


def run(tmp_path, inputs, name="out", **kw):
    kw.setdefault("tokenizer", "bytes")
    kw.setdefault("progress", False)
    kw.setdefault("workers", 1)
    return build(BuildConfig(inputs=inputs, output=str(tmp_path / name), **kw))


TEXTS = ["first document", "второй документ", "第三个文档 🎉", "x"]


def test_jsonl_plain_gz_zst_give_the_same_tokens(tmp_path):
    import zstandard

    src = write_jsonl(tmp_path / "a.jsonl", [{"text": t, "id": i} for i, t in enumerate(TEXTS)])
    raw = src.read_bytes()
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst"):
        r = run(tmp_path, [str(tmp_path / name)], name=name.split(".")[0] + "_out")
        assert docs_of(r.output) == [byte_doc(t) for t in TEXTS]
        assert r.meta["num_docs"] == 4 and r.meta["num_tokens"] == sum(len(byte_doc(t)) for t in TEXTS)


def test_world_build_matches_per_document_encoding(tmp_path):
    from infctx.data.tokenizers import WorldTokenizer  # itself checked against the reference in test_data_tokenizers

    ref = WorldTokenizer()
    src = write_jsonl(tmp_path / "w.jsonl", [{"text": t} for t in TEXTS])
    r = run(tmp_path, [str(src)], tokenizer="world", ctx_lens=[2])
    assert docs_of(r.output) == [ref.encode(t) + [0] for t in TEXTS]
    assert r.meta["dtype"] == "uint16" and r.meta["vocab_size"] == 65536 and r.meta["eod_id"] == 0


def test_plain_text_splits(tmp_path):
    (tmp_path / "t.txt").write_text("para one\nstill one\n\n\npara two\n", encoding="utf-8")
    assert docs_of(run(tmp_path, [InputSpec(str(tmp_path / "t.txt"))], "d").output) == [
        byte_doc("para one\nstill one\n\n\npara two\n")]
    assert docs_of(run(tmp_path, [InputSpec(str(tmp_path / "t.txt"), text_split="paragraph")], "p").output) == [
        byte_doc("para one\nstill one"), byte_doc("para two")]
    assert docs_of(run(tmp_path, [InputSpec(str(tmp_path / "t.txt"), text_split="line")], "l").output) == [
        byte_doc("para one"), byte_doc("still one"), byte_doc("para two")]


def test_hf_datasets_saved_to_disk_json_and_streaming(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"body": TEXTS, "n": list(range(4))}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "saved"))
    fmt = RecordFormat(text_key="body")
    r = run(tmp_path, [InputSpec(str(tmp_path / "saved"), split="train")], "disk", format=fmt)
    assert docs_of(r.output) == [byte_doc(t) for t in TEXTS]
    src = write_jsonl(tmp_path / "j.jsonl", [{"body": t} for t in TEXTS])
    for streaming in (False, True):
        spec = InputSpec("json", kind="hf", data_files=[str(src)], split="train", streaming=streaming)
        r = run(tmp_path, [spec], f"hf{streaming}", format=fmt)
        assert docs_of(r.output) == [byte_doc(t) for t in TEXTS]


def test_prompt_completion_mask_aligned_with_tokens(tmp_path):
    src = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q: 1+1?\n", "completion": "A: 2"}])
    r = run(tmp_path, [str(src)], format=RecordFormat(kind="prompt_completion"))
    tokens, mask = docs_of(r.output), docs_of(r.output + ".mask")
    assert tokens == [byte_doc("Q: 1+1?\nA: 2")]
    assert mask == [[0] * 8 + [1] * 4 + [1]]  # prompt 0, completion 1, EOD learned
    assert r.meta["mask"] == r.output + ".mask"


def test_chat_template_and_multicolumn_template(tmp_path):
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    src = write_jsonl(tmp_path / "chat.jsonl", chat)
    fmt = RecordFormat(kind="chat", chat={"prefix": {"user": "U:", "assistant": "A:"}, "suffix": "|"})
    r = run(tmp_path, [str(src)], "chat", format=fmt)
    assert docs_of(r.output) == [byte_doc("U:hi|A:yo|")]
    assert docs_of(r.output + ".mask") == [[0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]]
    src = write_jsonl(tmp_path / "cols.jsonl", [{"q": "2*3", "a": "6"}])
    fmt = RecordFormat(kind="template", template="Q={q};", completion_template="A={a}")
    r = run(tmp_path, [str(src)], "tpl", format=fmt)
    assert docs_of(r.output) == [byte_doc("Q=2*3;A=6")]
    assert docs_of(r.output + ".mask") == [[0] * 6 + [1] * 3 + [1]]
    r = run(tmp_path, [str(src)], "tpl2", format=RecordFormat(kind="template", template="{q}={a}"))
    assert docs_of(r.output) == [byte_doc("2*3=6")] and r.meta["mask"] is None


BAD_LINES = [
    ('{"text": "good one"}', None),
    ('{"text": "unterminated', "malformed JSON"),
    ('{"other": "x"}', "missing key"),
    ('{"text": 42}', "non-string field"),
    (b'{"text": "bad \xff byte"}', "invalid UTF-8"),
    ('{"text": "lone \\ud800 surrogate"}', "invalid UTF-8"),
    ('{"text": "   "}', "empty document"),
    ('{"text": "good two"}', None),
]


def _bad_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(l if isinstance(l, bytes) else l.encode() for l, _ in BAD_LINES) + b"\n")
    return path


def test_bad_input_is_skipped_counted_and_reported_with_file_line(tmp_path, capsys):
    path = _bad_file(tmp_path)
    r = build(BuildConfig(inputs=[str(path)], output=str(tmp_path / "o"), tokenizer="bytes", workers=1))
    assert docs_of(r.output) == [byte_doc("good one"), byte_doc("good two")]
    assert r.meta["skipped"] == {"malformed JSON": 1, "missing key": 1, "non-string field": 1, "invalid UTF-8": 2,
                                 "empty document": 1}
    err = capsys.readouterr().err
    for lineno, (_, kind) in enumerate(BAD_LINES, 1):
        if kind:
            assert f"{path}:{lineno}: {kind}" in err


@pytest.mark.parametrize("lineno", [2, 3, 4, 5, 6, 7])
def test_strict_stops_at_the_first_bad_record(tmp_path, lineno):
    path = tmp_path / "one_bad.jsonl"
    line, kind = BAD_LINES[lineno - 1]
    path.write_bytes(b'{"text": "ok"}\n' + (line if isinstance(line, bytes) else line.encode()) + b"\n")
    with pytest.raises(BuildError, match=f"{path}:2: {kind}"):
        run(tmp_path, [str(path)], strict=True)
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())  # no half files


def test_token_id_beyond_declared_vocab_is_an_error(tmp_path):
    src = write_jsonl(tmp_path / "v.jsonl", [{"text": "abc"}, {"text": "z"}])
    with pytest.raises(BuildError, match=r"v.jsonl:2: token id 122 >= declared vocab_size 100"):
        run(tmp_path, [str(src)], vocab_size=100)


def test_deterministic_for_any_worker_count_and_chunking_reuse(tmp_path):
    rng = np.random.default_rng(1)
    recs = [{"text": "".join(rng.choice(list("abcé中 \n"), size=int(rng.integers(1, 60))))} for _ in range(400)]
    src = write_jsonl(tmp_path / "many.jsonl", recs)
    one = run(tmp_path, [str(src)], "w1", workers=1, chunk_bytes=1000)
    two = run(tmp_path, [str(src)], "w2", workers=2, chunk_bytes=1000)
    for ext in (".bin", ".idx"):
        assert (tmp_path / ("w1" + ext)).read_bytes() == (tmp_path / ("w2" + ext)).read_bytes()
    assert one.meta["fingerprint"] == run(tmp_path, [str(src)], "w3", workers=2, chunk_bytes=1000).meta["fingerprint"]
    again = run(tmp_path, [str(src)], "w1", workers=1, chunk_bytes=1000)
    assert again.reused and again.meta == one.meta
    src.write_text(src.read_text() + '{"text": "new"}\n')
    assert not run(tmp_path, [str(src)], "w1", workers=1, chunk_bytes=1000).reused
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def magic_oracle(tokens, ctx):
    """Brute force: largest p <= tokens // ctx - 1, prime by trial division, p % 3 == 2."""
    for p in range(tokens // ctx - 1, 1, -1):
        if p % 3 == 2 and all(p % d for d in range(2, int(p ** 0.5) + 1)):
            return p
    return None


def test_metadata_magic_prime(tmp_path):
    src = write_jsonl(tmp_path / "m.jsonl", [{"text": "word " * 200}] * 30)
    r = run(tmp_path, [str(src)], ctx_lens=[16, 64, 256])
    n = r.meta["num_tokens"]
    assert n == 30 * 1001
    for ctx in (16, 64, 256):
        info = r.meta["magic_prime"][str(ctx)]
        p = magic_oracle(n, ctx)
        assert info["largest_prime"] == p and info["slots"] == n // ctx
        assert info["magic_prime"] == (p if p / (n // ctx) > 0.9 else None)
    assert r.meta["magic_prime"]["16"]["magic_prime"] == 1871  # 30030 // 16 - 1 = 1875 -> 1871 (prime, = 2 mod 3)


def test_yaml_config_with_several_builds(tmp_path):
    src = write_jsonl(tmp_path / "s.jsonl", [{"text": t} for t in TEXTS])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"tokenizer: bytes\nprogress: false\nworkers: 1\nbuilds:\n"
                   f"  - {{inputs: [{src}], output: {tmp_path}/tr}}\n"
                   f"  - {{inputs: [{{path: {src}, kind: jsonl}}], output: {tmp_path}/va, ctx_lens: [8]}}\n")
    cfgs = load_configs(cfg)
    assert [c.output for c in cfgs] == [f"{tmp_path}/tr", f"{tmp_path}/va"] and cfgs[1].ctx_lens == [8]
    from infctx.data.cli import main

    assert main(["build", "--config", str(cfg), "--quiet", "--workers", "1"]) == 0
    assert docs_of(f"{tmp_path}/va") == [byte_doc(t) for t in TEXTS]
    assert main(["inspect", f"{tmp_path}/va", "--docs", "1"]) == 0
    assert main(["build", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "x"), "--quiet"]) == 1


def test_plain_text_bad_utf8_is_reported_at_its_line(tmp_path, capsys):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good line\nbad \xff line\n\nlast line\n")
    r = run(tmp_path, [InputSpec(str(path), text_split="line")], progress=True)
    assert docs_of(r.output) == [byte_doc("good line"), byte_doc("last line")]
    assert f"{path}:2: invalid UTF-8" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(BuildError, match="empty.txt:1: empty document"):
        run(tmp_path, [InputSpec(str(tmp_path / "empty.txt"))], "e", strict=True)
