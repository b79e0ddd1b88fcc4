"""Typed model configuration: every size the RWKV-LM checkpoint implies, with RWKV-LM's defaults derived when left None.

The derived fields are filled in `__post_init__`, so a config read back from a checkpoint (or printed into a run log)
always says exactly which shapes the model has.
"""

from __future__ import annotations

from dataclasses import dataclass

FUSE_MODES = ("off", "compile", "auto")


def _lora_dim(factor: float, n_embd: int) -> int:
    """RWKV-7's suggested LoRA width: a multiple of 32 near factor*sqrt(C), at least 32 (RWKV-LM train_temp)."""
    return max(32, int(round(factor * n_embd**0.5 / 32) * 32))


@dataclass
class ModelConfig:
    """Shapes and options of one RWKV model (version 5 = "x052", 6 = "x060", 7 = "x070" in RWKV-LM)."""

    version: int = 7
    n_layer: int = 12
    n_embd: int = 768
    vocab_size: int = 65536
    head_size: int = 64
    dim_att: int | None = None  # None = n_embd (RWKV-7 requires dim_att == n_embd)
    dim_ffn: int | None = None  # None = 4*n_embd for v7, int(3.5*n_embd)//32*32 for v5/v6
    head_size_divisor: int = 8  # v5 divides the WKV output by it before ln_x; v6 scales ln_x eps by its square
    wkv_backend: str = "auto"  # "auto" | "torch" | "torch-naive" | "cuda" | "fla" (see infctx.ops)
    # The non-WKV elementwise parts of each block (token-shift mixes, gates, ln_x + bonus + gate, relu^2 FFN):
    # "off" = plain PyTorch (the reference), "compile" = through torch.compile on any device, "auto" = compile when
    # the activations are on a CUDA device. See infctx.model.fused.
    fuse: str = "off"
    # LoRA widths; None = RWKV-LM's value for this version and size.
    d_mix_lora: int | None = None  # v6 time_maa_w1 is [C, 5*d_mix_lora]
    d_decay_lora: int | None = None  # v6 time_decay_w1 / v7 w1
    d_aaa_lora: int | None = None  # v7 a1
    d_mv_lora: int | None = None  # v7 v1
    d_gate_lora: int | None = None  # v7 g1

    def __post_init__(self) -> None:
        if self.version not in (5, 6, 7):
            raise ValueError(f"ModelConfig.version must be 5, 6 or 7 (got {self.version!r})")
        for name in ("n_layer", "n_embd", "vocab_size", "head_size", "head_size_divisor"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer (got {value!r})")
        if self.dim_att is None:
            self.dim_att = self.n_embd
        if self.version == 7 and self.dim_att != self.n_embd:
            raise ValueError(f"ModelConfig.dim_att must equal n_embd for RWKV-7 (got {self.dim_att} vs {self.n_embd})")
        if self.dim_att % self.head_size:
            raise ValueError(
                f"ModelConfig.dim_att={self.dim_att} is not a multiple of head_size={self.head_size}: pick sizes that divide"
            )
        if self.dim_ffn is None:
            self.dim_ffn = 4 * self.n_embd if self.version == 7 else int(self.n_embd * 3.5) // 32 * 32
        C = self.n_embd
        defaults = {
            6: dict(d_mix_lora=32, d_decay_lora=64),
            7: dict(
                d_decay_lora=_lora_dim(2.5, C), d_aaa_lora=_lora_dim(2.5, C), d_mv_lora=_lora_dim(1.7, C),
                d_gate_lora=_lora_dim(5.0, C),
            ),
        }.get(self.version, {})
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if not isinstance(self.wkv_backend, str) or not self.wkv_backend:
            raise ValueError(f"ModelConfig.wkv_backend must be a backend name such as 'auto' (got {self.wkv_backend!r})")
        if self.fuse not in FUSE_MODES:
            raise ValueError(f"ModelConfig.fuse must be one of {', '.join(map(repr, FUSE_MODES))} (got {self.fuse!r})")

    @property
    def n_head(self) -> int:
        return self.dim_att // self.head_size
