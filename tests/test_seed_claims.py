"""The seeds' claims study (benchmarks/seed_claims.py): its rules (convergence, verdicts,
intervals, sample counts), its derived configs, and the one command end to end at toy
sizes on a fake MNIST folder, so it does not rot."""
import json
import math

import numpy as np
import pytest
import torch

from benchmarks import seed_claims as study
from tests.conftest import fake_mnist


def test_a_missing_folder_is_skipped_with_its_reason(tmp_path, capsys):
    assert study.main(["--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 0
    assert "skipped: no MNIST test split" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_convergence_is_the_change_over_the_last_fifth_of_the_steps():
    flat = [(100 * i, 3.0 + 0.5 ** i) for i in range(1, 11)]  # 1000 steps, settling
    done, change = study.converged(flat, 1000, 0.02)
    assert done and change == pytest.approx(0.5 ** 8 - 0.5 ** 10)
    moving = [(100 * i, 5.0 - 0.05 * i) for i in range(1, 11)]
    done, change = study.converged(moving, 1000, 0.02)
    assert not done and change == pytest.approx(0.1)
    # no validation at or before 80 %: not converged (nothing to compare with)
    assert study.converged([(1000, 3.0)], 1000, 0.02) == (False, math.inf)
    assert study.converged([(900, 3.0), (1000, 3.0)], 1000, 0.02)[0] is False


def gaussian_features(n, shift, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=generator, dtype=torch.float64) + shift


def test_the_bootstrap_interval_holds_the_point_and_separates_what_differs():
    real = gaussian_features(400, 0.0, 0)
    same = study.bootstrap(gaussian_features(400, 0.0, 1), real, draws=40)
    other = study.bootstrap(gaussian_features(400, 0.6, 2), real, draws=40)
    for scores in (same, other):
        low, high = scores["fid_interval"]
        assert low <= scores["fid"] <= high
        assert scores["kid_std"] > 1e-3 * abs(scores["kid"])  # subsets that differ: a real spread
    assert same["fid_interval"][1] < other["fid_interval"][0]  # 8 x 0.36 = 2.9 apart in FID
    assert same["kid"] + 2 * same["kid_std"] < other["kid"] - 2 * other["kid_std"]


def row(fid, interval, parameters=1.0):
    return {"parameters_millions": parameters,
            "temperatures": {"1.0": {"fid": fid, "fid_interval": list(interval)}}}


def test_a_claim_holds_fails_or_is_inconclusive_by_the_intervals():
    claim = study.Claim("c", "a beats b", "a", "b")
    assert study.verdict(claim, {"a": row(5, (4, 6)), "b": row(9, (8, 10))})["verdict"] == "holds"
    assert study.verdict(claim, {"a": row(9, (8, 10)), "b": row(5, (4, 6))})["verdict"] == "does not hold"
    assert study.verdict(claim, {"a": row(6, (4, 8)), "b": row(7, (5, 9))})["verdict"] == "inconclusive"
    assert study.verdict(claim, {"a": row(5, (4, 6))})["verdict"] == "not run"
    # a second seed widens a model's interval to both runs'
    second = {"a": {**row(5, (4, 6)), "second_seed": row(8.5, (8.2, 8.8))}, "b": row(9, (8, 10))}
    assert study.verdict(claim, second)["verdict"] == "inconclusive"
    fewer = study.Claim("f", "a beats b with fewer parameters", "a", "b", "fewer_parameters")
    out = study.verdict(fewer, {"a": row(5, (4, 6), parameters=2.0), "b": row(9, (8, 10), parameters=1.0)})
    assert out["verdict"].startswith("does not hold") and "more" in out["parameters"]
    close = study.Claim("k", "a close to b", "a", "b", "close")
    assert study.verdict(close, {"a": row(7, (6, 8)), "b": row(5, (4, 6.5))})["verdict"] == "holds"
    assert study.verdict(close, {"a": row(9, (8, 10)), "b": row(5, (4, 6))})["verdict"] == "does not hold"


def test_non_finite_samples_are_counted_apart_from_out_of_range_ones():
    samples = torch.zeros(4, 1, 2, 2)
    samples[0, 0, 0, 0] = float("nan")
    samples[1, 0, 1, 1] = 0.9   # beyond [-0.5, 0.5] by more than a tenth of the range
    samples[2, 0, 1, 1] = -0.5 - 2.0 / 256   # beyond by two bins: a pixel, not a gross sample
    samples[3, 0, 1, 1] = 0.5 + 0.5 / 256   # within a bin: quantizes to 255
    quality = study.sample_quality(samples)
    assert quality == {"non_finite": 0.25, "out_of_range": 0.25, "pixels_out_of_range": pytest.approx(2 / 12)}


def test_the_derived_configs_change_only_size_budget_and_bookkeeping(tmp_path):
    """The model of every derived config is the shipped one (overlays applied) with the
    listed size changes, 8 bits, and schedules scaled to the run: the comparison is
    between the shipped recipes."""
    args = study.argparse.Namespace(resolution=16, batch=64, evaluations=10, val_per_class=100, smoke=False,
                                    data_dir=tmp_path, bound_batches=1, bound_batch_size=100)
    schedule_keys = {"warmup_steps", "warmup_epochs", "lr_milestones", "epoch_decay", "decay_steps"}

    def without_schedules(tree):
        if isinstance(tree, dict):
            return {k: without_schedules(v) for k, v in tree.items()
                    if k not in schedule_keys | {"freeze_encoder_steps", "freeze_encoders_at_epoch"}}
        if isinstance(tree, list):
            return [without_schedules(v) for v in tree]
        return tree

    for name, model in study.models(16).items():
        shipped = study.shipped_config(model)
        derived = study.budget(name, model, args, tmp_path / name, 3000, seed=0)
        assert derived["trainer"]["max_steps"] == 3000 and derived["data"]["init_args"]["batch_size"] == 64
        assert derived["data"]["init_args"]["fit_split"] == "test"
        assert derived["data"]["init_args"]["resolutions"] == [16, *model.pyramid]
        for dotted, value in model.size:
            study.set_path(shipped["model"]["init_args"], dotted, value)
        if "n_bits" in shipped["model"]["init_args"]:
            shipped["model"]["init_args"]["n_bits"] = 8
        assert without_schedules(derived["model"]) == without_schedules(shipped["model"]), name
        monitor = derived["trainer"]["callbacks"][-1]["init_args"]["monitor"]
        assert monitor.endswith("_16") and monitor.rsplit("_", 1)[0] == \
            (model.monitor or study.checkpoint_monitor(shipped)).rsplit("_", 1)[0], name


def test_schedules_keep_their_place_in_a_shorter_run():
    settings = {"lr_milestones": [100000, 150000], "warmup_steps": 5000, "epoch_decay": 0.95}
    study.scale_optimizer(settings, fraction=0.01, epochs=10, shipped_epochs=100)
    assert settings["lr_milestones"] == [1000, 1500] and settings["warmup_steps"] == 50
    assert settings["epoch_decay"] ** 10 == pytest.approx(0.95 ** 100)


@pytest.mark.slow
def test_the_study_runs_end_to_end_at_toy_sizes_and_resumes(tmp_path):
    data = fake_mnist(tmp_path / "mnist")
    out = tmp_path / "out"
    command = ["--data-dir", str(data), "--out", str(out), "--smoke", "--steps", "4", "--batch", "8",
               "--val-per-class", "2", "--classifier-epochs", "1", "--fid-samples", "20", "--bootstrap", "4",
               "--bound-images", "4", "--bound-batch-size", "4", "--evaluations", "2", "--extensions", "1",
               "--tolerance", "1e-9"]  # every model trains on once: an extension resumes its checkpoint
    assert study.main(command + ["--figures", str(tmp_path / "figures")]) == 0
    saved = json.loads((out / "results.json").read_text())
    results = saved["results"]
    assert set(results) == set(study.models(16))
    for name, result in results.items():
        kinds = {figure["kind"] for figure in result["held_out"].values()}
        expected = {"tarflow": {"noisy_data_nll_bits"}, "glow": {"bpd"}, "nsf": {"bpd"},
                    "cascade": {"bpd", "bpd_bound"}}.get(name, {"bpd_bound"})
        assert kinds == expected, name
        assert [step for step, _ in result["curve"]] == [2, 4, 6], name  # 4 planned, then 6 (x1.5)
        phases = 2 if name == "cascade" else 1  # the cascade's steps add its two phases
        assert result["extensions"] == 1 and result["steps"] == 6 * phases, name
        for scores in result["temperatures"].values():
            assert np.isfinite(scores["fid"]) and scores["fid_interval"][0] <= scores["fid_interval"][1]
        assert result["sampling_seconds_25"] > 0
    assert "sampling_seconds_25_ddim" in results["pixel_ddpm"] and "sampling_seconds_25_ddim" not in results["nsf"]
    assert set(saved["claims"]) == {claim.key for claim in study.CLAIMS}
    # The floor is computed from the data, not typed: the FID of the first training images
    # against the held-out ones on the study's LeNet, recomputed here.
    args = study.argparse.Namespace(data_dir=data, resolution=16, val_per_class=2)
    split = study.study_data(args).datasets
    weights = out / "mnist_lenet.pt"
    train = study.lenet_features(study.dataset_uint8(split["train"], 16, 20), weights)
    real = study.lenet_features(study.dataset_uint8(split["val"], 16), weights)
    floor = study.fid(train, real)
    assert saved["fid_floor"]["fid"] == pytest.approx(floor, rel=1e-9)
    assert f"FID {floor:.2f}" in (out / "table.md").read_text()
    assert (tmp_path / "figures" / "seed_claims_curves.png").is_file()
    assert (tmp_path / "figures" / "seed_claims_grids.png").is_file()
    # --resume keeps the finished models: no model trains again, the same numbers.
    def logs():
        return {str(path): path.stat().st_mtime_ns for path in out.rglob("train.log")}

    before = logs()
    assert len(before) == len(results) + 1  # the cascade trains in two phases
    assert study.main(command + ["--resume"]) == 0
    resumed = json.loads((out / "results.json").read_text())["results"]
    assert {n: r["temperatures"] for n, r in resumed.items()} == {n: r["temperatures"] for n, r in results.items()}
    assert logs() == before


@pytest.mark.slow
def test_a_killed_model_resumes_from_its_last_checkpoint(tmp_path):
    """An unfinished model (no results yet, a last.ckpt on disk) goes on from its
    checkpoint under --resume: its curve continues where it stopped."""
    data = fake_mnist(tmp_path / "mnist")
    out = tmp_path / "out"
    command = ["--data-dir", str(data), "--out", str(out), "--smoke", "--batch", "8", "--val-per-class", "2",
               "--classifier-epochs", "1", "--fid-samples", "20", "--bootstrap", "2", "--evaluations", "2",
               "--extensions", "0", "--only", "glow"]
    assert study.main(command + ["--steps", "4"]) == 0
    (out / study.STATE).unlink()  # as if killed after training, before its results were written
    assert study.main(command + ["--steps", "8", "--resume"]) == 0
    result = json.loads((out / "results.json").read_text())["results"]["glow"]
    assert [step for step, _ in result["curve"]] == [2, 4, 8]
    assert "Restoring states from the checkpoint" in (out / "glow" / "train.log").read_text() or \
        "resuming from" in (out / "glow" / "train.log").read_text().lower()


def test_an_extension_changes_the_step_limit_not_the_model_settings(tmp_path):
    """A model that trains on resumes from its checkpoint, which refuses other model
    settings: the schedules stay those of the planned run (a cosine ends there)."""
    args = study.argparse.Namespace(resolution=16, batch=64, evaluations=10, val_per_class=100, smoke=False,
                                    data_dir=tmp_path, bound_batches=1, bound_batch_size=100)
    for name, model in study.models(16).items():
        planned = study.budget(name, model, args, tmp_path, 3000, seed=0)
        extended = study.budget(name, model, args, tmp_path, 4500, seed=0, planned=3000)
        assert extended["model"] == planned["model"], name
        again = study.budget(name, model, args, tmp_path, 3000, seed=0)  # the catalogue is not scaled twice
        assert again["model"] == planned["model"], name
        if name == "cascade":
            assert planned["model"]["init_args"]["sr_stages"][0]["optimizer"]["lr_milestones"] == [1500, 2250, 2700, 2850]
        assert extended["trainer"]["max_steps"] == 4500
        if name == "tarflow":
            assert planned["model"]["init_args"]["optimizer"]["decay_steps"] == 3000
