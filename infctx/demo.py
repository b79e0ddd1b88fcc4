"""`infctx demo`: a tiny RWKV-7 on CPU learns to recall a token it saw several segments earlier, with full BPTT,
while truncated BPTT (state carried, gradient cut at every segment boundary) cannot learn to store it.

The task: segment 1 holds a MARK token followed by a key; everything else is distractors (keys and noise tokens
alike, so "which keys occurred" says nothing); the last input is QUERY and the only counted target is the key that
followed MARK. Writing "the key after MARK" into the state is only rewarded through the gradient that flows back
across segment boundaries, which truncated BPTT throws away.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from infctx.bptt import BPTTConfig, BPTTEngine
from infctx.model import RWKV, ModelConfig

PAD, MARK, QUERY, FIRST_KEY = 0, 1, 2, 3


@dataclass
class RecallTask:
    n_keys: int = 8
    n_noise: int = 16
    segment_len: int = 16
    n_segments: int = 4
    key_fraction: float = 0.3  # share of distractor positions that show a (wrong) key token

    @property
    def vocab_size(self) -> int:
        return FIRST_KEY + self.n_keys + self.n_noise

    @property
    def length(self) -> int:
        return self.segment_len * self.n_segments

    def batch(self, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs [B,T], targets [B,T], mask [B,T], answer key [B]). Only the target after QUERY counts."""
        T = self.length
        keys = FIRST_KEY + torch.randint(0, self.n_keys, (size, T + 1), generator=gen)
        noise = FIRST_KEY + self.n_keys + torch.randint(0, self.n_noise, (size, T + 1), generator=gen)
        seq = torch.where(torch.rand(size, T + 1, generator=gen) < self.key_fraction, keys, noise)
        answer = FIRST_KEY + torch.randint(0, self.n_keys, (size,), generator=gen)
        rows = torch.arange(size)
        pos = torch.randint(1, self.segment_len - 1, (size,), generator=gen)  # MARK inside segment 1
        seq[:, 0] = PAD
        seq[rows, pos] = MARK
        seq[rows, pos + 1] = answer
        seq[:, T - 1] = QUERY
        seq[:, T] = answer
        mask = torch.zeros(size, T)
        mask[:, T - 1] = 1.0
        return seq[:, :-1], seq[:, 1:], mask, answer


@torch.no_grad()
def accuracy(model: RWKV, task: RecallTask, inputs: torch.Tensor, answer: torch.Tensor) -> float:
    logits, _ = model(inputs)
    return (logits[:, -1].argmax(-1) == answer).float().mean().item()


def train(mode: str, task: RecallTask, args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    cfg = ModelConfig(version=7, n_layer=args.n_layer, n_embd=args.n_embd, head_size=args.head_size,
                      vocab_size=task.vocab_size, wkv_backend="torch")
    model = RWKV(cfg)
    engine = BPTTEngine(model, BPTTConfig(segment_len=task.segment_len, mode=mode, truncate_every=1))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(args.seed + 1)
    eval_inputs, _, _, eval_answer = task.batch(args.eval_size, torch.Generator().manual_seed(args.seed + 2))
    start, loss_avg = time.time(), None
    for step in range(1, args.steps + 1):
        inputs, targets, mask, _ = task.batch(args.batch, gen)
        for group in opt.param_groups:  # short warmup, then constant
            group["lr"] = args.lr * min(1.0, step / 20)
        opt.zero_grad(set_to_none=True)
        loss = engine.forward_backward(inputs, targets, mask).loss
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_avg = loss if loss_avg is None else 0.95 * loss_avg + 0.05 * loss
        if step % args.log_every == 0 or step == args.steps:
            print(f"  [{mode:>9}] step {step:4d}  loss {loss_avg:.3f}  eval acc {accuracy(model, task, eval_inputs, eval_answer):.3f}"
                  f"  ({time.time() - start:.0f}s)", flush=True)
    return dict(mode=mode, loss=loss_avg, acc=accuracy(model, task, eval_inputs, eval_answer), seconds=time.time() - start)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="infctx demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per method")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--segment-len", type=int, default=16)
    p.add_argument("--segments", type=int, default=4, help="segments per sequence; the key is in the first")
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--head-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-size", type=int, default=512)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default="full,truncated", help="comma-separated: full, truncated")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (a model this small is fastest on one)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv or [])
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:  # callers in the same process (tests, notebooks) keep their own thread count
        torch.set_num_threads(threads_before)


def run(args: argparse.Namespace) -> int:
    task = RecallTask(segment_len=args.segment_len, n_segments=args.segments)
    print(f"recall a key seen {task.length - task.segment_len}+ tokens ({task.n_segments - 1} segment boundaries) earlier; "
          f"{task.n_keys} keys -> chance accuracy {1 / task.n_keys:.3f}; RWKV-7 L={args.n_layer} C={args.n_embd}, "
          f"{args.steps} steps of batch {args.batch} x {task.length} tokens, segment_len {task.segment_len}")
    results = [train(mode.strip(), task, args) for mode in args.modes.split(",")]
    print("\nmethod      eval accuracy   final loss   time")
    for r in results:
        print(f"{r['mode']:<11} {r['acc']:>13.3f}   {r['loss']:>10.3f}   {r['seconds']:.0f}s")
    return 0
