"""Exact resume: a job killed with SIGKILL and resumed from its last checkpoint ends
with the parameters of an uninterrupted run (deterministic on CPU)."""
import os
import pickle
import subprocess
import sys

import pytest
import torch

import random

from lightning_modules.checkpointing import AtomicCheckpointIO, newest_checkpoint
from tests.conftest import REPO


def job(*args, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "tests.resume_job", *map(str, args)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("family", ["glow", "cascade"])
def test_resume_after_sigkill_equals_the_uninterrupted_run(tmp_path, family):
    # 16 batches per epoch: the kill at step 11 is mid-epoch, the run ends in epoch 2.
    straight = job(family, tmp_path / "straight", 20)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = job(family, tmp_path / "killed", 20, "--kill-at", 11)
    assert killed.returncode == -9  # SIGKILL
    assert not (tmp_path / "killed" / "final.pt").exists()
    resumed = job(family, tmp_path / "killed", 20, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(tmp_path / "straight" / "final.pt")
    b = torch.load(tmp_path / "killed" / "final.pt")
    assert b["resumed_from"].endswith("last.ckpt") and b["global_step"] == a["global_step"] == 20
    for key, value in a["state_dict"].items():
        assert torch.allclose(value.float(), b["state_dict"][key].float(), atol=1e-6, rtol=0), key
    # The step since the last checkpoint (9) really was redone: the killed run's
    # checkpoint is from step 9, not a later one.
    assert torch.load(tmp_path / "killed" / "checkpoints" / "epoch=0-step=9.ckpt", weights_only=False)["global_step"] == 9


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("killed mid-write")


def test_resume_interrupted_checkpoint_write_keeps_the_last_good_one(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 9}, path)
    good = path.read_bytes()
    with pytest.raises((RuntimeError, pickle.PicklingError)):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "bad": Unpicklable()}, path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary left


def test_resume_rule_picks_the_newest_of_hpc_and_last(tmp_path):
    assert newest_checkpoint(tmp_path) is None
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"x")
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    hpc.write_bytes(b"x")
    os.utime(last, ns=(1_000_000_000, 1_000_000_000))
    os.utime(hpc, ns=(2_000_000_000, 2_000_000_000))
    assert newest_checkpoint(tmp_path) == hpc
    os.utime(last, ns=(3_000_000_000, 3_000_000_000))
    assert newest_checkpoint(tmp_path) == last


@pytest.mark.slow
def test_resume_after_ten_random_kills_in_training_and_in_checkpoint_writes(tmp_path):
    """Fault injection: SIGKILL at random steps and halfway through random checkpoint
    writes; every run resumed the ckpt_path-auto way ends with the uninterrupted run's
    parameters, and no temporary file is left."""
    straight = job("glow", tmp_path / "straight", 20)
    assert straight.returncode == 0, straight.stderr[-3000:]
    reference = torch.load(tmp_path / "straight" / "final.pt")["state_dict"]
    draw = random.Random(0)
    # Checkpoints every 3 steps, each written twice (step file and last.ckpt): 12 writes in 20 steps.
    faults = [("--kill-at", draw.randint(1, 19)) for _ in range(5)] + \
             [("--kill-in-write", draw.randint(1, 12)) for _ in range(5)]
    for index, (fault, where) in enumerate(faults):
        root = tmp_path / f"run{index}"
        killed = job("glow", root, 20, fault, where)
        assert killed.returncode == -9, (fault, where, killed.stderr[-2000:])
        resumed = job("glow", root, 20, "--resume")
        assert resumed.returncode == 0, (fault, where, resumed.stderr[-3000:])
        final = torch.load(root / "final.pt")
        assert final["global_step"] == 20
        for key, value in reference.items():
            assert torch.allclose(value.float(), final["state_dict"][key].float(), atol=1e-6, rtol=0), (fault, where, key)
        assert not list(root.rglob("*.tmp")), (fault, where)
