"""bench-kernels row arithmetic on CPU (the timing itself needs a GPU): Mtok/s and the speedup over fla from
hand-picked times, and rows written before fla has been timed."""

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
