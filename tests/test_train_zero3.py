"""DeepSpeed on CPU with the trainer's settings for one backward per segment (several per optimizer step).

ZeRO-2 (unmanaged accumulation, deepspeed_segment_config) and ZeRO-3 (InfctxModule.configure_model under
deepspeed.zero.Init as Lightning's DeepSpeedStrategy calls it, each backward closed as its own micro-step): segmented
full BPTT with zero-weight padding segments gives the plain model's loss and gradients, and DeepSpeed's own gradient
norm equals the plain one. Without the settings ZeRO-2 keeps only the last segment's gradient. Lightning's
DeepSpeedStrategy needs a GPU, so this drives DeepSpeed directly: CPU accelerator, one gloo process, every
parameter partitioned (persistence threshold 0).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

ZERO_RUNNER = r"""
import dataclasses, os, sys, types, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # no shared-memory all-reduce build for one process
torch.distributed.init_process_group("gloo", rank=0, world_size=1)
from deepspeed.utils import safe_get_full_grad
from infctx.bptt import BPTTEngine
from infctx.model import RWKV, ModelConfig
from infctx.train.module import InfctxModule, deepspeed_after_backward, deepspeed_segment_config

for stage, version in ((2, 7), (3, 5), (3, 6), (3, 7)):
    DS = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True, "gradient_clipping": 1.0,
          "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0, "overlap_comm": True,
                                "contiguous_gradients": True}}
    deepspeed_segment_config(DS)  # what InfctxModule.setup does to the strategy's config
    arch = ModelConfig(version=version, n_layer=2, n_embd=64, head_size=16, vocab_size=64, wkv_backend="torch")
    torch.manual_seed(version)
    ref = RWKV(arch)
    module = InfctxModule(arch, segment_len=8)
    module._trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(zero_stage_3=stage == 3, config=DS),
                                            is_global_zero=True)
    if stage == 3:
        module._init_state = ref.state_dict()  # what setup() prepares on rank 0
        with deepspeed.zero.Init(config_dict_or_path=DS):
            module.configure_model()
        assert all(p.ds_tensor is not None and p.numel() == 0 for p in module.model.parameters()), "not partitioned"
    else:
        module.configure_model()
        module.model.load_state_dict(ref.state_dict())
    engine, *_ = deepspeed.initialize(model=module.model, config=DS,
                                      optimizer=torch.optim.AdamW(module.model.parameters(), lr=1e-3))

    def backward(loss):  # InfctxModule._backward without Lightning's manual_backward wrapper
        engine.backward(loss)
        deepspeed_after_backward(engine)

    module.engine.backward = backward
    tokens = torch.randint(0, 64, (2, 25), generator=torch.Generator().manual_seed(1))  # 3 segments of 8
    got = module.engine.forward_backward(tokens[:, :-1], tokens[:, 1:], min_segments=5)  # + 2 padding segments
    # the fused head+CE runs under ZeRO-3 too (inside the head module's forward, where DeepSpeed gathers its weight);
    # the reference takes the checkpointed head, an independent path
    assert module.engine._fused_head()
    ref_cfg = dataclasses.replace(module.bptt_cfg, fused_ce=False)
    want = BPTTEngine(ref, ref_cfg).forward_backward(tokens[:, :-1], tokens[:, 1:])
    assert abs(got.loss - want.loss) <= 1e-6 * abs(want.loss), (stage, version, got.loss, want.loss)
    worst, n = 0.0, 0
    for (name, p), q in zip(module.model.named_parameters(), ref.parameters()):
        if stage != 3:  # unmanaged ZeRO-2 reduces at step(); its gradients show in the norm and the update below
            break
        g = safe_get_full_grad(p)
        if q.grad is None:
            assert g is None or not g.any(), (stage, version, name)
            continue
        assert g is not None, (stage, version, name, "no gradient")
        worst = max(worst, ((g - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-12)).item())
        n += 1
    assert worst <= 1e-5, (stage, version, worst)
    engine.step()  # DeepSpeed's own norm of the accumulated gradient (before clipping) = the plain model's
    norm = torch.nn.utils.clip_grad_norm_([q for q in ref.parameters() if q.grad is not None], 1.0).item()
    assert abs(engine.get_global_grad_norm() - norm) <= 1e-5 * norm, (stage, version, engine.get_global_grad_norm(), norm)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    ref_opt.step()  # the clipped AdamW update equals DeepSpeed's
    for (name, p), q in zip(module.model.named_parameters(), ref.parameters()):
        with deepspeed.zero.GatheredParameters([p]) if stage == 3 else torch.no_grad():
            assert torch.allclose(p.detach(), q.detach(), rtol=1e-5, atol=1e-6), (stage, version, name)
    print(f"stage {stage} v{version}: loss {got.loss:.6f}, {n} gradients, worst rel diff {worst:.1e}, norm {norm:.4g}")
    engine.destroy()
