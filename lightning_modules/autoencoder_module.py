"""A small diffusers ``AutoencoderKL`` trained by the project itself, so the latent flow's
quick demo (``experiments/quick_latent_flow.yaml``) needs no downloaded weights.

The objective is a VAE's: the squared error of the reconstruction (images in [-1, 1], the
range the latent module hands the autoencoder) plus ``kl_weight`` times the KL of the
posterior to N(0, I) (Stable Diffusion's autoencoder also uses perceptual and
adversarial losses, left out here: a demo's decoder, not a product's). After every
validation run and at the end of training, process 0 writes the autoencoder with
``save_pretrained`` to ``export_dir`` (the folder the latent module's ``autoencoder``
setting reads), its config's ``scaling_factor`` set to 1 / the standard deviation of the
validation latents (Stable Diffusion's 0.18215 was chosen so), so scaled latents have
unit variance as a flow's prior expects.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor

from lightning_modules.errors import ConfigurationError


class AutoencoderModule(pl.LightningModule):
    """Trains an ``AutoencoderKL`` built from its arguments (no weights read).

    Args:
        export_dir: where ``save_pretrained`` writes it.
        in_channels: the images' channels.
        latent_channels: the latents' channels (4 as Stable Diffusion's).
        block_out_channels: widths of the encoder's levels; each level after the first
            halves the resolution (three levels: a factor of 4).
        layers_per_block, norm_num_groups: as diffusers' ``AutoencoderKL``.
        kl_weight: the weight of the KL term.
        lr: Adam learning rate.
        resolution: the batch pyramid's resolution to train on (default: the largest).
    """

    def __init__(self, export_dir: str = "runs/quick_autoencoder/autoencoder", in_channels: int = 3,
                 latent_channels: int = 4, block_out_channels: list[int] = (32, 64, 64), layers_per_block: int = 1,
                 norm_num_groups: int = 8, kl_weight: float = 1e-4, lr: float = 1e-3,
                 resolution: int | None = None) -> None:
        super().__init__()
        try:
            from diffusers import AutoencoderKL
        except ImportError as error:
            raise ConfigurationError("AutoencoderModule builds a diffusers AutoencoderKL: pip install diffusers") from error
        self.save_hyperparameters()
        levels = len(block_out_channels)
        self.autoencoder = AutoencoderKL(
            in_channels=in_channels, out_channels=in_channels, latent_channels=latent_channels,
            down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups)
        self.export_dir, self.kl_weight, self.lr, self.resolution = export_dir, kl_weight, lr, resolution
        self._latent_std: list[Tensor] = []

    def _images(self, batch: dict) -> Tensor:
        images = batch["images"]
        uint8 = images[self.resolution if self.resolution is not None else max(images)]
        return uint8.float() / 127.5 - 1.0  # [-1, 1]

    def _step(self, batch: dict, split: str) -> Tensor:
        x = self._images(batch)
        posterior = self.autoencoder.encode(x).latent_dist
        latents = posterior.sample()
        reconstruction = self.autoencoder.decode(latents).sample
        mse = (reconstruction - x).pow(2).mean()
        kl = posterior.kl().mean() / latents[0].numel()  # per latent dimension
        loss = mse + self.kl_weight * kl
        on_step = split == "train"
        self.log(f"{split}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True)
        self.log(f"{split}/mse", mse, on_step=on_step, on_epoch=True)
        self.log(f"{split}/kl_per_dim", kl, on_step=on_step, on_epoch=True)
        if split == "val":
            self._latent_std.append(latents.detach().flatten().float().std())
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def export(self) -> Path:
        """``save_pretrained`` into ``export_dir`` (replaced whole, so a reader never sees
        half a folder), the scaling factor from the last validation's latents."""
        if self._latent_std:
            std = torch.stack(self._latent_std).mean().item()
            self.autoencoder.register_to_config(scaling_factor=1.0 / max(std, 1e-6))
        path = Path(self.export_dir).expanduser()
        temporary = path.with_name(path.name + ".tmp")
        shutil.rmtree(temporary, ignore_errors=True)
        self.autoencoder.save_pretrained(str(temporary))
        if path.exists():
            shutil.rmtree(path)
        os.replace(temporary, path)
        return path

    def on_validation_epoch_start(self) -> None:
        self._latent_std = []

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking and self.trainer.is_global_zero:
            self.export()

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            self.print(f"autoencoder written to {self.export()}")
