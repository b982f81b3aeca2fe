"""``lightning_modules.EMAWeights``: Lightning's ``EMAWeightAveraging`` (same arguments:
``decay``, ``update_every_n_steps``, ``update_starting_at_step``, ...) with the live
training weights kept apart from the averaged ones in every checkpoint.

Lightning's callback writes the averaged weights to ``state_dict`` and the model's
weights at the moment of the save to ``current_model_state``, and resuming loads the
second into the model. But at the end of ``fit`` it copies the averaged weights into
the model (so that what follows, a test or a save, uses them) and forgets the live
ones: a checkpoint written after that (ModelCheckpoint's ``save_last`` at the train
end, which a resumed run that saved nothing since its resume writes, or a
``trainer.save_checkpoint`` after ``fit``) holds the averaged weights twice, and a run
resumed from it trains on from the averaged weights without a word. A checkpoint
written during validation, where the two are swapped, would hold them crosswise. Here:

* ``current_model_state`` is always the live weights and ``state_dict`` the averaged
  ones (kept at the train end; un-swapped during validation);
* outside ``fit`` (``lightning test`` / ``validate`` / ``predict``) loading a checkpoint
  needs no averaging state: the model evaluates with ``state_dict``, the averaged
  weights the run validated and sampled with, without Lightning's "WeightAveraging
  state cannot be restored" warning;
* the epoch of the last epoch-end update is saved too, so ``update_starting_at_epoch``
  does not update twice for one epoch after a resume.
"""
from __future__ import annotations

from typing import Any

import torch
from pytorch_lightning.callbacks import EMAWeightAveraging


class EMAWeights(EMAWeightAveraging):
    # The changes above, then Lightning's argument documentation (for `lightning fit --help`).
    __doc__ = f"{__doc__}\n{EMAWeightAveraging.__doc__}"

    def __init__(self, device: torch.device | str | int | None = None, use_buffers: bool = True,
                 decay: float = 0.999, update_every_n_steps: int = 1, update_starting_at_step: int | None = None,
                 update_starting_at_epoch: int | None = None, **kwargs: Any) -> None:
        super().__init__(device=device, use_buffers=use_buffers, decay=decay,
                         update_every_n_steps=update_every_n_steps, update_starting_at_step=update_starting_at_step,
                         update_starting_at_epoch=update_starting_at_epoch, **kwargs)
        self._swapped = False  # during validation the model holds the averaged weights
        self._live_at_train_end: dict | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":  # a second fit with this callback starts from a clean slate
            self._swapped, self._live_at_train_end = False, None

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        super().on_validation_epoch_start(trainer, pl_module)
        if self._average_model is not None:
            self._swapped = not self._swapped

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        super().on_validation_epoch_end(trainer, pl_module)
        if self._average_model is not None:
            self._swapped = not self._swapped

    def on_train_end(self, trainer, pl_module) -> None:
        self._live_at_train_end = {name: value.detach().clone() for name, value in pl_module.state_dict().items()}
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._average_model is None:
            return
        if self._swapped:
            checkpoint["state_dict"], checkpoint["current_model_state"] = (checkpoint["current_model_state"],
                                                                           checkpoint["state_dict"])
        elif self._live_at_train_end is not None:
            checkpoint["current_model_state"] = self._live_at_train_end

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self._average_model is None:
            return  # not fitting: the model already holds state_dict, the averaged weights
        super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "latest_update_epoch": self._latest_update_epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._latest_update_epoch = state_dict.get("latest_update_epoch", self._latest_update_epoch)
