"""The LightningModule base every model family shares: optimization and logging.

A family implements (see ``GlowModule`` for the shortest one):

* ``self.model``: its whole model (``flows.model.FlowModel``);
* :attr:`resolutions` and :attr:`in_channels`: what it needs from the data;
* :meth:`compute_losses`: a :class:`Batch` -> :class:`LossOutput` (the loss, the
  log-likelihood per resolution and whether it is exact or a bound, extra scalars);
* :meth:`sample_images`: n samples per resolution at a temperature (for the callbacks);
* :meth:`parts` (optional): the model's parts with their own optimizer settings,
  checkpoints and freezing (``parts.py``); by default the whole model is one part.

The base does the rest: dequantization into a :class:`Batch`, one Adamax/Adam group per
trainable part with warm-up and step decay, gradient clipping, skipping (and counting)
steps whose loss or gradients are not finite, bits per dim per resolution for
train/val/test (``bpd_R`` when exact, ``bpd_bound_R`` when the likelihood is a lower
bound), and checkpoints that refuse another model. Sample grids, FID, the metrics
table and mid-epoch resume are Lightning callbacks (``callbacks.py``).
"""
from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.core.mixins.hparams_mixin import _given_hyperparameters
from torch import Tensor, nn

from datamodules.pyramid import check_resolutions
from flows.base import LABELS
from flows.model import NoisyReconstruction, Objective, map_latents
from flows.quantization import bits_per_dim, check_n_bits, dequantize, per_sample_uniform
from lightning_modules.checkpointing import (MODEL_KEY, check_fits, check_written_by, load_checkpoint_file,
                                             newest_checkpoint, seeded_rng, upgrade_state_dict, written_by)
from lightning_modules.errors import ConfigurationError, TrainingDivergedError
from lightning_modules.parts import (OptimizerGroup, OptimizerSettings, Part, RelativeGradientClipping,
                                     build_optimizer, load_and_freeze, steps_per_epoch)

RELATIVE_CLIPPING_KEY = "msflows_relative_gradient_clipping"


@dataclass
class Batch:
    """A batch ready for the model. ``images``: {resolution: uniformly dequantized
    images in [-0.5, 0.5]}. ``clean``: {resolution: the same images at the centres of
    their bins} (deterministic: what conditional stages condition on). ``labels``: [B].
    ``noise``: {resolution: the uniform [0, 1) noise of ``images``}, which a model's own
    dequantizer takes (``FlowModel.training_loss``); missing: drawn by the model."""

    images: dict[int, Tensor]
    clean: dict[int, Tensor]
    labels: Tensor
    noise: dict[int, Tensor] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.labels.shape[0]


@dataclass
class LossOutput:
    """``loss``: the scalar to minimize. ``log_prob``: {resolution: log-density of the
    images at that resolution, nats per sample}, logged as bits per dim (Glow's formula
    with ``dims``). ``exact``: {resolution: False} where ``log_prob`` is a lower bound
    (logged as ``bpd_bound_R``); missing resolutions are exact. ``extra``: other
    scalars to log. ``batch_size``: needed when ``log_prob`` is empty."""

    loss: Tensor
    log_prob: dict[int, Tensor]
    dims: dict[int, int]
    exact: dict[int, bool] = field(default_factory=dict)
    extra: dict[str, Tensor] = field(default_factory=dict)
    batch_size: int | None = None


def bpd_name(resolution: int, exact: bool, bound_metric: str = "bpd_bound") -> str:
    return f"bpd_{resolution}" if exact else f"{bound_metric}_{resolution}"


