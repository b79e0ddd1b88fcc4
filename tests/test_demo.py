"""The recall demo's task generator, and a few-step smoke run of `infctx demo` (the real run takes ~2 minutes)."""

from __future__ import annotations

import torch

from infctx import demo


def test_recall_task_layout():
    task = demo.RecallTask(n_keys=8, n_noise=16, segment_len=8, n_segments=3)
    inputs, targets, mask, answer = task.batch(64, torch.Generator().manual_seed(0))
    T = task.length
    assert inputs.shape == targets.shape == mask.shape == (64, T)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are the next tokens
    assert torch.all(mask[:, -1] == 1) and mask.sum() == 64  # only the answer after QUERY counts
    assert torch.all(inputs[:, -1] == demo.QUERY) and torch.equal(targets[:, -1], answer)
    for row in range(64):
        marks = (inputs[row] == demo.MARK).nonzero().flatten().tolist()
        assert len(marks) == 1 and 1 <= marks[0] < task.segment_len - 1  # exactly one MARK, inside segment 1
        assert inputs[row, marks[0] + 1] == answer[row]
    keys = (inputs >= demo.FIRST_KEY) & (inputs < demo.FIRST_KEY + task.n_keys)
    assert keys.sum(1).float().mean() > 4  # distractor keys too, so the set of keys seen does not give the answer away
    assert inputs.max() < task.vocab_size


def test_demo_smoke(capsys):
    threads = torch.get_num_threads()
    rc = demo.main(["--steps", "2", "--batch", "4", "--eval-size", "8", "--segments", "2", "--segment-len", "8",
                    "--n-embd", "32", "--log-every", "1", "--threads", str(threads + 1)])
    out = capsys.readouterr().out
    assert rc == 0
    assert torch.get_num_threads() == threads  # the caller's thread count is restored
    assert "full" in out and "truncated" in out and "eval accuracy" in out
