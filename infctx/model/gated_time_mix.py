"""What RWKV-5 and RWKV-6 time mixing share: r/k/v/gate projections, a SiLU gate, GroupNorm ln_x and the output."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from infctx.model import fused
from infctx.model.common import fill_, init_projection, ln_x_scale
from infctx.model.config import ModelConfig


class GatedTimeMix(nn.Module):
    """Base of TimeMixV5/TimeMixV6; subclasses add their mixing/decay parameters and `forward`."""

    ln_x_divisor: float  # the WKV output is divided by this before ln_x (RWKV-5: head_size_divisor)

    def __init__(self, cfg: ModelConfig, layer_id: int, ln_x_eps: float):
        super().__init__()
        self.layer_id, self.n_layer = layer_id, cfg.n_layer
        self.n_head, self.head_size = cfg.n_head, cfg.head_size
        self._ln_x_eps = ln_x_eps
        self.fuse = cfg.fuse

    def _make_projections(self, cfg: ModelConfig) -> None:
        C, A = cfg.n_embd, cfg.dim_att
        self.receptance = nn.Linear(C, A, bias=False)
        self.key = nn.Linear(C, A, bias=False)
        self.value = nn.Linear(C, A, bias=False)
        self.output = nn.Linear(A, C, bias=False)
        self.gate = nn.Linear(C, A, bias=False)
        self.ln_x = nn.GroupNorm(cfg.n_head, A, eps=self._ln_x_eps)

    def _init_projections(self) -> None:
        """generate_init_weight: receptance/value orthogonal 1, key/gate 0.1, output zero, ln_x layer scale."""
        for lin, gain in ((self.receptance, 1.0), (self.key, 0.1), (self.value, 1.0), (self.output, 0.0), (self.gate, 0.1)):
            init_projection(lin, gain)
        fill_(self.ln_x.weight, ln_x_scale(self.layer_id, self.n_layer))
        self.ln_x.bias.data.zero_()

    def _heads(self, t: Tensor) -> Tensor:
        B, T, _ = t.shape
        return t.view(B, T, self.n_head, self.head_size)

    def _rkvg(self, xr: Tensor, xk: Tensor, xv: Tensor, xg: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """r, k, v and the gate projection (its SiLU is applied in `_out`, fused with ln_x)."""
        return self.receptance(xr), self.key(xk), self.value(xv), self.gate(xg)

    def _out(self, run: Callable, y: Tensor, gate: Tensor) -> Tensor:
        """y: WKV output [B,T,H,N] -> ln_x (per head, after / ln_x_divisor) -> * silu(gate) -> output projection."""
        ln = self.ln_x
        return self.output(run(fused.gated_out, y, gate, ln.weight, ln.bias, ln.eps, self.ln_x_divisor,
                               fused.matmul_dtype(gate)))
