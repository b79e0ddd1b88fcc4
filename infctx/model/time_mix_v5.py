"""RWKV-5 ("x052", Eagle) time mixing as RWKV-LM's RWKV-v5/src/model.py RWKV_Tmix_x052 defines it."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from infctx.model import fused
from infctx.model.common import bonus_init, channel_ramp, decay_speed, fill_, layer_ratios
from infctx.model.config import ModelConfig
from infctx.model.gated_time_mix import GatedTimeMix


class TimeMixV5(GatedTimeMix):
    """Static token-shift interpolation (time_mix_*: weight of the current token) and a per-channel constant decay."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__(cfg, layer_id, ln_x_eps=1e-5)
        self.ln_x_divisor = float(cfg.head_size_divisor)
        C = cfg.n_embd
        mix = lambda: nn.Parameter(torch.empty(1, 1, C))  # noqa: E731
        self.time_mix_k, self.time_mix_v, self.time_mix_r, self.time_mix_g = (mix() for _ in range(4))
        self.time_decay = nn.Parameter(torch.empty(cfg.n_head, cfg.head_size))
        self.time_faaaa = nn.Parameter(torch.empty(cfg.n_head, cfg.head_size))
        self._make_projections(cfg)

    @torch.no_grad()
    def init_weights(self) -> None:
        C, A = self.time_mix_k.shape[-1], self.time_decay.numel()
        r01, r1a0 = layer_ratios(self.layer_id, self.n_layer)
        ddd = channel_ramp(C)
        fill_(self.time_mix_k, ddd**r1a0)
        fill_(self.time_mix_v, ddd**r1a0 + 0.3 * r01)
        fill_(self.time_mix_r, ddd ** (0.5 * r1a0))
        fill_(self.time_mix_g, ddd ** (0.5 * r1a0))
        fill_(self.time_decay, decay_speed(A, r01))
        fill_(self.time_faaaa, bonus_init(A, r01))
        self._init_projections()

    def forward(self, x: Tensor, norm: fused.Norm | None, shift: Tensor, wkv_state: Tensor, v_first, wkv
                ) -> tuple[Tensor, Tensor, Tensor, None]:
        """As TimeMixV7.forward (x normalised by `norm` when given); v_first is unused (None)."""
        run = fused.runner(self.fuse, x)
        mixes = (self.time_mix_r, self.time_mix_k, self.time_mix_v, self.time_mix_g)
        *mixed, shift_out = run(fused.v5_shift_mix, x, norm, shift, mixes, fused.matmul_dtype(x))
        r, k, v, g = self._rkvg(*mixed)
        y, wkv_state = wkv(self._heads(r), self.time_decay, self._heads(k), self._heads(v), self.time_faaaa, wkv_state)
        return self._out(run, y, g), shift_out, wkv_state, None
