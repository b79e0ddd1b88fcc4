"""bench-train on CPU: a tiny RWKV-7 through the real step loop (output schema, tokens/s and MFU arithmetic from the
recorded fields), parameter counting against RWKV-7's shape formula, kernel classification, and the issue-7 target
verdicts on hand-built rows."""

from __future__ import annotations

import json
import math

import pytest
import torch

from infctx.bench import train as bt

TINY = bt.ModelSpec("tiny", n_layer=2, n_embd=64, vocab_size=256)


def rwkv7_params(L: int, C: int, V: int, lora: int) -> tuple[int, int]:
    """RWKV-LM x070 shapes, by hand: (all parameters, all but emb.weight). Every LoRA is `lora` wide here."""
    att = 6 * C + 4 * (2 * C * lora) + 6 * C + 4 * C * C + 2 * C  # x_*, w/a/v/g LoRAs, w0 a0 v0 k_k k_a r_k, r/k/v/o, ln_x
    ffn = C + 2 * C * 4 * C  # x_k, key, value
    layer = 4 * C + att + ffn  # + ln1, ln2
    total = L * layer + 2 * C + V * C + 2 * C + V * C  # + ln0, emb, ln_out, head
    return total, total - V * C


@pytest.fixture(scope="module")
def smoke():
    cfg = bt.BenchConfig(models=(TINY,), seq_lens=(64, 128), modes=("truncated", "full"), segment_len=32, batch=2,
                         min_time_s=0.0, backend="torch", device="cpu", amp=False, peak_tflops=1.0)
    updates = []
    res = bt.run(cfg, on_update=lambda r: updates.append(len(r["rows"])))
    return cfg, res, updates


def test_param_count_matches_shape_formula(smoke):
    _, res, _ = smoke
    total, matmul = rwkv7_params(2, 64, 256, 32)
    assert (total, matmul) == (166528, 150144)
    m = res["models"]["tiny"]
    assert (m["params_total"], m["params_matmul"]) == (total, matmul)


def test_smoke_rows_schema_and_arithmetic(smoke):
    cfg, res, updates = smoke
    assert updates[-1] == 4 and updates == sorted(updates)  # saved after every row
    assert {(r["T"], r["mode"]) for r in res["rows"]} == {(64, "truncated"), (64, "full"), (128, "truncated"),
                                                          (128, "full")}
    params = res["models"]["tiny"]["params_matmul"]
    for r in res["rows"]:
        assert r["model"] == "tiny" and r["B"] == 2 and not r["fill"]  # a fixed batch is not a measured fill
        assert r["steps"] == 1 and r["segments"] == r["T"] // 32
        assert r["tokens"] == 2 * r["T"] * r["steps"]
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"], rel=1e-12)
        assert r["mfu"] == pytest.approx(6 * params * r["tokens_per_s"] / 1e12, rel=1e-12)
        assert r["step_s"] == pytest.approx(r["seconds"] / r["steps"], rel=1e-12)
        assert "profile" not in r and "peak_gib" not in r  # CPU: no CUDA profile, no allocator peak
    assert res["gpu"] == "cpu" and res["peak_bf16_tflops"] == 1.0
    json.dumps(res)  # serialisable as written


