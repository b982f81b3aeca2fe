"""The `lightning` command (and its alias `msflows`): LightningCLI in subclass mode for
the model and the data, e.g. ``lightning fit --config experiments/quickstart.yaml``.

Cluster behaviour (README "Running on a cluster"):
* ``ckpt_path: auto`` resumes from the newest of ``hpc_ckpt_*.ckpt`` (SLURM requeue) and
  every ``last*.ckpt`` under ``trainer.default_root_dir``, or starts fresh when none exists.
* Checkpoints are written atomically (:class:`AtomicCheckpointIO`).
* Every run gets the :class:`~lightning_modules.callbacks.ExactResume` callback (RNG
  states in checkpoints, mid-epoch resume), whether or not the config lists it.
* A WandbLogger without an ``id`` gets the one stored in
  ``default_root_dir/wandb_run_id.txt`` (created on the first launch), so a requeued job
  continues the same W&B run; the resolved config is logged to W&B.
"""
from __future__ import annotations

import sys

import pytorch_lightning as pl
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger

from datamodules import PyramidDataModule
from datamodules.sources import DatasetNotFoundError
from lightning_modules.callbacks import ExactResume
from lightning_modules.checkpointing import AtomicCheckpointIO, newest_checkpoint, persistent_wandb_id


class SaveConfigToLoggers(SaveConfigCallback):
    """Writes config.yaml to the log folder (Lightning's behaviour) and logs the resolved
    config to W&B."""

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                resolved = self.parser.dump(self.config, skip_none=False, format="json")
                import json

                logger.experiment.config.update({"resolved_config": json.loads(resolved)},
                                                allow_val_change=True)


class MsflowsCLI(LightningCLI):
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = config.trainer.default_root_dir or "."
        loggers = config.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            class_path = getattr(logger, "class_path", "") or ""
            if class_path.endswith("WandbLogger") and not logger.init_args.get("id"):
                logger.init_args["id"] = persistent_wandb_id(root)
        if config.get("ckpt_path") == "auto":
            newest = newest_checkpoint(root)
            config.ckpt_path = str(newest) if newest else None
            print(f"ckpt_path auto: {'resuming from ' + str(newest) if newest else 'no checkpoint, starting fresh'}",
                  file=sys.stderr)

    def instantiate_trainer(self, **kwargs) -> pl.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if not any(isinstance(c, ExactResume) for c in trainer.callbacks):
            trainer.callbacks.append(ExactResume())
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


def main(args=None) -> None:
    """Console-script entry (returns None, so the exit status is 0 on success)."""
    build_cli(args)


def build_cli(args=None, run: bool = True) -> LightningCLI:
    try:
        return MsflowsCLI(pl.LightningModule, PyramidDataModule, subclass_mode_model=True,
                          subclass_mode_data=True,
                          # A requeued job relaunches into the same folder: overwrite the saved config.
                          save_config_callback=SaveConfigToLoggers,
                          save_config_kwargs={"overwrite": True},
                          # Each family configures its own optimizer and schedule (seed settings).
                          auto_configure_optimizers=False,
                          # Any LightningModule: the flow families (FlowModule) and the RRDB
                          # pre-training (RRDBPretrainModule).
                          args=args, run=run)
    except DatasetNotFoundError as missing:
        # The message says which layout is expected; a traceback would bury it.
        print(f"error: {missing}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
