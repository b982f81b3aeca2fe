"""Exact resume: a job killed with SIGKILL and resumed from its last checkpoint ends
with the parameters of an uninterrupted run (deterministic on CPU)."""
import os
import pickle
import subprocess
import sys

import pytest
import torch

import random

from lightning_modules.checkpoint_files import AtomicCheckpointIO, load_checkpoint_file
from lightning_modules.run_folder import newest_checkpoint
from tests.conftest import REPO


def job(*args, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "tests.resume_job", *map(str, args)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


# Every family's kill (about 20 s each on 2 cores) but the Glow's runs with the slow tests
# (CI runs them), so that the fast suite keeps under five minutes.
@pytest.mark.parametrize("family", ["glow", *(pytest.param(family, marks=pytest.mark.slow)
                                              for family in ("cascade", "hierarchical", "diffusion_flow",
                                                             "pixel_diffusion", "tarflow"))])
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


# --- issue 23 items 1 and 3: EMA live weights and the epoch counter after a resume ----------------
# 48 images, batch 8: 6 steps per epoch. Checkpoints at epoch ends (steps 6 and 12, after
# validation, in on_train_epoch_end); 14 steps; the kill at step 13 leaves last.ckpt of
# step 12, so the resumed run starts with epoch 2 and trains steps 13 and 14.
EPOCH_END_RUN = ["glow", 14, "--train-size", 48, "--save-at", "epochs", "--ema", "msflows"]


def kill_and_resume(root, kill_at, *args):
    """(uninterrupted, resumed) results of a run of ``args`` killed at step ``kill_at``
    (SIGKILL) and resumed from its newest checkpoint."""
    straight = job(args[0], root / "straight", *args[1:])
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = job(args[0], root / "killed", *args[1:], "--kill-at", kill_at)
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = job(args[0], root / "killed", *args[1:], "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return root / "straight", root / "killed"


@pytest.fixture(scope="module")
def epoch_end_resume(tmp_path_factory):
    return kill_and_resume(tmp_path_factory.mktemp("epoch_end"), 13, *EPOCH_END_RUN)


def largest_difference(a: dict, b: dict) -> float:
    return max(float((value.float() - b[key].float()).abs().max()) for key, value in a.items())


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key, value in a.items():
        assert torch.allclose(value.float(), b[key].float(), atol=1e-6, rtol=0), (what, key)


def assert_resumed_epochs_are_the_uninterrupted_ones(straight, resumed) -> None:
    a, b = torch.load(straight / "final.pt"), torch.load(resumed / "final.pt")
    assert b["resumed_from"].endswith("last.ckpt") and b["global_step"] == a["global_step"]
    # At every step the resumed run trained: the epoch the schedules read
    # (current_epoch) and the sampler's epoch (the batch order).
    assert b["epochs"] and {s: a["epochs"][s] for s in b["epochs"]} == b["epochs"]
    assert b["current_epoch"] == a["current_epoch"]
    x, y = (load_checkpoint_file(run / "after_fit.ckpt") for run in (straight, resumed))
    assert (y["epoch"], y["global_step"]) == (x["epoch"], x["global_step"])
    assert_same_tensors(a["state_dict"], b["state_dict"], "parameters")


@pytest.mark.slow  # three training jobs (~60 s on 2 cores)
def test_resume_from_an_epoch_end_checkpoint_keeps_the_uninterrupted_epoch(epoch_end_resume):
    straight, resumed = epoch_end_resume
    assert load_checkpoint_file(resumed / "checkpoints" / "epoch=1-step=12.ckpt")["global_step"] == 12
    assert torch.load(resumed / "final.pt")["epochs"] == {12: (2, 2), 13: (2, 2)}
    assert_resumed_epochs_are_the_uninterrupted_ones(straight, resumed)


@pytest.mark.slow  # three training jobs (~60 s on 2 cores)
def test_resumed_ema_run_keeps_the_live_and_the_averaged_weights_apart(epoch_end_resume):
    straight, resumed = epoch_end_resume
    a, b = torch.load(straight / "final.pt"), torch.load(resumed / "final.pt")
    # After fit the model holds the averaged weights (state_dict); live_state_dict is the
    # training weights after the last step. Both runs end with the same of each.
    assert_same_tensors(a["state_dict"], b["state_dict"], "averaged")
    assert_same_tensors(a["live_state_dict"], b["live_state_dict"], "live")
    assert largest_difference(a["live_state_dict"], a["state_dict"]) > 1e-4
    # The resumed run saved nothing during its two steps, so ModelCheckpoint wrote
    # last.ckpt at the train end, after the EMA put the averaged weights in the model;
    # trainer.save_checkpoint after fit is that case too.
    last = load_checkpoint_file(resumed / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 14
    for checkpoint in (last, load_checkpoint_file(straight / "after_fit.ckpt"),
                       load_checkpoint_file(resumed / "after_fit.ckpt")):
        assert_same_tensors(checkpoint["current_model_state"], a["live_state_dict"], "current_model_state")
        assert_same_tensors(checkpoint["state_dict"], a["state_dict"], "state_dict")


@pytest.mark.slow  # three training jobs (~60 s on 2 cores)
def test_ema_checkpoint_tests_with_the_averaged_weights_without_a_warning(epoch_end_resume):
    import warnings

    import pytorch_lightning as pl

    from lightning_modules import EMAWeights
    from tests.resume_job import build

    straight, _ = epoch_end_resume
    path = straight / "checkpoints" / "last.ckpt"
    checkpoint = load_checkpoint_file(path)
    seen = {}

    class Weights(pl.Callback):
        def on_test_start(self, trainer, pl_module):
            seen.update({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    module, data = build("glow", 48)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_test_batches=1, default_root_dir=str(straight),
                         callbacks=[EMAWeights(decay=0.9), Weights()], plugins=[AtomicCheckpointIO()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.test(module, data, ckpt_path=str(path), verbose=False)
    assert not [w for w in caught if "WeightAveraging" in str(w.message)], [str(w.message) for w in caught]
    assert_same_tensors(seen, checkpoint["state_dict"], "tested weights")
    live = checkpoint["current_model_state"]
    assert largest_difference(seen, live) > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("family, save_at", [("glow", "steps"), ("hierarchical", "steps"), ("glow", "validation")])
def test_resume_from_the_last_batch_of_an_epoch_keeps_the_uninterrupted_epoch(tmp_path, family, save_at):
    """6 steps per epoch, last.ckpt of step 6 written at the end of epoch 0's last batch
    (checkpoints every 3 steps), before its validation, or at its validation end. The
    hierarchical flow freezes its encoders at epoch 2 and halves its rates per epoch: a
    resumed run one epoch ahead freezes them at step 6 instead of 12."""
    straight, resumed = kill_and_resume(tmp_path, 8, family, 14, "--train-size", 48, "--save-at", save_at)
    assert torch.load(resumed / "final.pt")["epochs"][6] == (1, 1)
    assert_resumed_epochs_are_the_uninterrupted_ones(straight, resumed)
