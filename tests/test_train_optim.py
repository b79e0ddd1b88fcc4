"""Optimizer groups and the token-driven LR schedule against hand-computed RWKV-LM values."""

import math

import pytest
import torch

from infctx.model import RWKV, ModelConfig
from infctx.train.optim import OptimConfig, lr_at, make_optimizer, param_groups


def test_schedule_matches_rwkv_lm_formulas():
    cfg = OptimConfig(lr=1e-3, lr_final=1e-4, warmup_tokens=1000, schedule="cosine")
    # warmup: lr_init * (0.01 + 0.99 * tokens / warmup)
    assert lr_at(0, cfg, 9000) == pytest.approx(1e-5)
    assert lr_at(500, cfg, 9000) == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5))
    # cosine (RWKV-LM): lr_init * ((0.5 + f/2) + (0.5 - f/2) * cos(pi * p)), f = lr_final / lr_init
    f, p = 0.1, 3000 / 9000
    assert lr_at(4000, cfg, 9000) == pytest.approx(1e-3 * ((0.5 + f / 2) + (0.5 - f / 2) * math.cos(math.pi * p)))
    assert lr_at(1000, cfg, 9000) == pytest.approx(1e-3)
    assert lr_at(10_000, cfg, 9000) == pytest.approx(1e-4)
    assert lr_at(50_000, cfg, 9000) == pytest.approx(1e-4)  # held at lr_final after the horizon
    lin = OptimConfig(lr=1e-3, lr_final=0.0, schedule="linear")
    assert lr_at(250, lin, 1000) == pytest.approx(0.75e-3)
    const = OptimConfig(lr=2e-4, schedule="constant")
    assert lr_at(10**9, const, 10) == pytest.approx(2e-4)


def test_param_groups_follow_rwkv_lm():
    model = RWKV(ModelConfig(version=7, n_layer=2, n_embd=64, head_size=16, vocab_size=50), init_weights=False)
    cfg = OptimConfig(weight_decay=0.1, decay_lr_mult=2.0)
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    names = {id(p): n for n, p in model.named_parameters()}
    fast = {names[id(p)] for p in groups["decay_params"]["params"]}
    decayed = {names[id(p)] for p in groups["weight_decay"]["params"]}
    plain = {names[id(p)] for p in groups["plain"]["params"]}
    assert fast == {"blocks.0.att.w0", "blocks.1.att.w0"}
    assert groups["decay_params"]["lr_mult"] == 2.0
    for n in decayed:
        p = dict(model.named_parameters())[n]
        assert n.endswith(".weight") and p.squeeze().dim() >= 2
    assert {"emb.weight", "head.weight", "blocks.0.att.key.weight", "blocks.0.ffn.value.weight"} <= decayed
    assert all(dict(model.named_parameters())[n].squeeze().dim() < 2 or not n.endswith(".weight") for n in plain)
    assert "blocks.0.ln1.weight" in plain and "blocks.0.att.w1" in plain  # 2-D but not `.weight`: no decay
    assert len(fast) + len(decayed) + len(plain) == len(list(model.parameters()))
    opt = make_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.1))
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"plain": 1e-3, "decay_params": 2e-3, "weight_decay": 1e-3}
    assert isinstance(opt, torch.optim.AdamW)
