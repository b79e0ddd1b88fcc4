"""GPU: the multi-backward-per-step pattern under DeepSpeed ZeRO-2 and ZeRO-3 loses no gradient.

One GPU is enough to show it: ZeRO-3 partitions and reduces gradients even with a single rank, and a lost
segment gradient changes the gradient norm and every loss after the first step. The reference is the plain
single-device run of the same recipe (fp32 both, so they agree to rounding).
"""

from __future__ import annotations

import pytest
import torch

from test_train import REPO, metrics, tiny_args, write_corpus  # noqa: F401  (fixture helpers)
from infctx.train.cli import main

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_corpus")
    return {"train": write_corpus(root / "train", seed=0)}


def gpu_args(corpus, run, *extra):
    return tiny_args(corpus, run, 3, "--trainer.accelerator", "gpu", "--trainer.devices", "1",
                     "--trainer.precision", "32-true", "--model.arch.wkv_backend", "torch", *extra)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("ds_config", ["zero2.json", "zero3.json"])
def test_deepspeed_gradients_equal_single_device(corpus, tmp_path, ds_config):
    plain, ds = tmp_path / "plain", tmp_path / "ds"
    assert main(gpu_args(corpus, plain)) == 0
    (tmp_path / "ds.yaml").write_text(
        "trainer:\n  strategy:\n    class_path: lightning.pytorch.strategies.DeepSpeedStrategy\n"
        f"    init_args:\n      config: {REPO / 'recipes/deepspeed' / ds_config}\n")
    assert main(gpu_args(corpus, ds, "--config", str(tmp_path / "ds.yaml"))) == 0
    a, b = metrics(plain), metrics(ds)
    assert b[1]["train/grad_norm"] == pytest.approx(a[1]["train/grad_norm"], rel=1e-4)
    for step in (1, 2, 3):
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], rel=1e-4, abs=1e-5), step
