"""The LightningModule base every model family shares: optimization and logging.

A family implements what ``family.FamilyInterface`` lists (its model, resolutions,
``compute_losses``, samples; see ``GlowModule`` for the shortest one, which only builds
its model). Around it the base mixes in, one concern per module:

* ``family.py``: the family contract, every hook a callback reads, with its one-image-size
  defaults (the model's own ``training_loss`` as the loss, bits per dim at one
  resolution, the analysis hooks);
* ``step_skipping.py``: steps with a non-finite loss or gradient are skipped and counted,
  a diverged run ends with advice;
* ``parts.py``: parts with their own optimizer settings, checkpoints and freezing;
* ``checkpoint_identity.py`` (``CheckpointIdentity``): checkpoints name their model, refuse others.

The base itself: the uint8 batch to a :class:`Batch` (the dequantization noise, fixed
per image in evaluation), one Adamax/Adam group per trainable part with warm-up and step
decay, gradient clipping, gradient accumulation, and the logs (``bpd_R`` when exact,
``bpd_bound_R`` when the likelihood is a lower bound). Sample grids, FID, the metrics
table and mid-epoch resume are Lightning callbacks (``sample_grids.py``, ``evaluation.py``,
``exact_resume.py``).
"""
from __future__ import annotations

import inspect

import pytorch_lightning as pl
import torch
from torch import Tensor

from datamodules.pyramid import data_mismatch
from flows.quantization import check_n_bits, dequantize, likelihood_figure, per_sample_uniform
from lightning_modules.checkpoint_identity import CheckpointIdentity, save_constructor_arguments
from lightning_modules.rng_states import seeded_rng
from lightning_modules.errors import ConfigurationError
from lightning_modules.family import Batch, FamilyInterface, LossOutput, bpd_name
from lightning_modules.lightning_internals import attached_trainer
from lightning_modules.parts import (RelativeGradientClipping, TrainableParts, build_optimizer, steps_per_epoch,
                                    total_steps)
from lightning_modules.step_skipping import NonFiniteStepSkipping

RELATIVE_CLIPPING_KEY = "msflows_relative_gradient_clipping"


