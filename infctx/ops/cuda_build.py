"""Just-in-time build of the WKV CUDA kernels (cuda/) with torch.utils.cpp_extension + ninja.

Each (version, head size) is one extension, built once into a per-user cache whose directory name is a hash
of the sources, flags, head size, GPU arch and the torch/CUDA versions, so a second start only imports the
finished .so. Builds are serialised per directory by an flock with a timeout (flock dies with its process,
so a crashed build never leaves a lock that blocks forever; torch's own lock file inside the directory is
cleared while we hold ours). The preflight checks give one clear line per problem before nvcc ever runs.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch

log = logging.getLogger(__name__)
CUDA_DIR = Path(__file__).resolve().parents[2] / "cuda"
SOURCES = {7: ("wkv7.cu", "wkv7_op.cpp"), 6: ("wkv6.cu", "wkv6_op.cpp"), 5: ("wkv5.cu", "wkv5_op.cpp")}
HEADERS = ("wkv_common.cuh", "wkv_error.h", "wkv_check.h", "wkv56_kernels.cuh", "wkv56_chunked.cuh", "wkv56_bind.h",
           "wkv7_chunked.cuh")
HEAD_SIZES = {5: (64,), 6: (64,), 7: (64, 128)}
MIN_CAPABILITY = (8, 0)  # bf16 arithmetic
# The language standard is torch's own (cpp_extension passes -std=c++20, which its headers are written for).
NVCC_FLAGS = ("-O3", "--extra-device-vectorization", "-Xptxas=-O3")
HOST_FLAGS = ("-O3",)


class CudaBuildError(RuntimeError):
    """A problem with the CUDA toolchain or the kernel build; the message is one line that says what to do."""


@dataclass(frozen=True)
class BuildConfig:
    """Where the kernels are cached and how long to wait for another process that is building them."""

    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "infctx" / "cuda")
    lock_timeout_s: float = 900.0
    verbose: bool = False


# ---- preflight: each check is a small function of plain values so CPU tests can drive it -------------------

def check_head_size(version: int, head_size: int) -> None:
    if version not in HEAD_SIZES:
        raise CudaBuildError(f"wkv cuda: RWKV version {version} has no kernel; use 5, 6 or 7")
    if head_size not in HEAD_SIZES[version]:
        sizes = ", ".join(map(str, HEAD_SIZES[version]))
        raise CudaBuildError(f"wkv cuda: head size {head_size} is not supported for RWKV-{version} (supported: "
                             f"{sizes}); set ModelConfig.head_size accordingly or use wkv_backend='torch'")


def check_nvcc(nvcc: str | None) -> None:
    if nvcc is None:
        raise CudaBuildError("wkv cuda: nvcc not found (no CUDA_HOME/bin/nvcc and none on PATH); install the CUDA "
                             "toolkit matching torch.version.cuda and set CUDA_HOME, or use wkv_backend='torch'")


def check_toolkit_matches(toolkit: tuple[int, int], torch_cuda: str | None) -> None:
    if torch_cuda is None:
        raise CudaBuildError(f"wkv cuda: torch {torch.__version__} is a CPU-only build; install a CUDA build of "
                             "torch to use the CUDA kernels")
    if toolkit[0] != int(torch_cuda.split(".")[0]):
        raise CudaBuildError(f"wkv cuda: nvcc is CUDA {toolkit[0]}.{toolkit[1]} but torch was built with CUDA "
                             f"{torch_cuda}; install a toolkit with the same major version (or point CUDA_HOME at one)")


def check_capability(capability: tuple[int, int], name: str = "this GPU") -> None:
    if tuple(capability) < MIN_CAPABILITY:
        raise CudaBuildError(f"wkv cuda: {name} is sm_{capability[0]}{capability[1]}; the kernels need bf16 "
                             "(sm_80 or newer: A100, H100, RTX 30xx+); use wkv_backend='torch'")


# Shared memory per block of the largest kernel of a (version, head size), where it is over the 99 KiB that every
# sm_80+ GPU allows (wkv5/6 and wkv7 N=64 fit). Checked before a build, so written out here; the GPU suite compares
# it with what the built extension reports (cuda/wkv7.cu wkv7_smem_bytes: the backward with the default split).
SMEM_NEEDED = {(7, 128): 149_504}


def check_shared_memory(version: int, head_size: int, optin_bytes: int | None, name: str = "this GPU") -> None:
    need = SMEM_NEEDED.get((version, head_size))
    if need and optin_bytes is not None and optin_bytes < need:
        raise CudaBuildError(f"wkv cuda: wkv{version} with head size {head_size} needs {need // 1024} KiB of shared "
                             f"memory per block and {name} allows {optin_bytes // 1024} KiB; use head size 64 or "
                             "wkv_backend='torch'")


def check_ninja(available: bool) -> None:
    if not available:
        raise CudaBuildError("wkv cuda: ninja is missing; `pip install ninja` (torch builds extensions with it)")


def find_nvcc() -> str | None:
    """nvcc from CUDA_HOME as torch sees it, else from PATH."""
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME:
        candidate = Path(CUDA_HOME) / "bin" / "nvcc"
        if candidate.is_file():
            return str(candidate)
    return shutil.which("nvcc")


def nvcc_version(nvcc: str) -> tuple[int, int]:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    if not match:
        raise CudaBuildError(f"wkv cuda: could not read the CUDA version from `{nvcc} --version`; reinstall the toolkit")
    return int(match.group(1)), int(match.group(2))


def preflight(version: int, head_size: int, device: torch.device | None = None) -> tuple[int, int]:
    """Run every check in the order a user would fix them; returns the GPU's compute capability."""
    check_head_size(version, head_size)
    if torch.version.cuda is None:
        check_toolkit_matches((0, 0), None)
    if not torch.cuda.is_available():
        raise CudaBuildError("wkv cuda: no CUDA GPU is visible to torch (torch.cuda.is_available() is False); "
                             "use wkv_backend='torch' on this machine")
    device = device if device is not None else torch.device("cuda", torch.cuda.current_device())
    capability, name = torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device)
    check_capability(capability, name)
    props = torch.cuda.get_device_properties(device)
    check_shared_memory(version, head_size, getattr(props, "shared_memory_per_block_optin", None), name)
    nvcc = find_nvcc()
    check_nvcc(nvcc)
    check_toolkit_matches(nvcc_version(nvcc), torch.version.cuda)
    from torch.utils.cpp_extension import is_ninja_available

    check_ninja(is_ninja_available())
    return capability


