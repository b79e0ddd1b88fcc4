"""bench-kernels row arithmetic on CPU (the timing itself needs a GPU): Mtok/s and the speedup over fla from
hand-picked times, and rows written before fla has been timed."""

import json

import pytest

from infctx.bench import kernels as bk


def test_shape_rows_by_hand():
    cfg = bk.BenchConfig()
    ours_only = bk.shape_rows(7, 4, 4096, 32, {"ours": dict(ms_fwd=1.0, ms_fwd_bwd=8.0, peak_mib=10.0)}, cfg)
    assert len(ours_only) == 1 and "speedup_vs_fla" not in ours_only[0]
    assert ours_only[0]["mtok_s"] == pytest.approx(4 * 4096 / 8.0 / 1e3, abs=1e-3)  # 2.048 Mtok/s
    times = {"ours": dict(ms_fwd=1.0, ms_fwd_bwd=8.0, peak_mib=10.0),
             "fla": dict(ms_fwd=2.0, ms_fwd_bwd=12.0, peak_mib=20.0), "ours-s4": dict(error="out of memory")}
    rows = {r["impl"]: r for r in bk.shape_rows(7, 4, 4096, 32, times, cfg)}
    assert rows["ours"]["speedup_vs_fla"] == 1.5 and "speedup_vs_fla" not in rows["fla"]
    assert rows["ours-s4"] == dict(version=7, impl="ours-s4", B=4, T=4096, H=32, N=64, error="out of memory")
    assert "| wkv7 | ours-s4 | 4 | 4096 | 32 | out of memory |" in bk.markdown(
        dict(gpu="g", date="d", torch="t", cuda="c", fla_core=None, fla_error=None, y_agreement_vs_fla={},
             dtype="bf16", rows=list(rows.values())))


def test_run_saves_after_every_impl_and_fills_in_the_speedup(monkeypatch):
    """run() with the GPU parts replaced: one save per timed impl, ours' speedup once fla's time is in."""
    import importlib.metadata
    import sys
    import types

    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake GPU")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setitem(sys.modules, "fla", types.ModuleType("fla"))
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.6.0")
    monkeypatch.setattr(bk, "make_inputs", lambda *a, **k: {})
    monkeypatch.setattr(bk, "ours", lambda version, tiling=0, kernel="chunked", span=None:
                        "ours" if kernel == "chunked" and span is None else "seq")
    monkeypatch.setattr(bk, "fla", lambda version: "fla")
    monkeypatch.setattr(bk, "agreement", lambda version: 0.0)
    monkeypatch.setattr(bk, "measure", lambda fn, x, cfg: dict(ms_fwd=1.0, ms_fwd_bwd={"ours": 2.0, "seq": 6.0, "fla": 3.0}[fn],
                                                               peak_mib=1.0))
    saved = []
    res = bk.run(bk.BenchConfig(versions=(7, 6), shapes=((1, 64, 2), (2, 64, 2))),
                 lambda r: saved.append([(x["impl"], x.get("speedup_vs_fla")) for x in r["rows"]]))
    # one save per impl (both add the sequential kernels: wkv7 without spans, wkv6 unchunked) + one per version
    # for the agreement
    assert [len(s) for s in saved] == [1, 2, 3, 4, 5, 6, 6, 7, 8, 9, 10, 11, 12, 12]
    assert saved[0] == [("ours", None)] and saved[1] == [("ours", 1.5), ("fla", None)]
    assert saved[2] == [("ours", 1.5), ("fla", None), ("ours-seq", 0.5)]  # wkv7, first shape
    assert saved[9][6:] == [("ours", 1.5), ("fla", None), ("ours-seq", 0.5)]  # wkv6, first shape
    assert [(r["version"], r["B"], r["impl"]) for r in res["rows"]] == [
        (7, B, impl) for B in (1, 2) for impl in ("ours", "fla", "ours-seq")] + [
        (6, B, impl) for B in (1, 2) for impl in ("ours", "fla", "ours-seq")]
    assert res["y_agreement_vs_fla"] == {"wkv7": 0.0, "wkv6": 0.0}


def _result(rows):
    return dict(gpu="NVIDIA H200", date="2026-12-02T00:58", rows=rows)


