"""The data module: binidx samplers (infctx.data) behind resumable, rank-split DataLoaders.

Samples are numbered globally 0, 1, 2, ...; micro-batch m of rank r takes samples start + (m*W + r)*B + [0, B).
`start` is the module's `samples_seen` restored from the checkpoint, so a resumed run sees exactly the samples the
uninterrupted run would have seen next, whatever the DataLoader prefetched before the crash.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Iterator, Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from infctx.train.errors import ConfigError


class RankSampler(Sampler[int]):
    """Endless global sample indices for one rank, starting after the `start` samples already consumed."""

    def __init__(self, start: int, rank: int, world: int, batch_size: int, limit: int | None = None) -> None:
        self.start, self.rank, self.world, self.batch_size, self.limit = start, rank, world, batch_size, limit

    def __iter__(self) -> Iterator[int]:
        m = 0
        while True:
            first = self.start + (m * self.world + self.rank) * self.batch_size
            if self.limit is not None and first + self.batch_size > self.limit:
                return
            yield from range(first, first + self.batch_size)
            m += 1


def collate(samples: list[dict], trim_padding: bool) -> dict:
    """Stack samples; optionally drop trailing columns whose targets are masked out in every row (SFT padding),
    so short batches run fewer segments. Ranks then agree on the segment count in the module."""
    batch = {k: torch.stack([s[k] for s in samples]) for k in ("input_ids", "targets")}
    if "mask" in samples[0] and samples[0]["mask"] is not None:
        mask = torch.stack([s["mask"] for s in samples]).float()
        batch["mask"] = mask
        if trim_padding:
            used = mask.any(dim=0).nonzero()
            keep = int(used[-1]) + 1 if len(used) else 1
            batch = {k: v[:, :keep] for k, v in batch.items()}
    return batch


class InfctxDataModule(pl.LightningDataModule):
    def __init__(
        self,
        train: str,
        val: str | None = None,
        build: str | None = None,
        mode: Literal["stream", "document", "sft"] = "stream",
        ctx_len: int = 4096,
        batch_size: int = 1,
        seed: int = 0,
        num_workers: int = 1,
        val_samples: int = 64,
        trim_padding: bool = True,
        bucket_size: int = 0,
    ) -> None:
        """
        Args:
            train: binidx path prefix of the training data (`<prefix>.bin` / `<prefix>.idx`), or a blend of
                several with weights: "a@0.7,b@0.3".
            val: binidx path prefix of held-out data for validation (None: no validation).
            build: data-builder config (`infctx data build --config`) that writes `train`/`val` when missing.
            mode: "stream" = RWKV-LM magic-prime slots over the token stream; "document" = samples start at
                document starts (short ones packed); "sft" = document mode with the loss-mask sidecar.
            ctx_len: tokens per training sequence (cut into model.segment_len segments).
            batch_size: sequences per micro-batch per device.
            seed: sampler seed (the order is a function of seed and sample index only).
            num_workers: DataLoader worker processes.
            val_samples: validation sequences per evaluation (split across ranks).
            trim_padding: drop trailing all-masked columns of a batch (only with masks).
            bucket_size: document/sft modes: sort each block of this many samples by length so batches trim well.
        """
        super().__init__()
        if ctx_len < 2:
            raise ConfigError(f"data.ctx_len must be >= 2 (got {ctx_len})")
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1 (got {batch_size})")
        self.train_prefix, self.val_prefix, self.build = train, val, build
        self.mode, self.ctx_len, self.batch_size, self.seed = mode, ctx_len, batch_size, seed
        self.num_workers, self.val_samples, self.trim_padding = num_workers, val_samples, trim_padding
        self.bucket_size = bucket_size
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    # ------------------------------------------------------------ preparing the files
    def prepare_data(self) -> None:
        """Runs on one process: build the binidx from the data config if the recipe points at missing files."""
        missing = [p for p in (self.train_prefix, self.val_prefix) if p and not _exists(p)]
        if not missing:
            return
        if not self.build:
            raise ConfigError(
                f"data: binidx {missing[0]}.bin/.idx not found; build it with `infctx data build` or set data.build"
            )
        if not Path(self.build).is_file():
            raise ConfigError(f"data.build: no such data config {self.build!r}")
        from infctx.data.builder import build_from_config

        build_from_config(self.build)
        still = [p for p in missing if not _exists(p)]
        if still:
            raise ConfigError(f"data: building {self.build} did not produce {still[0]}.bin/.idx; check its output paths")

    def setup(self, stage: str) -> None:
        for prefix in (self.train_prefix, self.val_prefix):
            if prefix and not _exists(prefix):
                raise ConfigError(f"data: binidx {prefix}.bin/.idx not found")
        if stage == "fit" and self.train_set is None:
            self.train_set = self._dataset(self.train_prefix, self.seed)
        if self.val_prefix and self.val_set is None:
            self.val_set = self._dataset(self.val_prefix, self.seed + 1)

    def _dataset(self, prefix: str, seed: int) -> Dataset:
        from infctx.data.samplers import make_dataset

        try:
            return make_dataset(prefix, mode=self.mode, ctx_len=self.ctx_len, seed=seed, bucket_size=self.bucket_size)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"data: {err}") from err

    # ------------------------------------------------------------ loaders
    def _loader(self, dataset: Dataset, sampler: Sampler, trim: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=partial(collate, trim_padding=trim),
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        start = int(getattr(trainer.lightning_module, "samples_seen", 0)) if trainer else 0
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        return self._loader(self.train_set, RankSampler(start, rank, world, self.batch_size), self.trim_padding)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        per_round = self.batch_size * world
        limit = max(self.val_samples // per_round, 1) * per_round
        # No trimming: every rank must run the same number of segments (ZeRO-3 gathers stay in lockstep).
        return self._loader(self.val_set, RankSampler(0, rank, world, self.batch_size, limit=limit), trim=False)


def _exists(spec: str) -> bool:
    """Every binidx of a prefix or of a blend spec 'a@0.7,b@0.3' is on disk."""
    from infctx.data.samplers import parse_blend

    prefixes, _ = parse_blend(spec)
    return all(Path(p + ".bin").is_file() and Path(p + ".idx").is_file() for p in prefixes)
