"""CPU-side checks of the CUDA backend's preflight and input validation: each problem gives one clear line.

No GPU needed: the checks are plain functions of versions, capabilities and tensors.
"""

from __future__ import annotations

import threading

import pytest
import torch

from infctx.ops import cuda_build as cb
from infctx.ops.cuda_wkv import validate_inputs


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("wkv"), msg
    return msg


def test_no_nvcc():
    with pytest.raises(cb.CudaBuildError) as err:
        cb.check_nvcc(None)
    assert "nvcc not found" in one_line(err) and "CUDA_HOME" in str(err.value)


def test_toolkit_vs_torch_cuda_mismatch():
    cb.check_toolkit_matches((13, 0), "13.0")
    cb.check_toolkit_matches((12, 4), "12.8")  # same major is fine
    with pytest.raises(cb.CudaBuildError) as err:
        cb.check_toolkit_matches((12, 4), "13.0")
    assert "CUDA 12.4 but torch was built with CUDA 13.0" in one_line(err)
    with pytest.raises(cb.CudaBuildError) as err:
        cb.check_toolkit_matches((13, 0), None)
    assert "CPU-only build" in one_line(err)


def test_gpu_without_bf16():
    cb.check_capability((8, 0))
    cb.check_capability((9, 0))
    with pytest.raises(cb.CudaBuildError) as err:
        cb.check_capability((7, 5), "Tesla T4")
    assert "Tesla T4 is sm_75" in one_line(err) and "sm_80" in str(err.value)


def test_shared_memory_check():
    """wkv7 with head size 128 needs 146 KiB of shared memory per block: fine on an A100 (163 KiB) or H100
    (227 KiB), one line on an RTX 4090 (99 KiB); head size 64 and unknown limits pass."""
    from infctx.ops import cuda_build as cb

    cb.check_shared_memory(7, 128, 163 * 1024)
    cb.check_shared_memory(7, 64, 99 * 1024)
    cb.check_shared_memory(6, 64, 48 * 1024)
    cb.check_shared_memory(7, 128, None)
    with pytest.raises(cb.CudaBuildError) as err:
        cb.check_shared_memory(7, 128, 99 * 1024, "NVIDIA GeForce RTX 4090")
    assert one_line(err) and "needs 146 KiB" in str(err.value) and "RTX 4090 allows 99 KiB" in str(err.value)



def test_ninja_missing():
    cb.check_ninja(True)
    with pytest.raises(cb.CudaBuildError) as err:
        cb.check_ninja(False)
    assert "pip install ninja" in one_line(err)


@pytest.mark.parametrize("version,n", [(7, 32), (6, 128), (5, 96)])
def test_unsupported_head_size(version, n):
    with pytest.raises(cb.CudaBuildError) as err:
        cb.check_head_size(version, n)
    assert f"head size {n} is not supported for RWKV-{version}" in one_line(err)
    cb.check_head_size(version, 64)


def _seq(B=1, T=5, H=2, N=64, dtype=torch.bfloat16):
    return {n: torch.zeros(B, T, H, N, dtype=dtype) for n in ("r", "w", "k", "v", "a", "b")}


def test_validation_messages():
    with pytest.raises(ValueError) as err:
        validate_inputs(7, {**_seq(), "k": torch.zeros(1, 5, 2, 64, dtype=torch.float16)}, {}, None)
    assert "k is torch.float16" in one_line(err)
    with pytest.raises(ValueError) as err:  # bf16 and fp32 may mix (cast to r's dtype): next check is the device
        validate_inputs(7, {**_seq(), "w": _seq(dtype=torch.float32)["w"]}, {}, None)
    assert "on cpu" in one_line(err)
    with pytest.raises(ValueError) as err:
        validate_inputs(7, {**_seq(), "v": torch.zeros(1, 2, 5, 64, dtype=torch.bfloat16).transpose(1, 2)}, {}, None)
    assert "v is not contiguous" in one_line(err) and ".contiguous()" in str(err.value)
    with pytest.raises(ValueError) as err:
        validate_inputs(7, _seq(N=32), {}, None)
    assert "head size 32 is not supported" in one_line(err)
    with pytest.raises(ValueError) as err:
        validate_inputs(7, _seq(), {}, torch.zeros(1, 2, 64, 64, dtype=torch.bfloat16))
    assert "s0 is torch.bfloat16" in one_line(err)
    with pytest.raises(ValueError) as err:
        validate_inputs(5, {n: t for n, t in _seq().items() if n in "rkv"}, {"w": torch.zeros(3, 64, dtype=torch.bfloat16),
                        "u": torch.zeros(2, 64, dtype=torch.bfloat16)}, None)
    assert "w has shape (3, 64), expected (2, 64)" in one_line(err)
    with pytest.raises(ValueError) as err:  # everything right but on the CPU
        validate_inputs(7, _seq(), {}, None)
    assert "must be on one CUDA device" in one_line(err)


