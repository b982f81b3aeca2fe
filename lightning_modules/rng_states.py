"""The random states of every process (torch, CUDA, numpy, python): saved in each
checkpoint and restored on resume, so dequantization and variational noise continue the
same stream (:class:`~lightning_modules.exact_resume.ExactResume`), and a seeded
generator for sampling that leaves the training stream alone (:func:`seeded_rng`).
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

RNG_KEY = "rng_states"


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
