"""`make bench-data` at a tiny size: it generates, builds, measures and writes both reports."""

import json

from infctx.bench.data import generate, main


def test_generator_mixes_english_cjk_and_code(tmp_path):
    path = tmp_path / "g.jsonl"
    size = generate(path, 0.3)
    texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    assert size >= 0.3e6
    assert any(t[:1].isascii() and " the " in t for t in texts)
    assert any("\u4e00" <= t[0] <= "\u9fff" or "\u3040" <= t[0] <= "\u30ff" for t in texts)
    assert any("def f" in t or "for (int" in t for t in texts)


def test_bench_writes_json_and_markdown(tmp_path):
    out = tmp_path / "results"
    assert main(["--size-mb", "0.4", "--workers", "1", "--work-dir", str(tmp_path / "work"), "--out-dir", str(out)]) == 0
    res = json.loads((out / "data.json").read_text())
    full = [b for b in res["builds"] if b["workers"] == 1 and b["input_mb"] >= 0.4]
    assert full and full[0]["tokens"] > 0.4e6 / 5 and full[0]["mb_s_per_core"] > 0 and full[0]["rss_main_mb"] > 0
    assert res["phases"]["tokenizer_mb_s"] > 0
    assert "MB/s per core" in (out / "data.md").read_text()
