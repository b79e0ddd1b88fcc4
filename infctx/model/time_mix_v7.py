"""RWKV-7 ("x070", goose) time mixing, as RWKV-LM's RWKV-v7/train_temp trains it, with explicit state in and out."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from infctx.model import fused
from infctx.model.common import channel_ramp, fill_, init_projection, layer_ratios, ln_x_scale, ortho_lora
from infctx.model.config import ModelConfig


class TimeMixV7(nn.Module):
    """Parameter names/shapes equal RWKV-LM's `blocks.{i}.att.*` keys (v0/v1/v2 exist on layer 0 too, unused there,
    exactly as RWKV-LM creates them, so its checkpoints load strictly)."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id, self.n_layer = layer_id, cfg.n_layer
        self.n_head, self.head_size = cfg.n_head, cfg.head_size
        self.fuse = cfg.fuse
        C = cfg.n_embd
        mix = lambda: nn.Parameter(torch.empty(1, 1, C))  # noqa: E731
        self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g = (mix() for _ in range(6))
        self.w1 = nn.Parameter(torch.empty(C, cfg.d_decay_lora))
        self.w2 = nn.Parameter(torch.empty(cfg.d_decay_lora, C))
        self.w0 = mix()
        self.a1 = nn.Parameter(torch.empty(C, cfg.d_aaa_lora))
        self.a2 = nn.Parameter(torch.empty(cfg.d_aaa_lora, C))
        self.a0 = mix()
        self.v1 = nn.Parameter(torch.empty(C, cfg.d_mv_lora))
        self.v2 = nn.Parameter(torch.empty(cfg.d_mv_lora, C))
        self.v0 = mix()
        self.g1 = nn.Parameter(torch.empty(C, cfg.d_gate_lora))
        self.g2 = nn.Parameter(torch.empty(cfg.d_gate_lora, C))
        self.k_k = mix()
        self.k_a = mix()
        self.r_k = nn.Parameter(torch.empty(cfg.n_head, cfg.head_size))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(cfg.n_head, C, eps=64e-5)  # RWKV-LM's eps for RWKV-7

    @torch.no_grad()
    def init_weights(self) -> None:
        """RWKV-LM x070 init: module formulas, then generate_init_weight's orthogonal/zero overrides of the linears."""
        C, N = self.x_r.shape[-1], self.head_size
        r01, r1a0 = layer_ratios(self.layer_id, self.n_layer)
        ddd = channel_ramp(C)
        for p, power in ((self.x_r, 0.2), (self.x_w, 0.9), (self.x_k, 0.7), (self.x_v, 0.7), (self.x_a, 0.9), (self.x_g, 0.2)):
            fill_(p, 1.0 - ddd ** (power * r1a0))
        n = torch.arange(C, dtype=torch.float64)
        linear = n / (C - 1) - 0.5
        zigzag = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
        zigzag = zigzag * zigzag.abs()
        www = -6 + 6 * (n / (C - 1)) ** (1 + r01**0.3)
        fill_(self.w0, www + 0.5 + zigzag * 2.5)
        fill_(self.a0, -0.19 + zigzag * 0.3 + linear * 0.4)
        fill_(self.v0, 0.73 - linear * 0.4)
        fill_(self.k_k, 0.71 - linear * 0.1)
        fill_(self.k_a, 1.02)
        fill_(self.r_k, -0.04)
        for down, up in ((self.w1, self.w2), (self.a1, self.a2), (self.v1, self.v2), (self.g1, self.g2)):
            down.zero_()
            ortho_lora(up, 0.1)
        for lin, gain in ((self.receptance, 1.0), (self.key, 0.1), (self.value, 1.0), (self.output, 0.0)):
            init_projection(lin, gain)
        fill_(self.ln_x.weight, ln_x_scale(self.layer_id, self.n_layer))
        self.ln_x.bias.zero_()

    def forward(
        self, x: Tensor, norm: fused.Norm | None, shift: Tensor, wkv_state: Tensor, v_first: Tensor | None, wkv
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x [B,T,C]: ln1's input when `norm` (ln1's weight, bias, eps) is given, else ln1's output; shift [B,C];
        wkv_state [B,H,N,N]. Returns (out, the shift row to carry, new wkv state, v_first). The elementwise parts
        run as infctx.model.fused regions (compiled per cfg.fuse); the WKV op between them."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        heads = lambda t: t.view(B, T, H, N)  # noqa: E731
        run, dt = fused.runner(self.fuse, x), fused.matmul_dtype(x)
        mixes = (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g)
        xr, xw, xk, xv, xa, xg, shift_out = run(fused.v7_shift_mix, x, norm, shift, mixes, dt)
        r = self.receptance(xr)
        k = self.key(xk)
        v = self.value(xv)
        if self.layer_id == 0:
            v_first = v
        else:
            v = run(fused.v7_value_residual, v, v_first, xv, self.v0, self.v1, self.v2, dt)
        w, k, a, b, g = run(fused.v7_gates, xw, xa, xg, k, (self.w0, self.w1, self.w2), (self.a0, self.a1, self.a2),
                            (self.g1, self.g2), self.k_k, self.k_a, H, dt)
        y, wkv_state = wkv(heads(r), heads(w), heads(k), heads(v), a, b, wkv_state)
        y = run(fused.v7_out, y, r, k, v, g, self.r_k, self.ln_x.weight, self.ln_x.bias, self.ln_x.eps, dt)
        return self.output(y), shift_out, wkv_state, v_first
