"""Shared helpers for the pure-PyTorch WKV ops: dtype policy, state set-up, and the error measure of every check."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """fp32 math for every input dtype, except float64 stays float64 (for gradcheck and references)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def initial_state(s0: Tensor | None, like: Tensor, dtype: torch.dtype) -> Tensor:
    """The starting state [B,H,N,N] (value, key) in the compute dtype; zeros when s0 is None."""
    B, _, H, N = like.shape
    if s0 is None:
        return torch.zeros(B, H, N, N, device=like.device, dtype=dtype)
    if s0.shape != (B, H, N, N):
        raise ValueError(f"wkv: s0 has shape {tuple(s0.shape)}, expected [B,H,N,N] = {(B, H, N, N)}")
    return s0.to(dtype)


def check_seq(name: str, t: Tensor, like: Tensor) -> None:
    """All sequence inputs share the [B,T,H,N] shape of r."""
    if t.shape != like.shape:
        raise ValueError(f"wkv: {name} has shape {tuple(t.shape)}, expected [B,T,H,N] = {tuple(like.shape)} like r")


def wkv7_log_decay(w: Tensor) -> Tensor:
    """log of the RWKV-7 decay exp(-e^-0.5 * sigmoid(w)); always in (-0.607, 0)."""
    return -math.exp(-0.5) * torch.sigmoid(w)


def wkv6_log_decay(w: Tensor) -> Tensor:
    """log of the RWKV-5/6 decay exp(-exp(w))."""
    return -torch.exp(w)


def rel_rms(got: Tensor, ref: Tensor) -> float:
    """RMS(got - ref) / RMS(ref), in float64: the error measure of the kernel contracts (doctor, benchmarks, the
    precision study); inf where it is not finite (a NaN never passes a `<=` threshold silently)."""
    ref = ref.double()
    err = ((got.double() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()
    return err if math.isfinite(err) else math.inf
