"""``lightning_modules.ModelCheckpoint``: Lightning's ModelCheckpoint (same arguments)
with the changes the experiment configs rely on.

* **A top-k ("best") file holds the weights its validation measured.** Lightning's
  step-scheduled save (``every_n_train_steps``) runs in ``on_train_batch_end``, before
  that step's validation, and ranks the weights of step N by the number the validation
  of an earlier step gave (with ``val_check_interval == every_n_train_steps`` the "best"
  file held the weights one interval after the ones measured). Here, with a step or time
  schedule and a monitored metric, every validation end of a fit is a top-k candidate,
  ranked by the number it has just measured on the weights it saves;
  ``every_n_train_steps`` / ``train_time_interval`` schedule ``last.ckpt`` only. (An epoch
  schedule is Lightning's: its save follows the epoch's validation.)
* ``last.ckpt`` follows ``every_n_train_steps`` from the first step. Lightning defers a
  step save to the next validation end while the monitored metric does not exist yet,
  so a run killed before its first validation has nothing to resume from. Here the
  last checkpoint is written on schedule anyway.
* A non-finite monitored value (a diverged run's ``val/bpd = nan``) is never a top-k
  candidate: Lightning ranks nan as +inf, so with ``save_top_k: 1`` the first
  checkpoint, nan or not, became "best". ``last.ckpt`` is still written.
* A monitored ``<split>/bpd_R`` that the module logs as a bound (``<split>/bpd_bound_R``,
  or its ``bound_metric``: a learned dequantizer or a bound prior turned the exact
  figure into one) is read under that name: the same images' bits per dim, so a config
  keeps working when a setting such as ``variational_dequantization.yaml`` makes the
  likelihood a bound. The logs keep the bound's name.
* **File names come from the monitored metric.** Without ``filename`` a top-k file is
  ``epoch{E}-step{S}-<metric>{value}.ckpt`` (``epoch3-step512-bpd_32=1.751.ckpt``), the
  same pattern in every config. A ``filename`` template naming a metric the run does not
  log (Lightning writes 0 for it: ``bpd0.000``) falls back to that pattern, with a warning.
* A monitor the module cannot log is refused before the first step (a model of noisy
  data monitored by ``val/bpd_R``), not after the first validation.

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
from lightning_modules.family import NOISY_DATA_METRIC, FamilyInterface
from lightning_modules.lightning_internals import CheckpointNaming

BPD_MONITOR = re.compile(r"(\w+)/bpd_(\d+)")


def filename_for(monitor: str | None) -> str | None:
    """The top-k file name template for ``monitor`` (None: Lightning's ``epoch=E-step=S``)."""
    if not monitor:
        return None
    short = monitor.split("/")[-1]
    return "epoch{epoch}-step{step}-" + short + "={" + monitor + ":.4g}"


class ModelCheckpoint(CheckpointNaming):
    # The changes above, then Lightning's argument documentation (for `lightning fit --help`).
    __doc__ = f"{__doc__}\n{LightningModelCheckpoint.__doc__}"
    _last_only_step: int | None = None
    _stage = "fit"  # the running stage, from setup

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.filename is None and self.monitor:
            self.filename = filename_for(self.monitor)
            self.auto_insert_metric_name = False
        self._fallback_warned = False

    @property
    def _topk_at_validation(self) -> bool:
        """Step- or time-scheduled with a monitored metric: top-k is chosen at validation ends."""
        return self.monitor is not None and (self._every_n_train_steps >= 1 or self._train_time_interval is not None)

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._stage = stage
        match = BPD_MONITOR.fullmatch(self.monitor or "")
        # Any LightningModule may be checkpointed (the RRDB pre-training too); a family's
        # noisy-data resolutions are refused as bits-per-dim monitors.
        family = pl_module if isinstance(pl_module, FamilyInterface) else None
        noisy = family.noisy_data_resolutions if family else set()
        if match and int(match[2]) in noisy:
            metric = family.continuous_metric
            raise ConfigurationError(
                f"ModelCheckpoint monitors {self.monitor}, but the model's figure at {match[2]} is a continuous "
                f"density ({'noise augmentation: a GaussianNoiseDequantizer' if metric == NOISY_DATA_METRIC else metric}), "
                f"not the discrete data's bits per dim, and is logged as {match[1]}/{metric}_{match[2]}: set "
                f"--trainer.callbacks.init_args.monitor {match[1]}/{metric}_{match[2]} "
                "(or train with uniform dequantization)")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self._every_n_train_steps
        due = n >= 1 and trainer.global_step % n == 0 and not self._should_skip_saving_checkpoint(trainer)
        if self._topk_at_validation:
            if due or self._time_due(trainer):
                self._save_last_only(trainer)
            return
        if not due:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        candidates = self._monitor_candidates(trainer)
        if pl_module.automatic_optimization:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
        self._last_time_checked = time.monotonic()

    def _time_due(self, trainer) -> bool:
        interval = self._train_time_interval
        if interval is None:
            return False
        now = time.monotonic()
        due = self._last_time_checked is not None and now - self._last_time_checked >= interval.total_seconds()
        due = trainer.strategy.broadcast(due)  # one decision for every process
        if due or self._last_time_checked is None:
            self._last_time_checked = now
        return due

    def _save_last_only(self, trainer) -> None:
        """``last.ckpt`` at this step, leaving the step "not saved" so that a validation
        ending at this same step still considers its weights for the top-k."""
        if not self.save_last or self._last_only_step == trainer.global_step or trainer.sanity_checking:
            return
        saved = self._last_global_step_saved
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._last_global_step_saved = saved
        self._last_only_step = trainer.global_step  # once per step (accumulated micro-batches)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self._topk_at_validation:
            super().on_validation_end(trainer, pl_module)
            return
        from pytorch_lightning.trainer.states import TrainerFn

        if trainer.fast_dev_run or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        self._defer_save_until_validation = False
        candidates = self._monitor_candidates(trainer)
        if self.monitor in candidates:
            self._save_topk_checkpoint(trainer, candidates)
        # last.ckpt again where this step wrote it: it then holds the updated best-k record.
        if self._last_only_step == trainer.global_step:
            saved = self._last_global_step_saved
            self._save_last_checkpoint(trainer, candidates)
            self._last_global_step_saved = saved

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self._topk_at_validation:
            super().on_train_epoch_end(trainer, pl_module)

    def load_state_dict(self, state_dict: dict) -> None:
        # `lightning test` / `validate` of a checkpoint writes no checkpoints: its record of
        # the best ones is not needed (and its other dirpath made Lightning warn).
        if self._stage != "fit":
            return
        super().load_state_dict(state_dict)

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

    def format_name(self, filename, metrics, prefix=None, auto_insert_metric_name=True) -> str:
        if filename and filename != self.CHECKPOINT_NAME_LAST:
            named = {group[1:] for group in re.findall(r"(\{.*?)[:\}]", filename)}
            missing = sorted(named - set(metrics) - {"epoch", "step"})
            if missing and self.monitor in metrics:
                if not self._fallback_warned:
                    rank_zero_warn(f"ModelCheckpoint: filename {filename!r} names {missing}, which this run does not "
                                   f"log; the files are named from the monitored {self.monitor} instead")
                    self._fallback_warned = True
                filename, auto_insert_metric_name = filename_for(self.monitor), False
        return super().format_name(filename, metrics, prefix, auto_insert_metric_name)

    def monitor_candidates(self, trainer) -> dict:
        candidates = super().monitor_candidates(trainer)
        match = BPD_MONITOR.fullmatch(self.monitor or "")
        module = trainer.lightning_module
        bound = module.bound_metric if isinstance(module, FamilyInterface) else None
        metric = module.continuous_metric if isinstance(module, FamilyInterface) else NOISY_DATA_METRIC
        noisy = match and f"{match[1]}/{metric}_{match[2]}"
        if match and self.monitor not in candidates and noisy in candidates:
            raise ConfigurationError(f"ModelCheckpoint monitors {self.monitor}, but the model trains on noisy data "
                                     "(noise augmentation), whose figure is not the discrete data's bits per dim: "
                                     f"monitor {noisy} (or train with uniform dequantization)")
        if match and self.monitor not in candidates and bound:
            name = f"{match[1]}/{bound}_{match[2]}"
            if name in candidates:
                candidates[self.monitor] = candidates[name]
        return candidates
