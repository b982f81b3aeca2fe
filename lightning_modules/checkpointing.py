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
"""
from __future__ import annotations

import os
import random
import secrets
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
        # The run's own checkpoints hold dataclass hyper-parameters (cascade levels), which
        # weights-only unpickling refuses; they are trusted files of this project.
        return super().load_checkpoint(path, map_location, weights_only=bool(weights_only))


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
    state = torch.load(path, map_location="cpu", weights_only=False)
    return state.get("state_dict", state)


def state_dict_mismatch(own: dict[str, Any], theirs: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, other-shape) tensor names of ``theirs`` against ``own``."""
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    mismatched = [k for k, v in theirs.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    return missing, unexpected, mismatched