def test_outputs_written_and_replot(smoke, tmp_path):
    _, res, _ = smoke
    bt.save(res, tmp_path, with_plots=True)
    assert json.loads((tmp_path / "train.json").read_text())["rows"] == json.loads(json.dumps(res["rows"]))
    md = (tmp_path / "train.md").read_text()
    assert "| tiny | 128 | full | 2 | 4 |" in md and "## Targets" in md
    for png in ("train_tokens_per_s.png", "train_peak_memory.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "train.md").unlink()
    assert bt.main(["--out", str(tmp_path), "--replot"]) == 0
    assert (tmp_path / "train.md").read_text() == md


def test_throughput_and_mfu_by_hand():
    tok_s, mfu = bt.throughput(tokens=65536, seconds=0.5, params=100_000_000, peak_tflops=989.0)
    assert tok_s == 131072.0
    assert mfu == pytest.approx(6e8 * 131072 / 989e12, rel=1e-12)
    assert mfu == pytest.approx(0.0795179, abs=1e-7)
    assert bt.throughput(10, 2.0, 5, None) == (5.0, None)
    assert bt.peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert bt.peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert bt.peak_tflops_for("NVIDIA H200") == 989.0
    assert bt.peak_tflops_for("Some GPU") is None


def test_lengths_state_size_and_fill_batch():
    assert [bt.parse_len(s) for s in ("4k", "16K", "1M", "300")] == [4096, 16384, 2**20, 300]
    assert [bt.fmt_len(n) for n in (4096, 2**20, 300)] == ["4k", "1M", "300"]
    cfg = TINY.config("torch")  # 2 layers x (2 shift vectors of 64 + 1 head of 64x64), fp32
    assert bt.state_bytes_per_row(cfg) == 2 * (2 * 64 * 4 + 64 * 64 * 4)
    # 10 GiB free after a 4 GiB base, 1 GiB per row + 256 segments x 2 MiB = 1.5 GiB per row -> 4 rows
    assert bt.fill_batch(4 * bt.GIB, bt.GIB, 2 * 2**20, 256, 10 * bt.GIB) == 4
    assert bt.fill_batch(9 * bt.GIB, bt.GIB, 0, 0, 8 * bt.GIB) == 1  # never below 1


def test_plan_rows_adds_same_batch_references():
    cfg = bt.BenchConfig(seq_lens=(4096, 16384, 65536, 2**20), modes=("truncated",), max_step_tokens=2**21)
    got = [(r["T"], r["B"], r["fill"]) for r in bt.plan_rows(cfg, fill=32)]
    # every length at B = 2^21 / 2^20 = 2; 4k at the filling batch added; targets' lengths first, cheapest first
    assert got == [(4096, 2, False), (16384, 2, False), (4096, 32, True), (2**20, 2, False), (65536, 2, False)]
    uncapped = bt.BenchConfig(seq_lens=(4096, 16384), modes=("full", "truncated"))
    assert [(r["T"], r["mode"], r["B"], r["fill"]) for r in bt.plan_rows(uncapped, fill=8)] == [
        (4096, "full", 8, True), (4096, "truncated", 8, True), (16384, "full", 8, True), (16384, "truncated", 8, True)]


def test_kernel_classes_and_shares():
    kernels = [
        ("void (anonymous namespace)::fwd_kernel<__nv_bfloat16, Tiling<64> >(int, int, ...)", 30.0),
        ("void (anonymous namespace)::bwd_kernel<__nv_bfloat16, Tiling<64> >(int, int, ...)", 6.0),
        ("void (anonymous namespace)::span_scan_kernel<64, true>(int, int, float const*, ...)", 2.0),
        ("void (anonymous namespace)::span_outer_kernel<__nv_bfloat16, 64>(int, int, float const*, ...)", 2.0),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", 25.0),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", 15.0),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", 12.0),
        ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>", 4.0),
        ("Memcpy DtoD (Device -> Device)", 4.0),
    ]
    assert [bt.classify_kernel(n) for n, _ in kernels] == ["wkv", "wkv", "wkv", "wkv", "matmul", "matmul",
                                                            "elementwise", "elementwise", "copy"]
    shares = bt.time_shares(kernels)
    assert shares == pytest.approx(dict(wkv=0.40, matmul=0.40, elementwise=0.16, copy=0.04), abs=1e-12)
    assert math.fsum(shares.values()) == pytest.approx(1.0)