# ---- the build itself ---------------------------------------------------------------------------------------

def build_flags(head_size: int, capability: tuple[int, int]) -> list[str]:
    arch = f"{capability[0]}{capability[1]}"
    return [*NVCC_FLAGS, f"-DWKV_N={head_size}", f"-gencode=arch=compute_{arch},code=sm_{arch}"]


def build_key(version: int, head_size: int, capability: tuple[int, int]) -> str:
    """Hash of everything that changes the binary: sources, headers, flags, head size, arch, torch/CUDA/Python."""
    digest = hashlib.sha256()
    for name in (*SOURCES[version], *HEADERS):
        digest.update(name.encode() + b"\0" + (CUDA_DIR / name).read_bytes())
    meta = [str(version), str(head_size), *build_flags(head_size, capability), *HOST_FLAGS, torch.__version__,
            str(torch.version.cuda), sys.version.split()[0]]
    digest.update("\0".join(meta).encode())
    return digest.hexdigest()[:16]


@contextmanager
def file_lock(path: Path, timeout_s: float) -> Iterator[None]:
    """Exclusive flock on `path`, giving up after `timeout_s` with a message that names the lock file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise CudaBuildError(f"wkv cuda: waited {timeout_s:.0f}s for the build lock {path}; another "
                                         "process is building the kernels (or hung): wait for it or kill it") from None
                time.sleep(0.5)
        yield
    finally:
        os.close(fd)  # releases the flock


def _import_so(name: str, so_path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(name, str(so_path))
    spec = importlib.util.spec_from_file_location(name, so_path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _build(version: int, head_size: int, capability: tuple[int, int], cfg: BuildConfig) -> ModuleType:
    from torch.utils.cpp_extension import load

    key = build_key(version, head_size, capability)
    name = f"infctx_wkv{version}_n{head_size}_{key}"
    build_dir = Path(cfg.cache_dir) / name
    so_path, done = build_dir / f"{name}.so", build_dir / "BUILD_OK"
    if done.is_file() and so_path.is_file():
        return _import_so(name, so_path)
    with file_lock(Path(cfg.cache_dir) / f"{name}.lock", cfg.lock_timeout_s):
        if done.is_file() and so_path.is_file():  # another process finished while we waited
            return _import_so(name, so_path)
        build_dir.mkdir(parents=True, exist_ok=True)
        stale = build_dir / "lock"  # torch's own baton, left behind if an earlier build was killed
        if stale.exists():
            stale.unlink()
        log.warning("wkv cuda: building %s into %s (first use of this kernel; about a minute)", name, build_dir)
        try:
            module = load(name=name, sources=[str(CUDA_DIR / s) for s in SOURCES[version]],
                          extra_cuda_cflags=build_flags(head_size, capability),
                          extra_cflags=[*HOST_FLAGS, f"-DWKV_N={head_size}"],
                          extra_include_paths=[str(CUDA_DIR)], build_directory=str(build_dir), verbose=cfg.verbose)
        except Exception as err:  # compiler output is printed by torch; keep our line short
            raise CudaBuildError(f"wkv cuda: building {name} failed ({type(err).__name__}: "
                                 f"{str(err).strip().splitlines()[-1] if str(err).strip() else err}); rerun with "
                                 f"`infctx doctor --verbose` to see the compiler output (build dir {build_dir})") from err
        tmp = done.with_suffix(".tmp")
        tmp.write_text(key + "\n")
        tmp.replace(done)
        return module


@functools.lru_cache(maxsize=None)
def _load_cached(version: int, head_size: int, device_index: int, cfg: BuildConfig) -> ModuleType:
    capability = preflight(version, head_size, torch.device("cuda", device_index))
    return _build(version, head_size, capability, cfg)


def load_extension(version: int, head_size: int, device: torch.device | None = None,
                   cfg: BuildConfig = BuildConfig()) -> ModuleType:
    """The compiled extension for RWKV-`version` with head size `head_size` (built on first use)."""
    if device is not None and device.index is not None:
        index = device.index
    else:
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return _load_cached(version, head_size, index, cfg)


def all_specs() -> list[tuple[int, int]]:
    return [(v, n) for v, sizes in sorted(HEAD_SIZES.items()) for n in sizes]


def _build_one(spec: tuple[int, int], cfg: BuildConfig) -> tuple[tuple[int, int], str | None, float]:
    start = time.perf_counter()
    try:
        load_extension(spec[0], spec[1], cfg=cfg)
        return spec, None, time.perf_counter() - start
    except CudaBuildError as err:
        return spec, str(err), time.perf_counter() - start


def build_all(specs: list[tuple[int, int]] | None = None, cfg: BuildConfig = BuildConfig(),
              jobs: int | None = None) -> list[tuple[tuple[int, int], str | None, float]]:
    """Build several extensions in parallel processes; returns (spec, error or None, seconds) per spec."""
    specs = specs or all_specs()
    jobs = jobs or min(len(specs), max(1, (os.cpu_count() or 2) // 2))
    if jobs == 1:
        return [_build_one(s, cfg) for s in specs]
    import multiprocessing

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_build_one, specs, [cfg] * len(specs)))
