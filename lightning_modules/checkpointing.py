"""What a preempted job needs to resume without losing work.

* :class:`AtomicCheckpointIO`: a checkpoint is written to a temporary file, flushed to
  disk and renamed over the target, so a job killed mid-write never leaves a truncated
  ``last.ckpt`` in place of the last good one.
* RNG states of every process (torch, CUDA, numpy, python) go into each checkpoint and
  come back on resume, so dequantization and variational noise continue the same stream.
* :func:`checkpoint_candidates`: the one ordering of resume candidates, newest first, of
  Lightning's SLURM ``hpc_ckpt_*.ckpt`` (written on SIGUSR1 before a requeue) and the
  ``last*.ckpt`` files of ModelCheckpoint (Lightning's ``ckpt_path: last`` ignores the hpc
  ones); :func:`resume_checkpoint` (``ckpt_path: auto``) takes the newest that loads,
  :func:`newest_checkpoint` the newest of all.
* :func:`persistent_wandb_id`: the W&B run id kept beside the checkpoints, so a
  requeued job continues the same W&B run.
* :func:`load_checkpoint_file`: every checkpoint is read through it, so checkpoints of
  earlier versions still load: classes that no longer exist are read as plain
  objects, and renamed state-dict keys are mapped (:func:`upgrade_state_dict`).
"""
from __future__ import annotations

import errno
import inspect
import json
import os
import pickle
import random
import re
import secrets
import socket
import threading
import time
import types
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from lightning_modules.errors import CheckpointError, RunLockedError, StorageError
from lightning_modules.lightning_internals import hyperparameters_from_cli

RNG_KEY = "rng_states"
WANDB_ID_FILE = "wandb_run_id.txt"


# Disk faults a user fixes (free space, another folder): (what happened, what to do).
_STORAGE_FAULTS = {
    errno.ENOSPC: ("no space left on device", "free space, then resume (ckpt_path: auto)"),
    errno.EDQUOT: ("disk quota exceeded", "free space or raise the quota, then resume (ckpt_path: auto)"),
    errno.EROFS: ("read-only file system", "give the run a folder it can write to with "
                                           "--trainer.default_root_dir DIR"),
    errno.EACCES: ("permission denied", "give the run a folder it can write to with --trainer.default_root_dir DIR"),
    errno.EPERM: ("operation not permitted", "give the run a folder it can write to with "
                                             "--trainer.default_root_dir DIR"),
}


def storage_error(error: BaseException, target: str, note: str = "") -> StorageError | None:
    """The one-paragraph :class:`StorageError` for a disk fault met writing ``target``
    (full, over quota, read-only, not permitted), or None for any other error."""
    code = getattr(error, "errno", None)
    if code is None and "unexpected pos" in str(error):
        code = errno.ENOSPC  # torch's zip writer reports a full disk as "unexpected pos ..."
    if code not in _STORAGE_FAULTS:
        return None
    what, remedy = _STORAGE_FAULTS[code]
    return StorageError(f"{what} writing {target}{f' ({note})' if note else ''}; {remedy}.", code)


