"""RWKV-6 ("x060", Finch) time mixing as RWKV-LM's RWKV-v5/src/model.py RWKV_Tmix_x060 defines it."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from infctx.model import fused
from infctx.model.common import bonus_init, channel_ramp, decay_speed, fill_, layer_ratios
from infctx.model.config import ModelConfig
from infctx.model.gated_time_mix import GatedTimeMix


class TimeMixV6(GatedTimeMix):
    """Data-dependent token shift (time_maa_* + LoRA) and data-dependent decay (time_decay + LoRA)."""

    ln_x_divisor = 1.0  # v6 folds head_size_divisor into ln_x's eps instead

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__(cfg, layer_id, ln_x_eps=1e-5 * cfg.head_size_divisor**2)
        C, A = cfg.n_embd, cfg.dim_att
        mix = lambda: nn.Parameter(torch.empty(1, 1, C))  # noqa: E731
        self.time_maa_x, self.time_maa_w, self.time_maa_k, self.time_maa_v, self.time_maa_r, self.time_maa_g = (
            mix() for _ in range(6)
        )
        self.time_maa_w1 = nn.Parameter(torch.empty(C, 5 * cfg.d_mix_lora))
        self.time_maa_w2 = nn.Parameter(torch.empty(5, cfg.d_mix_lora, C))
        self.time_decay = nn.Parameter(torch.empty(1, 1, A))
        self.time_decay_w1 = nn.Parameter(torch.empty(C, cfg.d_decay_lora))
        self.time_decay_w2 = nn.Parameter(torch.empty(cfg.d_decay_lora, A))
        self.time_faaaa = nn.Parameter(torch.empty(cfg.n_head, cfg.head_size))
        self._make_projections(cfg)  # after the time_* parameters, as RWKV-LM registers them

    @torch.no_grad()
    def init_weights(self) -> None:
        C, A = self.time_maa_x.shape[-1], self.time_decay.shape[-1]
        r01, r1a0 = layer_ratios(self.layer_id, self.n_layer)
        ddd = channel_ramp(C)
        for p in (self.time_maa_x, self.time_maa_w, self.time_maa_k):
            fill_(p, 1.0 - ddd**r1a0)
        fill_(self.time_maa_v, 1.0 - (ddd**r1a0 + 0.3 * r01))
        fill_(self.time_maa_r, 1.0 - ddd ** (0.5 * r1a0))
        fill_(self.time_maa_g, 1.0 - ddd ** (0.5 * r1a0))
        self.time_maa_w1.zero_()
        self.time_maa_w2.uniform_(-0.01, 0.01)
        fill_(self.time_decay, decay_speed(A, r01))
        self.time_decay_w1.zero_()
        self.time_decay_w2.uniform_(-0.01, 0.01)
        fill_(self.time_faaaa, bonus_init(A, r01))
        self._init_projections()

    def forward(self, x: Tensor, norm: fused.Norm | None, shift: Tensor, wkv_state: Tensor, v_first, wkv
                ) -> tuple[Tensor, Tensor, Tensor, None]:
        """As TimeMixV7.forward (x normalised by `norm` when given); v_first is unused (None)."""
        run = fused.runner(self.fuse, x)
        maas = (self.time_maa_w, self.time_maa_k, self.time_maa_v, self.time_maa_r, self.time_maa_g)
        decay = (self.time_decay, self.time_decay_w1, self.time_decay_w2)
        w, xk, xv, xr, xg, shift_out = run(fused.v6_shift_mix, x, norm, shift, self.time_maa_x, self.time_maa_w1,
                                           self.time_maa_w2, maas, decay, fused.matmul_dtype(x))
        r, k, v, g = self._rkvg(xr, xk, xv, xg)
        y, wkv_state = wkv(self._heads(r), self._heads(w), self._heads(k), self._heads(v), self.time_faaaa, wkv_state)
        return self._out(run, y, g), shift_out, wkv_state, None
