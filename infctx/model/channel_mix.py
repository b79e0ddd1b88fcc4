"""Channel mixing (the FFN) of RWKV-5/6/7 with the token-shift vector passed in explicitly.

RWKV-7: value(relu(key(mix(x)))^2). RWKV-5/6 add a sigmoid receptance gate; they differ only in how the mix is
parametrised (v5 time_mix_*: weight of the current token; v6 time_maa_*: weight of the previous one).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from infctx.model import fused
from infctx.model.common import channel_ramp, fill_, init_projection, layer_ratios
from infctx.model.config import ModelConfig


class ChannelMixV7(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id, self.n_layer = layer_id, cfg.n_layer
        self.fuse = cfg.fuse
        self.x_k = nn.Parameter(torch.empty(1, 1, cfg.n_embd))
        self.key = nn.Linear(cfg.n_embd, cfg.dim_ffn, bias=False)
        self.value = nn.Linear(cfg.dim_ffn, cfg.n_embd, bias=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        _, r1a0 = layer_ratios(self.layer_id, self.n_layer)
        fill_(self.x_k, 1.0 - channel_ramp(self.x_k.shape[-1]) ** (r1a0**4))
        init_projection(self.key, 1.0)
        init_projection(self.value, 0.0)

    def forward(self, x: Tensor, norm: fused.Norm | None, shift: Tensor) -> tuple[Tensor, Tensor]:
        """x: ln2's input when `norm` is given, else ln2's output. Returns (out, the shift row to carry)."""
        run = fused.runner(self.fuse, x)
        return run(fused.v7_channel_mix, x, norm, shift, self.x_k, self.key.weight, self.value.weight)


class GatedChannelMix(nn.Module):
    """RWKV-5/6 FFN: sigmoid(receptance(xr)) * value(relu(key(xk))^2). Subclasses name the two mixes (k, r), their
    init, and the fused region that applies them (infctx.model.fused.v5/v6_channel_mix)."""

    region: Callable

    def __init__(self, cfg: ModelConfig, layer_id: int, names: tuple[str, str]):
        super().__init__()
        self.layer_id, self.n_layer = layer_id, cfg.n_layer
        self.fuse = cfg.fuse
        self._mix_names = names
        for name in names:
            self.register_parameter(name, nn.Parameter(torch.empty(1, 1, cfg.n_embd)))
        self.key = nn.Linear(cfg.n_embd, cfg.dim_ffn, bias=False)
        self.receptance = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.value = nn.Linear(cfg.dim_ffn, cfg.n_embd, bias=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Both mixes start at the subclass's ramp; key orthogonal, receptance and value zero (generate_init_weight)."""
        _, r1a0 = layer_ratios(self.layer_id, self.n_layer)
        ramp = channel_ramp(self.key.in_features) ** r1a0
        for name in self._mix_names:
            fill_(getattr(self, name), self._mix_init(ramp))
        init_projection(self.key, 1.0)
        init_projection(self.receptance, 0.0)
        init_projection(self.value, 0.0)

    def forward(self, x: Tensor, norm: fused.Norm | None, shift: Tensor) -> tuple[Tensor, Tensor]:
        """As ChannelMixV7.forward."""
        run = fused.runner(self.fuse, x)
        mix_k, mix_r = (getattr(self, name) for name in self._mix_names)
        return run(self.region, x, norm, shift, mix_k, mix_r, self.key.weight, self.receptance.weight,
                   self.value.weight)


class ChannelMixV6(GatedChannelMix):
    region = staticmethod(fused.v6_channel_mix)

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__(cfg, layer_id, ("time_maa_k", "time_maa_r"))

    @staticmethod
    def _mix_init(ramp: Tensor) -> Tensor:
        return 1.0 - ramp


class ChannelMixV5(GatedChannelMix):
    region = staticmethod(fused.v5_channel_mix)

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__(cfg, layer_id, ("time_mix_k", "time_mix_r"))

    @staticmethod
    def _mix_init(ramp: Tensor) -> Tensor:
        return ramp
