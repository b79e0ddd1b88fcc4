"""`infctx fit` / `infctx validate`: LightningCLI over InfctxModule + InfctxDataModule, driven by YAML recipes.

Beyond stock LightningCLI: CSV + TensorBoard loggers under the run directory by default (W&B with `--wandb PROJECT`),
our rolling checkpoints (`checkpoint.*` section) instead of ModelCheckpoint, `--ckpt_path last|auto` resolved through
the run's `checkpoints/last` pointer, and recipe errors reported as one line.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from infctx.checkpoint import CheckpointError
from infctx.train.callbacks import RollingCheckpoint, StepProgressBar, resolve_last
from infctx.train.data import InfctxDataModule
from infctx.train.errors import ConfigError
from infctx.train.module import InfctxModule, NonFiniteStop

TRAINER_DEFAULTS = {
    "enable_checkpointing": False,  # RollingCheckpoint does it
    "log_every_n_steps": 1,
    "max_epochs": -1,
    "num_sanity_val_steps": 0,
    "enable_model_summary": False,  # InfctxModule prints its own summary
    "use_distributed_sampler": False,  # InfctxDataModule splits samples across ranks itself (resumable)
    "default_root_dir": "runs/default",
}


class InfctxCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(RollingCheckpoint, "checkpoint")
        parser.add_argument("--wandb", type=str | None, default=None,
                            help="also log to this Weights & Biases project (needs `pip install wandb`)")

    def instantiate_trainer(self, **kwargs: Any):
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        if trainer_cfg.get("logger") in (None, True):
            # validate prints its table and leaves the run's training logs alone
            kwargs["logger"] = (False if self.subcommand == "validate" else
                                self._default_loggers(Path(trainer_cfg.get("default_root_dir") or "runs/default")))
        return super().instantiate_trainer(**kwargs)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        user = config.get("callbacks") or []
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in user):
            callbacks = [*callbacks, StepProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    def _default_loggers(self, run_dir: Path) -> list:
        loggers = [CSVLogger(save_dir=str(run_dir), name="", version="", flush_logs_every_n_steps=1),
                   TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False)]
        project = self._get(self.config_init, "wandb")
        if project:
            try:
                from lightning.pytorch.loggers import WandbLogger
                import wandb  # noqa: F401
            except ImportError as err:
                raise ConfigError("--wandb was given but wandb is not installed: `pip install wandb`") from err
            loggers.append(WandbLogger(project=project, save_dir=str(run_dir)))
        return loggers

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if kwargs.get("ckpt_path") in ("last", "auto"):
            ckpt_dir = Path(self.trainer.default_root_dir) / "checkpoints"
            found = resolve_last(ckpt_dir)
            if found is None and kwargs["ckpt_path"] == "last":
                raise ConfigError(f"--ckpt_path last: no checkpoint under {ckpt_dir} (use --ckpt_path auto to start fresh)")
            kwargs["ckpt_path"] = str(found) if found else None
        elif kwargs.get("ckpt_path") and not Path(kwargs["ckpt_path"]).exists():
            raise ConfigError(f"--ckpt_path: {kwargs['ckpt_path']} does not exist")
        return kwargs


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else "fit"
    try:
        InfctxCLI(
            InfctxModule,
            InfctxDataModule,
            args=argv,
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=1234,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
        )
    except (ConfigError, CheckpointError) as err:
        print(f"infctx {command}: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteStop as err:
        print(f"infctx {command}: {err}", file=sys.stderr)
        return 1
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
