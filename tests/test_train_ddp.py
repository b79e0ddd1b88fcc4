"""Two ranks (DDP over gloo, CPU) whose micro-batches need different numbers of segments: the run must not hang,
and every step's loss, gradient norm and the final weights must equal a single process over the same global batch.

Rank r takes samples (m*2 + r) of micro-batch m; even samples count 10 targets (1 segment after trimming), odd
ones 60 (4 segments). One process with twice the batch size sees the same samples in the same steps.
L2Wrap is off: it acts on every position of the local batch with factor 1e-4/(B*T) of that batch, so it is not
invariant to how a batch is split or padded (by design in RWKV-LM, too).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from test_train import metrics

SCRIPT = textwrap.dedent('''
    import sys
    import lightning.pytorch as pl
    import torch
    from infctx.model import ModelConfig
    from infctx.train.data import InfctxDataModule
    from infctx.train.module import InfctxModule
    from infctx.train.optim import OptimConfig
    from lightning.pytorch.loggers import CSVLogger

    class VarLen(torch.utils.data.Dataset):
        """Sample i: seeded random tokens; targets counted up to 10 (even i) or 60 (odd i), then masked padding."""
        def __len__(self):
            return 10**6
        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            tokens = torch.randint(1, 256, (65,), generator=g)
            mask = torch.zeros(64)
            mask[: 10 if i % 2 == 0 else 60] = 1
            return {"input_ids": tokens[:-1], "targets": tokens[1:], "mask": mask}

    class Data(InfctxDataModule):
        def prepare_data(self):
            pass
        def setup(self, stage):
            self.train_set = VarLen()

    devices, batch, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    pl.seed_everything(7)
    arch = ModelConfig(version=7, n_layer=1, n_embd=32, head_size=16, vocab_size=256, wkv_backend="torch")
    model = InfctxModule(arch, segment_len=16, global_batch_size=4, l2wrap=False,
                         optim=OptimConfig(lr=1e-3, warmup_tokens=0, schedule="constant", eps=1e-8))
    data = Data(train="unused", ctx_len=64, batch_size=batch, num_workers=0)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                         max_steps=2, logger=CSVLogger(out, name="", version=""), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
                         use_distributed_sampler=False, log_every_n_steps=1)
    trainer.fit(model, data)
    if trainer.is_global_zero:
        torch.save({k: v.detach().cpu() for k, v in model.model.state_dict().items()}, out + "/final.pt")
''')


def run(tmp_path: Path, devices: int, batch: int) -> Path:
    out = tmp_path / f"dev{devices}"
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(devices), str(batch), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_two_ranks_with_uneven_segments_match_one_process(tmp_path):
    one, two = run(tmp_path, 1, 2), run(tmp_path, 2, 1)
    a, b = metrics(one), metrics(two)
    assert sorted(a) == sorted(b) == [1, 2]
    for step in (1, 2):
        assert b[step]["train/segments"] == a[step]["train/segments"] == 4
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], rel=1e-6)
        assert b[step]["train/grad_norm"] == pytest.approx(a[step]["train/grad_norm"], rel=1e-5)
        assert b[step]["train/tokens_seen"] == a[step]["train/tokens_seen"]
    wa, wb = torch.load(one / "final.pt"), torch.load(two / "final.pt")
    # Adam turns fp32 summation-order noise of near-zero gradients into small update differences; a lost or
    # double-counted gradient would move weights by ~lr = 1e-3 per step.
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=3e-5, msg=k)
