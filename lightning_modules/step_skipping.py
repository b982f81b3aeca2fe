"""Skipping optimizer steps whose loss or gradients are not finite, and ending a run that
diverged with a message that says what to do (``FlowModule`` mixes this in).

A skipped step changes no parameter. The count of skipped steps is a buffer of the
module (``skipped_steps``), so it survives checkpoints and resumes; the run of
consecutive skips is not saved: a resumed run starts with a fresh allowance.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_modules.run_folder import newest_checkpoint
from lightning_modules.errors import ConfigurationError, TrainingDivergedError


class NonFiniteStepSkipping:
    """For a LightningModule with manual optimization: call :meth:`init_step_skipping`
    in ``__init__``, :meth:`finite_on_every_process` on the loss before backward,
    :meth:`skip_step` where a step is dropped and :meth:`step_applied` after one is taken."""

    def init_step_skipping(self, max_skipped_steps: int) -> None:
        if max_skipped_steps < 1:
            raise ConfigurationError(f"max_skipped_steps must be >= 1, got {max_skipped_steps}")
        self.max_skipped_steps = max_skipped_steps
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        self.consecutive_skipped_steps = 0
        self._last_skip_reason = "loss"

    def finite_on_every_process(self, loss: Tensor) -> bool:
        """Every process must take the same decision, or DDP's all-reduce would wait forever."""
        return bool(self.trainer.strategy.reduce(torch.isfinite(loss.detach()).float(), reduce_op="min"))

    def step_applied(self) -> None:
        self.consecutive_skipped_steps = 0

    def skip_step(self, reason: str) -> None:
        """Count a dropped step (``reason``: "loss" or "gradient"), log it, and stop with
        :class:`TrainingDivergedError` after ``max_skipped_steps`` in a row."""
        self.skipped_steps += 1
        self.consecutive_skipped_steps += 1
        log = dict(on_step=True, on_epoch=False)
        self.log("train/skipped_steps", self.skipped_steps.float(), **log)
        self.log("train/consecutive_skipped_steps", float(self.consecutive_skipped_steps), **log)
        self.log(f"train/skipped_for_non_finite_{reason}", 1.0, **log)
        self.print(f"step {self.global_step}: non-finite {reason}, optimizer step skipped "
                   f"({self.consecutive_skipped_steps} in a row, {int(self.skipped_steps)} so far)")
        self._last_skip_reason = reason
        if self.consecutive_skipped_steps >= self.max_skipped_steps:
            raise TrainingDivergedError(self.divergence_message(reason))

    def on_train_end(self) -> None:
        """A run that reaches max_epochs (or max_steps) while diverged is no success: with
        fewer steps per epoch than ``max_skipped_steps`` the in-step rule never fires.
        Diverged here: the skips in a row at the end are at least
        min(max_skipped_steps, optimizer steps per epoch), i.e. a whole epoch (or the
        allowance) without an applied step. A few trailing skips of a healthy run pass."""
        epoch_steps = self.trainer.num_training_batches
        if math.isfinite(epoch_steps):
            epoch_steps = math.ceil(epoch_steps / max(1, int(getattr(self, "accumulate_grad_batches", 1))))
        if self.consecutive_skipped_steps and \
                self.consecutive_skipped_steps >= min(self.max_skipped_steps, epoch_steps):
            raise TrainingDivergedError(self.divergence_message(self._last_skip_reason, at_end=True))

    def divergence_message(self, reason: str, at_end: bool = False) -> str:
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
