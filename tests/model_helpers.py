"""Small shared helpers for the model / BPTT tests (tiny configs, weights with every path switched on)."""

from __future__ import annotations

import pytest
import torch

from infctx.model import RWKV, ModelConfig


def tiny_config(version: int, **overrides) -> ModelConfig:
    kw = dict(version=version, n_layer=2, n_embd=64, head_size=16, vocab_size=97, wkv_backend="torch")
    kw.update(overrides)
    return ModelConfig(**kw)


def tiny_model(version: int, seed: int = 0, noise: float = 0.1, dtype=torch.float32, **overrides) -> RWKV:
    """RWKV-LM init plus noise: at init output/value projections are zero, so without noise the blocks would add
    nothing and the state would not matter to the logits (tests would pass vacuously)."""
    torch.manual_seed(seed)
    model = RWKV(tiny_config(version, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    return model.to(dtype)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and far more predictably when other test processes share the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