class FlowModule(pl.LightningModule):
    """Shared training logic. A family module takes its own arguments and passes the rest,
    ``**training``, to this constructor, so every family accepts every argument below
    (a family states only the defaults it changes, e.g. Glow's relative clipping).

    Args:
        n_bits: bits per colour channel the data are reduced to before dequantizing.
        grad_clip_norm: clip the global gradient norm to this value (None: no clipping).
        grad_clip_relative: also clip it to this multiple of its running average
            (:class:`~lightning_modules.parts.RelativeGradientClipping`; None: off). The
            Glow configs use 2.0 (``benchmarks/learning_curves.py``: faster learning,
            fewer loss spikes than no clipping or a fixed threshold).
        evaluation_seed: seed of the evaluation dequantization noise, so val/test bits
            per dim of different epochs and runs compare.
        channels_last: keep parameters and inputs in channels-last memory format
            (faster convolutions on recent GPUs, same numbers).
        compile: wrap the loss computation in torch.compile (experimental; the first
            steps pay the compilation time).
        max_skipped_steps: stop with an error after this many consecutive optimizer
            steps skipped for a non-finite loss or gradient (a diverged run never
            advances global_step, so max_steps alone would never end it).
        accumulate_grad_batches: sum the gradients of this many batches (each loss
            scaled by 1/k) into one optimizer step: an effective batch of k x the data's
            batch size per process (seed 001's official code: micro-batches of 4 to 16).
            Lightning's ``trainer.accumulate_grad_batches`` does not apply to the manual
            optimization used here. The schedules count optimizer steps; the last group
            of an epoch may be shorter; a non-finite loss drops the whole group.
    """

    def __init__(self, *, n_bits: int = 8, grad_clip_norm: float | None = None,
                 grad_clip_relative: float | None = None, evaluation_seed: int = 1234, channels_last: bool = False, compile: bool = False,
                 max_skipped_steps: int = 100, accumulate_grad_batches: int = 1) -> None:
        super().__init__()
        self.automatic_optimization = False
        if accumulate_grad_batches < 1:
            raise ConfigurationError(f"accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
        self.accumulate_grad_batches = int(accumulate_grad_batches)
        self._accumulated = 0  # micro-batches whose gradients are summed, not yet stepped
        self.n_bits = check_n_bits(n_bits)
        if grad_clip_norm is not None and not grad_clip_norm > 0:
            raise ConfigurationError(f"grad_clip_norm must be > 0 or null, got {grad_clip_norm}")
        if max_skipped_steps < 1:
            raise ConfigurationError(f"max_skipped_steps must be >= 1, got {max_skipped_steps}")
        self.max_skipped_steps = max_skipped_steps
        self.grad_clip_norm = grad_clip_norm
        self.relative_clipping = RelativeGradientClipping(grad_clip_relative) if grad_clip_relative else None
        self.evaluation_seed = evaluation_seed
        self.channels_last = channels_last
        self.compile_losses = compile
        self._compiled = False
        # A buffer, so the count survives checkpoints and resumes. The run of consecutive
        # skips is not saved: a resumed run starts with a fresh allowance.
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        self.consecutive_skipped_steps = 0

    def save_config(self) -> None:
        """Record the constructor's arguments as hyper-parameters. Under the CLI they are
        the parsed config (models given by class_path stay dicts); built in Python, the
        arguments that are modules (or hold them) are left out, since the checkpoint's
        state dict already has their weights."""
        frame = inspect.currentframe().f_back
        if _given_hyperparameters.get() is not None:
            self.save_hyperparameters(frame=frame)
            return
        arguments = inspect.getargvalues(frame).locals
        holds_module = [name for name, value in arguments.items()
                        if name != "self" and _holds_module(value)]
        self.save_hyperparameters(ignore=holds_module, frame=frame)

    # --- what a family implements -------------------------------------------------
    model: nn.Module
    # The weight of each named auxiliary term of the model's Objective in the loss (e.g.
    # GlowCC's class_bits, lambda_c); a term without one counts fully.
    loss_weights: dict[str, float] = {}
    # The name of a bits-per-dim bound in the logs (``<bound_metric>_R``): the cascade's
    # sum of stage likelihoods is ``bpd_bound``, a variational model's ELBO ``elbo_bpd``.
    bound_metric: str = "bpd_bound"

    # Defaults for a model of one image size (every family but the cascade, which
    # overrides them): its resolution, its condition, its samples and its data.
    @property
    def resolution(self) -> int:
        return self.model.image_size

    @property
    def resolutions(self) -> list[int]:
        return [self.resolution]

    def condition(self, labels: Tensor) -> dict | None:
        """The model's ``cond`` for a batch's labels: the labels for a class-conditional
        model, else None."""
        return {LABELS: labels} if self.model.num_classes else None

    @property
    def in_channels(self) -> int:
        return self.model.in_channels

    def compute_losses(self, batch: Batch) -> LossOutput:
        """Default: the model's own objective (``FlowModel.training_loss``) at its one
        resolution."""
        r = self.resolution
        return self.loss_output(self.model.training_loss(batch.clean[r], self.condition(batch.labels),
                                                         n_bits=self.n_bits, noise=batch.noise.get(r)), r)

    def weighted_loss(self, objective: Objective) -> Tensor:
        """The objective's loss plus its auxiliary terms, each times its ``loss_weights``."""
        return objective.loss + sum((self.loss_weights.get(name, 1.0) * value
                                     for name, value in objective.terms.items()), objective.loss.new_zeros(()))

    def loss_output(self, objective: Objective, resolution: int) -> LossOutput:
        return LossOutput(self.weighted_loss(objective), {resolution: objective.log_prob},
                          {resolution: objective.dims}, {resolution: objective.exact},
                          {**objective.terms, **objective.extra})

    def sample_images(self, n: int, temperature: float | list[float]) -> dict[int, Tensor]:
        """Samples in model space ([-0.5, 0.5]) per resolution; a class-conditional
        model's classes cycle along each row of a grid."""
        labels = torch.arange(n, device=self.device) % max(1, self.model.num_classes)
        return {self.resolution: self.model.sample(n, self.condition(labels), temperature)}

    @property
    def model_name(self) -> str:
        """The name the metrics table uses (seed 000 Tables 4.2 / 4.3 style): the model's
        ``display_name``; a family overrides it where the module adds to the name."""
        return getattr(self.model, "display_name", type(self).__name__)

    def check_temperature(self, temperature) -> None:
        """Raise ValueError when ``sample_images`` cannot take ``temperature`` (callbacks
        check theirs before the first step). Default: one number."""
        if not isinstance(temperature, (int, float)):
            raise ValueError(f"{type(self).__name__} samples at one temperature, got {temperature!r}")

    # --- for the analyses (lightning_modules/analyses.py) ------------------------------------
    noise_sweep_sigmas: list[float] = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25]  # seed 000 Fig. 4.1 (Glow)

    def model_input(self, batch: Batch) -> tuple[Any, dict | None]:
        """(x, cond) as ``self.model.encode`` takes them for a batch."""
        return batch.images[self.resolution], self.condition(batch.labels)

    def images_of(self, decoded: Any) -> dict[int, Tensor]:
        """The model's data (an input or a decoding) as {resolution: images}."""
        return {self.resolution: decoded}

    def noise_std(self, sigma: float) -> float:
        """The standard deviation of the latent noise a ``sigma`` setting means (std)."""
        return sigma

    @torch.no_grad()
    def noisy_reconstructions(self, batch: Batch, sigma: float) -> dict[int, NoisyReconstruction]:
        """f^-1(f(x) + sigma eps) through the whole model, the same sigma on every latent;
        failed where non-finite (seed 000 sec. 4.4.2)."""
        x, cond = self.model_input(batch)
        std = self.noise_std(sigma)
        noisy = map_latents(lambda z: z + std * torch.randn_like(z), self.model.encode(x, cond).latents)
        decoded = self.images_of(self.model.decode(noisy, cond))
        return {r: NoisyReconstruction(images, ~torch.isfinite(images).flatten(1).all(dim=1))
                for r, images in decoded.items()}

    def parts(self) -> list[Part]:
        """The model's parts; by default one, the whole model, with the module's
        ``optimizer_settings``."""
        return [Part("model", self.model, getattr(self, "optimizer_settings", OptimizerSettings()), ["model."])]

    # --- parts: loading, freezing, optimizer groups ---------------------------------------
    def load_parts(self, init_checkpoint: str | None = None) -> None:
        """Load and freeze the parts; families call it at the end of ``__init__``."""
        load_and_freeze(self.parts(), init_checkpoint)

    def _frozen_parts(self) -> list[nn.Module]:
        return [part.module for part in self.parts() if not part.trainable]

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._frozen_parts():  # frozen parts never leave eval mode
            module.eval()
        return self

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        for part in self.parts():
            if part.trainable:
                for freeze in part.freezes:
                    freeze.module.requires_grad_(not freeze.frozen(self.global_step, self.current_epoch))

    def optimizer_groups(self) -> list[OptimizerGroup]:
        return [OptimizerGroup(part.name, list(part.module.parameters()), part.optimizer)
                for part in self.parts() if part.trainable]

    def configure_optimizers(self):
        return build_optimizer(self.optimizer_groups(), lambda: steps_per_epoch(self.trainer))

    # --- data -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if datamodule is None:
            return
        missing = [r for r in self.resolutions if r not in datamodule.resolutions]
        if missing:
            fix = f"add {missing} to data.init_args.resolutions"
            image_size = getattr(getattr(datamodule, "pyramid", None), "image_size", None)
            try:  # a pyramid only halves its image_size: a larger resolution cannot be added
                check_resolutions(image_size, [*datamodule.resolutions, *missing])
            except (TypeError, ValueError):
                fix = (f"set data.init_args.image_size: {max(self.resolutions)} and data.init_args.resolutions: "
                       f"{sorted(self.resolutions, reverse=True)} (the data's image_size is {image_size}), or "
                       f"build the model for {image_size}-pixel images")
            raise ConfigurationError(
                f"{type(self).__name__} models resolutions {self.resolutions} but the data "
                f"module yields {datamodule.resolutions}; {fix}")
        if datamodule.channels != self.in_channels:
            raise ConfigurationError(f"the data have {datamodule.channels} channels but the model expects "
                             f"{self.in_channels}; set in_channels: {datamodule.channels} in the model")

    def configure_model(self) -> None:
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        if self.compile_losses and not self._compiled:
            # The compiled function is an attribute of this instance: the state_dict and
            # checkpoints keep their plain keys.
            self.compute_losses = torch.compile(self.compute_losses)
            self._compiled = True

    def prepare_batch(self, batch: dict, noise: bool = True) -> Batch:
        """Dequantize every resolution. Training noise comes from the RNG stream; in
        evaluation (``self.training`` False) each image's noise is a function of its
        dataset index, so val/test bpd do not depend on batching or the process count."""
        def noise_for(resolution: int) -> Tensor:
            image = batch["images"][resolution]
            if not noise:
                return torch.full(image.shape, 0.5, device=image.device)
            if self.training or "index" not in batch:
                return torch.rand(image.shape, device=image.device)
            seed = self.evaluation_seed + resolution
            return per_sample_uniform(tuple(image.shape), batch["index"].cpu(), seed).to(image.device)

        uint8 = {int(r): batch["images"][r] for r in self.resolutions}
        uniform = {r: noise_for(r) for r in uint8}
        images = {r: dequantize(x, self.n_bits, uniform[r]) for r, x in uint8.items()}
        clean = {r: dequantize(x, self.n_bits, noise=False) for r, x in uint8.items()}
        if self.channels_last:
            images, clean = ({r: x.contiguous(memory_format=torch.channels_last) for r, x in d.items()}
                             for d in (images, clean))
        return Batch(images, clean, batch["label"], uniform)

    # --- optimization -------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        out = self.compute_losses(self.prepare_batch(batch, noise=True))
        self._log_metrics("train", out, on_step=True)
        optimizer = self.optimizers()
        k = self.accumulate_grad_batches
        if self._accumulated == 0:
            optimizer.zero_grad(set_to_none=True)
        # Every process must take the same decision, or DDP's all-reduce would wait forever.
        finite = self.trainer.strategy.reduce(torch.isfinite(out.loss.detach()).float(), reduce_op="min")
        if not bool(finite):
            # The group's gradients are dropped with it: a step from part of a group would
            # weigh its micro-batches by 1/k of a batch they do not fill.
            self._accumulated = 0
            optimizer.zero_grad(set_to_none=True)
            self._skip_step("loss")
            return out.loss.detach()
        self.manual_backward(out.loss / k if k > 1 else out.loss)
        self._accumulated += 1
        last_of_epoch = batch_idx + 1 >= getattr(self.trainer, "num_training_batches", float("inf"))
        if self._accumulated < k and not last_of_epoch:
            return out.loss.detach()
        self._accumulated = 0
        self._step_applied = True
        # With a GradScaler (16-mixed) Lightning unscales here, then calls
        # on_before_optimizer_step (clipping and the finiteness check) and steps.
        optimizer.step()
        if self._step_applied:
            self.consecutive_skipped_steps = 0
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
        threshold = self.grad_clip_norm or float("inf")
        if self.relative_clipping is not None:
            threshold = min(threshold, self.relative_clipping.threshold())
        grad_norm = torch.nn.utils.clip_grad_norm_(params, threshold)
        if torch.isfinite(grad_norm):
            self.log("train/grad_norm", grad_norm, on_step=True, on_epoch=False)
            if self.relative_clipping is not None:
                self.relative_clipping.update(float(grad_norm))
                self.log("train/grad_clip_threshold", min(threshold, 1e30), on_step=True, on_epoch=False)
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
        self.consecutive_skipped_steps += 1
        self.log("train/skipped_steps", self.skipped_steps.float(), on_step=True, on_epoch=False)
        self.log("train/consecutive_skipped_steps", float(self.consecutive_skipped_steps),
                 on_step=True, on_epoch=False)
        self.log(f"train/skipped_for_non_finite_{reason}", 1.0, on_step=True, on_epoch=False)
        self.print(f"step {self.global_step}: non-finite {reason}, optimizer step skipped "
                   f"({self.consecutive_skipped_steps} in a row, {int(self.skipped_steps)} so far)")
        self._last_skip_reason = reason
        if self.consecutive_skipped_steps >= self.max_skipped_steps:
            raise TrainingDivergedError(self._divergence_message(reason))

    def on_train_end(self) -> None:
        """A run that reaches max_epochs (or max_steps) while diverged is no success: with
        fewer steps per epoch than ``max_skipped_steps`` the in-step rule never fires.
        Diverged here: the skips in a row at the end are at least
        min(max_skipped_steps, optimizer steps per epoch), i.e. a whole epoch (or the
        allowance) without an applied step. A few trailing skips of a healthy run pass."""
        epoch_steps = self.trainer.num_training_batches
        if math.isfinite(epoch_steps):
            epoch_steps = math.ceil(epoch_steps / max(1, int(getattr(self, "accumulate_grad_batches", 1))))
        if self.consecutive_skipped_steps and self.consecutive_skipped_steps >= min(self.max_skipped_steps,
                                                                                  epoch_steps):
            raise TrainingDivergedError(self._divergence_message(getattr(self, "_last_skip_reason", "loss"),
                                                                 at_end=True))

    def _divergence_message(self, reason: str, at_end: bool = False) -> str:
        trainer = self.trainer
        callback = trainer.checkpoint_callback
        rates = sorted({f"{group['lr']:.3g}" for group in self.optimizers().param_groups})
        if at_end:
            # last.ckpt holds the diverged state; the best one has a finite metric
            # (lightning_modules.ModelCheckpoint never ranks a non-finite value best).
            checkpoint = getattr(callback, "best_model_path", "") or \
                "none (no checkpoint has a finite metric: start again)"
            what = (f"training ended diverged: its last {self.consecutive_skipped_steps} optimizer steps in a row "
                    f"were skipped because the {reason} was not finite (a whole epoch, or max_skipped_steps = "
                    f"{self.max_skipped_steps}, without an applied step). The best checkpoint is {checkpoint}")
        else:
            checkpoint = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "") or \
                newest_checkpoint(trainer.default_root_dir) or "none (none was written yet)"
            what = (f"training stopped: {self.consecutive_skipped_steps} optimizer steps in a row were skipped "
                    f"because the {reason} was not finite (the last at step {self.global_step}; "
                    f"max_skipped_steps is {self.max_skipped_steps}). The last good checkpoint is {checkpoint}")
        return (f"{what}. Try a lower learning rate (now {', '.join(rates)}), "
                f"stronger gradient clipping (grad_clip_norm, now {self.grad_clip_norm}), or full precision "
                f"(trainer.precision, now {trainer.precision}), then resume from that checkpoint.")

    # --- logging ------------------------------------------------------------------------
    def _log_metrics(self, split: str, out: LossOutput, on_step: bool = False) -> None:
        batch_size = out.batch_size or next(iter(out.log_prob.values())).shape[0]
        kwargs = dict(on_step=on_step, on_epoch=not on_step, batch_size=batch_size,
                      sync_dist=not on_step)
        self.log(f"{split}/loss", out.loss.detach(), prog_bar=split == "train", **kwargs)
        for resolution, log_prob in out.log_prob.items():
            bpd = bits_per_dim(log_prob.detach(), out.dims[resolution], self.n_bits).mean()
            name = bpd_name(resolution, out.exact.get(resolution, True), self.bound_metric)
            self.log(f"{split}/{name}", bpd, prog_bar=split != "train", **kwargs)
        for name, value in out.extra.items():
            self.log(f"{split}/{name}", value.detach(), **kwargs)

    def _evaluate(self, batch: dict, split: str, batch_idx: int) -> None:
        # Evaluation noise comes from a forked RNG seeded by the batch index: val bpd of
        # different epochs compare, and validation never moves the training RNG stream
        # (exact resume relies on it).
        with seeded_rng(self.evaluation_seed + 7919 * batch_idx, self.device):
            self._log_metrics(split, self.compute_losses(self.prepare_batch(batch, noise=True)))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val", batch_idx)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test", batch_idx)

    # --- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[MODEL_KEY] = written_by(type(self).__name__, self.model_name)
        if self.relative_clipping is not None:
            checkpoint[RELATIVE_CLIPPING_KEY] = self.relative_clipping.state()

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        """Lightning's, after reading the file through :func:`load_checkpoint_file`: an
        unreadable file (truncated, text, a directory) or one of another family fails with
        a CheckpointError paragraph, not a raw PytorchStreamReader error or Lightning's
        advice to import the other family's module."""
        if isinstance(checkpoint_path, (str, os.PathLike)):
            check_written_by(load_checkpoint_file(checkpoint_path), cls.__name__, str(checkpoint_path))
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Runs before Lightning loads the state dict: map the keys of earlier versions,
        and fail with a message (not deep inside load_state_dict) on a checkpoint of
        another model or configuration."""
        if self.relative_clipping is not None:
            self.relative_clipping.load_state(checkpoint.get(RELATIVE_CLIPPING_KEY))
        checkpoint["state_dict"] = upgrade_state_dict(checkpoint.get("state_dict", {}),
                                                      checkpoint.get("hyper_parameters") or {})
        check_fits(checkpoint, type(self).__name__, self.model_name, self.state_dict())


def _holds_module(value) -> bool:
    if isinstance(value, nn.Module):
        return True
    if isinstance(value, (list, tuple)):
        return any(_holds_module(v) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        return any(_holds_module(getattr(value, name)) for name in value.__dataclass_fields__)
    return False
