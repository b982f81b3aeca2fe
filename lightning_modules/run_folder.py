"""A run's folder (``trainer.default_root_dir``): what is in it and who may write it.

* :func:`checkpoint_candidates`: the one ordering of resume candidates, newest first, of
  Lightning's SLURM ``hpc_ckpt_*.ckpt`` (written on SIGUSR1 before a requeue) and the
  ``last*.ckpt`` files of ModelCheckpoint (Lightning's ``ckpt_path: last`` ignores the hpc
  ones); :func:`resume_checkpoint` (``ckpt_path: auto``) takes the newest that loads,
  :func:`newest_checkpoint` the newest of all.
* :class:`RunLock`: one live run per folder (a heartbeat, so a lock of a killed job or
  another host's stale one is taken over).
* :func:`persistent_wandb_id`: the W&B run id kept beside the checkpoints, so a
  requeued job continues the same W&B run.
* :func:`log_dir`: where a run's tables, sweeps, analyses and sample grids go.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from lightning_modules.checkpoint_files import load_checkpoint_file, storage_faults_reported
from lightning_modules.errors import CheckpointError, RunLockedError

if TYPE_CHECKING:
    import pytorch_lightning as pl

WANDB_ID_FILE = "wandb_run_id.txt"


def checkpoint_candidates(root: str | Path) -> list[Path]:
    """``root/hpc_ckpt_*.ckpt`` and every ``last*.ckpt`` below ``root``, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    candidates = [c for c in list(root.glob("hpc_ckpt_*.ckpt")) + list(root.rglob("last*.ckpt")) if c.is_file()]
    return sorted(candidates, key=lambda c: (c.stat().st_mtime_ns, c.name.startswith("hpc")), reverse=True)


