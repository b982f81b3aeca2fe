"""What a preempted job needs to resume without losing work.

* :class:`AtomicCheckpointIO`: a checkpoint is written to a temporary file, flushed to
  disk and renamed over the target, so a job killed mid-write never leaves a truncated
  ``last.ckpt`` in place of the last good one.
* RNG states of every process (torch, CUDA, numpy, python) go into each checkpoint and
  come back on resume, so dequantization and variational noise continue the same stream.
* :func:`newest_checkpoint`: the one resume rule, the newest of Lightning's SLURM
  ``hpc_ckpt_*.ckpt`` (written on SIGUSR1 before a requeue) and the ``last.ckpt`` files
  of ModelCheckpoint (Lightning's ``ckpt_path: last`` ignores the hpc ones).
* :func:`persistent_wandb_id`: the W&B run id kept beside the checkpoints, so a
  requeued job continues the same W&B run.
* :func:`load_checkpoint_file`: every checkpoint is read through it, so checkpoints of
  earlier versions still load: classes that no longer exist are read as plain
  objects, and renamed state-dict keys are mapped (:func:`upgrade_state_dict`).
"""
from __future__ import annotations

import os
import pickle
import random
import re
import secrets
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

RNG_KEY = "rng_states"
WANDB_ID_FILE = "wandb_run_id.txt"


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
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
    checkpoint = torch.load(path, map_location=map_location or "cpu", weights_only=False,
                            pickle_module=_tolerant_pickle)
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


def newest_checkpoint(root: str | Path) -> Path | None:
    """The newest (by modification time) of ``root/hpc_ckpt_*.ckpt`` and every
    ``last*.ckpt`` below ``root``; None when there is none (a fresh start)."""
    root = Path(root)
    if not root.is_dir():
        return None
    candidates = list(root.glob("hpc_ckpt_*.ckpt")) + list(root.rglob("last*.ckpt"))
    candidates = [c for c in candidates if c.is_file()]
    if not candidates:
        return None
    return max(candidates, key=lambda c: (c.stat().st_mtime_ns, c.name.startswith("hpc")))


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
    checkpoint = load_checkpoint_file(path)
    if "state_dict" in checkpoint:
        return checkpoint["state_dict"]
    return upgrade_state_dict(checkpoint)


def state_dict_mismatch(own: dict[str, Any], theirs: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, other-shape) tensor names of ``theirs`` against ``own``."""
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    mismatched = [k for k, v in theirs.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    return missing, unexpected, mismatched
