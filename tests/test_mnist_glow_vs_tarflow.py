"""The MNIST Glow-vs-TarFlow comparison (benchmarks/mnist_glow_vs_tarflow.py) end to end
at toy sizes on a fake MNIST folder, so that the one command does not rot. (The seeds'
claims study has its own: tests/test_seed_claims.py.)"""
import json

import numpy as np
import pytest

from tests.conftest import fake_mnist


@pytest.mark.slow
def test_the_glow_vs_tarflow_comparison_runs_end_to_end_at_toy_sizes(tmp_path):
    """benchmarks/mnist_glow_vs_tarflow.py on the fake folder: four runs, each with its
    held-out curve under the right name (bits/dim for uniform dequantization, the noisy
    data's figure for noise augmentation), FIDs raw and, for the noise runs, denoised."""
    from benchmarks import mnist_glow_vs_tarflow as comparison

    data = fake_mnist(tmp_path / "mnist")
    out = tmp_path / "out"
    assert comparison.main(["--data-dir", str(data), "--out", str(out), "--smoke", "--steps", "4",
                            "--eval-every", "2", "--batch", "8", "--val-per-class", "2", "--fid-samples", "20",
                            "--classifier-epochs", "1", "--figures", str(tmp_path / "figures")]) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {"glow/uniform", "tarflow/uniform", "glow/noise", "tarflow/noise"}
    for key, row in results.items():
        assert [step for step, _ in row["curve"]] == [2, 4], key
        assert np.isfinite(row["raw"]["fid"]) and row["step_seconds"] > 0
        assert ("denoised" in row) == key.endswith("noise"), key
    table = (out / "table.md").read_text()
    assert "bits/dim" in table and "noisy_data_nll_bits" in table
    assert (tmp_path / "figures" / "glow_vs_tarflow_mnist.png").is_file()
