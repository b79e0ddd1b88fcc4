"""Pieces every RWKV version shares: the token shift with carried state, and RWKV-LM's initialisation ramps."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def token_shift(x: Tensor, prev: Tensor) -> Tensor:
    """The previous token's row at every position of x [B,T,C]; position 0 sees `prev` [B,C] (the last segment's row)."""
    return torch.cat([prev.unsqueeze(1).to(x.dtype), x[:, :-1]], dim=1)


def layer_ratios(layer_id: int, n_layer: int) -> tuple[float, float]:
    """RWKV-LM's (ratio_0_to_1, ratio_1_to_almost0) for a layer. A 1-layer model (undefined in RWKV-LM) uses 0."""
    ratio_0_to_1 = layer_id / (n_layer - 1) if n_layer > 1 else 0.0
    return ratio_0_to_1, 1.0 - layer_id / n_layer


def channel_ramp(C: int) -> Tensor:
    """ddd[i] = i / C as [1,1,C] (float64): the base of every token-shift mix init."""
    return (torch.arange(C, dtype=torch.float64) / C).view(1, 1, C)


def decay_speed(dim: int, ratio_0_to_1: float) -> Tensor:
    """RWKV-5/6 time_decay init: -6 + 5 * (n/(dim-1)) ** (0.7 + 1.3 * ratio_0_to_1), float64 [dim]."""
    n = torch.arange(dim, dtype=torch.float64)
    return -6 + 5 * (n / (dim - 1)) ** (0.7 + 1.3 * ratio_0_to_1)


def bonus_init(dim: int, ratio_0_to_1: float) -> Tensor:
    """RWKV-5/6 time_faaaa init: ratio_0_to_1 * (1 - n/(dim-1)) + ((n+1) % 3 - 1) * 0.1, float64 [dim]."""
    n = torch.arange(dim, dtype=torch.float64)
    return ratio_0_to_1 * (1 - n / (dim - 1)) + ((n + 1) % 3 - 1) * 0.1


def ln_x_scale(layer_id: int, n_layer: int) -> float:
    """RWKV-LM's generate_init_weight sets every ln_x.weight to ((1 + layer) / n_layer) ** 0.7."""
    return ((1 + layer_id) / n_layer) ** 0.7


def init_projection(linear: nn.Linear, gain: float) -> None:
    """RWKV-LM's generate_init_weight for a 2-D weight: zeros when the gain is 0, else orthogonal with that gain."""
    if gain == 0:
        nn.init.zeros_(linear.weight)
    else:
        nn.init.orthogonal_(linear.weight, gain=gain)


def ortho_lora(p: nn.Parameter, scale: float) -> None:
    """RWKV-7's ortho_init for a LoRA matrix [rows, cols]: orthogonal with gain sqrt(rows/cols) (if rows > cols) * scale."""
    rows, cols = p.shape
    gain = math.sqrt(rows / cols) if rows > cols else 1.0
    nn.init.orthogonal_(p, gain=gain * scale)


def fill_(p: nn.Parameter, value: Tensor | float) -> None:
    """Copy an init value (float64 formula or scalar) into a parameter of any shape/dtype."""
    with torch.no_grad():
        if isinstance(value, Tensor):
            p.copy_(value.reshape(p.shape))
        else:
            p.fill_(value)
