"""Callbacks: rolling checkpoints with a `last` pointer, and a progress bar that counts optimizer steps.

Checkpoints are written under a temporary name and renamed when complete, so a crash mid-write never leaves a
checkpoint that looks finished; `last` is a one-line text file naming the newest one (also replaced atomically).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, TQDMProgressBar

from infctx.fileio import write_text_atomic

CKPT_RE = re.compile(r"^step-(\d+)\.ckpt$")
POINTER = "last"


def checkpoint_dir(trainer: pl.Trainer) -> Path:
    return Path(trainer.default_root_dir) / "checkpoints"


def resolve_last(ckpt_dir: str | os.PathLike) -> Path | None:
    """The checkpoint named by `ckpt_dir/last`, or None if there is none yet."""
    pointer = Path(ckpt_dir) / POINTER
    if not pointer.is_file():
        return None
    target = Path(ckpt_dir) / pointer.read_text().strip()
    return target if target.exists() else None


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


class RollingCheckpoint(Callback):
    """Save every `every_n_steps` optimizer steps and at the end of training; keep the newest `keep_last`."""

    def __init__(self, every_n_steps: int = 500, keep_last: int = 3, save_on_end: bool = True) -> None:
        if every_n_steps < 1 or keep_last < 1:
            raise ValueError("RollingCheckpoint: every_n_steps and keep_last must be >= 1")
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last
        self.save_on_end = save_on_end
        self._last_saved_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_saved_step:
            self.save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_on_end and trainer.global_step != self._last_saved_step and trainer.global_step > 0:
            self.save(trainer)

    def save(self, trainer: pl.Trainer) -> Path:
        """Collective: every rank must call it (DeepSpeed writes one shard per rank)."""
        directory = checkpoint_dir(trainer)
        step = trainer.global_step
        final = directory / f"step-{step:08d}.ckpt"
        tmp = directory / f".tmp-step-{step:08d}.ckpt"
        if trainer.is_global_zero:
            directory.mkdir(parents=True, exist_ok=True)
            _remove(tmp)
        trainer.strategy.barrier("infctx_ckpt_prepare")
        trainer.save_checkpoint(tmp, weights_only=False)
        trainer.strategy.barrier("infctx_ckpt_written")
        if trainer.is_global_zero:
            _remove(final)
            os.replace(tmp, final)
            write_text_atomic(directory / POINTER, final.name + "\n")
            self._prune(directory)
        trainer.strategy.barrier("infctx_ckpt_done")
        self._last_saved_step = step
        return final

    def _prune(self, directory: Path) -> None:
        ckpts = sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := CKPT_RE.match(p.name)))
        for _, path in ckpts[: max(len(ckpts) - self.keep_last, 0)]:
            _remove(path)

    def state_dict(self) -> dict:
        return {"last_saved_step": self._last_saved_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self._last_saved_step = state_dict.get("last_saved_step", -1)


class StepProgressBar(TQDMProgressBar):
    """tqdm bar over the micro-batches of the whole run (so it shows an ETA), with tokens/s in the postfix."""

    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        module = trainer.lightning_module
        if trainer.max_steps and trainer.max_steps > 0:
            accumulate = getattr(module, "accumulate", 1)
            return (trainer.max_steps - trainer.global_step) * accumulate
        return super().total_train_batches

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