class FlowModule(FamilyInterface, NonFiniteStepSkipping, TrainableParts, CheckpointIdentity,
                 pl.LightningModule):
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
        compile: wrap the loss computation (forward and backward) in torch.compile: one
            graph per family (tests/test_host_syncs.py); the first step pays the
            compilation (README, Performance: when it pays back).
        compile_sampling: compile what sampling runs
            (:meth:`flows.model.FlowModel.compile_sampler`: a Glow's whole sampling
            pass, TarFlow's patch step over a static key/value cache, a diffusion
            prior's denoiser step); the first sampling call pays the compilation.
        max_skipped_steps: stop with an error after this many consecutive optimizer
            steps skipped for a non-finite loss or gradient (a diverged run never
            advances global_step, so max_steps alone would never end it).
        accumulate_grad_batches: sum the gradients of this many batches (each loss
            scaled by 1/k) into one optimizer step: an effective batch of k x the data's
            batch size per process (seed 001's official code: micro-batches of 4 to 16).
            Lightning's ``trainer.accumulate_grad_batches`` does not apply to the manual
            optimization used here. The schedules count optimizer steps; the last group
            of an epoch may be shorter; a non-finite loss drops the whole group.
        accept_changed_settings: model settings (dotted keys, or their last part; "*" for
            all) allowed to differ from those saved in a checkpoint this run loads (a
            resume, ``lightning test``); any other difference is refused
            (``checkpoint_identity.check_settings``). Optimization and sampling settings may
            always differ (``checkpoint_identity.RUN_SETTINGS``).
    """

    def __init__(self, *, n_bits: int = 8, grad_clip_norm: float | None = None,
                 grad_clip_relative: float | None = None, evaluation_seed: int = 1234, channels_last: bool = False, compile: bool = False,
                 compile_sampling: bool = False,
                 max_skipped_steps: int = 100, accumulate_grad_batches: int = 1,
                 accept_changed_settings: list[str] | None = None) -> None:
        super().__init__()
        self.accept_changed_settings = tuple(accept_changed_settings or ())
        self.automatic_optimization = False
        if accumulate_grad_batches < 1:
            raise ConfigurationError(f"accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
        self.accumulate_grad_batches = int(accumulate_grad_batches)
        self._accumulated = 0  # micro-batches whose gradients are summed, not yet stepped
        self.n_bits = check_n_bits(n_bits)
        if grad_clip_norm is not None and not grad_clip_norm > 0:
            raise ConfigurationError(f"grad_clip_norm must be > 0 or null, got {grad_clip_norm}")
        self.grad_clip_norm = grad_clip_norm
        self.relative_clipping = RelativeGradientClipping(grad_clip_relative) if grad_clip_relative else None
        self.evaluation_seed = evaluation_seed
        self.channels_last = channels_last
        self.compile_losses = compile
        self.compile_sampling = compile_sampling
        self._compiled = False
        self.init_step_skipping(max_skipped_steps)

    @property
    def micro_batches_pending(self) -> int:
        """Micro-batches whose summed gradients wait for the optimizer step (0 at a step
        boundary, where a checkpoint holds everything; signals.py saves only there)."""
        return self._accumulated

    def save_config(self) -> None:
        """Record the family constructor's arguments as hyper-parameters
        (:func:`~lightning_modules.checkpoint_identity.save_constructor_arguments`)."""
        save_constructor_arguments(self, inspect.currentframe().f_back)

    def configure_optimizers(self):
        """One Adamax/Adam group per trainable part (``parts.py``)."""
        return build_optimizer(self.optimizer_groups(), lambda: steps_per_epoch(self.trainer),
                               lambda: total_steps(self.trainer))

    # --- data -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        trainer = attached_trainer(self)
        datamodule = getattr(trainer, "datamodule", None) if trainer else None
        problem = datamodule and data_mismatch(datamodule, self.resolutions, self.in_channels, type(self).__name__,
                                               self.num_classes)
        if problem:
            raise ConfigurationError(problem)

    def configure_model(self) -> None:
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        if self.compile_losses and not self._compiled:
            # The compiled function is an attribute of this instance: the state_dict and
            # checkpoints keep their plain keys.
            self.compute_losses = torch.compile(self.compute_losses)
        if self.compile_sampling and not self._compiled:
            self.model.compile_sampler()
        self._compiled = self._compiled or self.compile_losses or self.compile_sampling

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

    # --- work beside the loss (outside the function ``compile: true`` wraps) ----------------
    def training_diagnostics(self, batch: Batch) -> dict[str, Tensor]:
        """Figures to log at a training step that the loss does not need (the cascade's
        failure probe). Default: none."""
        return {}

    # --- optimization -------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        prepared = self.prepare_batch(batch, noise=True)
        out = self.compute_losses(prepared)
        out.extra.update(self.training_diagnostics(prepared))
        self._log_metrics("train", out, on_step=True)
        optimizer = self.optimizers()
        k = self.accumulate_grad_batches
        if self._accumulated == 0:
            optimizer.zero_grad(set_to_none=True)
        if not self.finite_on_every_process(out.loss):
            # The group's gradients are dropped with it: a step from part of a group would
            # weigh its micro-batches by 1/k of a batch they do not fill.
            self._accumulated = 0
            optimizer.zero_grad(set_to_none=True)
            self.skip_step("loss")
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
            self.step_applied()
            self.lr_schedulers().step()
            groups = optimizer.param_groups
            for group in groups:
                name = "train/lr" if len(groups) == 1 else f"train/lr_{group['name']}"
                self.log(name, group["lr"], on_step=True, on_epoch=False)
        return out.loss.detach()

    def on_validation_model_zero_grad(self) -> None:
        """Lightning zeroes the gradients before validation (its own accumulation is 1
        under manual optimization). A validation inside an accumulation group must not
        drop the micro-batches already summed: the group goes on after it, as if the
        validation had come at the group's end."""
        if not self._accumulated:
            super().on_validation_model_zero_grad()

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
        self.skip_step("gradient")

    # --- logging ------------------------------------------------------------------------
    def _log_metrics(self, split: str, out: LossOutput, on_step: bool = False) -> None:
        batch_size = out.batch_size or next(iter(out.log_prob.values())).shape[0]
        kwargs = dict(on_step=on_step, on_epoch=not on_step, batch_size=batch_size,
                      sync_dist=not on_step)
        self.log(f"{split}/loss", out.loss.detach(), prog_bar=split == "train", **kwargs)
        # The progress bar shows the largest resolution's figure only (what the configs
        # monitor): a cascade's every figure would push it past the terminal's width.
        shown = max(out.log_prob, default=None)
        for resolution, log_prob in out.log_prob.items():
            continuous = resolution in out.continuous
            bpd = likelihood_figure(log_prob.detach(), out.dims[resolution], self.n_bits, continuous).mean()
            name = bpd_name(resolution, out.exact.get(resolution, True), self.bound_metric, continuous,
                            self.continuous_metric)
            self.log(f"{split}/{name}", bpd, prog_bar=split != "train" and resolution == shown, **kwargs)
        for name, value in out.extra.items():
            self.log(f"{split}/{name}", value.detach(), **kwargs)

    def _evaluate(self, batch: dict, split: str, batch_idx: int) -> None:
        # Evaluation noise comes from a forked RNG seeded by the batch index: val bpd of
        # different epochs compare, and validation never moves the training RNG stream
        # (exact resume relies on it).
        with seeded_rng(self.evaluation_seed + 7919 * batch_idx, self.device):
            self._log_metrics(split, self.evaluate_batch(self.prepare_batch(batch, noise=True)))

    def evaluate_batch(self, batch: Batch) -> LossOutput:
        """The val/test figures of a batch: the loss's, with ``evaluation_log_probs`` where
        the loss's log-likelihood was a random estimate."""
        out = self.compute_losses(batch)
        if out.estimated:
            out.log_prob.update(self.evaluation_log_probs(batch, out.estimated))
        return out

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val", batch_idx)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test", batch_idx)

    # --- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.relative_clipping is not None:
            checkpoint[RELATIVE_CLIPPING_KEY] = self.relative_clipping.state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.relative_clipping is not None:
            self.relative_clipping.load_state(checkpoint.get(RELATIVE_CLIPPING_KEY))
        super().on_load_checkpoint(checkpoint)
