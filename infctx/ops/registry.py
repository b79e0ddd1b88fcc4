"""Op registry: picks a WKV implementation by (version, backend name).

Backends register themselves with `register`; "torch" (chunked) and "torch-naive" are built in.
Optional backends living in `infctx.ops.cuda_*` modules are imported the first time a name is not
found, so their import (and any kernel build inside `available`) costs nothing unless asked for.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from dataclasses import dataclass
from typing import Callable

import torch

VERSIONS = (5, 6, 7)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backend:
    """One implementation of one WKV version; `available(head_size)` returns None when usable, else the reason."""

    fn: Callable
    available: Callable[[int], str | None]


class Registry:
    """Maps (version, name) to a Backend. One shared instance lives below as `REGISTRY`."""

    def __init__(self) -> None:
        self._ops: dict[tuple[int, str], Backend] = {}
        self._plugins_loaded = False
        self._plugin_errors: list[str] = []

    def register(self, version: int, name: str, fn: Callable,
                 available: Callable[[int], str | None] = lambda head_size: None) -> None:
        if version not in VERSIONS:
            raise ValueError(f"wkv registry: version {version!r} is not one of {VERSIONS}")
        self._ops[(version, name)] = Backend(fn, available)

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted({name for _, name in self._ops})

    def lookup(self, version: int, name: str) -> Backend:
        if version not in VERSIONS:
            raise ValueError(f"wkv: version {version!r} is not one of {VERSIONS}")
        if (version, name) not in self._ops:
            self._load_plugins()
        if (version, name) not in self._ops:
            known = ", ".join(self.names())
            failed = "".join(f"; {err}" for err in self._plugin_errors)
            raise ValueError(f"wkv: unknown backend {name!r} for RWKV-{version}; known backends: {known}, auto{failed}")
        return self._ops[(version, name)]

    def _load_plugins(self) -> None:
        """Import the optional `infctx.ops.cuda_*` modules once; they call `register` at import."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        from infctx import ops

        for mod in pkgutil.iter_modules(ops.__path__):
            if mod.name.startswith("cuda_"):
                try:
                    importlib.import_module(f"infctx.ops.{mod.name}")
                except ImportError as err:  # a broken optional backend must not take the torch ops down
                    self._plugin_errors.append(f"infctx.ops.{mod.name} failed to import: {err}")


REGISTRY = Registry()


def register(version: int, name: str, fn: Callable,
             available: Callable[[int], str | None] = lambda head_size: None) -> None:
    """Add (or replace) backend `name` for RWKV-`version`; `available(head_size)` says why it can't run, or None."""
    REGISTRY.register(version, name, fn, available)


def get_wkv(version: int, backend: str = "torch", head_size: int = 64) -> Callable:
    """The op for RWKV-`version` from `backend`; raises with one clear line if unknown or unusable here."""
    op = REGISTRY.lookup(version, backend)
    reason = op.available(head_size)
    if reason is not None:
        raise RuntimeError(f"wkv: backend {backend!r} for RWKV-{version} is unavailable: {reason}")
    return op.fn


def resolve_backend(name: str, device: torch.device | str, version: int = 7, head_size: int = 64) -> str:
    """Turn "auto" into a concrete backend: "cuda" on a CUDA device when its kernel is usable (for this head
    size too), else "torch".

    A concrete name is checked (known and available) and returned unchanged.
    """
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":
            try:
                get_wkv(version, "cuda", head_size)
                return "cuda"
            except (ValueError, RuntimeError) as err:
                log.info("wkv: falling back to the torch backend (%s)", err)
        return "torch"
    get_wkv(version, name, head_size)
    return name