"""


def _run_one_process(runner: str, tmp_path) -> str:
    """Run a DeepSpeed script as one gloo process on the CPU accelerator; returns its stdout."""
    with socket.socket() as probe:  # a free TCP port for the one-process gloo group
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-c", runner, port], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_zero_segmented_bptt_gradients_equal_plain(tmp_path):
    pytest.importorskip("deepspeed")
    out = _run_one_process(ZERO_RUNNER, tmp_path)
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("stage")] == [
        "stage 2 v7", "stage 3 v5", "stage 3 v6", "stage 3 v7"]

GUARD_RUNNER = r"""
import os, sys, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
torch.distributed.init_process_group("gloo", rank=0, world_size=1)
from infctx.model import RWKV, ModelConfig
from infctx.train.module import GradWatch, deepspeed_discard_grads, deepspeed_grads_finite, deepspeed_segment_config

for stage, offload in ((0, False), (1, False), (2, False), (2, True), (3, False)):
    DS = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
          "zero_force_ds_cpu_optimizer": False,  # offload with torch's AdamW: no cpu_adam build in a test
          "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0,
                                **({"offload_optimizer": {"device": "cpu"}} if offload else {})}}
    deepspeed_segment_config(DS)  # the trainer's settings (unmanaged accumulation below ZeRO-3)
    torch.manual_seed(0)
    model = RWKV(ModelConfig(version=7, n_layer=2, n_embd=64, head_size=16, vocab_size=64, wkv_backend="torch"))
    engine, *_ = deepspeed.initialize(model=model, config=DS,
                                      optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3))
    tokens = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(0))
    poison = [False]  # while set, a NaN gradient in one weight (the loss stays finite)
    weight = dict(model.named_parameters())["blocks.1.ffn.value.weight"]
    weight.register_hook(lambda g: torch.full_like(g, float("nan")) if poison[0] else g)
    watch = GradWatch(model.parameters())  # as InfctxModule.on_train_start makes it (used by unmanaged ZeRO-2)
    verdicts = []
    for poison[0] in (False, True, False):
        for _ in range(2):  # two backwards per step, as segments make them
            logits = engine(tokens[:, :-1])[0]
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
            assert torch.isfinite(loss)
            engine.backward(loss)
        verdicts.append(deepspeed_grads_finite(engine, watch))
        if verdicts[-1]:
            engine.step()
        else:
            deepspeed_discard_grads(engine)  # what the guard does with a skipped step
        watch.reset()
    for name, p in model.named_parameters():  # the skipped step's NaN did not reach the weights in a later step
        with deepspeed.zero.GatheredParameters([p]) if stage == 3 else torch.no_grad():
            assert torch.isfinite(p).all(), (stage, offload, name)
    print(f"stage {stage}{' offload' if offload else ''}: {verdicts}")
    engine.destroy()
"""


def test_deepspeed_nan_gradient_is_detected_before_the_step(tmp_path):
    """The guard's gradient check under DeepSpeed (ZeRO stages 0-3, and ZeRO-2 with CPU offload): a NaN in one weight's
    gradient with a finite loss is caught before DeepSpeed's step; after the guard discards it, the next step is clean."""
    pytest.importorskip("deepspeed")
    out = _run_one_process(GUARD_RUNNER, tmp_path)
    assert [line for line in out.splitlines() if line.startswith("stage")] == [
        f"stage {s}: [True, False, True]" for s in ("0", "1", "2", "2 offload", "3")]
