"""The seed-003 MNIST reproduction (benchmarks/reproduce_seed003_mnist.py) end to end at
toy sizes on a fake MNIST folder, so that the one command does not rot."""
import json

import numpy as np
import pytest
import yaml

from benchmarks import reproduce_seed003_mnist as reproduction
from tests.test_datamodules import write_idx


def fake_mnist(root, per_class=12):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), per_class)
    images = np.zeros((len(labels), 28, 28))
    for i, label in enumerate(labels):  # a class-dependent bar, so the classifier has something to learn
        images[i, 4:24, 2 + 2 * label:5 + 2 * label] = 200 + rng.integers(0, 55)
    write_idx(raw / "t10k-images-idx3-ubyte.gz", images)
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", labels)
    return root


def test_a_missing_folder_is_skipped_with_its_reason(tmp_path, capsys):
    assert reproduction.main(["--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 0
    assert "skipped: no MNIST test split" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_the_derived_configs_change_only_size_budget_and_bookkeeping(tmp_path):
    """Every derived config keeps the shipped model except the listed size changes:
    the comparison is between the shipped recipes."""
    class Args:
        steps, batch, val_per_class, smoke, data_dir = 500, 64, 100, False, tmp_path

    for name, path in reproduction.CONFIGS.items():
        shipped = yaml.safe_load(open(reproduction.ROOT / path))
        derived = reproduction.derived_config(name, Args, tmp_path / name)
        assert derived["trainer"]["max_steps"] == 500 and derived["data"]["init_args"]["batch_size"] == 64
        assert derived["data"]["init_args"]["fit_split"] == "test"
        changed = dict(reproduction.SIZE[name])
        for dotted, value in changed.items():
            reproduction.set_path(shipped["model"]["init_args"], dotted, value)
        for key in ("optimizer", "flow_optimizer", "diffusion_optimizer"):  # warm-ups only
            for settings in (shipped["model"]["init_args"].get(key), derived["model"]["init_args"].get(key)):
                if isinstance(settings, dict):
                    settings.pop("warmup_steps", None), settings.pop("warmup_epochs", None)
        shipped["model"]["init_args"]["n_bits"] = derived["model"]["init_args"]["n_bits"] = 8
        assert derived["model"] == shipped["model"], name


@pytest.mark.slow
def test_the_reproduction_runs_end_to_end_at_toy_sizes(tmp_path):
    data = fake_mnist(tmp_path / "mnist")
    out = tmp_path / "out"
    assert reproduction.main(["--data-dir", str(data), "--out", str(out), "--smoke", "--steps", "3",
                              "--batch", "8", "--val-per-class", "2", "--classifier-epochs", "1",
                              "--figures", str(tmp_path / "figures")]) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == set(reproduction.CONFIGS)
    for name, row in results.items():
        assert row["bpd_is_bound"] == (name in ("pixel_ddpm", "diffused_flows"))
        assert np.isfinite(row["held_out_bpd"]) and np.isfinite(row["fid"]) and row["sampling_seconds_25"] > 0
        assert (tmp_path / "figures" / f"seed003_mnist_{name}.png").is_file()
    assert "sampling_seconds_25_ddim" in results["pixel_ddpm"] and "sampling_seconds_25_ddim" not in results["nsf"]
    table = (out / "table.md").read_text()
    assert "(bound," in table and "(exact)" in table and "not plausible" in table
    # --retime measures the sampling times again from the checkpoints; every other number
    # stays the run's.
    assert reproduction.main(["--data-dir", str(data), "--out", str(out), "--smoke", "--retime"]) == 0
    retimed = json.loads((out / "results.json").read_text())
    for name, row in retimed["results"].items():
        assert row["held_out_bpd"] == results[name]["held_out_bpd"] and row["fid"] == results[name]["fid"]
        assert row["sampling_seconds_25"] > 0
    assert "sampling_retimed" in retimed and "measured again" in (out / "table.md").read_text()
    # --resume keeps the classifier and the finished models (results.partial.json): the
    # same numbers, no model trained again.
    logs = {name: (out / f"{name}.log").stat().st_mtime_ns for name in reproduction.CONFIGS}
    assert reproduction.main(["--data-dir", str(data), "--out", str(out), "--smoke", "--resume", "--steps", "3",
                              "--batch", "8", "--val-per-class", "2"]) == 0
    resumed = json.loads((out / "results.json").read_text())["results"]
    assert {name: row["fid"] for name, row in resumed.items()} == {name: row["fid"] for name, row in
                                                                   retimed["results"].items()}
    assert logs == {name: (out / f"{name}.log").stat().st_mtime_ns for name in reproduction.CONFIGS}


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