def _row(impl, B, fwd, total):
    return dict(version=7, impl=impl, B=B, T=4096, H=32, N=64, ms_fwd=fwd, ms_fwd_bwd=total)


def test_compare_puts_two_trees_side_by_side_with_means_and_ratio(tmp_path):
    """this / other / this, as bench/device_run.sh ab-kernels times them: per row every run's times, each label's
    mean, other / this and the spread of this's runs, by hand: this (5.0 + 5.2) / 2 = 5.1, other 5.61, 5.61 / 5.1 =
    1.1, spread 0.2 / 5.1 = 3.9% (so 1.1 is outside it); ours-seq: 6.0 twice, spread 0, but no other mean."""
    this1 = _result([_row("ours", 4, 1.0, 5.0), _row("ours-seq", 4, 1.1, 6.0)])
    other = _result([_row("ours", 4, 1.2, 5.61), dict(version=7, impl="ours-seq", B=4, T=4096, H=32, N=64,
                                                       error="out of memory")])
    this2 = _result([_row("ours", 4, 1.0, 5.2), _row("ours-seq", 4, 1.1, 6.0)])
    paths = []
    for name, res in (("1", this1), ("2", other), ("3", this2)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(res))
    out = tmp_path / "ab"
    assert bk.main(["--compare", f"this={paths[0]}", f"other={paths[1]}", f"this={paths[2]}",
                    "--out-dir", str(out)]) == 0
    table = (out / "kernels-ab.md").read_text()
    assert ("| wkv7 | ours | 4 | 4096 | 32 | 1.000 / 5.000 | 1.200 / 5.610 | 1.000 / 5.200 | 5.100 | 5.610 | 1.100 "
            "| 3.9% | this faster | 1.200 |") in table
    # a row that failed in one run: a dash there, the mean of what was timed, NaN where a label has nothing
    assert "| wkv7 | ours-seq | 4 | 4096 | 32 | 1.100 / 6.000 | — | 1.100 / 6.000 | 6.000 | nan | nan | 0.0% | — | nan |" \
        in table


def test_compare_calls_a_ratio_inside_the_runs_spread_noise(tmp_path):
    """The skewed-backward A/B of 2026-12-02 at (16,1024,32): this 3.692 and 3.776 (mean 3.734, spread 0.084 / 3.734
    = 2.2%), other 3.831: 3.831 / 3.734 = 1.026, outside 2.2%, so "this faster"; with this 3.60 and 3.87 (spread
    7.2%) the same other time is within spread, and one run per label gives no verdict."""
    def table(this_a, this_b, other):
        runs = [("this", _result([_row("ours", 16, 1.2, this_a)])), ("other", _result([_row("ours", 16, 1.2, other)]))]
        if this_b is not None:
            runs.append(("this", _result([_row("ours", 16, 1.2, this_b)])))
        return bk.compare_markdown(runs)
    assert "| 3.734 | 3.831 | 1.026 | 2.2% | this faster | 1.000 |" in table(3.692, 3.776, 3.831)
    assert "| 3.735 | 3.831 | 1.026 | 7.2% | within spread | 1.000 |" in table(3.60, 3.87, 3.831)
    assert "| 3.692 | 3.600 | 0.975 | — | — | 1.000 |" in table(3.692, None, 3.600)
    assert "| 3.734 | 3.600 | 0.964 | 2.2% | this slower | 1.000 |" in table(3.692, 3.776, 3.600)


def test_compare_refuses_anything_but_two_labels_and_unreadable_files(tmp_path, capsys):
    path = tmp_path / "k.json"
    path.write_text(json.dumps(_result([_row("ours", 4, 1.0, 5.0)])))
    assert bk.main(["--compare", f"a={path}", f"b={path}", f"c={path}", "--out-dir", str(tmp_path)]) == 2
    assert "exactly two labels" in capsys.readouterr().out
    assert bk.main(["--compare", f"a={tmp_path / 'missing.json'}", f"b={path}", "--out-dir", str(tmp_path)]) == 2
    assert "missing.json: cannot read a kernels.json" in capsys.readouterr().out
    assert bk.main(["--compare", str(path), "--out-dir", str(tmp_path)]) == 2
    assert "is not LABEL=PATH" in capsys.readouterr().out
    assert not (tmp_path / "kernels-ab.md").exists()
