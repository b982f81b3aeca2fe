"""The silent faults of issue 36, each as the property a fix must keep: a "best"
checkpoint holds the weights its validation measured; validation inside an accumulation
group loses nothing; a label outside the model's classes is refused; guidance needs a
trained null class; a checkpoint loads only into the settings that wrote it; checkpoint
names come from the monitored metric; settings that cannot work fail before training;
a run says where its files are. (Non-finite samples: test_nonfinite_samples.py.)"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

from flows import Glow
from flows.tarflow import TarFlow
from lightning_modules import ModelCheckpoint
from lightning_modules.errors import ConfigurationError
from tests.conftest import REPO, run_command, tiny_data, tiny_module, trainer

PHOTOS = str(REPO / "experiments/quick_photos.yaml")
# The photo-crop quickstart at 8x8 with a two-step Glow: seconds per fit.
TINY = ["--model.init_args.flow.init_args.image_size", "8", "--model.init_args.flow.init_args.scales", "2",
        "--model.init_args.flow.init_args.steps_per_scale", "1",
        "--model.init_args.flow.init_args.hidden_channels", "8",
        "--data.init_args.image_size", "8", "--data.init_args.resolutions", "[8]",
        "--data.init_args.train_size", "64", "--data.init_args.val_size", "16", "--data.init_args.batch_size", "8",
        "--trainer.callbacks.monitor", "val/bpd_8", "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks.init_args.save_top_k", "-1"]


def fit_photos(capsys, root: Path, *extra) -> tuple[int, str, Path]:
    code, err, _ = run_command(capsys, "fit", "--config", PHOTOS, *TINY, "--trainer.default_root_dir", str(root),
                               *extra)
    return code, err, root / "glow32" / "version_0"


# --- 1. a top-k file holds the weights its validation measured ----------------------------
def test_every_best_checkpoint_holds_the_weights_its_validation_measured(tmp_path, capsys):
    """Validation and the step schedule every 4 steps (the shape of glow_celeba64,
    glow_lsun128, the cascade, tarflow_imagenet64 and the hierarchical configs): each
    top-k file, validated again, gives the number in its name. Before the fix the file
    named with step 4's number held step 8's weights."""
    code, err, run = fit_photos(capsys, tmp_path, "--trainer.max_steps", "12", "--trainer.val_check_interval", "4",
                                "--trainer.check_val_every_n_epoch", "null",
                                "--trainer.callbacks.init_args.every_n_train_steps", "4",
                                "--trainer.callbacks.init_args.filename", "step{step}-bpd{val/bpd_8:.4f}",
                                "--trainer.callbacks.init_args.auto_insert_metric_name", "false")
    assert code == 0, err[-3000:]
    best = sorted((run / "checkpoints").glob("step*.ckpt"))
    assert len(best) == 3, best
    from datamodules import EmbeddedDataModule
    from lightning_modules import GlowModule

    for path in best:
        named = float(re.search(r"bpd(-?[\d.]+)\.ckpt", path.name).group(1))
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        step = int(re.search(r"step(\d+)", path.name).group(1))
        assert checkpoint["global_step"] == step
        module = GlowModule.load_from_checkpoint(path)
        data = EmbeddedDataModule(image_size=8, resolutions=[8], train_size=64, val_size=16, batch_size=8)
        measured = trainer(tmp_path, limit_val_batches=1.0).validate(module, datamodule=data, verbose=False)[0]["val/bpd_8"]
        assert measured == pytest.approx(named, abs=5e-4), (path.name, measured)
    # The summary at the end names the best file and its score.
    assert "run finished at step 12" in err and "measured on these weights" in err


def test_last_checkpoint_still_follows_the_step_schedule_before_the_first_validation(tmp_path, capsys):
    code, err, run = fit_photos(capsys, tmp_path, "--trainer.max_steps", "4", "--trainer.limit_val_batches", "0",
                                "--trainer.callbacks.init_args.every_n_train_steps", "2")
    assert code == 0, err[-3000:]
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 4
    assert not list((run / "checkpoints").glob("epoch*.ckpt"))  # nothing measured, nothing "best"


# --- 2. validation inside an accumulation group ------------------------------------------
def accumulated_run(tmp_path, validate_every: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    module = tiny_module()
    module.accumulate_grad_batches = 4
    fit = trainer(tmp_path, max_steps=2, val_check_interval=validate_every, check_val_every_n_epoch=None)
    fit.fit(module, datamodule=tiny_data())
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_validation_in_the_middle_of_an_accumulation_group_loses_no_micro_batch(tmp_path):
    """Groups of 4 micro-batches, validated after batch 6 (mid-group) or after batch 4
    (a group's end): the same parameters. Lightning zeroed the group's gradients before
    its validation (1.5e-3 apart before the fix)."""
    at_group_end = accumulated_run(tmp_path / "a", 4)
    mid_group = accumulated_run(tmp_path / "b", 6)
    for name, value in at_group_end.items():
        assert torch.equal(value, mid_group[name]), name


# --- 3. labels and class counts ---------------------------------------------------------
def test_a_label_equal_to_num_classes_is_refused_not_read_as_the_null_class():
    model = TarFlow(in_channels=1, image_size=4, patch_size=2, channels=16, blocks=1, layers_per_block=1,
                    head_channels=8, num_classes=2, label_dropout=0.1)
    x = torch.rand(1, 1, 4, 4) - 0.5
    model.log_prob(x, {"labels": torch.tensor([1])})  # a class: fine
    model.log_prob(x, {"labels": torch.tensor([-1])})  # the null class: fine
    with pytest.raises(RuntimeError, match=r"\[0, 2\) or be -1"):
        model.log_prob(x, {"labels": torch.tensor([2])})


def write_class_folders(root: Path, classes: int, per_class: int = 4) -> Path:
    from PIL import Image

    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray((torch.rand(8, 8, 3) * 255).to(torch.uint8).numpy()).save(folder / f"{i}.png")
    return root


def test_a_model_with_fewer_classes_than_the_data_is_refused_before_the_first_step(tmp_path):
    from datamodules import ImageFolderDataModule
    from lightning_modules import GlowModule

    data = ImageFolderDataModule(data_dir=str(write_class_folders(tmp_path / "images", 3)), image_size=8,
                                 resolutions=[8], batch_size=4, labels_from_subfolders=True, num_classes=3,
                                 val_fraction=0.25)
    module = GlowModule(flow=Glow(image_size=8, scales=2, steps_per_scale=1, hidden_channels=8, num_classes=2))
    fit = trainer(tmp_path, max_steps=2)
    with pytest.raises(ConfigurationError, match="3 classes .* num_classes: 2; set num_classes: 3"):
        fit.fit(module, datamodule=data)
    assert fit.global_step == 0


# --- 5. guidance needs a trained null class ----------------------------------------------
def test_guidance_without_label_dropout_is_refused_and_warned():
    with pytest.raises(ValueError, match="label_dropout: 0 never learns"):
        Glow(image_size=4, in_channels=1, scales=1, steps_per_scale=1, hidden_channels=4, num_classes=2,
             guidance=2.0)
    def untrained_null():
        return Glow(image_size=4, in_channels=1, scales=1, steps_per_scale=1, hidden_channels=4, num_classes=2)

    with pytest.warns(UserWarning, match="null class was never trained"):
        untrained_null().sample(2, {"labels": torch.tensor([0, 1]), "guidance": 1.0})
    with pytest.warns(UserWarning, match="null class was never trained"):
        untrained_null().sample(2, {"labels": torch.tensor([-1, 1])})
    trained = Glow(image_size=4, in_channels=1, scales=1, steps_per_scale=1, hidden_channels=4, num_classes=2,
                   label_dropout=0.1, guidance=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trained.sample(2, {"labels": torch.tensor([0, 1])})


# --- 6 and 13. settings compared on load; test logs in the run folder ----------------------
def test_a_checkpoint_is_refused_by_a_config_with_other_model_settings(tmp_path, capsys):
    code, err, run = fit_photos(capsys, tmp_path, "--trainer.max_steps", "2")
    assert code == 0, err[-3000:]
    last = str(run / "checkpoints" / "last.ckpt")
    test = ["test", "--config", PHOTOS, *TINY, "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", last]
    code, err, _ = run_command(capsys, *test, "--model.init_args.flow.init_args.scale_fn", "squish")
    assert code == 2
    assert "scale_fn: 'glow' in the checkpoint, 'squish' here" in err and "accept_changed_settings" in err
    assert not (run / "metrics.json").exists()  # refused before anything was written
    # Optimization settings may differ; the explicit override loads the other settings.
    code, err, _ = run_command(capsys, *test, "--model.init_args.optimizer.lr", "0.5")
    assert code == 0, err[-3000:]
    code, err, _ = run_command(capsys, *test, "--model.init_args.flow.init_args.scale_fn", "squish",
                               "--model.init_args.accept_changed_settings", "[scale_fn]")
    assert code == 0, err[-3000:]
    # The test's own logs went into the run folder, not a new version_N beside it, and
    # Lightning did not warn about the checkpoint callback's other dirpath.
    assert sorted(p.name for p in (tmp_path / "glow32").iterdir()) == ["version_0"]
    assert (run / "test_last" / "metrics.csv").is_file()
    assert "dirpath has changed" not in err
    assert "test finished" in err and str(run / "metrics.json") in err


# --- 7. names from the monitored metric ----------------------------------------------------
def test_checkpoint_names_come_from_the_monitored_metric():
    metrics = {"epoch": 0, "step": 4, "val/noisy_data_nll_bits_32": torch.tensor(-2.5)}
    default = ModelCheckpoint(monitor="val/noisy_data_nll_bits_32")
    assert Path(default.format_checkpoint_name(dict(metrics))).name == \
        "epoch0-step4-noisy_data_nll_bits_32=-2.5.ckpt"
    template = ModelCheckpoint(monitor="val/noisy_data_nll_bits_32", filename="epoch{epoch}-bpd{val/bpd_32:.3f}",
                               auto_insert_metric_name=False)
    with pytest.warns(UserWarning, match=r"names \['val/bpd_32'\], which this run does not log"):
        name = Path(template.format_checkpoint_name(dict(metrics))).name
    assert name == "epoch0-step4-noisy_data_nll_bits_32=-2.5.ckpt"  # not "epoch0-bpd0.000"


# --- 8. errors before training -------------------------------------------------------------
def test_noise_augmentation_monitored_as_bpd_fails_before_the_first_step(tmp_path, capsys):
    code, err, run = fit_photos(capsys, tmp_path, "--config", str(REPO / "experiments/noise_augmentation.yaml"),
                                "--trainer.max_steps", "2")
    assert code == 2
    assert "monitor val/noisy_data_nll_bits_8" in err
    assert not (run / "checkpoints").exists() or not list((run / "checkpoints").iterdir())


@pytest.mark.parametrize("setting, value", [("patch_size", 0), ("patch_size", -4), ("head_channels", 0),
                                            ("patch_size", 3)])
def test_tarflow_sizes_that_cannot_work_are_named(setting, value):
    options = dict(in_channels=1, image_size=8, patch_size=2, channels=16, blocks=1, layers_per_block=1,
                   head_channels=8)
    options[setting] = value
    with pytest.raises(ValueError, match=f"TarFlow's (\\w+ \\d+ is not a multiple of )?{setting}"):
        TarFlow(**options)


def test_trainer_accumulation_points_to_the_modules_setting(tmp_path, capsys):
    code, err, _ = fit_photos(capsys, tmp_path, "--trainer.accumulate_grad_batches", "4")
    assert code == 2
    assert "model.init_args.accumulate_grad_batches: 4" in err and "Traceback" not in err


def test_a_yaml_syntax_error_names_the_file_the_line_and_the_cause(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer:\n  max_steps: 3\n  callbacks: [a, b\nmodel: {}\n")
    code, err, _ = run_command(capsys, "fit", "--config", str(broken))
    assert code == 2
    assert str(broken) in err and "not valid YAML" in err and re.search(r"line \d+, column \d+", err)


def test_a_setting_for_an_argument_a_class_lacks_names_the_argument():
    from lightning_modules.cli import parser_cause

    message = ("Parser key \"model\":\n  Does not validate against any of the Union subtypes\n  Errors:\n"
               "    - Problem with given class_path 'lightning_modules.HierarchicalModule':\n"
               "        Parser key \"flow\":\n"
               "          Problem with given class_path 'flows.HierarchicalFlow':\n"
               "            Option 'dequantizer.init_args.noise_std' is not accepted\n")
    assert "flows.HierarchicalFlow has no argument 'dequantizer'" in parser_cause(message)


def test_validating_two_checkpoints_writes_two_grids(tmp_path, capsys):
    code, err, run = fit_photos(capsys, tmp_path, "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
                                "--trainer.check_val_every_n_epoch", "null",
                                "--trainer.callbacks.init_args.every_n_train_steps", "2")
    assert code == 0, err[-3000:]
    grids_after_fit = set((run / "samples").glob("*.png"))
    for checkpoint in sorted((run / "checkpoints").glob("epoch*.ckpt")):
        code, err, _ = run_command(capsys, "validate", "--config", PHOTOS, *TINY, "--trainer.default_root_dir",
                                   str(tmp_path), "--ckpt_path", str(checkpoint))
        assert code == 0, err[-3000:]
    new = sorted(p.name for p in set((run / "samples").glob("*.png")) - grids_after_fit)
    assert len(new) == 2 * 2, new  # two checkpoints x two temperatures
    assert all(name.startswith("validate_epoch") for name in new)


EQUAL_INTERVALS = ["glow_celeba64.yaml", "glow_lsun128.yaml", "celeba_cascade.yaml", "cifar10_cascade.yaml",
                   "tarflow_imagenet64.yaml", "hierarchical_celebahq256.yaml", "hierarchical_lsun128.yaml"]


@pytest.mark.parametrize("config", EQUAL_INTERVALS)
def test_the_shipped_configs_that_validate_on_their_checkpoint_schedule_keep_measured_weights(config):
    """The configs whose top-k file held the next interval's weights (validation every
    N steps and the step schedule every N): their ModelCheckpoint now chooses the top-k
    at validation ends (the property test above), and names files from its monitor."""
    import yaml

    settings = yaml.safe_load((REPO / "experiments" / config).read_text())
    trainer_settings = settings["trainer"]
    (callback,) = [c for c in trainer_settings["callbacks"] if isinstance(c, dict)
                   and c["class_path"] == "lightning_modules.ModelCheckpoint"]
    assert callback["init_args"]["every_n_train_steps"] == trainer_settings["val_check_interval"]
    checkpoint = ModelCheckpoint(**callback["init_args"])
    assert checkpoint._topk_at_validation
    monitor = callback["init_args"]["monitor"]
    name = Path(checkpoint.format_checkpoint_name({"epoch": 1, "step": 5000, monitor: torch.tensor(3.25)})).name
    assert name == f"epoch1-step5000-{monitor.split('/')[-1]}=3.25.ckpt"
