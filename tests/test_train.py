"""End-to-end trainer tests on CPU: a short run of the default recipe, exact resume after a SIGKILL, the NaN guard
with an injected bad batch, recipe errors, and the 2-process (DDP/gloo) run against a single process.

Besides the default-recipe run, every run uses a tiny RWKV-7 (L2 D32) on a hand-written byte-level binidx corpus,
a few steps each.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from infctx.data.binidx import IndexedDatasetWriter
from infctx.train.cli import main

REPO = Path(__file__).resolve().parents[1]
SENTENCES = [
    "the quick brown fox jumps over the lazy dog. ",
    "a recurrent state carries the past from one segment to the next. ",
    "rwkv trains like a transformer and runs like an rnn. ",
]


def write_corpus(prefix: Path, n_docs: int = 40, seed: int = 0) -> str:
    """Byte-level documents (vocab 256, EOD 0) of repeated sentences: easy to learn, so the loss visibly falls."""
    rng = np.random.default_rng(seed)
    writer = IndexedDatasetWriter(prefix, np.uint16)
    for _ in range(n_docs):
        text = "".join(SENTENCES[i] for i in rng.integers(0, len(SENTENCES), size=6))
        writer.add_document(np.frombuffer(text.encode(), dtype=np.uint8).astype(np.uint16).tolist() + [0])
    writer.finalize()
    return str(prefix)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("corpus")
    return {"train": write_corpus(root / "train", seed=0), "val": write_corpus(root / "val", n_docs=8, seed=1)}


def tiny_args(corpus: dict, run: Path, steps: int, *extra: str) -> list[str]:
    return [
        "fit", "--config", str(REPO / "recipes/cpu-demo.yaml"),
        "--data.train", corpus["train"], "--data.val", "null", "--data.build", "null",
        "--data.ctx_len", "48", "--data.batch_size", "2", "--data.num_workers", "0",
        "--model.arch.n_layer", "2", "--model.arch.n_embd", "32", "--model.arch.head_size", "16",
        "--model.segment_len", "16", "--model.global_batch_size", "4",
        "--model.optim.warmup_tokens", "200", "--model.optim.lr", "3e-3",
        "--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(run),
        "--trainer.enable_progress_bar", "false", "--checkpoint.every_n_steps", "2", "--checkpoint.keep_last", "2",
        *extra,
    ]


def metrics(run: Path) -> dict[int, dict[str, float]]:
    rows: dict[int, dict[str, float]] = {}
    with open(run / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                rows[int(row["step"])] = {k: float(v) for k, v in row.items() if v not in ("", None)}
    return rows


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


def test_make_train_default_recipe_short(tmp_path, capsys):
    """`make train` = `infctx fit --config recipes/cpu-demo.yaml`, cut to 6 steps; its binidx is built on the fly
    from the bundled sample (data/configs/sample.yaml, outputs redirected to tmp)."""
    import yaml

    cfg = yaml.safe_load((REPO / "data/configs/sample.yaml").read_text())
    for build in cfg["builds"]:
        build["inputs"] = [str(REPO / i) for i in build["inputs"]]
        build["output"] = str(tmp_path / "built" / Path(build["output"]).name)
    cfg["progress"] = False
    (tmp_path / "sample.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    args = ["fit", "--config", str(REPO / "recipes/cpu-demo.yaml"), "--data.build", str(tmp_path / "sample.yaml"),
            "--data.train", str(tmp_path / "built/train"), "--data.val", str(tmp_path / "built/val"),
            "--trainer.max_steps", "6", "--trainer.val_check_interval", "6", "--trainer.limit_val_batches", "1",
            "--checkpoint.every_n_steps", "2", "--trainer.default_root_dir", str(run),
            "--trainer.enable_progress_bar", "false"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "RWKV-7 L2 D64" in out and "2,048 tokens per optimizer step" in out and "4 segments per sequence" in out
    rows = metrics(run)
    assert sorted(rows) == list(range(1, 7))
    losses = [rows[s]["train/loss"] for s in range(1, 7)]
    assert losses[-1] < losses[0] - 0.5, losses  # it learns
    assert [rows[s]["train/tokens_seen"] for s in (1, 6)] == [2048.0, 6 * 2048.0]
    assert rows[1]["train/lr"] == pytest.approx(3e-5)  # warmup starts at 1% of lr
    assert all(rows[s]["train/segments"] == 4 for s in rows)
    ckpts = run / "checkpoints"
    assert (ckpts / "last").read_text().strip() == "step-00000006.ckpt"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-00000004.ckpt", "step-00000006.ckpt"]  # keep 2
    assert not list(ckpts.glob(".tmp*"))
    with open(run / "metrics.csv") as f:
        assert any(r.get("val/loss") for r in csv.DictReader(f))
    from infctx.train.plot import main as plot

    assert plot([str(run)]) == 0 and (run / "loss.png").stat().st_size > 0 and (run / "tokens_per_s.png").is_file()


KILLER = """
import os, signal
from lightning.pytorch.callbacks import Callback

class KillAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
"""


def test_resume_after_kill_is_exact(corpus, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(tiny_args(corpus, full, 5)) == 0
    (tmp_path / "killer.py").write_text(KILLER)
    (tmp_path / "kill.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: killer.KillAt\n      init_args: {step: 3}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "infctx.cli", *tiny_args(corpus, killed, 5),
                           "--config", str(tmp_path / "kill.yaml")], env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (killed / "checkpoints/last").read_text().strip() == "step-00000002.ckpt"
    assert main(tiny_args(corpus, killed, 5, "--ckpt_path", "last")) == 0
    a, b = metrics(full), metrics(killed)
    for step in (3, 4, 5):  # steps after the checkpoint: identical loss, lr and tokens
        for key in ("train/loss", "train/lr", "train/tokens_seen", "train/grad_norm"):
            assert b[step][key] == a[step][key], (step, key)
    wa, wb = weights(full / "checkpoints/step-00000005.ckpt"), weights(killed / "checkpoints/step-00000005.ckpt")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


class PoisonBatches(Callback):
    """Makes the embedding output NaN for the given micro-batches: loss and gradients become non-finite."""

    def __init__(self, batches: list[int]):
        self.batches = set(batches)
        self.seen = 0
        self.handle = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.seen in self.batches or -1 in self.batches:
            self.handle = pl_module.model.emb.register_forward_hook(lambda m, i, out: out * float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen += 1
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def test_nan_guard_skips_dumps_and_stops(corpus, tmp_path, capsys):
    run = tmp_path / "nan"
    poison = ["--trainer.callbacks+=test_train.PoisonBatches", "--trainer.callbacks.batches=[2]"]
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        assert main(tiny_args(corpus, run, 3, *poison)) == 0
    dump = torch.load(run / "nan_dumps/step-00000001-rank0.pt", weights_only=False)
    assert dump["step"] == 1 and len(dump["batches"]) == 2  # the 2 micro-batches of the skipped step
    assert dump["batches"][0]["input_ids"].shape == (2, 48)
    rows = metrics(run)
    assert sorted(rows) == [1, 2, 3] and all(np.isfinite(r["train/loss"]) for r in rows.values())
    w = weights(run / "checkpoints/step-00000003.ckpt")
    assert all(torch.isfinite(t).all() for t in w.values())

    stop = ["--trainer.callbacks+=test_train.PoisonBatches", "--trainer.callbacks.batches=[-1]",
            "--model.max_bad_steps", "2"]
    with pytest.warns(RuntimeWarning):
        assert main(tiny_args(corpus, tmp_path / "stop", 3, *stop)) == 1
    assert "stopped after 2 consecutive non-finite steps" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        (["--model.segment_length", "8"], "segment_length"),
        (["--model.segment_len", "0"], "model.segment_len must be a positive integer (got 0)"),
        (["--data.train", "/nonexistent/corpus"], "data: binidx /nonexistent/corpus.bin/.idx not found"),
        (["--ckpt_path", "last"], "--ckpt_path last: no checkpoint under"),
    ],
)
def test_config_errors_are_one_clear_line(corpus, tmp_path, capsys, override, message):
    assert main(tiny_args(corpus, tmp_path / "err", 2, *override)) == 2
    err = capsys.readouterr().err
    assert message in err
    if "unknown" not in message and "segment_length" not in message:
        lines = [line for line in err.splitlines() if line.startswith("infctx fit: error:")]
        assert len(lines) == 1 and "Traceback" not in err


def test_init_from_pth_starts_where_the_export_left_off(corpus, tmp_path):
    from infctx.checkpoint import read_training_checkpoint, save_pth

    first = tmp_path / "first"
    assert main(tiny_args(corpus, first, 6, "--model.optim.lr", "1e-2")) == 0
    save_pth(read_training_checkpoint(first), tmp_path / "trained.pth", dtype=torch.float32)
    second = tmp_path / "second"
    assert main(tiny_args(corpus, second, 1, "--model.init_from", str(tmp_path / "trained.pth"))) == 0
    a, b = metrics(first), metrics(second)
    assert abs(b[1]["train/loss"] - a[6]["train/loss"]) < abs(a[1]["train/loss"] - a[6]["train/loss"]) / 3
    assert main(tiny_args(corpus, tmp_path / "bad", 1, "--model.init_from", str(tmp_path / "missing.pth"))) == 2


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_every_recipe_parses(recipe, capsys):
    """Each shipped recipe (and the ZeRO-3 check layered on the 0.1B one) is a valid config: unknown or mistyped keys
    fail here rather than on a GPU machine."""
    configs = ["--config", str(REPO / "recipes" / recipe)]
    if recipe == "rwkv7-0.1b-zero3-check.yaml":
        configs = ["--config", str(REPO / "recipes/rwkv7-0.1b-pretrain.yaml")] + configs
    assert main(["fit", *configs, "--print_config"]) == 0
    assert "model:" in capsys.readouterr().out
