"""Resume a killed run exactly where it stopped (:class:`ExactResume`; the ``lightning``
command adds it to every run): RNG states of every process in each checkpoint, a run
resumed mid-epoch continues with the batches an uninterrupted run would draw, and one
resumed from an end-of-epoch checkpoint with the uninterrupted run's epoch number.
"""
from __future__ import annotations

import pytorch_lightning as pl

from datamodules.datamodules import ResumableSampler
from lightning_modules.lightning_internals import rewind_epoch_end_checkpoint
from lightning_modules.rng_states import RNG_KEY, gather_rng_states, restore_rng_states


def _as_saved_at_the_last_batch(fit_loop_state: dict, max_epochs: int | None) -> None:
    """Rewrite, in place, the fit-loop progress of a checkpoint written in
    ``on_train_epoch_end`` (ModelCheckpoint's epoch-end save when validation runs at the
    epoch end) into that of one written at the end of the epoch's last batch, whose
    resume Lightning (2.6) gets right: it goes on with the next epoch under the next
    number. From the former, in a ``max_steps`` run, it runs the finished epoch's end
    again and counts it twice: the next epoch trains with the batch order of the epoch
    after it. (A checkpoint written at a validation end after the last batch resumes
    right as it is.)"""
    epochs, batches = fit_loop_state["epoch_progress"], fit_loop_state["epoch_loop.batch_progress"]
    e, b = epochs["current"], batches["current"]
    batches_done = b["ready"] == b["started"] == b["processed"] == b["completed"] > 0
    # The last epoch's checkpoint is left alone: Lightning sees the run finished.
    finished = max_epochs not in (None, -1) and e["processed"] >= max_epochs
    if e["ready"] == e["started"] == e["processed"] == e["completed"] + 1 and batches_done and not finished:
        # The epoch is already counted as processed, and the logging step has already
        # advanced past its last batch (Lightning adds that step back on this resume).
        rewind_epoch_end_checkpoint(fit_loop_state)


class ExactResume(pl.Callback):
    """What an exact resume needs beyond Lightning's own state: the RNG states of every
    process (dequantization and variational noise continue the same stream); a run
    resumed mid-epoch continues with the batches an uninterrupted run would draw next
    (the sampler's order depends on seed and epoch only); and a run resumed from a
    checkpoint written at the end of an epoch goes on with the next epoch, numbered as
    in the uninterrupted run (``current_epoch``, the sampler's epoch, the epoch-driven
    freezes and decays), whichever hook wrote it. The finished epoch's remaining end
    work (its validation, when the checkpoint was written before it) is not redone."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[RNG_KEY] = gather_rng_states()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if RNG_KEY in checkpoint:
            restore_rng_states(checkpoint[RNG_KEY], trainer.global_rank)
        # Callbacks load before the loops do: the loops then read the rewritten progress.
        from pytorch_lightning.trainer.states import TrainerFn

        fit_loop_state = (checkpoint.get("loops") or {}).get("fit_loop")
        if trainer.state.fn == TrainerFn.FITTING and fit_loop_state and "epoch_progress" in fit_loop_state:
            _as_saved_at_the_last_batch(fit_loop_state, trainer.max_epochs)

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning does not call on_train_epoch_start for the resumed epoch;
        # on_train_start runs after the restore and before that epoch's iterator exists.
        loop = trainer.fit_loop.epoch_loop
        if not loop.restarting:
            return
        done = loop.batch_progress.current.processed
        if done >= trainer.num_training_batches:
            # Saved after the epoch's last batch: Lightning counted that epoch in
            # FitLoop.reset and begins the next one afresh (nothing to skip; a skip would
            # empty the next epoch), but leaves its ready/started counters one behind an
            # uninterrupted run's, which would make a mid-epoch checkpoint of this epoch
            # look like one written between epochs.
            progress = trainer.fit_loop.epoch_progress
            if loop.restarted_on_train_batch_end and progress.current.ready == progress.current.processed:
                progress.increment_ready()
                progress.increment_started()
            return
        loader = trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        if done and isinstance(sampler, ResumableSampler):
            sampler.skip_next(done * loader.batch_size)
