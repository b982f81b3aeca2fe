"""The `lightning` command (and its alias `msflows`): LightningCLI in subclass mode for
the model and the data, e.g. ``lightning fit --config experiments/quickstart.yaml``."""
from __future__ import annotations

import sys

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI

from datamodules import PyramidDataModule
from datamodules.sources import DatasetNotFoundError


def main(args=None, run: bool = True) -> LightningCLI:
    try:
        return LightningCLI(pl.LightningModule, PyramidDataModule, subclass_mode_model=True,
                     subclass_mode_data=True,
                     # A requeued job relaunches into the same folder: overwrite the saved config.
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
