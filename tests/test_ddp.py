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
    assert set(table["fid"]) == {"8", "16"}
    # Scored once, on the 6 + 6 samples of both ranks (each with its own seed): the same
    # FID as the trained model's two shares drawn and scored here in one process, and not
    # the FID of 12 samples drawn by rank 0 alone.
    from lightning_modules import FIDSettings
    from lightning_modules.sample_grids import draw_samples
    from lightning_modules.metrics import ImagesAtResolution, TensorImages, fidelity
    from tests.resume_job import build

    module, data = build("cascade")
    module.load_state_dict(torch.load(ddp_runs / "ddp" / "rank0_end.pt"))
    data.setup("test")
    settings = FIDSettings(num_samples=12, feature_extractor="random-conv", batch_size=4, kid_subset_size=4)
    temperature = table["evaluation"]["temperature"]
    shares = [draw_samples(module, 6, temperature, settings.seed + rank, 4) for rank in (0, 1)]
    alone = draw_samples(module, 12, temperature, settings.seed, 4)
    for resolution in (8, 16):
        real = ImagesAtResolution(data.datasets["test"], resolution, module.n_bits)

        def fid(images):
            return fidelity(TensorImages(images), real, settings, None, cuda=False)["fid"]

        split = fid(torch.cat([share[resolution] for share in shares]))
        assert table["fid"][str(resolution)] == pytest.approx(split, rel=1e-4, abs=1e-6)
        assert table["fid"][str(resolution)] != pytest.approx(fid(alone[resolution]), rel=1e-4)
