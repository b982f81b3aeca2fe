"""SLURM auto-requeue without SLURM: the SLURM variables are set, a fake ``scontrol``
records the requeue, the requeue signal (SIGUSR1) arrives during training, and the
relaunch with ``ckpt_path: auto`` resumes from the saved step. The job must stop by
itself after requeueing (SLURM would kill it), with a checkpoint taken at the end of a
step, not from inside the signal handler."""
import csv
import os
import signal
import subprocess
import time

import pytest
import torch

from lightning_modules.checkpoint_files import load_checkpoint_file
from tests.conftest import REPO
from tests.commands import (CLI, TINY_QUICKSTART, assert_same_training_state, fit_capturing, signal_at,
                            uninterrupted_last_checkpoint)

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "msflows",
         "SLURM_NODELIST": "localhost", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}


def fake_scontrol(tmp_path, then: str = "") -> dict:
    """The environment of a SLURM job whose ``scontrol`` records its arguments in
    ``tmp_path/scontrol_args`` (and then runs ``then``)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/scontrol_args\n{then}\n')
    scontrol.chmod(0o755)
    return {**SLURM, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


@pytest.fixture(scope="module")
def requeued_run(tmp_path_factory):
    """The two-epoch quickstart of test_reliability, SIGUSR1 in step 6, in this process."""
    root = tmp_path_factory.mktemp("requeue")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in fake_scontrol(root).items():
            patch.setenv(key, value)
        code, err = fit_capturing(root / "run", signal_at(5, "SIGUSR1"))
    return root, code, err


def test_slurm_requeue_signal_saves_at_the_step_end_requeues_and_stops(requeued_run):
    root, code, err = requeued_run
    assert code == 128 + signal.SIGUSR1, err[-3000:]  # stopped by itself, did not train on
    assert (root / "scontrol_args").read_text().split() == ["requeue", "4242"]
    hpc = root / "run" / "hpc_ckpt_1.ckpt"
    assert f"SIGUSR1: saved {hpc} at step 6; requeued SLURM job 4242" in err
    assert load_checkpoint_file(hpc)["global_step"] == 6
    assert max(load_checkpoint_file(p)["global_step"] for p in (root / "run").rglob("*.ckpt")) == 6


@pytest.mark.slow
def test_the_requeue_checkpoint_alone_resumes_to_the_uninterrupted_run(requeued_run, tmp_path_factory):
    root, code, _ = requeued_run
    assert code == 128 + signal.SIGUSR1
    for path in (root / "run" / "checkpoints").glob("*.ckpt"):
        path.unlink()  # the hpc checkpoint alone
    with pytest.MonkeyPatch.context() as patch:
        for key, value in fake_scontrol(root).items():
            patch.setenv(key, value)
        code, err = fit_capturing(root / "run", "--ckpt_path", "auto")
    assert code == 0, err[-3000:]
    assert f"resuming from {root / 'run' / 'hpc_ckpt_1.ckpt'}" in err
    assert_same_training_state(root / "run" / "checkpoints" / "last.ckpt",
                               uninterrupted_last_checkpoint(tmp_path_factory))


@pytest.mark.slow  # a CLI subprocess with DataLoader workers and a relaunch (~35 s)
def test_slurm_sigusr1_from_outside_saves_requeues_stops_and_the_relaunch_resumes(tmp_path):
    """The signal sent from outside, at whatever the run is doing, to every process of
    the job (as SLURM signals a job step), its DataLoader workers included."""
    env = {**os.environ, **fake_scontrol(tmp_path)}
    args = ["fit", "--config", str(REPO / "experiments/quick_photos.yaml"), "--trainer.default_root_dir", "run",
            "--trainer.logger.init_args.save_dir", "run", "--ckpt_path", "auto", *TINY_QUICKSTART,
            "--data.init_args.train_size", "2048", "--data.init_args.num_workers", "2"]
    job = subprocess.Popen([*CLI, *args, "--trainer.max_epochs", "50"], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    metrics = tmp_path / "run" / "glow32" / "version_0" / "metrics.csv"
    deadline = time.time() + 300
    while time.time() < deadline and job.poll() is None:  # wait until a few steps are logged
        if metrics.exists() and len(metrics.read_text().splitlines()) > 6:
            break
        time.sleep(0.5)
    assert job.poll() is None, job.stdout.read()[-3000:]
    assert len(subprocess.run(["pgrep", "-g", str(job.pid)], capture_output=True, text=True).stdout.split()) > 1
    os.killpg(job.pid, signal.SIGUSR1)
    output, _ = job.communicate(timeout=300)
    assert job.returncode == 128 + signal.SIGUSR1, output[-3000:]  # stopped after the requeue
    assert (tmp_path / "scontrol_args").read_text().split() == ["requeue", "4242"]
    hpc = tmp_path / "run" / "hpc_ckpt_1.ckpt"
    saved_step = torch.load(hpc, map_location="cpu", weights_only=False)["global_step"]
    assert saved_step > 0

    relaunch = subprocess.run([*CLI, *args, "--trainer.max_steps", str(saved_step + 3)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    assert f"resuming from {hpc}" in relaunch.stderr or "resuming from run/hpc_ckpt_1.ckpt" in relaunch.stderr
    resumed_rows = list(csv.DictReader((tmp_path / "run" / "glow32" / "version_1" / "metrics.csv").open()))
    steps = [int(r["step"]) for r in resumed_rows if r.get("train/loss")]
    assert steps and min(steps) >= saved_step, (saved_step, steps)
