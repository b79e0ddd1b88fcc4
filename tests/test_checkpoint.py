"""RWKV-LM .pth checkpoints: init/read round trips, config inference, clear mismatch errors, export from Lightning and
DeepSpeed ZeRO checkpoints, and the main check: what we export loads in the `rwkv` pip package (ChatRWKV's runtime)
and gives the same logits and states as our model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from infctx.checkpoint import (
    CheckpointError,
    atomic_save,
    infer_config,
    load_model,
    load_pth,
    load_state_file,
    main_export,
    main_init,
    model_weights,
    read_tensors,
    save_pth,
    state_from_rwkv_pip,
    state_to_rwkv_pip,
    state_to_time_state,
)
from infctx.model import RWKV, ModelConfig, State

HERE = Path(__file__).parent


def tiny_cfg(version: int, **kw) -> ModelConfig:
    sizes = dict(version=version, n_layer=2, n_embd=128, vocab_size=97, head_size=64, wkv_backend="torch")
    return ModelConfig(**{**sizes, **kw})


def noisy_model(version: int, seed: int = 0, **kw) -> RWKV:
    """RWKV-LM init plus noise: the init zeroes output projections, which would make every block a no-op."""
    torch.manual_seed(seed)
    model = RWKV(tiny_cfg(version, **kw))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def random_state(cfg: ModelConfig, seed: int) -> State:
    g = torch.Generator().manual_seed(seed)
    state = State.zeros(cfg, 1)
    return State(*(torch.randn(t.shape, generator=g) * 0.5 for t in state.tensors()))


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------------ init / read


@pytest.mark.parametrize("version", [5, 6, 7])
def test_init_writes_rwkv_lm_init_and_reads_back(version, tmp_path):
    out = tmp_path / "m.pth"
    rc = main_init(["--version", str(version), "--n_layer", "2", "--n_embd", "128", "--vocab", "97", "--seed", "3",
                    "--output", str(out), "--dtype", "fp32"])
    assert rc == 0
    cfg = ModelConfig(version=version, n_layer=2, n_embd=128, vocab_size=97)
    torch.manual_seed(3)
    reference = RWKV(cfg).state_dict()
    on_disk = read_tensors(out)
    assert_same_tensors(on_disk, reference)
    assert infer_config(on_disk) == cfg
    assert_same_tensors(load_pth(out), reference)
    assert_same_tensors(load_model(out).state_dict(), reference)
    assert not [p for p in tmp_path.iterdir() if p.name != "m.pth"], "a temporary file was left behind"


def test_init_bf16_and_load_dtype(tmp_path):
    out = tmp_path / "m.pth"
    assert main_init(["--version", "7", "--n_layer", "1", "--n_embd", "64", "--vocab", "50", "--output", str(out)]) == 0
    fp32 = read_tensors(out)
    assert main_init(["--version", "7", "--n_layer", "1", "--n_embd", "64", "--vocab", "50", "--output", str(out),
                      "--dtype", "bf16"]) == 0
    bf16 = read_tensors(out)
    assert all(t.dtype == torch.bfloat16 for t in bf16.values())
    assert_same_tensors(bf16, {k: v.bfloat16() for k, v in fp32.items()})
    model = load_model(out, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(model.emb.weight, bf16["emb.weight"].float())


def test_loaded_model_never_writes_back_to_the_mapped_file(tmp_path):
    out = tmp_path / "m.pth"
    save_pth(RWKV(tiny_cfg(7, n_embd=64)), out, torch.float32)
    before = read_tensors(out)["emb.weight"].clone()
    model = load_model(out)  # fp32 from an fp32 file: parameters are the memory-mapped tensors themselves
    with torch.no_grad():
        model.emb.weight.add_(1.0)
    assert model.emb.weight.requires_grad
    assert torch.equal(read_tensors(out)["emb.weight"], before)


def test_rwkv7_file_without_layer0_value_residual_loads(tmp_path):
    """Layer 0 never reads att.v0/v1/v2 (it defines v_first); a file stripped of them loads with the same logits."""
    model = noisy_model(7)
    stripped = {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}
    weights = {k: v.clone() for k, v in model.state_dict().items() if k not in stripped}
    assert len(weights) == len(model.state_dict()) - 3
    torch.save(weights, tmp_path / "stripped.pth")
    loaded = load_model(tmp_path / "stripped.pth", wkv_backend="torch").eval()
    assert torch.count_nonzero(loaded.blocks[0].att.v1) == 0 and loaded.cfg.d_mv_lora == model.cfg.d_mv_lora
    idx = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)


@pytest.mark.parametrize("cfg", [
    ModelConfig(version=5, n_layer=3, n_embd=128, vocab_size=300, head_size=32, dim_ffn=256),
    ModelConfig(version=6, n_layer=2, n_embd=256, vocab_size=70, head_size=64, dim_att=128, d_mix_lora=16,
                d_decay_lora=48),
    ModelConfig(version=7, n_layer=4, n_embd=192, vocab_size=65, head_size=32, dim_ffn=512, d_decay_lora=64,
                d_aaa_lora=32, d_mv_lora=96, d_gate_lora=160),
], ids=["v5", "v6", "v7"])
def test_infer_config_reads_every_size_from_the_tensors(cfg):
    with torch.device("meta"):  # shapes are all that is read
        tensors = RWKV(cfg, init_weights=False).state_dict()
    assert infer_config(tensors) == cfg


def test_mismatch_with_recipe_is_one_line_naming_tensor_and_shapes(tmp_path):
    path = tmp_path / "m.pth"
    save_pth(RWKV(tiny_cfg(7, n_embd=64)), path, torch.float32)
    with pytest.raises(CheckpointError) as err:
        load_pth(path, tiny_cfg(7, n_embd=64, vocab_size=100))
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    assert "'emb.weight' has shape (97, 64) in the file but the model expects (100, 64)" in msg
    with pytest.raises(CheckpointError, match=r"'blocks\.2\.ln1\.weight' is missing \(the model expects shape \(64,\)\)"):
        load_pth(path, tiny_cfg(7, n_embd=64, n_layer=3))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'blocks\.1\.ln1\.weight'"):
        load_pth(path, tiny_cfg(7, n_embd=64, n_layer=1))
    with pytest.raises(CheckpointError, match="an RWKV-7 checkpoint but the model config says version 6"):
        load_model(path, tiny_cfg(6, n_embd=64))


def test_bad_files_give_one_clear_line(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="cannot be read as a PyTorch checkpoint") as err:
        read_tensors(text)
    assert "\n" not in str(err.value)
    other = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, other)
    with pytest.raises(CheckpointError, match="'emb.weight' is missing"):
        load_pth(other)
    v4ish = {"emb.weight": torch.zeros(5, 8), "blocks.0.att.time_decay": torch.zeros(8)}
    with pytest.raises(CheckpointError, match="only RWKV-5.2/6/7 are supported"):
        infer_config(v4ish)
    with pytest.raises(FileNotFoundError):
        load_pth(tmp_path / "missing.pth")


def test_atomic_save_leaves_the_old_file_on_failure(tmp_path):
    path = tmp_path / "m.pth"
    atomic_save({"a": torch.ones(2)}, path)
    with pytest.raises(Exception):
        atomic_save({"a": lambda: 0}, path)  # not picklable: torch.save fails half-way
    assert torch.equal(torch.load(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["m.pth"]


# ------------------------------------------------------------------------------ the rwkv pip package as oracle


def run_rwkv_pip(version: int, request: dict, tmp_path: Path) -> dict:
    req, res = tmp_path / "request.pt", tmp_path / "result.pt"
    torch.save({**request, "version": version}, req)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RWKV_")}
    if version == 7:
        env["RWKV_V7_ON"] = "1"  # the rwkv package's own switch for its RWKV-7 code path
    env["RWKV_JIT_ON"] = "0"  # its TorchScript compile costs seconds and changes no number
    proc = subprocess.run([sys.executable, str(HERE / "rwkv_pip_export_runner.py"), str(req), str(res)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(res)


@pytest.mark.parametrize("version", [5, 6, 7])
def test_exported_pth_runs_in_rwkv_pip_with_the_same_logits_and_states(version, tmp_path):
    """Export through the CLI from a Lightning-style checkpoint, then compare the rwkv package's parallel logits,
    recurrent logits and carried state with ours (fp32, CPU), plus both state layout conversions."""
    model = noisy_model(version, seed=version)
    cfg = model.cfg
    ckpt = tmp_path / "run.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    pth = tmp_path / "exported.pth"
    assert main_export([str(ckpt), "--output", str(pth), "--dtype", "fp32"]) == 0

    tokens = torch.randint(0, cfg.vocab_size, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    more = [5, 17, 3, 60]
    given = random_state(cfg, seed=2)
    request = dict(model=str(pth), tokens=tokens, more=more, state=state_to_rwkv_pip(given, version))
    if version in (5, 6):  # the package reads a merged time_state for v5/v6 only
        tuned = tmp_path / "tuned.pth"
        save_pth({**read_tensors(pth), **state_to_time_state(given)}, tuned, torch.float32)
        request["time_state_model"] = str(tuned)
    theirs = run_rwkv_pip(version, request, tmp_path)

    ours_model = load_model(pth)
    with torch.no_grad():
        logits, after_prompt = ours_model(torch.tensor([tokens]))
        one, state = [], after_prompt
        for token in more:
            out, state = ours_model.forward_one(torch.tensor([token]), state)
            one.append(out[0])
        from_state = ours_model(torch.tensor([tokens]), given)[0][0]
    tol = dict(rtol=1e-4, atol=2e-4)
    assert logits.abs().max() > 1.0, "logits too flat for the comparison to mean anything"
    torch.testing.assert_close(logits[0].double(), theirs["seq_logits"], **tol)
    torch.testing.assert_close(torch.stack(one).double(), theirs["one_logits"], **tol)
    torch.testing.assert_close(from_state.double(), theirs["from_state_logits"], **tol)
    theirs_state = state_from_rwkv_pip(theirs["state"], cfg)
    for ours_t, theirs_t in zip(after_prompt.tensors(), theirs_state.tensors()):
        torch.testing.assert_close(ours_t, theirs_t, **tol)
    if version in (5, 6):
        time_state_only = State(torch.zeros_like(given.att_shift), given.wkv, torch.zeros_like(given.ffn_shift))
        with torch.no_grad():
            tuned_logits = ours_model(torch.tensor([tokens]), time_state_only)[0][0]
        torch.testing.assert_close(tuned_logits.double(), theirs["time_state_logits"], **tol)


# ------------------------------------------------------------------------------------------ training checkpoints


def test_export_from_lightning_run_directory(tmp_path, capsys):
    model = noisy_model(6, seed=1)
    weights = model.state_dict()
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    older = {k: torch.zeros_like(v) for k, v in weights.items()}
    torch.save({"state_dict": {f"model.{k}": v for k, v in older.items()}, "global_step": 1}, run / "step=1.ckpt")
    lightning = {"state_dict": {f"model.{k}": v for k, v in weights.items()}, "global_step": 9, "epoch": 0,
                 "optimizer_states": [{"state": {}}], "infctx": {"tokens_seen": 123}}
    torch.save(lightning, run / "last.ckpt")
    os.utime(run / "step=1.ckpt")  # the newer file by time; 'last' must still win

    out = tmp_path / "out.pth"
    assert main_export([str(tmp_path / "run"), "--output", str(out)]) == 0
    exported = read_tensors(out)
    assert_same_tensors(exported, {k: v.bfloat16() for k, v in weights.items()})
    assert "RWKV-6 L2 D128" in capsys.readouterr().out

    # infctx fit's layout: checkpoints/step-*.ckpt plus a one-line `last` pointer naming the newest.
    (run / "last.ckpt").rename(run / "step-00000009.ckpt")
    (run / "last").write_text("step-00000009.ckpt\n")
    os.utime(run / "step=1.ckpt")
    assert main_export([str(tmp_path / "run"), "--output", str(out), "--dtype", "fp32"]) == 0
    assert_same_tensors(read_tensors(out), weights)


def test_model_weights_finds_the_prefix():
    w = {"emb.weight": torch.ones(1), "head.weight": torch.ones(1), "blocks.0.ln1.weight": torch.ones(1)}
    assert model_weights(w, "pth").keys() == w.keys()
    for prefix in ("model.", "_forward_module.model.", "module.net."):
        wrapped = {f"{prefix}{k}": v for k, v in w.items()}
        wrapped["loss_scale"] = torch.ones(1)  # outside the model: dropped
        wrapped[f"{prefix}blocks.0.ffn.s_emb.weight"] = torch.zeros(1)  # ends in 'emb.weight' but is not it
        assert model_weights(wrapped, "ckpt").keys() == {*w, "blocks.0.ffn.s_emb.weight"}
    with pytest.raises(CheckpointError, match="holds no RWKV model"):
        model_weights({"model.emb.weight": torch.ones(1)}, "ckpt")


def test_export_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {"model.layer.weight": torch.ones(2)}}, bad)
    assert main_export([str(bad), "--output", str(tmp_path / "o.pth")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no RWKV model" in err
    assert main_export([str(tmp_path / "empty_dir_missing"), "--output", str(tmp_path / "o.pth")]) == 2
    (tmp_path / "emptyrun").mkdir()
    assert main_export([str(tmp_path / "emptyrun"), "--output", str(tmp_path / "o.pth")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o.pth").exists()


def test_export_tuned_state_in_both_formats(tmp_path):
    """A checkpoint with RWKV-LM state-tuning tensors (blocks.N.att.time_state): the model goes to the .pth, the
    state to an infctx State file or an RWKV-LM time_state file, and both load back as the same State."""
    model = noisy_model(7, seed=4)
    cfg = model.cfg
    tuned = random_state(cfg, seed=5)
    ckpt = tmp_path / "tuned.ckpt"
    sd = {**model.state_dict(), **state_to_time_state(tuned)}
    torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}}, ckpt)
    for fmt in ("infctx", "rwkv"):
        state_path = tmp_path / f"state-{fmt}.pt"
        rc = main_export([str(ckpt), "--output", str(tmp_path / "m.pth"), "--dtype", "fp32",
                          "--state-output", str(state_path), "--state-format", fmt])
        assert rc == 0
        assert_same_tensors(read_tensors(tmp_path / "m.pth"), model.state_dict())
        loaded = load_state_file(state_path, cfg)
        assert torch.equal(loaded.wkv, tuned.wkv)
        assert not loaded.att_shift.any() and not loaded.ffn_shift.any()  # RWKV-LM tunes only the wkv state
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, plain)
    assert main_export([str(plain), "--output", str(tmp_path / "m2.pth"), "--state-output", "s.pt"]) == 2


def test_state_conversions_round_trip():
    cfg = tiny_cfg(6)
    state = random_state(cfg, seed=0)
    pip = state_to_rwkv_pip(state, 6)
    assert torch.equal(pip[1], state.wkv[0, 0].transpose(-1, -2))  # v5/v6 package: [H, key, value]
    back = state_from_rwkv_pip(pip, cfg)
    for a, b in zip(back.tensors(), state.tensors()):
        assert torch.equal(a, b)
    assert torch.equal(state_to_rwkv_pip(state, 7)[1], state.wkv[0, 0])  # v7 package: [H, value, key] like ours


# ----------------------------------------------------------------------------------------------- DeepSpeed ZeRO

ZERO_WRITER = r"""
import os, sys, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
# DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce on first use (~40 s); one process needs none.
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
torch.distributed.init_process_group("gloo", rank=0, world_size=1)
from infctx.model import RWKV, ModelConfig

