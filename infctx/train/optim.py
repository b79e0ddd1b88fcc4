"""Optimizer and learning-rate schedule, as RWKV-LM sets them up.

Parameter groups: AdamW with weight decay only on >=2-D `.weight` matrices, and a larger learning rate (x2 by
default) for the decay parameters (`att.w0` in RWKV-7, `att.time_decay`/`att.time_faaaa` in RWKV-5/6), which RWKV-LM
found to train better. The schedule is driven by tokens seen (not steps), so changing the batch size or resuming
with a different number of devices keeps the same curve per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch


@dataclass
class OptimConfig:
    """Recipe section `model.optim`."""

    lr: float = 6e-4
    """Peak learning rate (RWKV-LM lr_init)."""
    lr_final: float = 6e-5
    """Learning rate at the end of the decay (RWKV-LM lr_final)."""
    warmup_tokens: int = 0
    """Tokens of linear warmup from 1% of `lr` to `lr`."""
    decay_tokens: int | None = None
    """Tokens from the end of warmup to `lr_final`. None: derived from trainer.max_steps x tokens per step."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-18
    weight_decay: float = 0.0
    decay_lr_mult: float = 2.0
    """Learning-rate multiplier of the decay parameters listed in `decay_lr_params`."""
    decay_lr_params: list[str] = field(default_factory=lambda: ["att.w0", "att.time_decay", "att.time_faaaa"])
    """Parameter-name suffixes that get `decay_lr_mult`."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this value (None: no clipping)."""

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.lr_final < 0:
            raise ValueError(f"model.optim: lr must be > 0 and lr_final >= 0 (got lr={self.lr}, lr_final={self.lr_final})")
        if self.warmup_tokens < 0 or (self.decay_tokens is not None and self.decay_tokens <= 0):
            raise ValueError("model.optim: warmup_tokens must be >= 0 and decay_tokens > 0 (or null)")


def param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    """Split trainable parameters into up to three AdamW groups; each group carries its `lr_mult`."""
    decay, fast, plain = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if any(name.endswith(s) for s in cfg.decay_lr_params):
            fast.append(p)
        elif cfg.weight_decay > 0 and name.endswith(".weight") and _ndim(p) >= 2:
            decay.append(p)
        else:
            plain.append(p)
    groups = [
        {"params": plain, "weight_decay": 0.0, "lr_mult": 1.0, "name": "plain"},
        {"params": fast, "weight_decay": 0.0, "lr_mult": cfg.decay_lr_mult, "name": "decay_params"},
        {"params": decay, "weight_decay": cfg.weight_decay, "lr_mult": 1.0, "name": "weight_decay"},
    ]
    return [g for g in groups if g["params"]]


def _ndim(p: torch.Tensor) -> int:
    """Dimensions after squeezing; ZeRO-3 partitions keep the full shape in `ds_shape`."""
    shape = getattr(p, "ds_shape", p.shape)
    return sum(1 for s in shape if s != 1)


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig, cpu_offload: bool = False) -> torch.optim.Optimizer:
    """AdamW; DeepSpeed's CPU Adam (in AdamW mode) when ZeRO offloads the optimizer state to the CPU."""
    groups = param_groups(model, cfg)
    for g in groups:
        g["lr"] = cfg.lr * g["lr_mult"]
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=0.0)


def lr_at(tokens: int, cfg: OptimConfig, decay_tokens: int | None) -> float:
    """Learning rate after `tokens` tokens: warmup from 0.01*lr, then cosine/linear to lr_final (RWKV-LM)."""
    if cfg.warmup_tokens > 0 and tokens < cfg.warmup_tokens:
        return cfg.lr * (0.01 + 0.99 * tokens / cfg.warmup_tokens)
    if cfg.schedule == "constant" or not decay_tokens:
        return cfg.lr
    progress = min(max((tokens - cfg.warmup_tokens) / decay_tokens, 0.0), 1.0)
    if cfg.schedule == "linear":
        return cfg.lr + (cfg.lr_final - cfg.lr) * progress
    return cfg.lr_final + 0.5 * (cfg.lr - cfg.lr_final) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
