"""The one RWKV skeleton (embedding, blocks, ln_out, head); versions differ only in their time-mix/channel-mix modules.

Every call takes a State and returns the next one, so a long sequence can be fed segment by segment (training) or token
by token (generation) with the same weights and the same code: `forward_one` is the T=1 case of `forward`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from infctx.model import fused
from infctx.model.channel_mix import ChannelMixV5, ChannelMixV6, ChannelMixV7
from infctx.model.config import ModelConfig
from infctx.model.state import State
from infctx.model.time_mix_v5 import TimeMixV5
from infctx.model.time_mix_v6 import TimeMixV6
from infctx.model.time_mix_v7 import TimeMixV7
from infctx.ops.fused_ce import linear_cross_entropy

log = logging.getLogger(__name__)

MODULES: dict[int, tuple[type[nn.Module], type[nn.Module]]] = {
    5: (TimeMixV5, ChannelMixV5),
    6: (TimeMixV6, ChannelMixV6),
    7: (TimeMixV7, ChannelMixV7),
}


class LMHead(nn.Linear):
    """The bias-free output projection (RWKV-LM's `head.weight`). Called with targets it returns the weighted
    cross-entropy sum through the fused head+CE op (infctx.ops.fused_ce) instead of the logits, inside its own forward:
    hooks on the module then run as for a plain call, so DeepSpeed ZeRO-3 gathers the weight for the forward and
    again for the backward, where the op hands back the weight's gradient."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, h: Tensor, targets: Tensor | None = None, weights: Tensor | None = None,
                l2_factor: float = 0.0, chunk_tokens: int = 4096) -> Tensor:
        """h [..., C] -> logits [..., V]; with targets (and per-token weights): sum_i weights_i * CE_i (0-dim)."""
        if targets is None:
            return super().forward(h)
        if weights is None:
            raise ValueError("LMHead: targets given without their per-token weights")
        return linear_cross_entropy(h, self.weight, targets, weights, l2_factor, chunk_tokens)


def norm_input(ln: nn.LayerNorm, x: Tensor) -> tuple[Tensor, fused.Norm | None]:
    """(x, ln's weight/bias/eps) for a time-mix/channel-mix module to normalise inside its first fused region (no
    fp32 LayerNorm output in memory, no separate LayerNorm kernels); (ln(x), None) where DeepSpeed ZeRO-3 partitions
    ln's weights, which only ln's own forward hook gathers."""
    if hasattr(ln.weight, "ds_id"):
        return ln(x), None
    return x, (ln.weight, ln.bias, ln.eps)


class Block(nn.Module):
    """x -> (ln0 on layer 0) -> x + att(ln1 x) -> x + ffn(ln2 x); the shift states are the last rows of ln1/ln2."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd)
        time_mix, channel_mix = MODULES[cfg.version]
        self.att = time_mix(cfg, layer_id)
        self.ffn = channel_mix(cfg, layer_id)

    def init_weights(self) -> None:
        for ln in (self.ln1, self.ln2, getattr(self, "ln0", None)):
            if ln is not None:
                ln.reset_parameters()
        self.att.init_weights()
        self.ffn.init_weights()

    def forward(
        self, x: Tensor, layer_state: tuple[Tensor, Tensor, Tensor], v_first: Tensor | None, wkv: Callable
    ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor], Tensor | None]:
        att_shift, wkv_state, ffn_shift = layer_state
        if self.layer_id == 0:
            x = self.ln0(x)
        dx, att_shift, wkv_state, v_first = self.att(*norm_input(self.ln1, x), att_shift, wkv_state, v_first, wkv)
        x = x + dx
        dx, ffn_shift = self.ffn(*norm_input(self.ln2, x), ffn_shift)
        return x + dx, (att_shift, wkv_state, ffn_shift), v_first


class RWKV(nn.Module):
    """RWKV-5/6/7 language model whose state_dict keys and shapes are RWKV-LM's .pth keys."""

    def __init__(self, cfg: ModelConfig, init_weights: bool = True):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = LMHead(cfg.n_embd, cfg.vocab_size)
        self._wkv_ops: dict[str, Callable] = {}
        if init_weights:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """RWKV-LM's init: emb uniform(+-1e-4), head orthogonal with gain 0.5*sqrt(V/C) (0.5 if V <= C), blocks per version."""
        V, C = self.cfg.vocab_size, self.cfg.n_embd
        nn.init.uniform_(self.emb.weight, -1e-4, 1e-4)
        nn.init.orthogonal_(self.head.weight, gain=0.5 * math.sqrt(V / C) if V > C else 0.5)
        self.ln_out.reset_parameters()
        for block in self.blocks:
            block.init_weights()

    def wkv_op(self, device: torch.device) -> Callable:
        """The WKV op for this config's backend on `device`, resolved (and logged) once per device type."""
        key = torch.device(device).type
        if key not in self._wkv_ops:
            from infctx import ops

            name = ops.resolve_backend(self.cfg.wkv_backend, torch.device(device), self.cfg.version, self.cfg.head_size)
            log.info("RWKV-%d WKV backend on %s: %s (asked for %r)", self.cfg.version, key, name, self.cfg.wkv_backend)
            self._wkv_ops[key] = ops.get_wkv(self.cfg.version, name, self.cfg.head_size)
        return self._wkv_ops[key]

    def zero_state(self, batch: int) -> State:
        w = self.emb.weight
        return State.zeros(self.cfg, batch, device=w.device, dtype=w.dtype)

    def forward_hidden(self, idx: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """idx [B,T] -> (hidden after ln_out [B,T,C], state after the last token)."""
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError(f"RWKV.forward expects token ids [B, T] with T >= 1, got shape {tuple(idx.shape)}")
        if state is None:
            state = self.zero_state(idx.shape[0])
        x = self.emb(idx)
        wkv = self.wkv_op(x.device)
        v_first = None
        layers = []
        for i, block in enumerate(self.blocks):
            x, layer_state, v_first = block(x, state.layer(i), v_first, wkv)
            layers.append(layer_state)
        return self.ln_out(x), State.stack(layers)

    def forward(self, idx: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """idx [B,T] -> (logits [B,T,V], new state)."""
        h, state = self.forward_hidden(idx, state)
        return self.head(h), state

    def forward_one(self, idx: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """Recurrent mode: idx [B] -> (logits [B,V], new state), the T=1 case of `forward`."""
        logits, state = self.forward(idx.view(-1, 1), state)
        return logits[:, 0], state
