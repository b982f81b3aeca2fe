"""Reading and writing checkpoint files.

* :class:`AtomicCheckpointIO`: a checkpoint is written to a temporary file, flushed to
  disk and renamed over the target, so a job killed mid-write never leaves a truncated
  ``last.ckpt`` in place of the last good one; disk faults a user can fix are one
  paragraph (:func:`storage_error`).
* :func:`load_checkpoint_file`: every checkpoint is read through it, so checkpoints of
  earlier versions still load: classes that no longer exist are read as plain
  objects, and renamed state-dict keys are mapped (:func:`upgrade_state_dict`).
"""
from __future__ import annotations

import errno
import os
import pickle
import re
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from lightning_modules.errors import CheckpointError, StorageError

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
