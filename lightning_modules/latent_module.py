"""A flow over the latents of a frozen pretrained autoencoder (STARFlow, Gu et al. 2025;
apple/ml-starflow ``utils/model_setup.py`` and ``finetune_decoder.py``, nothing copied).

The images (8-bit, to [-1, 1] as the autoencoder was trained) are encoded by a diffusers
``AutoencoderKL`` loaded from a local folder (the format users keep on their clusters;
nothing is downloaded at run time), a draw of its posterior times the autoencoder's
scaling factor (``latent_dist.sample() * scaling_factor``, as ml-starflow encodes), and
any :class:`~flows.model.FlowModel` of the latents' shape (a deep-shallow TarFlow in
STARFlow) learns their density with Gaussian noise on them: the flow's dequantizer must
be a :class:`~flows.dequantization.GaussianNoiseDequantizer`, whose ``noise_std`` is
STARFlow's latent noise (0.3 in ml-starflow's configs).

Its figure is the density of the noisy latents: exact for the flow, in bits per latent
dimension, logged as ``latent_nll_bits_R`` (R the image resolution), never as bits per
pixel of the images, which this model does not give (the autoencoder is not invertible).

Samples: the flow's latents (denoised by Tweedie's formula when the dequantizer's
``denoise_samples`` is on) divided by the scaling factor and decoded to images, so grids
and FID see images. ``finetune_decoder`` trains the decoder as a part of its own to map
noisy latents to the images (ml-starflow's decoder fine-tuning, which uses perceptual and
adversarial losses; here the mean squared error), so that samples can be decoded without
denoising; ``train_flow: false`` with ``init_checkpoint`` makes that a phase of its own.

Checkpoints hold the flow (and the decoder when it trains), never a second copy of the
frozen autoencoder: that stays in its folder and is not a registered sub-module (moved
to the data's device when first used).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from flows.dequantization import GaussianNoiseDequantizer
from flows.model import FlowModel
from lightning_modules.base import FlowModule
from lightning_modules.errors import ConfigurationError
from lightning_modules.family import Batch, LossOutput
from lightning_modules.parts import OptimizerSettings, Part

LATENT_METRIC = "latent_nll_bits"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def load_autoencoder(path: str, setting: str = "model.init_args.autoencoder") -> nn.Module:
    """A diffusers ``AutoencoderKL`` from a local folder (``save_pretrained``'s layout:
    config.json and its weights; a pipeline folder's ``vae/`` sub-folder is found too),
    frozen and in eval mode. A missing folder or package is one clear error naming
    ``setting``."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as error:
        raise ConfigurationError(f"{setting} needs the diffusers package to read an AutoencoderKL: "
                                 "pip install diffusers") from error
    folder = Path(path).expanduser()
    if (folder / "vae" / "config.json").is_file() and not (folder / "config.json").is_file():
        folder = folder / "vae"
    if not (folder / "config.json").is_file() or not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ConfigurationError(
            f"{setting}: {str(path)!r} is not a diffusers AutoencoderKL folder (expected config.json and "
            f"{' or '.join(WEIGHT_FILES)}, as AutoencoderKL.save_pretrained writes them and as Hugging Face's "
            "stabilityai/sd-vae-ft-ema holds them). Nothing is downloaded at run time: copy the folder here (e.g. "
            "huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir <folder> on a machine with internet), "
            "or train a small one with experiments/quick_autoencoder.yaml, and set this to its path")
    autoencoder = AutoencoderKL.from_pretrained(str(folder), local_files_only=True, low_cpu_mem_usage=False)
    autoencoder.requires_grad_(False)
    return autoencoder.eval()


class LatentFlowModule(FlowModule):
    """Any FlowModel over the latents of a frozen pretrained autoencoder (the module
    docstring).

    Args:
        flow: the model of the latents, built for their shape ([latent_channels,
            image_size / f, image_size / f] for a downsampling factor f), with a
            ``GaussianNoiseDequantizer`` (the latent noise).
        autoencoder: the folder of a diffusers ``AutoencoderKL``.
        image_size: the images' resolution (the data's).
        scaling_factor: what the latents are multiplied by (None: the autoencoder
            config's ``scaling_factor``, 0.18215 for Stable Diffusion's).
        finetune_decoder: train the decoder on noisy latents (its own part).
        decoder_optimizer: its optimizer settings.
        train_flow: False freezes the flow (a decoder-only phase).
        optimizer: the flow's optimizer settings.
    The remaining args are :class:`~lightning_modules.base.FlowModule`'s.
    """

    continuous_metric = LATENT_METRIC

    def __init__(self, *, flow: FlowModel, autoencoder: str, image_size: int, scaling_factor: float | None = None,
                 finetune_decoder: bool = False, decoder_optimizer: OptimizerSettings | None = None,
                 train_flow: bool = True, optimizer: OptimizerSettings | None = None,
                 init_checkpoint: str | None = None, **training) -> None:
        super().__init__(**training)
        self.save_config()
        if not isinstance(flow.dequantizer, GaussianNoiseDequantizer):
            raise ConfigurationError(
                f"a latent flow models noisy latents: its flow's dequantizer must be a GaussianNoiseDequantizer (the "
                f"latent noise; ml-starflow: noise_std 0.3), got {type(flow.dequantizer).__name__}; set "
                "model.init_args.flow.init_args.dequantizer to flows.dequantization.GaussianNoiseDequantizer")
        self.model = flow
        # Not a registered sub-module: the frozen autoencoder stays out of state_dict and
        # checkpoints (its folder holds it); _autoencoder_on moves it to the data.
        object.__setattr__(self, "_autoencoder", load_autoencoder(autoencoder))
        config = self._autoencoder.config
        self.image_size, self.image_channels = int(image_size), int(config.in_channels)
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else config.scaling_factor)
        factor = 2 ** (len(config.block_out_channels) - 1)
        expected = (int(config.latent_channels), self.image_size // factor, self.image_size // factor)
        modelled = (flow.in_channels, flow.image_size, flow.image_size)
        if self.image_size % factor or modelled != expected:
            raise ConfigurationError(
                f"the autoencoder maps {self.image_size}-pixel images to latents of shape {list(expected)} (downsampling "
                f"{factor}, {config.latent_channels} channels), but the flow models {list(modelled)}: build "
                f"the flow with in_channels {expected[0]} and image_size {expected[1]}")
        self.finetune_decoder, self.train_flow = bool(finetune_decoder), bool(train_flow)
        if self.finetune_decoder:  # registered: it trains, so checkpoints hold it
            self.decoder = self._autoencoder.decoder
            self.post_quant_conv = self._autoencoder.post_quant_conv
            self.decoder.requires_grad_(True), self.post_quant_conv.requires_grad_(True)
        self.optimizer_settings = optimizer or OptimizerSettings()
        self.decoder_optimizer = decoder_optimizer or OptimizerSettings.adam(1e-4)
        self.load_parts(init_checkpoint)

    # --- the frozen autoencoder --------------------------------------------------------
    def _frozen_modules(self) -> list[nn.Module]:
        autoencoder = self._autoencoder
        frozen = [autoencoder.encoder, autoencoder.quant_conv]
        if not self.finetune_decoder:
            frozen += [autoencoder.decoder, autoencoder.post_quant_conv]
        return [module for module in frozen if module is not None]

    def _autoencoder_on(self, device: torch.device) -> nn.Module:
        """The autoencoder on ``device``: its frozen parts are not sub-modules, so they
        follow the data there when first used (the decoder, when it trains, is moved
        with the module)."""
        for module in self._frozen_modules():
            first = next(module.parameters(), None)
            if first is not None and first.device != device:
                module.to(device)
        return self._autoencoder

    def parts(self) -> list[Part]:
        parts = [Part("flow", self.model, self.optimizer_settings, ["model."], trainable=self.train_flow)]
        if self.finetune_decoder:
            parts += [Part("decoder", self.decoder, self.decoder_optimizer, ["decoder."]),
                      Part("decoder.post_quant_conv", self.post_quant_conv, self.decoder_optimizer,
                           ["post_quant_conv."])]
        return parts

    @torch.no_grad()
    def encode_latents(self, images: Tensor) -> Tensor:
        """Scaled latents of images in model space ([-0.5, 0.5]): a draw of the
        autoencoder's posterior times the scaling factor (ml-starflow's encode)."""
        posterior = self._autoencoder_on(images.device).encode(2.0 * images).latent_dist
        return (posterior.sample() * self.scaling_factor).float()

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Images in model space from scaled latents (the decoder's [-1, 1] halved)."""
        return 0.5 * self._autoencoder_on(latents.device).decode(latents / self.scaling_factor).sample.float()

    # --- the family contract -----------------------------------------------------------
    @property
    def resolution(self) -> int:
        return self.image_size

    @property
    def in_channels(self) -> int:
        return self.image_channels

    @property
    def noisy_data_resolutions(self) -> set[int]:
        return {self.resolution}

    def compute_losses(self, batch: Batch) -> LossOutput:
        """The flow's objective on the noisy scaled latents (exact, continuous), plus the
        decoder's squared error on noisy latents when it trains."""
        r = self.resolution
        images = batch.clean[r]
        latents = self.encode_latents(images)
        out = self.loss_output(self.model.training_loss(latents, self.condition(batch.labels), n_bits=self.n_bits), r)
        if self.finetune_decoder:
            noisy = latents + self.model.dequantizer.noise_std * torch.randn_like(latents)
            decoder_mse = (self.decode_latents(noisy) - images).pow(2).mean()
            out.loss = out.loss + decoder_mse
            out.extra["decoder_mse"] = decoder_mse
        return out

    def evaluation_log_probs(self, batch: Batch, resolutions: set[int]) -> dict[int, Tensor]:
        raise NotImplementedError("a latent flow's log-likelihood is exact: nothing to estimate")

    @torch.no_grad()
    def sample_images(self, n: int, temperature: float | list[float]) -> dict[int, Tensor]:
        """The flow's latents (denoised as its dequantizer says) decoded to images."""
        latents = super().sample_images(n, temperature)[self.resolution]
        return {self.resolution: self.decode_latents(latents)}

    def model_input(self, batch) -> tuple:
        return self.encode_latents(batch.images[self.resolution]), self.condition(batch.labels)

    def images_of(self, decoded) -> dict[int, Tensor]:
        return {self.resolution: self.decode_latents(decoded)}

    @property
    def model_name(self) -> str:
        return f"Latent{self.model.display_name}"