@contextmanager
def storage_faults_reported(target: str, note: str = ""):
    """Raise a disk fault inside the block as one :func:`storage_error` paragraph (not the
    OS error chained to torch's), and any other error as it is."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        problem = storage_error(error, target, note)
        if problem is None:
            raise
        raise problem from None


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with storage_faults_reported(str(path), "the previous checkpoint there, if any, is kept"):
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(temporary, "wb") as handle:
                    torch.save(checkpoint, handle)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(temporary, path)  # atomic on POSIX: the old file or the new, never half
        finally:
            if temporary.exists():
                temporary.unlink()


    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        # The run's own checkpoints hold dataclass hyper-parameters (cascade stages),
        # which weights-only unpickling refuses; they are trusted files of this project.
        return load_checkpoint_file(path, map_location)


class LegacyObject:
    """Stands in for a class a checkpoint names that this version no longer has (the
    hyper-parameter dataclasses of earlier versions): its fields stay readable."""

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {"state": state})


class _TolerantUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return super().find_class(module, name)
        except (AttributeError, ModuleNotFoundError, ImportError):
            return type(name, (LegacyObject,), {"__module__": f"legacy.{module}"})


_tolerant_pickle = types.SimpleNamespace(Unpickler=_TolerantUnpickler, load=pickle.load,
                                         __name__="tolerant_pickle")


def load_checkpoint_file(path: str | Path, map_location=None) -> dict[str, Any]:
    """torch.load of a trusted checkpoint of this project, earlier versions included;
    the state dict's keys are upgraded to the current names."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(str(p.relative_to(path)) for p in path.rglob("*.ckpt"))
        listing = (f"the checkpoints inside are {', '.join(inside[:10])}{' ...' if len(inside) > 10 else ''}"
                   if inside else "it holds no .ckpt file")
        raise CheckpointError(f"checkpoint {str(path)!r} is a directory, not a checkpoint file: {listing}. "
                              "Pass one file (e.g. .../checkpoints/last.ckpt), or ckpt_path: auto with "
                              "trainer.default_root_dir set to the run's folder.")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (0 bytes): its write was cut short. "
                              "Use an earlier checkpoint (ckpt_path: auto picks the newest readable one).")
    try:
        checkpoint = torch.load(path, map_location=map_location or "cpu", weights_only=False,
                                pickle_module=_tolerant_pickle)
    except Exception as error:  # noqa: BLE001 - a text file fails with KeyError, IndexError, ...
        raise CheckpointError(f"cannot read checkpoint {str(path)!r} ({type(error).__name__}: {error}); "
                              "the file is truncated or not a checkpoint of this project. Use an earlier "
                              "one (ckpt_path: auto picks the newest readable one).") from error
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint["state_dict"] = upgrade_state_dict(checkpoint["state_dict"],
                                                      checkpoint.get("hyper_parameters") or {})
    return checkpoint


# Glow's "levels" became "scales"; the cascade's "base" and "levels" became "stages",
# keyed by resolution (the model contract).
_OLD_GLOW_SCALE = re.compile(r"(^|\.)levels\.(\d+)\.layers\.")
_OLD_CASCADE_STAGE = re.compile(r"^model\.levels\.(\d+)\.")


