"""The recurrent state of a whole model, batched: what one segment hands to the next.

Per layer: the time-mix token-shift vector (last row of ln1(x)), the WKV matrix state (fp32, or float64 for a float64
model; layout S[b, h, value_i, key_j]) and the channel-mix token-shift vector (last row of ln2(x)).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from infctx.fileio import write_atomic
from infctx.model.config import ModelConfig

_FORMAT = "infctx.State/1"


def wkv_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """WKV state math is fp32 whatever the activations are, except float64 runs (used by exact gradient tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class State:
    att_shift: Tensor  # [L, B, C]
    wkv: Tensor  # [L, B, H, N, N]
    ffn_shift: Tensor  # [L, B, C]

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, device=None, dtype: torch.dtype = torch.float32) -> State:
        L, C, H, N = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size
        return cls(
            att_shift=torch.zeros(L, batch, C, device=device, dtype=dtype),
            wkv=torch.zeros(L, batch, H, N, N, device=device, dtype=wkv_dtype_for(dtype)),
            ffn_shift=torch.zeros(L, batch, C, device=device, dtype=dtype),
        )

    @classmethod
    def stack(cls, layers: Sequence[tuple[Tensor, Tensor, Tensor]]) -> State:
        """Build a State from per-layer (att_shift [B,C], wkv [B,H,N,N], ffn_shift [B,C]) tuples."""
        att, wkv, ffn = zip(*layers)
        return cls(torch.stack(att), torch.stack(wkv), torch.stack(ffn))

    def layer(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.att_shift[i], self.wkv[i], self.ffn_shift[i]

    @property
    def n_layer(self) -> int:
        return self.att_shift.shape[0]

    @property
    def batch_size(self) -> int:
        return self.att_shift.shape[1]

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.att_shift, self.wkv, self.ffn_shift

    def map(self, fn: Callable[[Tensor], Tensor]) -> State:
        return State(*(fn(t) for t in self.tensors()))

    def detach(self) -> State:
        return self.map(Tensor.detach)

    def clone(self) -> State:
        return self.map(Tensor.clone)

    def to(self, device=None, dtype: torch.dtype | None = None) -> State:
        """Move; a dtype applies to the shift vectors, the WKV state stays fp32 (float64 for float64)."""
        if dtype is None:
            return self.map(lambda t: t.to(device))
        return State(
            self.att_shift.to(device, dtype), self.wkv.to(device, wkv_dtype_for(dtype)), self.ffn_shift.to(device, dtype)
        )

    def zero_(self) -> State:
        for t in self.tensors():
            t.zero_()
        return self

    def requires_grad_(self, flag: bool = True) -> State:
        for t in self.tensors():
            t.requires_grad_(flag)
        return self

    def grads(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        return tuple(t.grad for t in self.tensors())

    def select(self, rows) -> State:
        """Rows of the batch (an index, list, slice or bool/long tensor), as a new State."""
        if isinstance(rows, int):
            rows = [rows]
        return State(self.att_shift[:, rows], self.wkv[:, rows], self.ffn_shift[:, rows])

    def save(self, path: str | os.PathLike) -> None:
        """torch.save to a temporary name, then rename, so a crash never leaves half a file."""
        payload = {"format": _FORMAT, **{k: v.detach().cpu() for k, v in zip(("att_shift", "wkv", "ffn_shift"), self.tensors())}}
        write_atomic(path, lambda tmp: torch.save(payload, tmp))

    @classmethod
    def load(cls, path: str | os.PathLike, map_location="cpu") -> State:
        try:
            payload = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:  # torch raises many types for a file that is not a torch.save archive
            raise ValueError(f"{path}: cannot read as an infctx State file ({type(err).__name__}); write it with State.save") from err
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise ValueError(f"{path}: not an infctx State file (expected format '{_FORMAT}'); write it with State.save")
        state = cls(payload["att_shift"], payload["wkv"], payload["ffn_shift"])
        L, B = state.att_shift.shape[:2]
        if state.wkv.shape[:2] != (L, B) or state.ffn_shift.shape != state.att_shift.shape:
            raise ValueError(f"{path}: inconsistent State shapes {[tuple(t.shape) for t in state.tensors()]}")
        return state
