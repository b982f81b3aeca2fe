"""The LightningModule base every model family shares.

A family implements three things: which pyramid resolutions it models
(:attr:`resolutions`), the per-resolution log-likelihoods and the loss of a batch
(:meth:`compute_losses`), and sampling (:meth:`sample_images`). The base does the rest:
dequantization, bits per dim per resolution for train/val/test, Adamax with linear
warm-up and optional step decay, gradient clipping, skipping (and counting) steps whose
loss or gradients are not finite, and sample grids at several temperatures, saved as
PNG and sent to every configured logger.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor

from datamodules.datamodules import ResumableSampler
from datamodules.pyramid import bits_per_dim, dequantize, per_sample_uniform, quantize
from lightning_modules.checkpointing import (RNG_KEY, gather_rng_states, restore_rng_states,
                                             state_dict_mismatch)
from lightning_modules.metrics import (FIDSettings, ImagesAtResolution, TensorImages, as_rgb,
                                       fidelity, generate_uint8, in_loop_fid, plot_temperature_sweep,
                                       reduce_bits, settings_dict, write_metrics_table)


MODEL_KEY = "msflows_model"


@dataclass
class OptimizerSettings:
    """Adamax settings of one parameter group, with its linear warm-up (in epochs, or
    in steps when ``warmup_steps`` is set) and step decay by ``lr_gamma`` at each of
    ``lr_milestones`` (optimizer steps)."""

    lr: float
    betas: tuple[float, float]
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0
    warmup_steps: int | None = None
    lr_milestones: list[int] = field(default_factory=list)
    lr_gamma: float = 0.5


@dataclass
class OptimizerGroup:
    name: str
    params: list
    settings: OptimizerSettings


@dataclass
class LossOutput:
    """``loss``: the scalar to minimize. ``log_prob``: {resolution: log p(x) in nats per
    sample}, logged as ``bpd_{resolution}``. ``dims``: {resolution: C*H*W}. ``extra``:
    other scalars to log. ``batch_size``: needed when ``log_prob`` is empty."""

    loss: Tensor
    log_prob: dict[int, Tensor]
    dims: dict[int, int]
    extra: dict[str, Tensor] = field(default_factory=dict)
    batch_size: int | None = None


class FlowModule(pl.LightningModule):
    """Shared training logic (optimization defaults: seed 000 sec. 4.3.2, Glow).

    Args:
        n_bits: bits per colour channel the data are reduced to before dequantizing.
        lr: peak learning rate of Adamax.
        betas: Adamax (beta1, beta2).
        weight_decay: L2 weight decay.
        warmup_epochs: linear warm-up length in epochs (used when warmup_steps is None).
        warmup_steps: linear warm-up length in optimizer steps (overrides warmup_epochs).
        lr_milestones: optimizer steps at which the learning rate is multiplied by lr_gamma.
        lr_gamma: the factor applied at each milestone.
        grad_clip_norm: clip the global gradient norm to this value (None: no clipping).
        sample_temperatures: temperatures of the sample grids logged after validation.
        num_samples: images per sample grid.
        sample_every_n_epochs: how often sample grids are drawn (0: never).
        sample_seed: seed of the sample noise, so grids of different epochs compare.
        evaluation: FID/KID settings for ``lightning test`` (None: bits/dim only).
        channels_last: keep parameters and inputs in channels-last memory format
            (faster convolutions on recent GPUs, same numbers).
        compile: wrap the loss computation in torch.compile (experimental; the first
            steps pay the compilation time).
    `lightning test` writes ``metrics.json`` (model name, per-resolution bpd, FID, KID)
    into the log folder and sends the figures to the loggers.
    """

    def __init__(self, n_bits: int = 8, lr: float = 5e-4, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 5e-5, warmup_epochs: float = 5.0,
                 warmup_steps: int | None = None, lr_milestones: list[int] | None = None,
                 lr_gamma: float = 0.5, grad_clip_norm: float | None = None,
                 sample_temperatures: list[float] | None = None, num_samples: int = 64,
                 sample_every_n_epochs: int = 1, sample_seed: int = 1234,
                 evaluation: FIDSettings | None = None, channels_last: bool = False,
                 compile: bool = False) -> None:
        super().__init__()
        self.evaluation = evaluation
        self.channels_last = channels_last
        self.compile_losses = compile
        self._compiled = False
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.n_bits = n_bits
        self.sample_temperatures = list(sample_temperatures or [0.7, 0.8, 1.0])
        # A buffer, so the count survives checkpoints and resumes.
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))

    # --- what a family implements -------------------------------------------------
    @property
    def resolutions(self) -> list[int]:
        raise NotImplementedError

    @property
    def in_channels(self) -> int:
        raise NotImplementedError

    def compute_losses(self, images: dict[int, Tensor], labels: Tensor) -> LossOutput:
        raise NotImplementedError

    def sample_images(self, n: int, temperature: float | list[float]) -> dict[int, Tensor]:
        """Samples in model space ([-0.5, 0.5]) per resolution. A cascade takes one
        temperature per level as well."""
        raise NotImplementedError

    @property
    def model_name(self) -> str:
        """The name the metrics table uses (seed 000 Tables 4.2 / 4.3 style)."""
        return type(self).__name__

    # --- data -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if datamodule is None:
            return
        missing = [r for r in self.resolutions if r not in datamodule.resolutions]
        if missing:
            raise ValueError(
                f"{type(self).__name__} models resolutions {self.resolutions} but the data "
                f"module yields {datamodule.resolutions}; add {missing} to data.init_args.resolutions")
        if datamodule.channels != self.in_channels:
            raise ValueError(f"the data have {datamodule.channels} channels but the model expects "
                             f"{self.in_channels}; set model.init_args.in_channels: {datamodule.channels}")

    def configure_model(self) -> None:
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        if self.compile_losses and not self._compiled:
            # The compiled function is an attribute of this instance: the state_dict and
            # checkpoints keep their plain keys.
            self.compute_losses = torch.compile(self.compute_losses)
            self._compiled = True

    def prepare_batch(self, batch: dict, noise: bool = True) -> tuple[dict[int, Tensor], Tensor]:
        """Dequantize every resolution. Training noise comes from the RNG stream; in
        evaluation (``self.training`` False) each image's noise is a function of its
        dataset index, so val/test bpd do not depend on batching or the process count."""
        def noise_for(resolution: int):
            image = batch["images"][resolution]
            if not noise or self.training or "index" not in batch:
                return noise
            seed = self.hparams.sample_seed + resolution
            return per_sample_uniform(tuple(image.shape), batch["index"].cpu(), seed).to(image.device)

        images = {int(r): dequantize(batch["images"][r], self.n_bits, noise_for(r))
                  for r in self.resolutions}
        if self.channels_last:
            images = {r: x.contiguous(memory_format=torch.channels_last) for r, x in images.items()}
        return images, batch["label"]

    # --- optimization -------------------------------------------------------------------
    def _steps_per_epoch(self) -> int:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            raise ValueError("warmup_epochs needs a datamodule to count steps; set warmup_steps")
        batches = len(datamodule.train_dataloader())
        return max(1, math.ceil(batches / max(1, self.trainer.world_size)))

    def optimizer_groups(self) -> list[OptimizerGroup]:
        """The parameter groups and their settings. Default: every parameter with the
        module's own settings. Families whose parts follow different seed schedules
        (the cascade's Glow and SRFlow levels) return one group per part."""
        hp = self.hparams
        settings = OptimizerSettings(hp.lr, tuple(hp.betas), hp.weight_decay, hp.warmup_epochs,
                                     hp.warmup_steps, list(hp.lr_milestones or []), hp.lr_gamma)
        return [OptimizerGroup("model", list(self.parameters()), settings)]

    def _lr_factor(self, settings: OptimizerSettings):
        warmup = settings.warmup_steps
        if warmup is None:
            warmup = (int(round(settings.warmup_epochs * self._steps_per_epoch()))
                      if settings.warmup_epochs else 0)
        milestones = sorted(settings.lr_milestones or [])
        gamma = settings.lr_gamma

        def factor(step: int) -> float:
            ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
            return ramp * gamma ** sum(1 for m in milestones if step >= m)

        return factor

    def configure_optimizers(self):
        groups = self.optimizer_groups()
        if not any(group.params for group in groups):
            raise ValueError(f"{type(self).__name__} has no trainable parameters: every part is frozen")
        optimizer = torch.optim.Adamax(
            [{"params": g.params, "lr": g.settings.lr, "betas": tuple(g.settings.betas),
              "weight_decay": g.settings.weight_decay, "name": g.name} for g in groups])
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, [self._lr_factor(g.settings) for g in groups])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images, labels = self.prepare_batch(batch, noise=True)
        out = self.compute_losses(images, labels)
        self._log_metrics("train", out, on_step=True)
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        # Every process must take the same decision, or DDP's all-reduce would wait forever.
        finite = self.trainer.strategy.reduce(torch.isfinite(out.loss.detach()).float(), reduce_op="min")
        if not bool(finite):
            self._skip_step("loss")
            return out.loss.detach()
        self.manual_backward(out.loss)
        self._step_applied = True
        # With a GradScaler (16-mixed) Lightning unscales here, then calls
        # on_before_optimizer_step (clipping and the finiteness check) and steps.
        optimizer.step()
        if self._step_applied:
            self.lr_schedulers().step()
            groups = optimizer.param_groups
            for group in groups:
                name = "train/lr" if len(groups) == 1 else f"train/lr_{group['name']}"
                self.log(name, group["lr"], on_step=True, on_epoch=False)
        return out.loss.detach()

    def on_before_optimizer_step(self, optimizer) -> None:
        """Gradients are unscaled here: clip them, and drop a step whose gradient norm is
        not finite (DDP has already averaged the gradients, so all processes agree)."""
        params = [p for p in self.parameters() if p.grad is not None]
        max_norm = self.hparams.grad_clip_norm or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if torch.isfinite(grad_norm):
            self.log("train/grad_norm", grad_norm, on_step=True, on_epoch=False)
            return
        self._step_applied = False
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            # fp16: the GradScaler skips this step itself and lowers its scale, which is
            # routine early in training, so it is not counted as a skipped step.
            self.log("train/fp16_overflow", 1.0, on_step=True, on_epoch=False)
            return
        for p in params:  # an optimizer leaves parameters without gradients untouched
            p.grad = None
        self._skip_step("gradient")

    def _skip_step(self, reason: str) -> None:
        self.skipped_steps += 1
        self.log("train/skipped_steps", self.skipped_steps.float(), on_step=True, on_epoch=False)
        self.print(f"step {self.global_step}: non-finite {reason}, optimizer step skipped "
                   f"({int(self.skipped_steps)} so far)")

    # --- evaluation ---------------------------------------------------------------------
    def _log_metrics(self, split: str, out: LossOutput, on_step: bool = False) -> None:
        batch_size = out.batch_size or next(iter(out.log_prob.values())).shape[0]
        kwargs = dict(on_step=on_step, on_epoch=not on_step, batch_size=batch_size,
                      sync_dist=not on_step)
        self.log(f"{split}/loss", out.loss.detach(), prog_bar=split == "train", **kwargs)
        for resolution, log_prob in out.log_prob.items():
            bpd = bits_per_dim(log_prob.detach(), out.dims[resolution], self.n_bits).mean()
            self.log(f"{split}/bpd_{resolution}", bpd, prog_bar=split != "train", **kwargs)
        for name, value in out.extra.items():
            self.log(f"{split}/{name}", value.detach(), **kwargs)

    def _evaluate(self, batch: dict, split: str, batch_idx: int) -> None:
        # Evaluation noise comes from a forked RNG seeded by the batch index: val bpd of
        # different epochs compare, and validation never moves the training RNG stream
        # (exact resume relies on it).
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.hparams.sample_seed + 7919 * batch_idx)
            images, labels = self.prepare_batch(batch, noise=True)
            self._log_metrics(split, self.compute_losses(images, labels))
        if split == "val" and self._collecting_real_fid_features():
            for resolution, metric in self._val_fid_metrics().items():
                real = batch["images"][resolution]
                metric.update(torch.stack([as_rgb(reduce_bits(x, self.n_bits)) for x in real]), real=True)

    # --- in-loop FID (torchmetrics), for curves ----------------------------------------
    def _val_fid_enabled(self) -> bool:
        return bool(self.evaluation is not None and self.evaluation.val_fid_every_n_validations)

    def _val_fid_metrics(self) -> dict:
        # A plain dict, not a ModuleDict: the Inception weights stay out of the model's
        # state_dict, checkpoints and optimizer.
        if getattr(self, "_val_fid", None) is None:
            self._val_fid = {r: in_loop_fid(self.evaluation).to(self.device) for r in self.resolutions}
            self._val_fid_has_real = False
        return self._val_fid

    def _collecting_real_fid_features(self) -> bool:
        if not self._val_fid_enabled() or self.trainer.sanity_checking:
            return False
        self._val_fid_metrics()
        return not self._val_fid_has_real

    @torch.no_grad()
    def _log_val_fid(self) -> None:
        metrics = self._val_fid_metrics()
        settings = self.evaluation
        per_process = max(1, settings.val_num_samples // max(1, self.trainer.world_size))
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(settings.seed + self.global_rank)
            fakes = generate_uint8(lambda n: self.sample_images(n, settings.temperature), per_process,
                                   settings.batch_size, lambda x: quantize(x, self.n_bits))
        for resolution, metric in metrics.items():
            images = fakes[resolution]
            metric.update(torch.stack([as_rgb(x) for x in images]).to(self.device), real=False)
            self.log(f"val/fid_{resolution}", metric.compute().float(), sync_dist=False)
            metric.reset()  # fake features only: reset_real_features=False

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val", batch_idx)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test", batch_idx)

    # --- checkpoints and resume -----------------------------------------------------------
    def on_train_start(self) -> None:
        """A run resumed mid-epoch continues with the batches an uninterrupted run would
        have drawn next (the sampler's order depends on seed and epoch only). Lightning
        does not call on_train_epoch_start for the resumed epoch; on_train_start runs
        after the restore and before that epoch's iterator exists."""
        loop = self.trainer.fit_loop.epoch_loop
        if not loop.restarting:
            return
        done = loop.batch_progress.current.processed
        loader = self.trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        if done and isinstance(sampler, ResumableSampler):
            sampler.skip_next(done * loader.batch_size)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[RNG_KEY] = gather_rng_states()
        checkpoint[MODEL_KEY] = {"class": type(self).__name__, "name": self.model_name}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._check_checkpoint_matches(checkpoint)
        if RNG_KEY in checkpoint:
            restore_rng_states(checkpoint[RNG_KEY], self.global_rank)

    def _check_checkpoint_matches(self, checkpoint: dict) -> None:
        """A checkpoint of another model or configuration fails here with a message,
        not deep inside load_state_dict."""
        written_by = checkpoint.get(MODEL_KEY, {})
        ours = f"{type(self).__name__} {self.model_name!r}"
        theirs = f"{written_by.get('class', 'an unknown model')} {written_by.get('name', '')!r}"
        if written_by and written_by.get("class") != type(self).__name__:
            raise ValueError(f"this checkpoint was written by {theirs}, but this run builds {ours}; "
                             "pass a checkpoint of this model, or the config that wrote it")
        missing, unexpected, mismatched = state_dict_mismatch(self.state_dict(), checkpoint.get("state_dict", {}))
        if missing or unexpected or mismatched:
            raise ValueError(
                f"this checkpoint ({theirs}) does not fit this run's {ours}: {len(missing)} tensors "
                f"missing, {len(unexpected)} unexpected, {len(mismatched)} of another shape (e.g. "
                f"{(mismatched + missing + unexpected)[:3]}). The architecture settings differ from "
                "the run that wrote it; use its config (saved as config.yaml in its log folder).")

    def log_dir(self) -> Path:
        """Where tables, sweeps and sample grids go: Trainer.log_dir's rule without its
        broadcast, which would deadlock when only process 0 asks."""
        from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

        loggers = self.trainer.loggers
        if not loggers:
            return Path(self.trainer.default_root_dir)
        first = loggers[0]
        directory = first.log_dir if isinstance(first, (TensorBoardLogger, CSVLogger)) else first.save_dir
        return Path(directory or self.trainer.default_root_dir)

    def on_test_end(self) -> None:
        """Write the metrics table: bits/dim from the test loop, FID/KID per resolution.
        Every process draws its share of the samples; process 0 scores them."""
        table: dict = {}
        if self.evaluation is not None:
            settings = self.evaluation
            results = self.sample_quality(settings.temperature)
            sweep = {f"{t:g}": {str(r): row["fid"] for r, row in self.sample_quality(t).items()}
                     for t in settings.sweep_temperatures}
            table = {"evaluation": settings_dict(settings),
                     "fid": {str(r): row["fid"] for r, row in results.items()},
                     "kid": {str(r): row["kid"] for r, row in results.items()},
                     "kid_std": {str(r): row["kid_std"] for r, row in results.items()}}
            if sweep:
                table["temperature_sweep"] = sweep
        if not self.trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("test/")}
        table = {"model": self.model_name, "n_bits": self.n_bits,
                 "bpd": {k[len("test/bpd_"):]: v for k, v in metrics.items() if k.startswith("test/bpd_")},
                 "test_metrics": metrics, **table}
        if "temperature_sweep" in table:
            write_metrics_table(self.log_dir() / "temperature_sweep.json", table["temperature_sweep"])
            plot_temperature_sweep(self.log_dir() / "temperature_sweep.png", table["temperature_sweep"],
                                   f"{self.model_name}: FID vs temperature")
        if "fid" in table:
            flat = {f"test/{name}_{r}": v for name in ("fid", "kid") for r, v in table[name].items()}
            for logger in self.loggers:
                logger.log_metrics(flat, step=self.global_step)
        write_metrics_table(self.log_dir() / "metrics.json", table)
        self.print(f"metrics table: {self.log_dir() / 'metrics.json'}")

    @torch.no_grad()
    def generate_for_evaluation(self, temperature: float | list[float]) -> dict[int, Tensor]:
        """``evaluation.num_samples`` uint8 samples per resolution, split over the
        processes (each with its own seed) and gathered: the full set on every process."""
        settings = self.evaluation
        world, rank = self.trainer.world_size, self.global_rank
        share = math.ceil(settings.num_samples / world)
        devices = [self.device] if self.device.type == "cuda" else []
        was_training = self.training
        self.eval()
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(settings.seed + rank)
                fakes = generate_uint8(lambda n: self.sample_images(n, temperature), share,
                                       settings.batch_size, lambda x: quantize(x, self.n_bits))
        finally:
            self.train(was_training)
        if world > 1:
            fakes = {r: self.all_gather(x.to(self.device)).flatten(0, 1)[:settings.num_samples].cpu()
                     for r, x in fakes.items()}
        return fakes

    @torch.no_grad()
    def sample_quality(self, temperature: float | list[float]) -> dict[int, dict[str, float]]:
        """FID and KID of ``evaluation.num_samples`` samples at every resolution against
        the test split at that resolution (seed 000 sec. 4.2). Collective: every process
        calls it; process 0 returns the scores, the others an empty dict."""
        settings = self.evaluation
        datamodule = self.trainer.datamodule
        real_split = datamodule.datasets.get("test")
        if real_split is None:
            raise RuntimeError("FID compares with the test split; run `lightning test`")
        fakes = self.generate_for_evaluation(temperature)
        if not self.trainer.is_global_zero:
            return {}
        results = {}
        for resolution, images in fakes.items():
            cache_name = "-".join(str(part) for part in (
                type(datamodule).__name__, Path(str(datamodule.data_dir)).name or "data",
                datamodule.image_size, getattr(datamodule, "seed", 0), "test", len(real_split),
                resolution, self.n_bits, settings.feature_extractor))
            results[resolution] = fidelity(TensorImages(images),
                                           ImagesAtResolution(real_split, resolution, self.n_bits),
                                           settings, cache_name, cuda=self.device.type == "cuda")
            self.print(f"{self.model_name} at {resolution}px, temperature {temperature}: "
                       f"FID {results[resolution]['fid']:.2f}, KID {results[resolution]['kid']:.4f}")
        return results

    def on_validation_epoch_end(self) -> None:
        if self._val_fid_enabled() and not self.trainer.sanity_checking:
            # Counted in validation runs, which also works for step-based validation.
            runs = getattr(self, "_validation_runs", 0)
            if runs % self.evaluation.val_fid_every_n_validations == 0:
                self._log_val_fid()
            self._validation_runs = runs + 1
            self._val_fid_has_real = True  # one full validation run of real images
        every = self.hparams.sample_every_n_epochs
        if self.trainer.sanity_checking or not every or self.current_epoch % every:
            return
        if self.trainer.is_global_zero:
            self.log_sample_grids()

    @torch.no_grad()
    def log_sample_grids(self) -> list[Path]:
        """Draw a grid per resolution and temperature, save PNGs, send to the loggers.
        The noise comes from a forked RNG with a fixed seed: grids of successive epochs
        are comparable and the training RNG stream is untouched."""
        from torchvision.utils import make_grid

        saved = []
        out_dir = self.log_dir() / "samples"
        out_dir.mkdir(parents=True, exist_ok=True)
        devices = [self.device] if self.device.type == "cuda" else []
        was_training = self.training
        self.eval()
        try:
            for temperature in self.sample_temperatures:
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(self.hparams.sample_seed)
                    samples = self.sample_images(self.hparams.num_samples, temperature)
                for resolution, images in samples.items():
                    grid = make_grid(quantize(images.cpu(), self.n_bits),
                                     nrow=int(math.ceil(math.sqrt(images.shape[0]))), padding=1)
                    key = f"samples/res{resolution}_t{temperature:g}"
                    path = out_dir / f"step{self.global_step:08d}_res{resolution}_t{temperature:g}.png"
                    save_uint8_png(grid, path)
                    saved.append(path)
                    self._send_image(key, grid)
        finally:
            self.train(was_training)
        return saved

    def _send_image(self, key: str, grid: Tensor) -> None:
        from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=key, images=[grid.permute(1, 2, 0).numpy()], step=self.global_step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(key, grid, self.global_step)


def save_uint8_png(image: Tensor, path: Path) -> None:
    from PIL import Image

    array = image.permute(1, 2, 0).numpy()
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(path)
