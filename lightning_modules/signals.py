"""Stopping a run on a signal without losing a step: :class:`SignalCheckpoint`.

SIGTERM (a scheduler's preemption or ``kill``), SIGINT (Ctrl-C) and, under SLURM with
auto-requeue, the requeue signal (SIGUSR1, ``--signal=SIGUSR1@120``) only set a flag.
At the end of the optimizer step in progress the callback saves a checkpoint through
``trainer.save_checkpoint`` (what a ModelCheckpoint save holds: ExactResume's RNG states,
the loop position, ...), so a resume from it ends where an uninterrupted run ends. Then:

* requeue signal: ``<default_root_dir>/hpc_ckpt_N.ckpt`` (Lightning's name), then
  ``scontrol requeue <job id>`` from process 0, and the process stops;
* SIGTERM, SIGINT: ``last-interrupted.ckpt`` beside the run's checkpoints (the
  ModelCheckpoint folder, else ``default_root_dir``), and the process stops.

``ckpt_path: auto`` resumes from both names (``hpc_ckpt_*`` and ``last*.ckpt``). The
process exits with status 128 + the signal number (the shell's "killed by signal"
convention: 143 SIGTERM, 130 SIGINT, 138 SIGUSR1), because the run did not finish. A
second Ctrl-C stops at once without saving.

Lightning's own handlers are replaced while training runs: its SLURM handler saves from
inside the signal handler, mid-step (the resume redoes that step from a changed RNG
state and optimizer), and its SIGTERM handler ends the run with status 0 and no
checkpoint. A signal during validation is acted on at the next training step's end; one
after the last step is reported and the run ends as it would have.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments import SLURMEnvironment

from lightning_modules.family import FamilyInterface
from lightning_modules.lightning_internals import cluster_environment, hpc_checkpoint_path, lightning_accumulates

INTERRUPTED_CHECKPOINT = "last-interrupted.ckpt"  # a "last*.ckpt": ckpt_path auto (and Lightning's "last") find it


class RunStopped(SystemExit):
    """Raised (on every process) after the signal's checkpoint is saved; its ``code`` is
    the exit status, 128 + the signal number. A SystemExit, so a script ends with that
    status unless it catches this."""

    def __init__(self, signum: int, checkpoint: str) -> None:
        super().__init__(128 + int(signum))
        self.signum, self.checkpoint = int(signum), checkpoint


def _name(signum: int) -> str:
    return signal.Signals(signum).name


def slurm_job_id() -> str:
    """The id ``scontrol requeue`` takes: ``ARRAYJOB_TASK`` for an array task."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    if not re.fullmatch(r"[0-9_]+", job):
        raise ValueError(f"unexpected SLURM job id {job!r}")
    return job