def test_top_ops_ranks_by_own_gpu_time_and_drops_host_only_ops():
    """top_ops on a stand-in for a profiler: operators (name + input shapes) by their own GPU time, most first,
    those without GPU time left out, at most n rows, microseconds reported as milliseconds."""
    from types import SimpleNamespace as Op

    events = [Op(key="aten::mm", input_shapes=[[4, 8], [8, 2]], self_device_time_total=1500.0, count=3),
              Op(key="aten::view", input_shapes=[[4, 8]], self_device_time_total=0.0, count=9),
              Op(key="aten::copy_", input_shapes=[[4, 8], [4, 8]], self_device_time_total=2500.0, count=2),
              Op(key="aten::add_", input_shapes=[[4, 8], [4, 8], []], self_device_time_total=500.0, count=1)]
    prof = Op(key_averages=lambda group_by_input_shape: events if group_by_input_shape else [])
    assert bt.top_ops(prof, n=2) == [
        dict(op="aten::copy_", shapes="[[4, 8], [4, 8]]", ms=2.5, calls=2),
        dict(op="aten::mm", shapes="[[4, 8], [8, 2]]", ms=1.5, calls=3)]
    assert [r["op"] for r in bt.top_ops(prof)] == ["aten::copy_", "aten::mm", "aten::add_"]


def _row(model, T, mode, B, tok_s, peak=None, mfu=None, step_s=1.0):
    r = dict(model=model, T=T, mode=mode, B=B, fill=False, tokens_per_s=tok_s, mfu=mfu, step_s=step_s, segments=1,
             ce="fused")
    if peak is not None:
        r["peak_gib"] = peak
    return r


def test_targets_verdicts_by_hand():
    M = 2**20
    rows = [
        _row("0.1b", 4096, "truncated", 16, 250_000.0, peak=40.0),
        _row("1.5b", 4096, "full", 4, 30_000.0, peak=60.0, mfu=0.40),
        _row("0.1b", 4096, "truncated", 1, 100_000.0),
        _row("0.1b", 4096, "full", 1, 98_000.0),
        _row("0.1b", 16384, "truncated", 1, 99_000.0, peak=10.0),
        _row("0.1b", 16384, "full", 1, 80_000.0, peak=10.0),
        _row("0.1b", M, "truncated", 1, 90_000.0, peak=10.5),
        _row("0.1b", M, "full", 1, 75_000.0, peak=12.0),
    ]
    res = dict(rows=rows, settings=dict(segment_len=4096), models={"1.5b": dict(state_row_mib=12.0)})
    got = {t["target"]: (t["measured"], t["verdict"]) for t in bt.targets(res)}
    assert got["0.1B tokens/s at 4k"] == ("250,000 (B=16)", "pass")
    assert got["1.5B MFU at 4k"] == ("40.0% (B=4)", "fail")
    assert got["0.1b truncated BPTT tokens/s at 1M / at 4k (same B)"] == ("0.900 (B=1)", "fail")  # 90k / 100k
    assert got["0.1b full BPTT tokens/s at 1M / at 4k (same B)"] == ("0.750 (B=1)", "pass")  # 75k / 100k
    assert got["0.1b truncated peak memory at 1M / at 16k (same B)"] == ("1.050 (10.5 / 10.0 GiB)", "pass")
    assert got["0.1b full peak memory at 1M / at 16k (same B)"] == ("1.200 (12.0 / 10.0 GiB)", "fail")
    assert got["1.5b full BPTT tokens/s at 1M / at 4k (same B)"] == (None, "not measured")
    assert got["1.5B trains one 4M-token sequence, full BPTT"] == (None, "not measured")
    # the 4M target from the 1.5B full 1M row: + (1024 - 256) boundary states of 12 MiB = 9.0 GiB, time x 4
    res["rows"].append(_row("1.5b", M, "full", 1, 20_000.0, peak=40.0, step_s=52.4))
    four_m = bt.four_m_target(res)
    assert four_m["verdict"] == "not measured"
    assert four_m["measured"] == "not run; predicted from the 1M row: 49.0 GiB peak, 210 s/step"


@pytest.fixture
def dynamo_trace_only(monkeypatch):
    """fused.compiled through dynamo with the 'eager' backend: the fused code path (fullgraph capture, guards,
    recompiles) without inductor's minute of C++ builds on this CPU; numerics are checked in test_fused.py."""
    import functools

    from infctx.model import fused

    torch._dynamo.reset()
    monkeypatch.setattr(fused, "compiled", functools.cache(
        lambda region: torch.compile(region, fullgraph=True, backend="eager")))
    yield
    torch._dynamo.reset()


