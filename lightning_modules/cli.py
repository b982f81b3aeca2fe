"""The `lightning` command (and its alias `msflows`): LightningCLI in subclass mode for
the model and the data, e.g. ``lightning fit --config experiments/quickstart.yaml``.

Cluster behaviour (README "Running on a cluster"):
* ``fit`` takes the folder's :class:`RunLock` (one live run per ``default_root_dir``) and
  removes the temporary files of killed checkpoint writes.
* ``ckpt_path: auto`` resumes from the newest readable of ``hpc_ckpt_*.ckpt`` (SLURM
  requeue) and every ``last*.ckpt`` under ``trainer.default_root_dir`` (a broken one is
  moved aside), or starts fresh when none exists.
* The config the user wrote wins over a checkpoint's saved hyper-parameters: a
  checkpoint that does not fit the configured model fails before training starts
  (LightningCLI would otherwise build the checkpoint's model instead).
* Errors a user can fix (``errors.py``, a missing dataset, a constructor argument that
  cannot work) print one paragraph and exit with status 2.
* Checkpoints are written atomically (:class:`AtomicCheckpointIO`).
* Every run gets the :class:`~lightning_modules.callbacks.ExactResume` callback (RNG
  states in checkpoints, mid-epoch resume), whether or not the config lists it.
* A WandbLogger without an ``id`` gets the one stored in
  ``default_root_dir/wandb_run_id.txt`` (created on the first launch), so a requeued job
  continues the same W&B run; the resolved config is logged to W&B.
"""
from __future__ import annotations

import os
import sys

import pytorch_lightning as pl
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger

from datamodules import PyramidDataModule
from datamodules.sources import DatasetNotFoundError, DataSettingsError
from lightning_modules.callbacks import ExactResume
from lightning_modules.checkpointing import (AtomicCheckpointIO, RunLock, persistent_wandb_id,
                                             remove_stale_temporaries, resume_checkpoint)
from lightning_modules.errors import ConfigurationError, UsageError


def is_launch_process() -> bool:
    """True in the process a user or srun started as rank 0; False in the other ranks."""
    for variable in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if os.environ.get(variable, "0") != "0":
            return False
    return True


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


def constructor_reason(message: str) -> str:
    """When a constructor refuses an argument, jsonargparse wraps its message in a page
    about union subtypes and the whole resolved namespace: keep the constructor's words."""
    lines = message.splitlines()
    if "Errors:" in lines:
        for line in lines[lines.index("Errors:") + 1:]:
            if line.strip().startswith("- ") and not line.strip().startswith("- Expected a"):
                return line.strip()[2:]
    return lines[0] if lines else message


class MsflowsCLI(LightningCLI):
    run_lock: RunLock | None = None

    def _parse_ckpt_path(self) -> None:
        """LightningCLI would merge the checkpoint's saved hyper-parameters over the parsed
        config, silently building the checkpoint's model (another family, another width)
        and dropping test-time settings. The config wins here; ``on_load_checkpoint``
        refuses a checkpoint that does not fit it, before the first step."""

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = config.trainer.default_root_dir or "."
        if self.subcommand == "fit" and is_launch_process():
            MsflowsCLI.run_lock = RunLock(root).acquire()
            for path in remove_stale_temporaries(root):
                print(f"removed {path}, left by a checkpoint write that was cut short", file=sys.stderr)
        loggers = config.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            class_path = getattr(logger, "class_path", "") or ""
            if class_path.endswith("WandbLogger") and not logger.init_args.get("id"):
                logger.init_args["id"] = persistent_wandb_id(root)
        if config.get("ckpt_path") == "auto":
            newest = resume_checkpoint(root, move_aside=is_launch_process())
            config.ckpt_path = str(newest) if newest else None
            print(f"ckpt_path auto: {'resuming from ' + str(newest) if newest else 'no checkpoint, starting fresh'}",
                  file=sys.stderr)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as error:  # a constructor refused an argument: say it in one paragraph
            if isinstance(error, UsageError):
                raise
            raise ConfigurationError(constructor_reason(str(error))) from error

    def instantiate_trainer(self, **kwargs) -> pl.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if not any(isinstance(c, ExactResume) for c in trainer.callbacks):
            trainer.callbacks.append(ExactResume())
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


def main(args=None) -> None:
    """Console-script entry (returns None, so the exit status is 0 on success). Errors a
    user can fix print one paragraph and exit with 2 (MSFLOWS_TRACEBACK=1: the traceback)."""
    try:
        build_cli(args)
    except (UsageError, DatasetNotFoundError, DataSettingsError) as error:
        if os.environ.get("MSFLOWS_TRACEBACK"):
            raise
        # The message says what was expected and how to fix it; a traceback would bury it.
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if MsflowsCLI.run_lock is not None:
            MsflowsCLI.run_lock.release()
            MsflowsCLI.run_lock = None


def build_cli(args=None, run: bool = True) -> LightningCLI:
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


if __name__ == "__main__":
    main()