def test_lock_timeout_names_the_lock_file(tmp_path):
    lock = tmp_path / "build.lock"
    held, release = threading.Event(), threading.Event()

    def holder():
        with cb.file_lock(lock, timeout_s=5):
            held.set()
            release.wait(5)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(5)
    try:
        with pytest.raises(cb.CudaBuildError) as err:
            with cb.file_lock(lock, timeout_s=0.3):
                pass
        assert str(lock) in one_line(err)
    finally:
        release.set()
        thread.join()
    with cb.file_lock(lock, timeout_s=1):  # released: the next process gets it at once
        pass


def test_build_key_tracks_head_size_and_arch():
    keys = {cb.build_key(7, n, cap) for n in (64, 128) for cap in ((8, 0), (9, 0))}
    assert len(keys) == 4
    assert cb.build_key(7, 64, (9, 0)) == cb.build_key(7, 64, (9, 0))


def test_doctor_without_gpu_exits_cleanly(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the no-GPU path of doctor is not reachable")
    from infctx.ops import doctor

    assert doctor.main([]) == 1
    out = capsys.readouterr().out
    assert "no CUDA GPU is visible" in out and "wkv_backend='auto' will use 'torch'" in out


@pytest.mark.parametrize("version", [5, 6, 7])
def test_doctor_reference_check_harness(version):
    """The doctor's fwd+bwd comparison, run on CPU with the torch backend standing in for the kernel: near zero
    for a correct op, large for a wrong one (here: the op with its output scaled)."""
    from infctx import ops
    from infctx.ops import doctor

    naive = getattr(ops, f"wkv{version}_naive")
    assert doctor.tiny_check(ops.get_wkv(version, "torch"), naive, version, T=7, device="cpu") < 1e-5

    def wrong(*args):
        y, s = naive(*args)
        return y * 1.01, s

    assert doctor.tiny_check(wrong, naive, version, T=7, device="cpu") > 1e-3


def test_wkv56_kernel_choice_and_limits(monkeypatch):
    """kernel= picks the wkv5/6 Function ("auto": sequential below one 16-token chunk); an unknown name or a B*H
    beyond the chunked grid is one clear line."""
    from infctx.ops import cuda_wkv

    picked = []
    monkeypatch.setattr(cuda_wkv._WKV56, "apply", lambda *a: picked.append("sequential"))
    monkeypatch.setattr(cuda_wkv._WKV56Chunked, "apply", lambda *a: picked.append("chunked"))
    x, u = torch.zeros(1, 4, 2, 64), torch.zeros(2, 64)
    long = torch.zeros(1, 16, 2, 64)
    for kernel in ("chunked", "sequential"):
        cuda_wkv._wkv56(6, x, x, x, x, u, None, 0, kernel)
    cuda_wkv._wkv56(6, x, x, x, x, u, None, 0, "auto")  # T = 4 < one chunk
    cuda_wkv._wkv56(6, long, long, long, long, u, None, 0, "auto")  # T = 16
    cuda_wkv._wkv56(6, long, long, long, long, u, None, 8, "auto")  # rows_per_block asks for the sequential kernel
    assert picked == ["chunked", "sequential", "sequential", "chunked", "sequential"]
    with pytest.raises(ValueError) as err:
        cuda_wkv._wkv56(6, x, x, x, x, u, None, 0, "fast")
    assert "kernel='fast'" in one_line(err) and "auto, chunked, sequential" in str(err.value)
    wide = torch.zeros(1, 1, cuda_wkv.MAX_CHUNKED_HEADS + 1, 64)
    with pytest.raises(ValueError) as err:
        cuda_wkv._wkv56(6, wide, wide, wide, wide, torch.zeros(wide.shape[2:]), None, 0, "chunked")
    assert "B*H = 65536" in one_line(err) and "kernel='sequential'" in str(err.value)
    cuda_wkv._wkv56(6, wide, wide, wide, wide, torch.zeros(wide.shape[2:]), None, 0, "sequential")
    assert picked[-1] == "sequential"
    wide_long = torch.zeros(1, 16, cuda_wkv.MAX_CHUNKED_HEADS + 1, 64)
    cuda_wkv._wkv56(6, *[wide_long] * 4, torch.zeros(wide.shape[2:]), None, 0, "auto")  # beyond the grid: sequential
    assert picked[-1] == "sequential"
    with pytest.raises(ValueError) as err:
        cuda_wkv._wkv56(6, x, x, x, x, u, None, 16, "chunked")
    assert "rows_per_block=16" in one_line(err) and "kernel='sequential'" in str(err.value)


def test_wkv7_span_choice(monkeypatch):
    """span= picks the wkv7 Function (None: the auto rule; 0: the sequential kernels); a span that is no multiple of
    64 or does not divide T is one clear line, and so is a forward grouping the kernels do not build."""
    from infctx.ops import cuda_wkv

    picked = []
    monkeypatch.setattr(cuda_wkv._WKV7, "apply", lambda *a: picked.append(("sequential", a[8])))
    monkeypatch.setattr(cuda_wkv._WKV7Spans, "apply", lambda *a: picked.append(("spans", a[-1])))
    few, many = torch.zeros(1, 4096, 2, 64), torch.zeros(4, 256, 32, 64)
    for x, span in ((few, None), (few, 0), (few, 1024), (many, None)):
        cuda_wkv._wkv7(*[x] * 6, None, 0, span)
    assert picked == [("spans", 64), ("sequential", 0), ("spans", 1024), ("sequential", 0)]
    for span in (100, 768, -64):
        with pytest.raises(ValueError) as err:
            cuda_wkv._wkv7(*[few] * 6, None, 0, span)
        assert f"span={span} must be 0" in one_line(err) and "T=4096" in str(err.value)
    picked.clear()
    cuda_wkv._wkv7(*[many] * 6, None, 0, None, 2)
    assert picked == [("sequential", 2)]  # argument 8 of the whole-T Function is groups
    with pytest.raises(ValueError) as err:
        cuda_wkv._wkv7(*[many] * 6, None, 0, None, 0, "mma")
    assert "forward='mma' must be 'sequential' or 'chunked'" in one_line(err)
    picked.clear()
    cuda_wkv._wkv7(*[few] * 6, None, 0, None, 0, "sequential", "chunked")
    assert picked == [("sequential", 0)]  # the chunked backward runs the whole T: no span path
    for x, span in ((few, 1024), (torch.zeros(1, 64, 2, 128), None)):  # an explicit span; head size 128
        with pytest.raises(ValueError) as err:
            cuda_wkv._wkv7(*[x] * 6, None, 0, span, 0, "sequential", "chunked")
        assert "backward='chunked' runs head size 64 over the whole T" in one_line(err)
    for groups in (3, 8, -1):
        with pytest.raises(ValueError) as err:
            cuda_wkv._wkv7(*[many] * 6, None, 0, None, groups)
        assert f"groups={groups} must be 0 (auto) or one of 1, 2, 4 " in one_line(err)


@pytest.mark.parametrize("version", [5, 6])
def test_wkv56_gradient_buffers(version):
    """Both wkv5/6 backward Functions take their buffers from one helper: dw per token (wkv6) or fp32 per (b, h)
    (wkv5), du fp32 per (b, h); the per-(b, h) sums come back summed over b in the parameter's dtype."""
    from infctx.ops import cuda_wkv

    r = torch.zeros(3, 5, 2, 64, dtype=torch.bfloat16)
    w = r if version == 6 else torch.zeros(2, 64, dtype=torch.bfloat16)
    dr, dw, dk, dv, du, ds0 = cuda_wkv._grads56(version, r, w)
    assert all(t.shape == r.shape and t.dtype == r.dtype for t in (dr, dk, dv))
    assert (dw.shape, dw.dtype) == ((r.shape, r.dtype) if version == 6 else ((3, 2, 64), torch.float32))
    assert (du.shape, du.dtype, ds0.shape, ds0.dtype) == ((3, 2, 64), torch.float32, (3, 2, 64, 64), torch.float32)
    u = torch.zeros(2, 64, dtype=torch.bfloat16)
    dw, du = cuda_wkv._param_grads56(version, dw.fill_(1.0), du.fill_(2.0), w, u)
    assert du.shape == (2, 64) and du.dtype == torch.bfloat16 and du.float().eq(6.0).all()
    assert dw.shape == w.shape and dw.dtype == w.dtype and (version == 6 or dw.float().eq(3.0).all())