def test_fuse_before_after_rows_and_table(dynamo_trace_only):
    cfg = bt.BenchConfig(models=(TINY,), seq_lens=(64,), modes=("full",), segment_len=32, batch=2, min_time_s=0.0,
                         backend="torch", fuses=("off", "compile"), device="cpu", amp=False, peak_tflops=1.0)
    res = bt.run(cfg)
    assert [(r["fuse"], r["T"], r["B"]) for r in res["rows"]] == [("off", 64, 2), ("compile", 64, 2)]
    assert all("tokens_per_s" in r for r in res["rows"]) and res["settings"]["fuse"] == ["off", "compile"]
    (lever,) = bt.lever(res, "fuse", "off", "compile")
    off, on = res["rows"]
    assert lever["speedup"] == pytest.approx(on["tokens_per_s"] / off["tokens_per_s"], rel=1e-12)
    assert lever["peak_ratio"] is None and lever["other"] == "ce=fused"  # CPU: no allocator peak
    md = bt.markdown(res)
    assert "| tiny | 64 | full | 2 | 2 | off | fused |" in md and "| tiny | 64 | full | 2 | 2 | compile | fused |" in md
    assert "## Fusion lever" in md and "| tiny | 64 | full | 2 | ce=fused |" in md.split("## Fusion lever")[1]
    assert "## Head + cross-entropy lever" not in md  # one head+CE path measured: no table
    old = dict(off, ce="checkpointed")
    del old["fuse"], old["ce"]  # a row written before the options: fuse=off with the checkpointed head+CE
    assert bt._key(old) == bt._key(dict(off, ce="checkpointed"))


def test_head_ce_before_after_rows_and_table():
    cfg = bt.BenchConfig(models=(TINY,), seq_lens=(64,), modes=("full",), segment_len=32, batch=2, min_time_s=0.0,
                         backend="torch", ces=("checkpointed", "fused"), device="cpu", amp=False, peak_tflops=1.0)
    res = bt.run(cfg)
    assert [(r["ce"], r["fuse"]) for r in res["rows"]] == [("checkpointed", "off"), ("fused", "off")]
    (lever,) = bt.lever(res, "ce", "checkpointed", "fused")
    base, alt = res["rows"]
    assert lever["speedup"] == pytest.approx(alt["tokens_per_s"] / base["tokens_per_s"], rel=1e-12)
    assert lever["other"] == "fuse=off" and bt.lever(res, "fuse", "off", "compile") == []
    md = bt.markdown(res)
    assert "## Head + cross-entropy lever (ce: fused vs checkpointed" in md and "## Fusion lever" not in md
    assert "| tiny | 64 | full | 2 | 2 | off | checkpointed |" in md


def test_merge_keeps_the_first_runs_header_and_marks_new_rows(smoke, tmp_path):
    _, res, _ = smoke
    first = json.loads(json.dumps(res))
    first["models"]["tiny"]["fill_batch"] = 7  # as if the first run had measured the filling batch
    cfg = bt.BenchConfig(models=(TINY,), seq_lens=(256,), modes=("full",), segment_len=32, batch=1, min_time_s=0.0,
                         backend="torch", device="cpu", amp=False, peak_tflops=1.0)
    merged = bt.run(cfg, res=json.loads(json.dumps(first)))
    assert merged["settings"] == first["settings"] and merged["date"] == first["date"]
    assert merged["models"]["tiny"]["fill_batch"] == 7
    assert merged["rows"][:4] == first["rows"] and len(merged["rows"]) == 5
    new = merged["rows"][-1]
    assert (new["T"], new["B"], new["run"]) == (256, 1, 1)
    assert merged["merged_runs"][0]["settings"]["batch"] == 1
    md = bt.markdown(merged)
    assert "| tiny | 256 | full (run 1) | 1 | 8 |" in md and "Rows marked (run 1) were added later" in md
