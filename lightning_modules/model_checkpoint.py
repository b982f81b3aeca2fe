"""``lightning_modules.ModelCheckpoint``: Lightning's ModelCheckpoint (same arguments)
with two changes the experiment configs rely on.

* ``last.ckpt`` follows ``every_n_train_steps`` from the first step. Lightning defers a
  step save to the next validation end while the monitored metric does not exist yet,
  so a run killed before its first validation has nothing to resume from. Here the
  last checkpoint is written on schedule anyway; the top-k save still waits for the
  metric (a top-k file is named and ranked by it).
* A non-finite monitored value (a diverged run's ``val/bpd = nan``) is never a top-k
  candidate: Lightning ranks nan as +inf, so with ``save_top_k: 1`` the first
  checkpoint, nan or not, became "best". ``last.ckpt`` is still written.
* A monitored ``<split>/bpd_R`` that the module logs as a bound (``<split>/bpd_bound_R``,
  or its ``bound_metric``: a learned dequantizer or a bound prior turned the exact
  figure into one) is read under that name: the same images' bits per dim, so a config
  keeps working when a setting such as ``variational_dequantization.yaml`` makes the
  likelihood a bound. The logs keep the bound's name.

For manual optimization (the flow families), the step save is Lightning's without its
warning about a "pre-optimization state": these modules step inside ``training_step``
and the state after the step is the one to resume from.
"""
from __future__ import annotations

import re
import time

import torch
from pytorch_lightning.callbacks import ModelCheckpoint as LightningModelCheckpoint
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from lightning_modules.errors import ConfigurationError
from lightning_modules.family import NOISY_DATA_METRIC


class ModelCheckpoint(LightningModelCheckpoint):
    # The changes above, then Lightning's argument documentation (for `lightning fit --help`).
    __doc__ = f"{__doc__}\n{LightningModelCheckpoint.__doc__}"
    _last_only_step: int | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self._every_n_train_steps
        due = n >= 1 and trainer.global_step % n == 0 and not self._should_skip_saving_checkpoint(trainer)
        if not due:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        candidates = self._monitor_candidates(trainer)
        if self.monitor is not None and self.monitor not in candidates:
            # Before the first validation. The step counter stays "not saved", so the
            # deferred top-k save at the validation end (possibly at this same step) runs.
            if self.save_last and self._last_only_step != trainer.global_step:
                saved = self._last_global_step_saved
                self._save_last_checkpoint(trainer, candidates)
                self._last_global_step_saved = saved
                self._last_only_step = trainer.global_step  # once per step (accumulated micro-batches)
            self._defer_save_until_validation = True
            return
        if pl_module.automatic_optimization:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
        self._last_time_checked = time.monotonic()

    def check_monitor_top_k(self, trainer, current=None) -> bool:
        if current is not None:
            finite = bool(torch.isfinite(torch.as_tensor(current)).all())
            # Every process takes the same decision (the base class's is collective too).
            if not trainer.strategy.reduce_boolean_decision(finite, all=True):
                rank_zero_warn(f"ModelCheckpoint: {self.monitor} is {float(current)} at step {trainer.global_step}, "
                               "so this checkpoint is not a candidate for the best ones (a diverged model is "
                               "never best); last.ckpt is still written")
                return False
        return super().check_monitor_top_k(trainer, current)

    def _monitor_candidates(self, trainer) -> dict:
        candidates = super()._monitor_candidates(trainer)
        match = re.fullmatch(r"(\w+)/bpd_(\d+)", self.monitor or "")
        bound = getattr(trainer.lightning_module, "bound_metric", None)
        noisy = match and f"{match[1]}/{NOISY_DATA_METRIC}_{match[2]}"
        if match and self.monitor not in candidates and noisy in candidates:
            raise ConfigurationError(f"ModelCheckpoint monitors {self.monitor}, but the model trains on noisy data "
                                     "(noise augmentation), whose figure is not the discrete data's bits per dim: "
                                     f"monitor {noisy} (or train with uniform dequantization)")
        if match and self.monitor not in candidates and bound:
            name = f"{match[1]}/{bound}_{match[2]}"
            if name in candidates:
                candidates[self.monitor] = candidates[name]
        return candidates