class Wrapper(torch.nn.Module):  # like a LightningModule holding the model as .model
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = RWKV(ModelConfig(version=7, n_layer=2, n_embd=64, vocab_size=50, wkv_backend="torch-naive"))
    def forward(self, idx):
        return self.model(idx)[0].square().mean()

out = {}
for stage in (2, 3):
    net = Wrapper()
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage},
           "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=net, config=cfg, model_parameters=net.parameters())
    loss = engine(torch.randint(0, 50, (1, 8)))
    engine.backward(loss)
    engine.step()
    engine.save_checkpoint(os.path.join(sys.argv[1], f"zero{stage}"))
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        out[stage] = {k[len("model."):]: p.detach().clone() for k, p in params.items()}
torch.save(out, sys.argv[2])
"""


def test_export_from_deepspeed_zero2_and_zero3_checkpoints(tmp_path):
    """Real ZeRO-2/3 checkpoints written by DeepSpeed (CPU accelerator, one gloo process) after one Adam step."""
    pytest.importorskip("deepspeed")
    expected_path = tmp_path / "expected.pt"
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    with socket.socket() as probe:  # a free TCP port for the one-process gloo group
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    proc = subprocess.run([sys.executable, "-c", ZERO_WRITER, str(tmp_path), str(expected_path), port], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = torch.load(expected_path)
    torch.manual_seed(0)
    init = RWKV(ModelConfig(version=7, n_layer=2, n_embd=64, vocab_size=50)).state_dict()
    for stage in (2, 3):
        out = tmp_path / f"zero{stage}.pth"
        assert main_export([str(tmp_path / f"zero{stage}"), "--output", str(out), "--dtype", "fp32"]) == 0
        exported = read_tensors(out)
        assert_same_tensors(exported, expected[stage])
        assert not torch.equal(exported["blocks.0.att.receptance.weight"], init["blocks.0.att.receptance.weight"])
