"""L1 pre-training of an SRFlow stage's RRDB encoder (seed 000 sec. 4.3.2: Adam,
learning rate 2e-4, 200k iterations). Its checkpoint is what
``SRFlowStage.encoder_checkpoint`` loads.

This is the one LightningModule that is not a :class:`FlowModule`: it trains a
regression network, has no likelihood, bits/dim or samples.
"""
from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from flows.nets import RRDBEncoder
from flows.quantization import dequantize
from lightning_modules.errors import ConfigurationError
from lightning_modules.lightning_internals import attached_trainer
from lightning_modules.parts import OptimizerGroup, OptimizerSettings, build_optimizer, steps_per_epoch


class RRDBPretrainModule(pl.LightningModule):
    """Args: ``resolution`` the high-resolution side (the encoder reads resolution / 2);
    the rrdb_* settings must equal those of the SRFlow stage that will load it;
    ``optimizer``: Adam 2e-4 by default (seed 000 sec. 4.3.2)."""

    def __init__(self, *, resolution: int = 32, in_channels: int = 3, rrdb_features: int = 64,
                 rrdb_blocks: int = 23, rrdb_growth: int = 32,
                 rrdb_feature_blocks: list[int] | None = None, n_bits: int = 8,
                 optimizer: OptimizerSettings | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.resolution = resolution
        self.n_bits = n_bits
        self.optimizer_settings = optimizer or OptimizerSettings.adam(2e-4)
        self.optimizer_settings.validate()
        self.encoder = RRDBEncoder(in_channels, rrdb_features, rrdb_blocks, rrdb_growth, rrdb_feature_blocks)

    def setup(self, stage: str) -> None:
        trainer = attached_trainer(self)
        datamodule = getattr(trainer, "datamodule", None) if trainer else None
        if datamodule is None:
            return
        needed = [self.resolution, self.resolution // 2]
        if any(r not in datamodule.resolutions for r in needed):
            raise ConfigurationError(f"RRDB pre-training at {self.resolution}px needs data resolutions {needed}; "
                             f"the data module yields {datamodule.resolutions}")

    def _pair(self, batch: dict) -> tuple[Tensor, Tensor]:
        images = batch["images"]
        lowres = dequantize(images[self.resolution // 2], self.n_bits, noise=False)
        highres = dequantize(images[self.resolution], self.n_bits, noise=False)
        return lowres, highres

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        lowres, highres = self._pair(batch)
        loss = F.l1_loss(self.encoder(lowres), highres)
        self.log("train/l1", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: dict, split: str) -> None:
        lowres, highres = self._pair(batch)
        sr = self.encoder(lowres)
        mse = F.mse_loss(sr.clamp(-0.5, 0.5), highres, reduction="none").flatten(1).mean(1)
        self.log(f"{split}/l1", F.l1_loss(sr, highres), prog_bar=True)
        # Data span a range of 1, so PSNR = -10 log10(MSE).
        self.log(f"{split}/psnr_{self.resolution}", (-10 * torch.log10(mse.clamp_min(1e-10))).mean())

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self):
        group = OptimizerGroup("encoder", list(self.parameters()), self.optimizer_settings)
        return build_optimizer([group], lambda: steps_per_epoch(self.trainer))