class SignalCheckpoint(pl.Callback):
    """On SIGTERM, SIGINT or the SLURM requeue signal: save a checkpoint at the end of
    the current optimizer step, requeue (SLURM), and stop with status 128 + signal (see
    the module docstring). The ``lightning`` command adds it to every ``fit``; add it to
    ``Trainer(callbacks=...)`` in Python.

    Args:
        signals: the signals to take over besides the SLURM requeue signal (which is
            taken when Lightning's SLURMEnvironment has auto-requeue on).
    """

    def __init__(self, signals: tuple[str, ...] = ("SIGTERM", "SIGINT")) -> None:
        self.signals = [signal.Signals[name] if isinstance(name, str) else signal.Signals(name) for name in signals]
        self.requeue_signal: int | None = None
        self.received: int | None = None
        self._active = False
        self._pid = os.getpid()
        self._previous: dict[int, object] = {}  # the handlers from before fit

    # --- the handler: only a flag ---------------------------------------------------------
    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:
            return  # a DataLoader worker forked from the trainer: the main process stops the run
        if not self._active:
            self._pass_on(signum, frame)
            return
        if self.received is not None:
            if signum == signal.SIGINT and self.received == signal.SIGINT:
                self._restore()
                raise KeyboardInterrupt  # the second Ctrl-C: stop now, without saving
            if signum == self.requeue_signal:
                self.received = signum  # a requeue outranks a termination: the job is to come back
            return
        self.received = signum
        again = " (Ctrl-C again stops at once, without saving)" if signum == signal.SIGINT else ""
        print(f"received {_name(signum)}: a checkpoint is saved at the end of the current step, then the run "
              f"stops{again}", file=sys.stderr, flush=True)

    def _pass_on(self, signum: int, frame) -> None:
        """Outside training (Lightning's teardown after an exception puts this handler
        back): hand the signal to the handler from before fit, as if never replaced."""
        previous = self._previous.get(signum, signal.SIG_DFL)
        previous = signal.SIG_DFL if previous is None else previous
        signal.signal(signum, previous)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.raise_signal(signum)

    def _install(self, trainer: pl.Trainer, capture: bool) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python takes signals in the main thread only
        environment = cluster_environment(trainer)
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue and environment.requeue_signal:
            self.requeue_signal = int(environment.requeue_signal)
        wanted = {int(s) for s in self.signals} | ({self.requeue_signal} if self.requeue_signal else set())
        if capture:
            self._previous = {signum: signal.getsignal(signum) for signum in wanted}
        self._pid, self._active = os.getpid(), True
        for signum in wanted:
            self._previous.setdefault(signum, signal.getsignal(signum))
            signal.signal(signum, self._handle)

    def _restore(self) -> None:
        self._active = False
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    # --- hooks ----------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            # Before the DataLoader workers fork, so they inherit a handler that ignores
            # the signal (a scheduler signals every process of the job; Lightning's SLURM
            # handler would save and requeue from a worker). Lightning then does not
            # register its requeue handler over this one.
            self.received = None
            self._install(trainer, capture=True)

    def on_train_start(self, trainer, pl_module) -> None:
        # Again: Lightning registered its SIGTERM handler after setup (just before the
        # training stage), and it would end the run with status 0 and no checkpoint.
        self._install(trainer, capture=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        received = self._agreed_signal(trainer)
        if received is None or not self._at_step_boundary(trainer, pl_module):
            return
        # The handler stays: a second SIGTERM during the save is ignored (a second Ctrl-C
        # still stops at once; the atomic write keeps the previous file whole).
        if received == self.requeue_signal:
            path = hpc_checkpoint_path(trainer)
        else:
            callback = trainer.checkpoint_callback
            folder = getattr(callback, "dirpath", None) or trainer.default_root_dir
            path = str(Path(folder) / INTERRUPTED_CHECKPOINT)
        trainer.save_checkpoint(path, weights_only=False)
        message = f"{_name(received)}: saved {path} at step {trainer.global_step}"
        if received == self.requeue_signal:
            message += "; " + self._requeue(trainer, path)
        else:
            message += f"; resume with ckpt_path: auto (or --ckpt_path {path})"
        if trainer.is_global_zero:
            print(f"{message}. Stopping with exit status {128 + received}.", file=sys.stderr, flush=True)
        raise RunStopped(received, path)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()
        if self.received is not None and trainer.is_global_zero:
            print(f"{_name(self.received)} came after the last training step: the run finished, its "
                  "checkpoints are the usual ones", file=sys.stderr, flush=True)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            # Lightning's teardown put back the handlers it found at its registration
            # (these, after setup): back to the ones from before fit.
            self._restore()

    # --- helpers --------------------------------------------------------------------------
    def _agreed_signal(self, trainer: pl.Trainer) -> int | None:
        """The signal every process acts on (a collective under DDP, so all stop at the
        same step): the requeue signal over SIGTERM over SIGINT."""
        if trainer.world_size <= 1:
            return self.received
        order = [None, int(signal.SIGINT), int(signal.SIGTERM), self.requeue_signal]
        mine = torch.tensor(float(order.index(self.received)), device=trainer.strategy.root_device)
        return order[int(trainer.strategy.reduce(mine, reduce_op="max"))]

    @staticmethod
    def _at_step_boundary(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Not between the micro-batches of an accumulated step, whose summed gradients
        a checkpoint does not hold (FlowModule counts its own; Lightning's for
        automatic optimization)."""
        if isinstance(pl_module, FamilyInterface) and pl_module.micro_batches_pending:
            return False
        if pl_module.automatic_optimization and lightning_accumulates(trainer):
            return False
        return True

    def _requeue(self, trainer: pl.Trainer, path: str) -> str:
        if not trainer.is_global_zero:
            return "process 0 requeues the job"
        job = slurm_job_id()
        try:
            status = subprocess.call(["scontrol", "requeue", job])
        except FileNotFoundError:
            status = None
        if status == 0:
            return f"requeued SLURM job {job} (scontrol requeue {job}); it resumes from there with ckpt_path: auto"
        how = "scontrol was not found" if status is None else f"scontrol requeue {job} failed with status {status}"
        return f"{how}: submit the job again, it resumes from there with ckpt_path: auto"

