"""Drawing samples in a callback, and :class:`SampleGrids`: sample grids per resolution
and temperature after validation, saved as PNG and sent to every logger (W&B,
TensorBoard). Switched on in YAML under ``trainer.callbacks``.

A sampling callback needs the module's family contract (``sample_images(n,
temperature)``, a dict of model-space images per resolution, and ``n_bits``); what
"temperature" means is the module's business (one per cascade stage, for instance).
Draws come from a forked RNG (:func:`sampling_mode`): the training stream is untouched.

Non-finite samples (a NaN or infinite value anywhere in model space) are painted red
wherever an image of them is shown (:func:`mark_failed`, the one marking every grid and
analysis figure uses), counted per resolution and temperature, and left out of FID/KID
(``lightning_modules/evaluation.py``).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor

from flows.quantization import to_uint8
from lightning_modules.errors import ConfigurationError
from lightning_modules.family import family_of
from lightning_modules.metrics import Samples, generate_uint8
from lightning_modules.rng_states import seeded_rng
from lightning_modules.run_folder import log_dir

# How every figure of this project shows a failed (non-finite) sample: a flat tile of this
# colour, which to_uint8's mid-grey for NaN is not.
FAILED_RGB = (255, 0, 0)


FAILED_LEGEND = "red = non-finite sample"


def mark_failed(images_uint8: Tensor, failed: Tensor | None) -> Tensor:
    """uint8 [N, C, H, W] images (C = 1 or 3) as RGB [N, 3, H, W] on the CPU, each image
    where ``failed`` ([N] bool) is True painted ``FAILED_RGB`` (red): the one marking of
    a failed sample in sample grids and analysis figures (legend: ``FAILED_LEGEND``)."""
    images = images_uint8.cpu()
    shown = (images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images).clone()
    if failed is not None:
        shown[failed.to(torch.bool).cpu()] = torch.tensor(FAILED_RGB, dtype=torch.uint8)[:, None, None]
    return shown


def check_temperatures(callback: pl.Callback, pl_module: pl.LightningModule, temperatures) -> None:
    """Fail before the first step, not at the first validation end, on a temperature the
    module cannot sample at (e.g. a per-stage list of the wrong length)."""
    family = family_of(pl_module, type(callback).__name__)
    for temperature in temperatures:
        try:
            family.check_temperature(temperature)
        except ValueError as error:
            raise ConfigurationError(f"{type(callback).__name__}: temperature {temperature!r} does not fit "
                                     f"{family.model_name}: {error}") from error


@contextmanager
def sampling_mode(pl_module: pl.LightningModule, seed: int):
    """Eval mode and a forked RNG seeded with ``seed``: the training RNG stream is
    untouched and draws repeat; the module's mode is restored afterwards."""
    was_training = pl_module.training
    pl_module.eval()
    try:
        with seeded_rng(seed, pl_module.device):
            yield
    finally:
        pl_module.train(was_training)


@torch.no_grad()
def draw_samples(pl_module: pl.LightningModule, n: int, temperature, seed: int,
                 batch_size: int | None = None) -> Samples:
    """n uint8 samples per resolution (CPU), with which of them were finite in model
    space (:class:`~lightning_modules.metrics.Samples`), in eval mode, from a forked RNG
    seeded with ``seed`` (:func:`sampling_mode`)."""
    sample = family_of(pl_module, "drawing samples").sample_images
    with sampling_mode(pl_module, seed):
        return generate_uint8(lambda k: sample(k, temperature), n, batch_size or n,
                              lambda x: to_uint8(x, pl_module.n_bits))


def send_image(trainer: pl.Trainer, key: str, grid: Tensor, caption: str | None = None) -> None:
    from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            extra = {"caption": [caption]} if caption else {}
            logger.log_image(key=key, images=[grid.permute(1, 2, 0).numpy()], step=trainer.global_step, **extra)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, grid, trainer.global_step)


def save_uint8_png(image: Tensor, path: Path) -> None:
    from PIL import Image

    array = image.permute(1, 2, 0).numpy()
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(path)


def grid_prefix(trainer: pl.Trainer) -> str:
    """``stepXXXXXXXX`` in a fit; outside one (``lightning validate`` of a checkpoint) also
    the checkpoint's name, so that validating two checkpoints of a run (both at the step
    they were saved, or 0 for weights loaded in Python) writes two grids, not one."""
    from pytorch_lightning.trainer.states import TrainerFn

    prefix = f"step{trainer.global_step:08d}"
    if trainer.state.fn != TrainerFn.FITTING:
        name = Path(trainer.ckpt_path).stem if trainer.ckpt_path else "weights"
        prefix = f"{trainer.state.fn.value}_{name}_{prefix}"
    return prefix


class SampleGrids(pl.Callback):
    """A grid per resolution and temperature every ``every_n_epochs`` validation epochs,
    saved as ``samples/stepXXXXXXXX_resR_tT.png`` in the log folder and sent to the
    loggers. The noise comes from ``seed``, so grids of successive epochs compare.
    Non-finite samples are red tiles (:func:`mark_failed`), counted in the loggers as
    ``val/nonfinite_samples_R_tT`` and printed when there are any."""

    def __init__(self, temperatures: list[float] | None = None, num_samples: int = 64,
                 every_n_epochs: int = 1, seed: int = 1234) -> None:
        self.temperatures = list(temperatures if temperatures is not None else [0.7, 0.8, 1.0])
        self.num_samples = num_samples
        self.every_n_epochs = every_n_epochs
        self.seed = seed

    def setup(self, trainer, pl_module, stage: str) -> None:
        check_temperatures(self, pl_module, self.temperatures)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        every = self.every_n_epochs
        if trainer.sanity_checking or not every or trainer.current_epoch % every:
            return
        if trainer.is_global_zero:
            self.draw(trainer, pl_module)

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Path]:
        from torchvision.utils import make_grid

        saved = []
        counts: dict[str, int] = {}
        out_dir = log_dir(trainer) / "samples"
        out_dir.mkdir(parents=True, exist_ok=True)
        for temperature in self.temperatures:
            samples = draw_samples(pl_module, self.num_samples, temperature, self.seed)
            for resolution, images in samples.items():
                failed = samples.failed(resolution)
                shown = mark_failed(images, failed)
                grid = make_grid(shown, nrow=int(math.ceil(math.sqrt(images.shape[0]))), padding=1)
                path = out_dir / f"{grid_prefix(trainer)}_res{resolution}_t{temperature:g}.png"
                save_uint8_png(grid, path)
                saved.append(path)
                bad = int(failed.sum())
                counts[f"val/nonfinite_samples_{resolution}_t{temperature:g}"] = bad
                caption = f"{bad} of {len(failed)} samples non-finite ({FAILED_LEGEND})" if bad else None
                if bad:
                    pl_module.print(f"sample grid {resolution}px, temperature {temperature:g}: {caption}: {path}")
                send_image(trainer, f"samples/res{resolution}_t{temperature:g}", grid, caption)
        for logger in trainer.loggers:
            logger.log_metrics(counts, step=trainer.global_step)
        return saved
