"""Small models and data that several test files build (not tests): the cascade's stages,
a cascade, its module and pyramid data, a trained-looking tiny Glow, and grid tiles."""
import numpy as np
import torch
from PIL import Image

from datamodules import EmbeddedDataModule
from flows import Cascade, Glow, SRFlow
from flows.denoiser import TimeConditionedUNet
from flows.hierarchical import Level
from flows.quantization import dequantize
from lightning_modules import CascadeModule, GlowStage, OptimizerSettings, SRFlowStage
from tests.conftest import perturb_parameters

TINY_SR_FLOW = dict(scales=2, steps_per_scale=1, hidden_channels=8, rrdb_features=8, rrdb_blocks=2,
                    rrdb_growth=4)
TINY_SR_OPTIMIZER = dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0, warmup_epochs=0.0, lr_milestones=[])


def tiny_srflow(size=16, **kwargs):
    return SRFlow(image_size=size, scales=2, steps_per_scale=2, hidden_channels=8, rrdb_features=8,
                  rrdb_blocks=2, rrdb_growth=4, **kwargs)


def tiny_cascade():
    base = Glow(image_size=8, scales=2, steps_per_scale=2, hidden_channels=8)
    cascade = Cascade(base=base, sr_stages=[tiny_srflow(16), tiny_srflow(32)], n_bits=5)
    perturb_parameters(cascade, 0.02)
    return cascade.eval()


def pyramid_batch(batch=3, n_bits=5):
    """Noisy images and clean (bin-centre) images of a real pyramid (x_{i-1} = d(x_i))."""
    data = EmbeddedDataModule(image_size=32, resolutions=[32, 16, 8], train_size=8, val_size=4)
    data.setup("fit")
    items = [data.datasets["train"][i] for i in range(batch)]
    uint8 = {r: torch.stack([item["images"][r] for item in items]) for r in (8, 16, 32)}
    images = {r: dequantize(x, n_bits, noise=True) for r, x in uint8.items()}
    clean = {r: dequantize(x, n_bits, noise=False) for r, x in uint8.items()}
    return images, clean, uint8


def glow_stage(hidden_channels=8, num_classes=0, **kwargs):
    return GlowStage(flow=Glow(image_size=8, scales=2, steps_per_scale=1, hidden_channels=hidden_channels,
                               num_classes=num_classes),
                     optimizer=OptimizerSettings(lr=1e-3, warmup_steps=1), **kwargs)


def sr_stage(size=16, sigma=0.0, num_classes=0, flow=None, **kwargs):
    settings = dict(freeze_encoder_steps=0, optimizer=OptimizerSettings(**TINY_SR_OPTIMIZER))
    settings.update(kwargs)
    flow = flow or dict(TINY_SR_FLOW)
    return SRFlowStage(flow=SRFlow(image_size=size, num_classes=num_classes, **flow), sigma=sigma, **settings)


def cascade_module(num_classes=0, sr_stages=None, **kwargs):
    defaults = dict(base=glow_stage(num_classes=num_classes),
                    sr_stages=sr_stages or [sr_stage(num_classes=num_classes)], n_bits=5,
                    failure_probe_every_n_steps=0)
    defaults.update(kwargs)
    return CascadeModule(**defaults)


def pyramid_data(top=16, batch_size=8):
    resolutions = [r for r in (32, 16, 8) if r <= top]
    return EmbeddedDataModule(image_size=top, resolutions=resolutions, train_size=32, val_size=8,
                              batch_size=batch_size)


SMOKE_FID = dict(feature_extractor="random-conv", batch_size=32, kid_subset_size=16)  # FIDSettings for tests


def tiny_glow():
    """A small Glow whose ActNorms were initialized on data and whose weights were
    perturbed (not an identity), and the data."""
    model = Glow(image_size=8, scales=2, steps_per_scale=2, hidden_channels=8)
    x = torch.rand(6, 3, 8, 8) - 0.5
    model.train()
    with torch.no_grad():
        model.encode(x)
    perturb_parameters(model, 0.05)
    return model.eval(), x


def split_grid(path, rows: int, columns: int) -> list[torch.Tensor]:
    """The tiles of a torchvision make_grid(padding=1) PNG: one [columns, 3, h, w] tensor per row."""
    grid = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)
    h, w = (grid.shape[1] - 1) // rows - 1, (grid.shape[2] - 1) // columns - 1
    return [torch.stack([grid[:, 1 + i * (h + 1):1 + i * (h + 1) + h, 1 + j * (w + 1):1 + j * (w + 1) + w]
                         for j in range(columns)]) for i in range(rows)]


def tiny_levels(overrides=None):
    levels = [
        dict(resolution=8, channels=3, couplings=["C", "S2"], coupling_hidden=6, cond_channels=4,
             decoder_hidden=6),
        dict(resolution=4, channels=4, couplings=["C", "S2"], coupling_hidden=6, cond_channels=4,
             alpha_flow=0.4, alpha_decoder=0.3, conditioning_unet=True, encoder_hidden=6, decoder_hidden=6),
        dict(resolution=1, channels=6, couplings=["C", "C"], coupling_hidden=6, cond_channels=3,
             alpha_flow=0.3, alpha_decoder=0.5, invconv="unitary", encoder_hidden=8, decoder_hidden=4),
        dict(resolution=1, channels=2, couplings=["C", "C"], coupling_hidden=4, alpha_flow=0.3,
             alpha_decoder=0.5, invconv="unitary"),
    ]
    for i, changes in (overrides or {}).items():
        levels[i].update(changes)
    return [Level(**level) for level in levels]


def tiny_unet(in_channels, out_channels, image_size):
    return TimeConditionedUNet(in_channels, out_channels, image_size, base_channels=8, channel_mults=(1, 2),
                               num_res_blocks=1, attention_resolutions=(4,), dropout=0.0, num_heads=2)


def tiny_denoiser(in_channels, out_channels, image_size):
    return TimeConditionedUNet(in_channels, out_channels, image_size, base_channels=8, channel_mults=(1, 2),
                               num_res_blocks=1, attention_resolutions=(2,), dropout=0.0, num_heads=2)
