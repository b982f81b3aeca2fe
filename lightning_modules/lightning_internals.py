"""Everything this project needs from Lightning that Lightning does not offer publicly.

Private names change between Lightning releases without notice, so they live here and
nowhere else (tests/test_lightning_internals.py greps the project for private Lightning
names outside this file, and checks that the installed Lightning is in
:data:`TESTED_LIGHTNING`, the range ``pyproject.toml`` pins). Moving to a new Lightning
release means reading this file against it, widening the pin, and running the tests.

What each piece is for:

* :func:`hpc_checkpoint_path`: the ``hpc_ckpt_N.ckpt`` name Lightning's SLURM requeue
  resumes from (signals.py).
* :func:`cluster_environment`: the SLURM environment's requeue signal (signals.py).
* :func:`lightning_accumulates`: inside one of Lightning's own accumulation groups
  (automatic optimization only; FlowModule counts its own groups).
* :func:`hyperparameters_from_cli`: whether LightningCLI is instantiating this module
  (its parsed config is then the module's hyper-parameters; checkpoint_identity.py).
* :func:`attached_trainer`: the module's trainer, or None outside a Trainer (the public
  ``trainer`` property raises there).
* :func:`rewind_epoch_end_checkpoint`: the fit loop's saved progress, rewritten for an
  exact resume (callbacks.ExactResume).
* :class:`CheckpointNaming`: Lightning's ModelCheckpoint with its two private hooks
  (file names, monitor candidates) under public names (model_checkpoint.py).
* :class:`ConfigOverCheckpointCLI`: LightningCLI without its merge of a checkpoint's
  hyper-parameters over the parsed config (cli.py).
"""
from __future__ import annotations

import warnings

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI
from packaging.specifiers import SpecifierSet
from packaging.version import Version

# The Lightning releases this file was read against and the tests pass on (pyproject.toml
# pins the same range; averaging.py needs 2.6's EMAWeightAveraging).
TESTED_LIGHTNING = SpecifierSet(">=2.6,<2.7")


def lightning_version_problem(version: str | None = None) -> str | None:
    """Why the installed (or the given) Lightning is outside the tested range, or None."""
    version = version or pl.__version__
    if Version(version) in TESTED_LIGHTNING:
        return None
    return (f"pytorch-lightning {version} is installed, but this project is tested on {TESTED_LIGHTNING} and "
            "reads private Lightning state (lightning_modules/lightning_internals.py); install "
            f"'pytorch-lightning{TESTED_LIGHTNING}' (pip install -e . does), or read that file against your release")


_PROBLEM = lightning_version_problem()
if _PROBLEM:
    warnings.warn(_PROBLEM, stacklevel=2)


def hpc_checkpoint_path(trainer: pl.Trainer) -> str:
    """The next ``<default_root_dir>/hpc_ckpt_N.ckpt``: the file Lightning's own SLURM
    requeue writes and a resume with ``ckpt_path: auto`` reads first."""
    return trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)


def cluster_environment(trainer: pl.Trainer):
    """The trainer's cluster environment (a SLURMEnvironment under SLURM), or None."""
    return getattr(trainer._accelerator_connector, "cluster_environment", None)


def lightning_accumulates(trainer: pl.Trainer) -> bool:
    """True between the micro-batches of one of Lightning's accumulation groups
    (``trainer.accumulate_grad_batches`` with automatic optimization)."""
    return bool(trainer.fit_loop.epoch_loop._should_accumulate())


def hyperparameters_from_cli() -> bool:
    """Whether LightningCLI is instantiating the module being built (it then records the
    parsed config as the hyper-parameters, class_path dicts included)."""
    from pytorch_lightning.core.mixins.hparams_mixin import _given_hyperparameters

    return _given_hyperparameters.get() is not None


def attached_trainer(module: pl.LightningModule) -> pl.Trainer | None:
    """``module.trainer``, or None when the module is used outside a Trainer."""
    return module._trainer


def rewind_epoch_end_checkpoint(fit_loop_state: dict) -> None:
    """Undo, in a checkpoint's fit-loop state, the epoch-end bookkeeping of a checkpoint
    written in ``on_train_epoch_end``, so that it reads as written at the end of the
    epoch's last batch (callbacks._as_saved_at_the_last_batch says why): the epoch and
    its last batch no longer counted as processed, the logging step one back (Lightning
    adds it again on this resume)."""
    epochs, batches = fit_loop_state["epoch_progress"], fit_loop_state["epoch_loop.batch_progress"]
    for kind in ("current", "total"):
        epochs[kind]["processed"] -= 1
        batches[kind]["completed"] -= 1
    fit_loop_state["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1
    batches["is_last_batch"] = True


class CheckpointNaming(pl.callbacks.ModelCheckpoint):
    """Lightning's ModelCheckpoint with its private hooks under public names:
    :meth:`format_name` (a file name from the template and the logged metrics) and
    :meth:`monitor_candidates` (the metrics a save may rank by). Override those."""

    def format_name(self, filename: str | None, metrics: dict, prefix: str | None = None,
                    auto_insert_metric_name: bool = True) -> str:
        return super()._format_checkpoint_name(filename, metrics, prefix, auto_insert_metric_name)

    def monitor_candidates(self, trainer: pl.Trainer) -> dict:
        return super()._monitor_candidates(trainer)

    def _format_checkpoint_name(self, filename, metrics, prefix=None, auto_insert_metric_name=True) -> str:
        return self.format_name(filename, metrics, prefix, auto_insert_metric_name)

    def _monitor_candidates(self, trainer) -> dict:
        return self.monitor_candidates(trainer)


class ConfigOverCheckpointCLI(LightningCLI):
    """LightningCLI whose parsed config is what runs. Lightning's would merge the
    checkpoint's saved hyper-parameters over the config (its ``_parse_ckpt_path``),
    silently building the checkpoint's model (another family, another width) and dropping
    test-time settings; here the config wins, and ``on_load_checkpoint`` refuses a
    checkpoint that does not fit it, before the first step."""

    def _parse_ckpt_path(self) -> None:
        pass