RESUME_KEYS = ("state_dict", "global_step", "loops", "optimizer_states")


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot resume a run (unreadable, or without a training state), or None."""
    try:
        checkpoint = load_checkpoint_file(path)
    except CheckpointError as error:
        return str(error)
    missing = [key for key in RESUME_KEYS if key not in checkpoint]
    return f"it holds no {', '.join(missing)}" if missing else None


def resume_checkpoint(root: str | Path, move_aside: bool = True) -> Path | None:
    """The ``ckpt_path: auto`` rule: the newest candidate (:func:`checkpoint_candidates`)
    that loads and holds a training state. A broken one is renamed aside
    (``<name>.broken-<time>``, kept for inspection) with a warning, and the next newest
    is tried; None when there is none (a fresh start). Only one process may rename
    (the others of a multi-process job pass ``move_aside=False`` and skip)."""
    for candidate in checkpoint_candidates(root):
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate
        note = "skipping it"
        if move_aside:
            aside = candidate.with_name(f"{candidate.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(candidate, aside)
            note = f"moved it aside to {aside.name}"
        warnings.warn(f"ckpt_path auto: {candidate} cannot resume the run ({problem}); {note} and trying "
                      "the next newest checkpoint", stacklevel=2)
    return None


def remove_stale_temporaries(root: str | Path) -> list[Path]:
    """Delete the ``.<name>.<pid>.tmp`` files that killed checkpoint writes left behind
    (call it holding the folder's :class:`RunLock`, so no live write owns them)."""
    root = Path(root)
    if not root.is_dir():
        return []
    removed = [p for p in root.rglob(".*.ckpt.*.tmp") if p.is_file()]
    for path in removed:
        path.unlink()
    return removed


LOCK_FILE = "msflows.lock"


class RunLock:
    """One live training run per ``default_root_dir``: two runs there would share the W&B
    run id and the resume checkpoints, and delete each other's top-k checkpoints.

    ``msflows.lock`` holds the owner's pid, host and SLURM job id; a daemon thread
    touches it every ``heartbeat_s``. A second run refuses to start while the owner is
    live (same host: its pid exists; any host: the lock was touched within
    ``stale_after_s``). A stale lock (dead owner) is taken over with a warning, and so
    is the lock of the same SLURM job (a requeued job restarts on any node). The run
    refuses rather than moving to a folder of its own because the folder is what
    ``ckpt_path: auto`` resumes from and what keeps the W&B run id."""

    def __init__(self, root: str | Path, heartbeat_s: float = 30.0, stale_after_s: float = 120.0) -> None:
        self.path = Path(root) / LOCK_FILE
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(),
                      "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "started": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def holder_is_live(self, holder: dict) -> bool:
        if holder.get("pid") == os.getpid() and holder.get("host") == self.owner["host"]:
            return False
        if holder.get("slurm_job_id") and holder.get("slurm_job_id") == self.owner["slurm_job_id"]:
            return False  # this job's previous run, before its requeue
        try:
            fresh = time.time() - self.path.stat().st_mtime < self.stale_after_s
        except OSError:
            return False
        if holder.get("host") != self.owner["host"]:
            return fresh
        try:
            os.kill(int(holder.get("pid", -1)), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError, OverflowError):
            pass
        return fresh

    def _storage_faults_reported(self):
        return storage_faults_reported(f"the run lock {self.path}",
                                       "a run keeps its lock, checkpoints and logs in trainer.default_root_dir")

    def acquire(self) -> "RunLock":
        # A read-only or full folder fails here in one paragraph, before anything else is
        # written there.
        with self._storage_faults_reported():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        holder = self.holder() if self.path.exists() else None
        if holder is not None and self.holder_is_live(holder):
            raise RunLockedError(
                f"another run is training in {self.path.parent} (pid {holder.get('pid')} on "
                f"{holder.get('host')}, started {time.ctime(holder.get('started', 0))}): two runs in one "
                "folder would share its checkpoints and W&B run id. Wait for it, stop it, or give this "
                f"run its own trainer.default_root_dir. (A lock not touched for {self.stale_after_s:.0f} s "
                f"is taken over; remove {self.path} by hand if its owner is gone.)")
        if self.path.exists():
            warnings.warn(f"taking over the lock of a run that is gone ({holder}) in {self.path.parent}",
                          stacklevel=2)
        temporary = self.path.with_name(f".{LOCK_FILE}.{os.getpid()}.tmp")
        with self._storage_faults_reported():
            temporary.write_text(json.dumps(self.owner))
            os.replace(temporary, self.path)
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        holder = self.holder()
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == self.owner["host"]:
            self.path.unlink(missing_ok=True)


def newest_checkpoint(root: str | Path) -> Path | None:
    """The first of :func:`checkpoint_candidates` (readable or not); None when there is
    none (a fresh start). ``ckpt_path: auto`` uses :func:`resume_checkpoint`, which also
    skips the unreadable ones."""
    candidates = checkpoint_candidates(root)
    return candidates[0] if candidates else None


def persistent_wandb_id(root: str | Path) -> str:
    """The W&B run id stored in ``root``, created on the first launch."""
    path = Path(root) / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # W&B ids: letters, digits, - and _
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


def log_dir(trainer: pl.Trainer) -> Path:
    """A run's folder, where its tables, sweeps, analyses and sample grids go; printed the
    first time. One rule for every logger, Lightning's for checkpoints:

    * training: the folder that holds ``checkpoints/``, ``<save_dir>/<name>/<version>``
      of the first logger (CSV and TensorBoard ``<name>/version_N``, W&B
      ``<project>/<run id>``), ``default_root_dir`` without a logger;
    * ``lightning test`` / ``validate`` / ``predict`` of a checkpoint: beside it, in its
      run folder for ``<run>/checkpoints/<file>`` (not the new ``version_N`` a logger
      opens for the test), unless that folder cannot be written.

    Without Trainer.log_dir's broadcast, which would deadlock when only process 0 asks."""
    from pytorch_lightning.trainer.states import TrainerFn

    directory = None
    if trainer.state.fn != TrainerFn.FITTING and trainer.ckpt_path and Path(trainer.ckpt_path).is_file():
        tested = Path(trainer.ckpt_path).resolve().parent
        tested = tested.parent if tested.name == "checkpoints" else tested
        directory = tested if os.access(tested, os.W_OK) else None
    if directory is None and trainer.loggers:
        first = trainer.loggers[0]
        version = first.version if isinstance(first.version, str) else f"version_{first.version}"
        directory = Path(first.save_dir or trainer.default_root_dir) / str(first.name) / version
    directory = Path(directory or trainer.default_root_dir)
    announced = trainer.__dict__.setdefault("_msflows_announced_log_dirs", set())
    if directory not in announced and trainer.is_global_zero:
        announced.add(directory)
        print(f"outputs of this run ({trainer.state.fn.value}): {directory}", file=sys.stderr)
    return directory