def upgrade_state_dict(state: dict[str, Any], hparams: dict | None = None) -> dict[str, Any]:
    """Map the keys of checkpoints written before the model contract to today's names;
    today's keys pass unchanged."""
    base = None
    if any(k.startswith("model.base.") for k in state):  # a cascade of an earlier version
        old_stages = sorted({int(m.group(1)) for k in state for m in [_OLD_CASCADE_STAGE.match(k)] if m})
        base = (hparams or {}).get("base_resolution") or (old_stages[0] // 2 if old_stages else None)
        if base is None:
            raise ValueError("a cascade checkpoint of an earlier version without its base resolution; "
                             "load it with the version that wrote it")
    upgraded = {}
    for key, value in state.items():
        if base is not None:
            if key.startswith("model.base."):
                key = f"model.stages.{base}." + key[len("model.base."):]
            else:
                key = _OLD_CASCADE_STAGE.sub(r"model.stages.\1.", key)
        upgraded[_OLD_GLOW_SCALE.sub(r"\1scales.\2.layers.", key)] = value
    return upgraded


def rng_state() -> dict[str, Any]:
    # Tensors and plain Python values only, so weights-only loading accepts them.
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def seeded_rng(seed: int, device: torch.device):
    """Torch's RNG (and ``device``'s, on CUDA) forked and seeded with ``seed``: draws
    inside repeat run after run, and the stream outside (training's, which exact resume
    replays) does not move."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def gather_rng_states() -> list[dict[str, Any]]:
    """Every process's RNG state, indexed by rank (collective under torch.distributed)."""
    state = rng_state()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        states: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(states, state)
        return states
    return [state]


def restore_rng_states(states: list[dict[str, Any]], rank: int) -> None:
    set_rng_state(states[rank] if rank < len(states) else states[0])


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


def read_state_dict(path: str | Path, what: str) -> dict[str, Any]:
    """The state dict of a Lightning checkpoint (or a bare state dict) on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = load_checkpoint_file(path)
    except CheckpointError as error:
        raise CheckpointError(f"{what}: {error}") from error
    if "state_dict" in checkpoint:
        return checkpoint["state_dict"]
    return upgrade_state_dict(checkpoint)


def state_dict_mismatch(own: dict[str, Any], theirs: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, other-shape) tensor names of ``theirs`` against ``own``."""
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    mismatched = [k for k, v in theirs.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    return missing, unexpected, mismatched


# --- which module wrote a checkpoint, and whether it fits this one --------------------------
MODEL_KEY = "msflows_model"  # {"class": the LightningModule, "name": its model_name}


def written_by(module_class: str, model_name: str) -> dict:
    return {"class": module_class, "name": model_name}


def check_written_by(checkpoint: dict, module_class: str, source: str) -> None:
    """Fail with a paragraph (not Lightning's advice to import another family's module)
    when ``checkpoint`` was written by another LightningModule class."""
    author = checkpoint.get(MODEL_KEY, {})
    if author and author.get("class") != module_class:
        raise CheckpointError(
            f"{source!r} was written by {author.get('class')} {author.get('name', '')!r}, not by a "
            f"{module_class}: load it with lightning_modules.{author.get('class')}.load_from_checkpoint")


def check_fits(checkpoint: dict, module_class: str, model_name: str, state_dict: dict) -> None:
    """Fail with a message, not deep inside load_state_dict, on a checkpoint of another
    module class or of another configuration (tensors missing, unexpected or reshaped)."""
    author = checkpoint.get(MODEL_KEY, {})
    ours = f"{module_class} {model_name!r}"
    theirs = f"{author.get('class', 'an unknown model')} {author.get('name', '')!r}"
    if author and author.get("class") != module_class:
        raise CheckpointError(f"this checkpoint was written by {theirs}, but this run builds {ours}; "
                              "pass a checkpoint of this model, or the config that wrote it")
    missing, unexpected, mismatched = state_dict_mismatch(state_dict, checkpoint["state_dict"])
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"this checkpoint ({theirs}) does not fit this run's {ours}: {len(missing)} tensors "
            f"missing, {len(unexpected)} unexpected, {len(mismatched)} of another shape (e.g. "
            f"{(mismatched + missing + unexpected)[:3]}). The architecture settings differ from "
            "the run that wrote it; use its config (saved as config.yaml in its log folder).")


# Settings that never change what the weights mean or the likelihood a checkpoint gives:
# how it is optimized, sampled, evaluated or run. They may differ between the run that
# wrote a checkpoint and one that resumes or tests it (a new learning rate, a guidance
# weight, DDIM steps); any other difference is refused (:func:`check_settings`).
RUN_SETTINGS = frozenset({
    "optimizer", "flow_optimizer", "diffusion_optimizer", "encoder_optimizer", "decoder_optimizer",
    "grad_clip_norm", "grad_clip_relative", "evaluation_seed", "channels_last", "compile", "compile_sampling",
    "max_skipped_steps",
    "accumulate_grad_batches", "class_loss_weight", "loss_mode", "vlb_weight", "bound_estimator", "loss",
    "label_dropout", "guidance", "sampling_steps", "eta", "clip_denoised", "denoise_samples", "memory_efficient",
    "activation_checkpointing", "train_stages", "init_checkpoint", "freeze_encoders_at_epoch", "train_noise_std",
    "failure_probe_sigmas", "failure_probe_every_n_steps", "max_reconstruction_abs", "accept_changed_settings",
    "_instantiator",
})


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def setting_differences(saved, current, path: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, saved value, current value) for every setting of ``current`` that
    ``saved`` holds with another value. A key only one side has is not a difference (an
    argument added or removed since); :data:`RUN_SETTINGS` are skipped; a component of
    another ``class_path`` differs as a whole."""
    def mapping(value):
        if isinstance(value, Mapping):
            return value
        if hasattr(value, "__dict__") and type(value).__name__ == "Namespace":
            return vars(value)
        return None

    a, b = mapping(saved), mapping(current)
    if a is None or b is None:
        return [] if _same(saved, current) else [(path, saved, current)]
    if "class_path" in a and "class_path" in b and a["class_path"] != b["class_path"]:
        return [(f"{path}.class_path" if path else "class_path", a["class_path"], b["class_path"])]
    differences = []
    for key in a.keys() & b.keys():
        if key in RUN_SETTINGS:
            continue
        differences += setting_differences(a[key], b[key], f"{path}.{key}" if path else str(key))
    return sorted(differences, key=lambda d: d[0])


def check_settings(saved: Mapping | None, current: Mapping | None, accepted=()) -> None:
    """Refuse a checkpoint whose saved model settings differ from this run's config where
    the tensors still fit (``scale_fn: glow`` tested as ``squish``: the same shapes, other
    numbers, and a metrics.json that overwrites the run's own). ``accepted``: dotted keys
    (or their last part) allowed to differ, ``"*"`` for all (the module's
    ``accept_changed_settings``)."""
    if not saved or not current or "*" in accepted:
        return
    differences = [d for d in setting_differences(saved, current)
                   if d[0] not in accepted and d[0].rsplit(".", 1)[-1] not in accepted]
    if differences:
        listed = "; ".join(f"model.init_args.{key}: {old!r} in the checkpoint, {new!r} here"
                           for key, old, new in differences[:6])
        more = f" (and {len(differences) - 6} more)" if len(differences) > 6 else ""
        leaves = sorted({key.rsplit(".", 1)[-1] for key, _, _ in differences})
        raise CheckpointError(
            f"this checkpoint was written with other model settings than this run's config: {listed}{more}. Its "
            "weights would load and give other numbers. Use the config that wrote it (config.yaml in its run folder), "
            f"or, to load it anyway, pass --model.init_args.accept_changed_settings '[{', '.join(leaves)}]'")


class CheckpointIdentity:
    """LightningModule hooks (``FlowModule`` mixes them in): a checkpoint names the module
    class and the model that wrote it, and loads only into a module that fits it, after
    the keys of earlier versions are mapped. Needs ``self.model_name``."""

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[MODEL_KEY] = written_by(type(self).__name__, self.model_name)

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
        """Runs before Lightning loads the state dict."""
        checkpoint["state_dict"] = upgrade_state_dict(checkpoint.get("state_dict", {}),
                                                      checkpoint.get("hyper_parameters") or {})
        check_fits(checkpoint, type(self).__name__, self.model_name, self.state_dict())
        check_settings(checkpoint.get("hyper_parameters"), dict(self.hparams),
                       getattr(self, "accept_changed_settings", ()))


def save_constructor_arguments(module, frame) -> None:
    """Record the arguments of the constructor running in ``frame`` as ``module``'s
    hyper-parameters. Under the CLI they are the parsed config (models given by
    class_path stay dicts); built in Python, the arguments that are modules (or hold
    them) are left out, since the checkpoint's state dict already has their weights."""
    if hyperparameters_from_cli():
        module.save_hyperparameters(frame=frame)
        return
    arguments = inspect.getargvalues(frame).locals
    module.save_hyperparameters(ignore=[name for name, value in arguments.items()
                                        if name != "self" and _holds_module(value)], frame=frame)


def _holds_module(value) -> bool:
    if isinstance(value, torch.nn.Module):
        return True
    if isinstance(value, (list, tuple)):
        return any(_holds_module(v) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        return any(_holds_module(getattr(value, name)) for name in value.__dataclass_fields__)
    return False
