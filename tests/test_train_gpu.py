"""GPU: the multi-backward-per-step pattern under DeepSpeed ZeRO-2 and ZeRO-3 loses no gradient.

One GPU is enough to show it: ZeRO-2/3 partition and reduce gradients even with a single rank, and a lost
segment gradient changes the gradient norm and every loss after the first step. The reference is the plain
single-device run of the same recipe from the same initial weights (an `infctx init` .pth: the plain run would
otherwise initialise on the GPU and ZeRO-3 on the CPU, with different random streams), fp32 both, so they agree to
rounding.
"""

from __future__ import annotations

import pytest
import torch

from test_train import REPO, metrics, tiny_args, write_corpus  # noqa: F401  (fixture helpers)
from infctx.checkpoint import main_init
from infctx.train.cli import main

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_corpus")
    return {"train": write_corpus(root / "train", seed=0)}


def gpu_args(corpus, run, init, *extra):
    return tiny_args(corpus, run, 3, "--model.init_from", str(init), "--trainer.accelerator", "gpu",
                     "--trainer.devices", "1",
                     "--trainer.precision", "32-true", "--model.arch.wkv_backend", "torch", *extra)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("ds_config", "fuse"), [("zero2.json", "off"), ("zero3.json", "off"), ("zero3.json", "compile")])
def test_deepspeed_gradients_equal_single_device(corpus, tmp_path, ds_config, fuse):
    """fuse=compile: the compiled elementwise regions read ZeRO-3's gathered weights like the eager ones."""
    plain, ds, init = tmp_path / "plain", tmp_path / "ds", tmp_path / "init.pth"
    assert main_init(["--n_layer", "2", "--n_embd", "32", "--head_size", "16", "--vocab", "256",
                      "--output", str(init)]) == 0
    assert main(gpu_args(corpus, plain, init, "--model.arch.fuse", fuse)) == 0
    (tmp_path / "ds.yaml").write_text(
        "trainer:\n  strategy:\n    class_path: lightning.pytorch.strategies.DeepSpeedStrategy\n"
        f"    init_args:\n      config: {REPO / 'recipes/deepspeed' / ds_config}\n")
    assert main(gpu_args(corpus, ds, init, "--model.arch.fuse", fuse, "--config", str(tmp_path / "ds.yaml"))) == 0
    a, b = metrics(plain), metrics(ds)
    seen = {s: (a[s]["train/loss"], b[s]["train/loss"], a[s].get("train/grad_norm"), b[s].get("train/grad_norm"))
            for s in (1, 2, 3)}  # (loss plain, loss ds, grad_norm plain, grad_norm ds) per step, for the message
    assert b[1]["train/loss"] == pytest.approx(a[1]["train/loss"], rel=1e-5), seen  # same start
    assert b[1]["train/grad_norm"] == pytest.approx(a[1]["train/grad_norm"], rel=1e-4), seen
    for step in (2, 3):
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], rel=1e-4, abs=1e-5), seen
