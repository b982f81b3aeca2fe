"""SLURM auto-requeue without SLURM: the SLURM variables are set, a fake ``scontrol``
records the requeue and then kills the job (as SLURM does), SIGUSR1 arrives during
training, and the relaunch with ``ckpt_path: auto`` resumes from the saved step."""
import csv
import os
import signal
import subprocess
import time

import torch

from tests.conftest import REPO
from tests.test_cli import CLI, TINY_QUICKSTART


def test_slurm_sigusr1_saves_requeues_and_the_relaunch_resumes(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    # Record the call, then kill the job the way a requeue does.
    scontrol.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/scontrol_args\nkill -9 $PPID\n')
    scontrol.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "msflows",
           "SLURM_NODELIST": "localhost", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
    args = ["fit", "--config", str(REPO / "experiments/quickstart.yaml"), "--trainer.default_root_dir", "run",
            "--trainer.logger.init_args.save_dir", "run", "--ckpt_path", "auto", *TINY_QUICKSTART,
            "--data.init_args.train_size", "2048"]
    job = subprocess.Popen([*CLI, *args, "--trainer.max_epochs", "50"], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "glow32" / "version_0" / "metrics.csv"
    deadline = time.time() + 300
    while time.time() < deadline and job.poll() is None:  # wait until a few steps are logged
        if metrics.exists() and len(metrics.read_text().splitlines()) > 6:
            break
        time.sleep(0.5)
    assert job.poll() is None, job.stdout.read()[-3000:]
    job.send_signal(signal.SIGUSR1)
    output, _ = job.communicate(timeout=300)
    assert job.returncode == -9, output[-3000:]  # killed by the "requeue"
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
