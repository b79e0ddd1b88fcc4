"""`infctx doctor`: check the CUDA toolchain, build the WKV kernels and test a tiny forward+backward.

Prints one line per finding (ok / FAIL with the fix). Exit code 0 when the CUDA backend is usable, 1 when it
is not (on a machine without a GPU that is the expected, clean outcome: training then uses the torch backend).
"""

from __future__ import annotations

import argparse
import platform

import torch

from . import cuda_build as cb
from ._common import rel_rms


def _say(ok: bool, what: str) -> bool:
    print(f"[{'ok' if ok else 'FAIL'}] {what}")
    return ok


def toolchain() -> bool:
    """Each preflight item on its own line, so a user sees everything that is wrong at once."""
    print(f"python {platform.python_version()}, torch {torch.__version__}, torch CUDA {torch.version.cuda}")
    good = True
    if torch.version.cuda is None:
        good = _say(False, "torch is a CPU-only build: install a CUDA build of torch for the kernels")
    gpu = torch.cuda.is_available()
    if not gpu:
        good = _say(False, "no CUDA GPU is visible (torch.cuda.is_available() is False): the kernels cannot run "
                           "here; training uses wkv_backend='torch'")
    else:
        cap = torch.cuda.get_device_capability()
        name = torch.cuda.get_device_name()
        try:
            cb.check_capability(cap, name)
            _say(True, f"GPU {name} (sm_{cap[0]}{cap[1]})")
        except cb.CudaBuildError as err:
            good = _say(False, str(err))
    nvcc = cb.find_nvcc()
    try:
        cb.check_nvcc(nvcc)
        version = cb.nvcc_version(nvcc)
        _say(True, f"nvcc {version[0]}.{version[1]} at {nvcc}")
        if torch.version.cuda is not None:
            cb.check_toolkit_matches(version, torch.version.cuda)
            _say(True, f"toolkit major matches torch (CUDA {torch.version.cuda})")
    except cb.CudaBuildError as err:
        good = _say(False, str(err))
    from torch.utils.cpp_extension import is_ninja_available

    try:
        cb.check_ninja(is_ninja_available())
        _say(True, "ninja available")
    except cb.CudaBuildError as err:
        good = _say(False, str(err))
    return good


def build_and_test(cfg: cb.BuildConfig) -> bool:
    """Build every (version, head size) in parallel, then compare a tiny fwd+bwd with the float64 oracle."""
    good = True
    for (version, n), err, seconds in cb.build_all(cfg=cfg):
        good &= _say(err is None, f"build wkv{version} N={n} ({seconds:.0f}s)" if err is None else err)
    if not good:
        return False
    from . import cuda_wkv  # noqa: F401  (registers the backend)
    from . import get_wkv, wkv5_naive, wkv6_naive, wkv7_naive

    naive = {5: wkv5_naive, 6: wkv6_naive, 7: wkv7_naive}
    for version in (5, 6, 7):
        err = tiny_check(get_wkv(version, "cuda"), naive[version], version)
        good &= _say(err <= 1e-5, f"wkv{version} fwd+bwd vs float64 reference: max rel RMS {err:.1e} (limit 1e-5)")
    return good


def tiny_check(op, ref, version: int, B: int = 2, T: int = 21, H: int = 2, N: int = 64,
               device: str = "cuda") -> float:
    """Worst rel. RMS over y, sT and every gradient (incl. ds0, with a random dsT) of `op` in fp32 vs `ref` in
    float64, on one small random problem."""
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, device=device) * 0.5  # noqa: E731
    seq = dict(r=rnd(B, T, H, N), w=rnd(B, T, H, N), k=rnd(B, T, H, N), v=rnd(B, T, H, N))
    if version == 7:
        kappa = torch.nn.functional.normalize(rnd(B, T, H, N), dim=-1)
        seq.update(a=-kappa, b=kappa * 0.5)
    else:
        seq.update(u=rnd(H, N))
        if version == 5:
            seq["w"] = rnd(H, N)
    seq["s0"] = rnd(B, H, N, N)
    gy, gs = rnd(B, T, H, N), rnd(B, H, N, N)
    worst = 0.0
    outs = []
    for fn, dtype in ((op, torch.float32), (ref, torch.float64)):
        leaves = [t.detach().to(dtype).clone().requires_grad_(True) for t in seq.values()]
        y, sT = fn(*leaves)
        torch.autograd.backward([y, sT], [gy.to(dtype), gs.to(dtype)])
        outs.append([y.detach(), sT.detach(), *[t.grad for t in leaves]])
    for got, want in zip(*outs):
        worst = max(worst, rel_rms(got, want))
    return worst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="infctx doctor", description=__doc__.splitlines()[0])
    p.add_argument("--verbose", action="store_true", help="show the compiler output of the kernel builds")
    args = p.parse_args(argv)
    ok = toolchain()
    if not ok:
        print("doctor: the CUDA backend is not usable here (see FAIL lines); wkv_backend='auto' will use 'torch'")
        return 1
    ok = build_and_test(cb.BuildConfig(verbose=args.verbose))
    print("doctor: CUDA WKV kernels are ready" if ok else "doctor: CUDA WKV kernels FAILED (see above)")
    return 0 if ok else 1
