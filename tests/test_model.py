"""RWKV-5/6/7 model: RWKV-LM key table, init formulas, the `rwkv` pip package as an oracle, parallel == recurrent, State."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from infctx.model import RWKV, ModelConfig, State
from model_helpers import one_thread, tiny_config, tiny_model  # noqa: F401 (autouse fixture)

VERSIONS = (5, 6, 7)

# Hand-written RWKV-LM keys for n_layer=2, n_embd=64, head_size=16 (H=4), vocab 97. Shapes as RWKV-LM's .pth holds them.
COMMON_TOP = {"emb.weight": (97, 64), "ln_out.weight": (64,), "ln_out.bias": (64,), "head.weight": (97, 64)}
LN = {f"{ln}.{p}": (64,) for ln in ("ln1", "ln2") for p in ("weight", "bias")}
LN0 = {"ln0.weight": (64,), "ln0.bias": (64,)}
BLOCK_KEYS = {
    7: {
        **{f"att.x_{c}": (1, 1, 64) for c in "rwkvag"},
        "att.w0": (1, 1, 64), "att.w1": (64, 32), "att.w2": (32, 64),
        "att.a0": (1, 1, 64), "att.a1": (64, 32), "att.a2": (32, 64),
        "att.v0": (1, 1, 64), "att.v1": (64, 32), "att.v2": (32, 64),
        "att.g1": (64, 32), "att.g2": (32, 64),
        "att.k_k": (1, 1, 64), "att.k_a": (1, 1, 64), "att.r_k": (4, 16),
        **{f"att.{p}.weight": (64, 64) for p in ("receptance", "key", "value", "output")},
        "att.ln_x.weight": (64,), "att.ln_x.bias": (64,),
        "ffn.x_k": (1, 1, 64), "ffn.key.weight": (256, 64), "ffn.value.weight": (64, 256),
    },
    6: {
        **{f"att.time_maa_{c}": (1, 1, 64) for c in "xwkvrg"},
        "att.time_maa_w1": (64, 160), "att.time_maa_w2": (5, 32, 64),
        "att.time_decay": (1, 1, 64), "att.time_decay_w1": (64, 64), "att.time_decay_w2": (64, 64),
        "att.time_faaaa": (4, 16),
        **{f"att.{p}.weight": (64, 64) for p in ("receptance", "key", "value", "output", "gate")},
        "att.ln_x.weight": (64,), "att.ln_x.bias": (64,),
        "ffn.time_maa_k": (1, 1, 64), "ffn.time_maa_r": (1, 1, 64),
        "ffn.key.weight": (224, 64), "ffn.receptance.weight": (64, 64), "ffn.value.weight": (64, 224),
    },
    5: {
        **{f"att.time_mix_{c}": (1, 1, 64) for c in "kvrg"},
        "att.time_decay": (4, 16), "att.time_faaaa": (4, 16),
        **{f"att.{p}.weight": (64, 64) for p in ("receptance", "key", "value", "output", "gate")},
        "att.ln_x.weight": (64,), "att.ln_x.bias": (64,),
        "ffn.time_mix_k": (1, 1, 64), "ffn.time_mix_r": (1, 1, 64),
        "ffn.key.weight": (224, 64), "ffn.receptance.weight": (64, 64), "ffn.value.weight": (64, 224),
    },
}


@pytest.mark.parametrize("version", VERSIONS)
def test_parameter_names_and_shapes_are_rwkv_lm_keys(version):
    expected = dict(COMMON_TOP)
    for i in range(2):
        block = {**LN, **BLOCK_KEYS[version], **(LN0 if i == 0 else {})}
        expected.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    got = {k: tuple(v.shape) for k, v in RWKV(tiny_config(version)).state_dict().items()}
    assert got == expected


def test_config_derives_rwkv_lm_sizes():
    v7 = ModelConfig(version=7, n_embd=768)  # RWKV-7 0.1B: w1 [768,64], a1 [768,64], v1 [768,32], g1 [768,128]
    assert (v7.d_decay_lora, v7.d_aaa_lora, v7.d_mv_lora, v7.d_gate_lora, v7.dim_ffn) == (64, 64, 32, 128, 3072)
    v6 = ModelConfig(version=6, n_embd=768)
    assert (v6.d_mix_lora, v6.d_decay_lora, v6.dim_ffn, v6.n_head) == (32, 64, 2688, 12)
    assert ModelConfig(version=5, n_embd=2560).dim_ffn == 8960
    with pytest.raises(ValueError, match="version"):
        ModelConfig(version=4)
    with pytest.raises(ValueError, match="head_size"):
        ModelConfig(version=7, n_embd=100, head_size=64)


def _orthogonal_gain(w: torch.Tensor) -> float:
    """Asserts w has orthogonal rows or columns (whichever are fewer) with one common norm; returns that norm."""
    m = w.double() @ w.double().T if w.shape[0] <= w.shape[1] else w.double().T @ w.double()
    gain2 = m.diagonal().mean().item()
    torch.testing.assert_close(m, torch.eye(m.shape[0], dtype=torch.float64) * gain2, atol=1e-5, rtol=0)
    return math.sqrt(gain2)


def test_init_v7_matches_rwkv_lm_formulas():
    model = RWKV(tiny_config(7))  # L=2, C=64, N=16
    C, N, L = 64, 16, 2
    for i, block in enumerate(model.blocks):
        att = block.att
        r01, r1a0 = i / (L - 1), 1 - i / L
        for c in (0, 8, 40, 63):
            zig = ((c % N) - (N - 1) / 2) / ((N - 1) / 2)
            zig *= abs(zig)
            lin = c / (C - 1) - 0.5
            www = -6 + 6 * (c / (C - 1)) ** (1 + r01**0.3)
            assert att.w0[0, 0, c].item() == pytest.approx(www + 0.5 + zig * 2.5, abs=1e-6)
            assert att.a0[0, 0, c].item() == pytest.approx(-0.19 + zig * 0.3 + lin * 0.4, abs=1e-6)
            assert att.v0[0, 0, c].item() == pytest.approx(0.73 - lin * 0.4, abs=1e-6)
            assert att.k_k[0, 0, c].item() == pytest.approx(0.71 - lin * 0.1, abs=1e-6)
            assert att.x_r[0, 0, c].item() == pytest.approx(1 - (c / C) ** (0.2 * r1a0), abs=1e-6)
            assert att.x_a[0, 0, c].item() == pytest.approx(1 - (c / C) ** (0.9 * r1a0), abs=1e-6)
            assert block.ffn.x_k[0, 0, c].item() == pytest.approx(1 - (c / C) ** (r1a0**4), abs=1e-6)
        assert att.w0[0, 0, 0].item() == pytest.approx(-8.0) and att.w0[0, 0, 63].item() == pytest.approx(3.0)
        assert torch.all(att.k_a == 1.02) and torch.all(att.r_k == -0.04)
        assert torch.allclose(att.ln_x.weight, torch.tensor(((1 + i) / L) ** 0.7))
        for lora in (att.w1, att.a1, att.v1, att.g1):
            assert torch.all(lora == 0)
        for lora in (att.w2, att.a2, att.v2, att.g2):
            assert _orthogonal_gain(lora) == pytest.approx(0.1, rel=1e-5)
        assert _orthogonal_gain(att.receptance.weight) == pytest.approx(1.0, rel=1e-5)
        assert _orthogonal_gain(att.key.weight) == pytest.approx(0.1, rel=1e-5)
        assert _orthogonal_gain(att.value.weight) == pytest.approx(1.0, rel=1e-5)
        assert _orthogonal_gain(block.ffn.key.weight) == pytest.approx(1.0, rel=1e-5)
        assert torch.all(att.output.weight == 0) and torch.all(block.ffn.value.weight == 0)
    assert model.emb.weight.abs().max().item() <= 1e-4 and model.emb.weight.std().item() > 3e-5
    assert _orthogonal_gain(model.head.weight) == pytest.approx(0.5 * math.sqrt(97 / 64), rel=1e-5)


@pytest.mark.parametrize("version", (5, 6))
def test_init_v5_v6_match_rwkv_lm_formulas(version):
    model = RWKV(tiny_config(version))
    C, L = 64, 2
    for i, block in enumerate(model.blocks):
        att, ffn = block.att, block.ffn
        r01, r1a0 = i / (L - 1), 1 - i / L
        decay, bonus = att.time_decay.flatten(), att.time_faaaa.flatten()
        for c in (0, 5, 31, 63):
            assert decay[c].item() == pytest.approx(-6 + 5 * (c / (C - 1)) ** (0.7 + 1.3 * r01), abs=1e-6)
            assert bonus[c].item() == pytest.approx(r01 * (1 - c / (C - 1)) + ((c + 1) % 3 - 1) * 0.1, abs=1e-6)
            ramp = (c / C) ** r1a0
            if version == 6:
                assert att.time_maa_v[0, 0, c].item() == pytest.approx(1 - (ramp + 0.3 * r01), abs=1e-6)
                assert att.time_maa_g[0, 0, c].item() == pytest.approx(1 - (c / C) ** (0.5 * r1a0), abs=1e-6)
                assert ffn.time_maa_k[0, 0, c].item() == pytest.approx(1 - ramp, abs=1e-6)
            else:
                assert att.time_mix_v[0, 0, c].item() == pytest.approx(ramp + 0.3 * r01, abs=1e-6)
                assert att.time_mix_r[0, 0, c].item() == pytest.approx((c / C) ** (0.5 * r1a0), abs=1e-6)
                assert ffn.time_mix_r[0, 0, c].item() == pytest.approx(ramp, abs=1e-6)
        if version == 6:
            assert torch.all(att.time_maa_w1 == 0) and torch.all(att.time_decay_w1 == 0)
            for w2 in (att.time_maa_w2, att.time_decay_w2):
                assert w2.abs().max().item() <= 0.01 and w2.std().item() > 0.004
        assert _orthogonal_gain(att.gate.weight) == pytest.approx(0.1, rel=1e-5)
        assert _orthogonal_gain(att.key.weight) == pytest.approx(0.1, rel=1e-5)
        for zero in (att.output.weight, ffn.value.weight, ffn.receptance.weight):
            assert torch.all(zero == 0)
        assert torch.allclose(att.ln_x.weight, torch.tensor(((1 + i) / L) ** 0.7))
    expected_eps = 1e-5 * 64 if version == 6 else 1e-5
    assert model.blocks[0].att.ln_x.eps == pytest.approx(expected_eps)


@pytest.mark.parametrize("version", VERSIONS)
def test_logits_match_rwkv_pip_package(version, tmp_path):
    """The `rwkv` pip package (ChatRWKV's runtime, written independently of this repo) loads our state_dict as an
    RWKV-LM .pth and must produce the same per-token logits."""
    model = tiny_model(version, seed=version)
    tokens = torch.randint(0, 97, (48,), generator=torch.Generator().manual_seed(1))
    torch.save(model.state_dict(), tmp_path / "m.pth")
    torch.save(tokens, tmp_path / "t.pt")
    env = dict(os.environ, RWKV_JIT_ON="0", RWKV_CUDA_ON="0", RWKV_V7_ON="1" if version == 7 else "0")
    oracle = Path(__file__).with_name("rwkv_pip_oracle.py")
    args = [sys.executable, str(oracle), str(tmp_path / "m.pth"), str(tmp_path / "t.pt"), str(tmp_path / "o.pt")]
    run = subprocess.run(args + (["V7"] if version == 7 else []), env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    expected = torch.load(tmp_path / "o.pt")
    with torch.no_grad():
        logits, _ = model(tokens[None])
    assert expected.abs().max() > 1.0  # the blocks really contribute (noise switched every path on)
    torch.testing.assert_close(logits[0].double(), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("version", VERSIONS)
def test_parallel_equals_recurrent(version):
    """One parallel call over 200 tokens == 200 forward_one calls == three uneven parallel segments, B=2, fp32."""
    model = tiny_model(version, seed=10 + version)
    idx = torch.randint(0, 97, (2, 200), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole, s_whole = model(idx)
        state, steps = None, []
        for t in range(idx.shape[1]):
            logits, state = model.forward_one(idx[:, t], state)
            steps.append(logits)
        seg_state, segs = None, []
        for a, b in ((0, 1), (1, 77), (77, 200)):
            logits, seg_state = model(idx[:, a:b], seg_state)
            segs.append(logits)
    torch.testing.assert_close(torch.stack(steps, 1), whole, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(segs, 1), whole, atol=2e-5, rtol=1e-5)
    for got in (state, seg_state):
        for x, y in zip(got.tensors(), s_whole.tensors()):
            torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-5)
    assert s_whole.wkv.dtype == torch.float32 and s_whole.wkv.abs().max() > 0.1


def test_state_shapes_and_shift_rows():
    model = tiny_model(7)
    idx = torch.randint(0, 97, (3, 9))
    with torch.no_grad():
        _, state = model(idx)
        x = model.blocks[0].ln0(model.emb(idx))
        ln1_last = model.blocks[0].ln1(x)[:, -1]
    assert tuple(state.att_shift.shape) == (2, 3, 64) and tuple(state.ffn_shift.shape) == (2, 3, 64)
    assert tuple(state.wkv.shape) == (2, 3, 4, 16, 16)
    torch.testing.assert_close(state.att_shift[0], ln1_last)  # the shift state is the last row of ln1(x)


def test_state_save_load_select_detach_zero(tmp_path):
    model = tiny_model(7, seed=3)
    idx = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(4))
    nxt = torch.randint(0, 97, (3, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, state = model(idx)
        state.save(tmp_path / "s.pt")
        loaded = State.load(tmp_path / "s.pt")
        for x, y in zip(loaded.tensors(), state.tensors()):
            assert torch.equal(x, y)
        assert not (tmp_path / "s.pt.tmp").exists()
        # select(rows) carries exactly those sequences: continuing row 2 alone equals row 2 of the batch
        full, _ = model(nxt, loaded)
        alone, _ = model(nxt[[2]], loaded.select(2))
        pair, _ = model(nxt[[0, 2]], loaded.select([0, 2]))
    torch.testing.assert_close(alone[0], full[2], atol=5e-6, rtol=0)
    torch.testing.assert_close(pair, full[[0, 2]], atol=5e-6, rtol=0)
    grad_state = State.zeros(model.cfg, 1).requires_grad_()
    assert all(not t.requires_grad for t in grad_state.detach().tensors())
    as64 = state.to(dtype=torch.float64)
    assert as64.att_shift.dtype == torch.float64 and as64.wkv.dtype == torch.float64
    as16 = state.to(dtype=torch.bfloat16)
    assert as16.att_shift.dtype == torch.bfloat16 and as16.wkv.dtype == torch.float32  # WKV state stays fp32
    state.zero_()
    assert all(t.abs().sum() == 0 for t in state.tensors())
    (tmp_path / "bad.pt").write_bytes(b"not a state")
    with pytest.raises(Exception, match="bad.pt"):
        State.load(tmp_path / "bad.pt")


@pytest.mark.parametrize("version", VERSIONS)
def test_head_size_128_parallel_equals_recurrent(version):
    model = tiny_model(version, seed=30 + version, n_embd=128, head_size=128)
    assert model.cfg.n_head == 1 and tuple(model.zero_state(1).wkv.shape) == (2, 1, 1, 128, 128)
    idx = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        whole, _ = model(idx)
        state, steps = None, []
        for t in range(idx.shape[1]):
            logits, state = model.forward_one(idx[:, t], state)
            steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, 1), whole, atol=2e-5, rtol=1e-5)
