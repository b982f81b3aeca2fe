"""DDP with 2 CPU processes (gloo)."""
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO


def run_job(mode, out):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "tests.ddp_job", mode, str(out)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    run_job("ddp", root / "ddp")
    run_job("single", root / "single")
    return root


def test_ddp_parameters_identical_across_ranks_after_init_and_steps(ddp_runs):
    for tag in ("step1", "end"):
        rank0 = torch.load(ddp_runs / "ddp" / f"rank0_{tag}.pt")
        rank1 = torch.load(ddp_runs / "ddp" / f"rank1_{tag}.pt")
        for key, value in rank0.items():
            assert torch.equal(value, rank1[key]), (tag, key)
    # Data-dependent initialization ran (and agreed): ActNorm is initialized and moved.
    actnorm = [k for k in rank0 if k.endswith("initialized")]
    assert actnorm and all(bool(rank0[k]) for k in actnorm)


def test_ddp_gathered_validation_metric_equals_single_process(ddp_runs):
    ddp = torch.load(ddp_runs / "ddp" / "validate.pt")
    single = torch.load(ddp_runs / "single" / "validate.pt")
    for key in ("val/bpd_8", "val/bpd_bound_16", "val/bpd_16_given_8"):
        assert ddp[key] == pytest.approx(single[key], rel=1e-5), key


def test_ddp_fid_samples_are_split_across_ranks_and_scored_once(ddp_runs):
    import json

    table = json.loads((ddp_runs / "ddp" / "metrics.json").read_text())
    assert table["evaluation"]["num_samples"] == 12
    assert set(table["fid"]) == {"8", "16"} and all(v >= 0 for v in table["fid"].values())
