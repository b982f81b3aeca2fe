"""The `lightning` command as users run it."""
import csv
import subprocess
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from lightning_modules import TestMetrics
from tests.commands import CLI, TINY_QUICKSTART, print_config, run_cli
from tests.conftest import REPO, run_command

def test_console_scripts_point_at_one_entry():
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")
               if ep.name in ("lightning", "msflows")}
    assert scripts == {"lightning": "lightning_modules.cli:main", "msflows": "lightning_modules.cli:main"}


def test_print_config_resolves_the_seed_settings(capsys):
    result = print_config(capsys, "--config", "experiments/glow_cifar10.yaml")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for line in ("class_path: lightning_modules.GlowModule", "class_path: flows.Glow", "steps_per_scale: 32",
                 "hidden_channels: 512", "lr: 0.0005", "weight_decay: 5.0e-05",
                 "batch_size: 512", "max_steps: 200000", "warmup_epochs: 5.0"):
        assert line in out, line


ADD_ONS = {"analyses.yaml", "variational_dequantization.yaml", "noise_augmentation.yaml"}  # put on top of an experiment's config


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "experiments").glob("*.yaml")))
def test_every_experiment_config_parses(config, capsys):
    configs = ["--config", "experiments/quick_photos.yaml"] if config in ADD_ONS else []
    result = print_config(capsys, *configs, "--config", f"experiments/{config}")
    assert result.returncode == 0, result.stderr[-2000:]


def test_missing_cifar10_is_a_clear_error_not_a_traceback(tmp_path):
    result = run_cli("fit", "--config", "experiments/glow_cifar10.yaml",
                     "--data.init_args.data_dir", str(tmp_path / "cifar"),
                     "--data.init_args.download", "false", "--trainer.logger", "false",
                     "--trainer.default_root_dir", str(tmp_path))
    assert result.returncode == 2
    assert "cifar-10-batches-py/data_batch_1" in result.stderr
    assert "Traceback" not in result.stderr


def test_wrong_config_key_is_caught(tmp_path):
    result = run_cli("fit", "--config", "experiments/quickstart.yaml", "--model.init_args.levelz", "3")
    assert result.returncode != 0
    assert "levelz" in result.stderr


def read_val_bpd(metrics: Path, name: str) -> list[float]:
    """The logged ``val/<name>`` values, e.g. name ``bpd_32`` or ``bpd_bound_32``."""
    rows = list(csv.DictReader(metrics.open()))
    return [float(r[f"val/{name}"]) for r in rows if r.get(f"val/{name}")]


def test_small_quick_photos_fit_writes_checkpoint_samples_and_bpd(tmp_path):
    result = run_cli(
        "fit", "--config", str(REPO / "experiments/quick_photos.yaml"),
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
        "--model.init_args.flow.init_args.image_size", "16", "--model.init_args.flow.init_args.scales", "2",
        "--model.init_args.flow.init_args.steps_per_scale", "2", "--model.init_args.flow.init_args.hidden_channels", "16",
        "--data.init_args.image_size", "16", "--data.init_args.resolutions", "[16]",
        "--data.init_args.train_size", "256", "--data.init_args.val_size", "64",
        "--trainer.callbacks.monitor", "val/bpd_16",
        "--trainer.callbacks.filename", "epoch{epoch}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "glow32" / "version_0"
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert len(list((run_dir / "samples").glob("*_res16_t*.png"))) == 4  # 2 epochs x 2 temperatures
    bpd = read_val_bpd(run_dir / "metrics.csv", "bpd_16")
    assert len(bpd) == 2 and all(0 < b < 8 for b in bpd)


@pytest.mark.slow
def test_quick_photos_as_shipped_improves_val_bpd(tmp_path):
    result = run_cli("fit", "--config", str(REPO / "experiments/quick_photos.yaml"),
                     "--trainer.enable_progress_bar", "false", cwd=tmp_path, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    bpd = read_val_bpd(tmp_path / "runs/quick_photos/glow32/version_0/metrics.csv", "bpd_32")
    assert bpd[-1] < bpd[0] - 0.3, bpd


@pytest.mark.slow
def test_quickstart_as_shipped_learns_the_digits(tmp_path):
    """The README's first command: val/bpd_16 falls by more than half a bit per dim
    (1.85 -> 1.09 when measured) and a sample grid is written after every validation."""
    result = run_cli("fit", "--config", str(REPO / "experiments/quickstart.yaml"),
                     "--trainer.enable_progress_bar", "false", cwd=tmp_path, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs/quickstart/digits16/version_0"
    bpd = read_val_bpd(run_dir / "metrics.csv", "bpd_16")
    assert bpd[-1] < bpd[0] - 0.5, bpd
    assert len(list((run_dir / "samples").glob("*_res16_t0.7.png"))) == len(bpd)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_cascade_config_shows_each_stages_sigma(capsys):
    result = print_config(capsys, "--config", "experiments/celeba_cascade.yaml")
    assert result.returncode == 0, result.stderr[-2000:]
    sigmas = [line.strip().lstrip("- ") for line in result.stdout.splitlines()
              if line.strip().lstrip("- ").startswith("sigma:")]
    assert sigmas == ["sigma: 0.02", "sigma: 0.5"]


@pytest.mark.parametrize("config, name, resolutions", [
    ("celeba_cascade.yaml", "Glow16-SRF32(0.02)-SRF64(0.50)", [16, 32, 64]),
    ("cifar10_cascade.yaml", "GlowCC16-SRFCC32", [16, 32]),
])
def test_seed_cascade_configs_build_the_seed_models(config, name, resolutions, tmp_path):
    from lightning_modules.cli import build_cli

    # Without a subcommand (run=False) the parser has no ckpt_path: drop that line.
    text = (REPO / "experiments" / config).read_text()
    (tmp_path / config).write_text("".join(line for line in text.splitlines(keepends=True)
                                           if not line.startswith("ckpt_path:")))
    cli = build_cli(["--config", str(tmp_path / config), "--trainer.logger", "false"], run=False)
    model = cli.model
    assert model.model_name == name
    assert model.resolutions == resolutions
    groups = {g.name: g.settings for g in model.optimizer_groups()}
    top = model.model.stage(resolutions[-1])
    assert len(top.flow.scales) == 4 and len(top.flow.scales[0]) == 1 + 16  # squeeze + K=16
    assert len(top.encoder.trunk) == 23
    assert groups[name.split("-")[-1]].lr_milestones == [100_000, 150_000, 180_000, 190_000]
    assert groups[name.split("-")[-1]].betas == (0.9, 0.99)
    test_metrics = next(c for c in cli.trainer.callbacks if isinstance(c, TestMetrics))
    assert test_metrics.fid.num_samples == 50_000


SMALL_CASCADE_CALLBACKS = """
trainer:
  callbacks:
    - class_path: pytorch_lightning.callbacks.ModelCheckpoint
      init_args: {{monitor: val/bpd_bound_32, save_last: true}}
    - class_path: lightning_modules.SampleGrids
      init_args: {{temperatures: [0.8, 1.0], num_samples: 4}}
    - class_path: lightning_modules.TestMetrics
      init_args:
        fid: {{num_samples: 64, temperature: 0.8, feature_extractor: random-conv, batch_size: 32,
               kid_subset_size: 32, sweep_temperatures: [0.7], cache_dir: {cache}}}
"""


def test_small_cascade_fit_then_test_writes_samples_and_the_metrics_table(tmp_path):
    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text(SMALL_CASCADE_CALLBACKS.format(cache=tmp_path / "fid_cache"))
    common = ["--config", str(callbacks),
              "--trainer.default_root_dir", str(tmp_path),
              "--trainer.logger.init_args.save_dir", str(tmp_path),
              "--trainer.enable_progress_bar", "false",
              "--trainer.log_every_n_steps", "1",
              "--data.init_args.train_size", "128", "--data.init_args.val_size", "32",
              "--data.init_args.batch_size", "32",
              "--model.init_args.failure_probe_every_n_steps", "1"]
    config = str(REPO / "experiments/quick_cascade.yaml")
    fit = run_cli("fit", "--config", config, "--trainer.max_epochs", "1", *common, cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    run_dir = tmp_path / "cascade" / "version_0"
    for resolution in (8, 16, 32):
        assert len(list((run_dir / "samples").glob(f"*_res{resolution}_t*.png"))) == 2
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert any(r.get("train/failure_rate_32_sigma1") for r in rows)
    test = run_cli("test", "--config", config, *common,
                   "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"), cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-3000:]
    import json
    table = json.loads((run_dir / "metrics.json").read_text())
    assert table["model"] == "Glow8-SRF16-SRF32"
    assert set(table["fid"]) == {"8", "16", "32"}
    assert {"8", "16_given_8", "32_given_16"} <= set(table["bpd"])
    assert set(table["bpd_bound"]) == {"16", "32"}
    assert (run_dir / "temperature_sweep.png").exists()


@pytest.mark.slow
def test_quick_cascade_as_shipped_trains_samples_and_reports_fid(tmp_path):
    import json

    config = str(REPO / "experiments/quick_cascade.yaml")
    fit = run_cli("fit", "--config", config, "--trainer.enable_progress_bar", "false",
                  cwd=tmp_path, timeout=1500)
    assert fit.returncode == 0, fit.stderr[-3000:]
    run_dir = tmp_path / "runs/quick_cascade/cascade"
    bpd = read_val_bpd(run_dir / "version_0/metrics.csv", "bpd_bound_32")
    assert bpd[-1] < bpd[0] - 0.3, bpd
    test = run_cli("test", "--config", config, "--trainer.enable_progress_bar", "false",
                   "--ckpt_path", str(run_dir / "version_0/checkpoints/last.ckpt"), cwd=tmp_path, timeout=900)
    assert test.returncode == 0, test.stderr[-3000:]
    table = json.loads((run_dir / "version_0/metrics.json").read_text())
    print(json.dumps(table, indent=1))
    assert set(table["fid"]) == {"8", "16", "32"}
    assert set(table["temperature_sweep"]) == {"0.5", "0.7", "0.9", "1"}


def fit_quick_config(tmp_path, name: str, run_name: str, metric: str):
    """`lightning fit` of experiments/<name>.yaml as shipped in ``tmp_path``: (the config's
    path, its run folder runs/<name>/<run_name>, the validation ``metric`` per epoch)."""
    config = str(REPO / f"experiments/{name}.yaml")
    fit = run_cli("fit", "--config", config, "--trainer.enable_progress_bar", "false", cwd=tmp_path, timeout=1500)
    assert fit.returncode == 0, fit.stderr[-3000:]
    run_dir = tmp_path / "runs" / name / run_name
    values = read_val_bpd(run_dir / "version_0/metrics.csv", metric)
    print(f"val/{metric} per epoch:", values)
    return config, run_dir, values


@pytest.mark.slow
def test_quick_hierarchical_as_shipped_improves_its_elbo_and_writes_samples(tmp_path):
    import json

    config, run_dir, elbo = fit_quick_config(tmp_path, "quick_hierarchical", "hierarchical", "elbo_bpd_32")
    assert elbo[-1] < elbo[0] - 1.0, elbo
    assert len(list((run_dir / "version_0/samples").glob("*_res32_t0.7.png"))) == 8
    test = run_cli("test", "--config", config, "--trainer.enable_progress_bar", "false",
                   "--ckpt_path", str(run_dir / "version_0/checkpoints/last.ckpt"), cwd=tmp_path, timeout=900)
    assert test.returncode == 0, test.stderr[-3000:]
    table = json.loads((run_dir / "version_0/metrics.json").read_text())
    assert table["model"] == "HierarchicalFlow32" and set(table["bpd_bound"]) == {"32"}
    assert table["bpd"] == {}  # the ELBO is a bound: nothing is reported as exact
    assert abs(table["bpd_bound"]["32"] - elbo[-1]) < 0.2  # the EMA weights were saved


# override name prefix: (the config it goes on, a line the merged config must show); the
# first matching prefix wins.
OVERRIDE_BASES = {"celeba_": ("celeba_cascade.yaml", "sigma:"), "cifar10_": ("cifar10_cascade.yaml", "sigma:"),
                  "quick_nsf": ("quick_photos.yaml", "coupling: spline"), "quick_": ("quick_cascade.yaml", "sigma:"),
                  "hierarchical_": ("hierarchical_celebahq256.yaml", "levels:"),
                  "diffusion_flow_": ("diffusion_flow_mnist.yaml", "loss_mode: seed")}


@pytest.mark.parametrize("override", sorted(p.name for p in (REPO / "experiments/overrides").glob("*.yaml")))
def test_every_override_parses_on_top_of_its_config(override, capsys):
    base, expected = next(pair for prefix, pair in OVERRIDE_BASES.items() if override.startswith(prefix))
    result = print_config(capsys, "--config", f"experiments/{base}", "--config", f"experiments/overrides/{override}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert expected in result.stdout


def test_wandb_offline_run_holds_config_metrics_images_and_a_relaunch_reuses_its_id(tmp_path):
    import os

    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    wandb_args = ["--config", str(REPO / "experiments/quick_photos.yaml"), "--trainer.default_root_dir", "run",
                  "--trainer.logger", "pytorch_lightning.loggers.WandbLogger",
                  "--trainer.logger.init_args.project", "msflows-test",
                  "--trainer.logger.init_args.offline", "true", "--trainer.logger.init_args.save_dir", "run",
                  "--ckpt_path", "auto", *TINY_QUICKSTART]
    first = subprocess.run([*CLI, "fit", *wandb_args, "--trainer.max_epochs", "1"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    run_id = (tmp_path / "run" / "wandb_run_id.txt").read_text().strip()
    runs = list((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1
    record = next(runs[0].glob("run-*.wandb")).read_bytes()
    for key in (b"resolved_config", b"steps_per_scale", b"val/bpd_16", b"train/loss", b"samples/res16_t1"):
        assert key in record, key
    assert list((runs[0] / "files" / "media" / "images").rglob("*.png"))
    # One run folder, as for CSV and TensorBoard: <save_dir>/<project>/<run id>/ holds the
    # checkpoints and the sample grids (W&B's own files stay in <save_dir>/wandb/).
    run_folder = tmp_path / "run" / "msflows-test" / run_id
    assert (run_folder / "checkpoints" / "last.ckpt").is_file()
    assert len(list((run_folder / "samples").glob("*.png"))) == 2
    second = subprocess.run([*CLI, "fit", *wandb_args, "--trainer.max_epochs", "2"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stderr and "last.ckpt" in second.stderr
    assert len(list((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}"))) == 2
    assert (tmp_path / "run" / "wandb_run_id.txt").read_text().strip() == run_id


@pytest.mark.slow
def test_quick_diffusion_flow_as_shipped_improves_its_bound_and_writes_ddim_samples(tmp_path):
    """Seed 003's quick config: val/nll_bpd_16 (the bound) falls, DDIM sample grids are
    written, and `lightning test` reports the bound (never as exact) and the time for
    25 samples."""
    import json

    config, run_dir, nll = fit_quick_config(tmp_path, "quick_diffusion_flow", "diffusion_flow", "nll_bpd_16")
    assert nll[-1] < nll[0] - 0.5, nll
    assert len(list((run_dir / "version_0/samples").glob("*_res16_t1.png"))) == 8
    test = run_cli("test", "--config", config, "--trainer.enable_progress_bar", "false",
                   "--ckpt_path", str(run_dir / "version_0/checkpoints/last.ckpt"), cwd=tmp_path, timeout=900)
    assert test.returncode == 0, test.stderr[-3000:]
    table = json.loads((run_dir / "version_0/metrics.json").read_text())
    assert table["model"] == "DiffusionFlow16" and table["bpd"] == {} and set(table["bpd_bound"]) == {"16"}
    assert table["sampling_time_s"] > 0 and table["sampling_time_samples"] == 25


@pytest.mark.slow
def test_quick_tarflow_as_shipped_improves_and_writes_samples(tmp_path):
    """TarFlow's quick config: val/bpd_32 (exact) falls by more than a bit per dim over
    its 8 epochs (3.59 -> 1.99 when measured), and a sample grid is written every epoch."""
    _, run_dir, bpd = fit_quick_config(tmp_path, "quick_tarflow", "tarflow32", "bpd_32")
    assert bpd[-1] < bpd[0] - 1.0, bpd
    assert len(list((run_dir / "version_0/samples").glob("*_res32_t0.7.png"))) == 8


# The three shipped quick configs whose full runs are too long for CI (the hierarchical,
# diffusion-flow and TarFlow families, above) run end to end at a budget of about a minute
# each: the config as shipped (model, callbacks, samples, checkpoints), only the data and
# the epochs cut. The validation figure of the second epoch is below the first's.
SHORT_BUDGET = {"quick_hierarchical": ("hierarchical", "elbo_bpd_32", 256),
                "quick_diffusion_flow": ("diffusion_flow", "nll_bpd_16", 512),
                "quick_tarflow": ("tarflow32", "bpd_32", 1024)}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SHORT_BUDGET))
def test_every_long_quick_config_learns_end_to_end_at_a_short_budget(name, tmp_path):
    run_name, metric, train_size = SHORT_BUDGET[name]
    fit = run_cli("fit", "--config", str(REPO / f"experiments/{name}.yaml"), "--trainer.enable_progress_bar", "false",
                  "--trainer.max_epochs", "2", "--data.init_args.train_size", str(train_size),
                  "--data.init_args.val_size", "64", cwd=tmp_path, timeout=900)
    assert fit.returncode == 0, fit.stderr[-3000:]
    run_dir = tmp_path / "runs" / name / run_name / "version_0"
    values = read_val_bpd(run_dir / "metrics.csv", metric)
    assert len(values) == 2 and values[1] < values[0], values
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "samples").glob("*.png"))


# --- run folders (issue 22: default_root_dir; issue 23 item 14) -------------------------------------
def in_process(capsys, *args) -> tuple[int, str]:
    """The `lightning` command in this process: (exit status, stderr)."""
    code, err, _ = run_command(capsys, *args)
    return code, err


TINY_FIT = [*TINY_QUICKSTART, "--data.init_args.train_size", "32", "--data.init_args.val_size", "16",
            "--data.init_args.batch_size", "8", "--trainer.max_epochs", "1"]


def test_default_root_dir_on_the_command_line_holds_the_lock_checkpoints_logs_and_test_outputs(
        tmp_path, capsys, monkeypatch):
    import json

    from lightning_modules import cli
    from lightning_modules.run_folder import resume_checkpoint

    monkeypatch.chdir(tmp_path)  # the YAML's logger would write under ./runs/quick_photos
    locks = []

    class RecordingLock(cli.RunLock):
        def acquire(self):
            locks.append(self.path)
            return super().acquire()

    monkeypatch.setattr(cli, "RunLock", RecordingLock)
    root = tmp_path / "elsewhere"
    config = ["--config", str(REPO / "experiments/quick_photos.yaml"), *TINY_FIT, "--trainer.default_root_dir", str(root)]
    code, err = in_process(capsys, "fit", *config)
    assert code == 0, err[-3000:]
    run = root / "glow32" / "version_0"
    assert locks == [root / "msflows.lock"]
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "metrics.csv").is_file()
    assert len(list((run / "samples").glob("*.png"))) == 2
    assert not (tmp_path / "runs").exists()
    assert resume_checkpoint(root) == run / "checkpoints" / "last.ckpt"  # where ckpt_path: auto looks
    # lightning test writes its table beside the checkpoint it tested, and says where
    code, err = in_process(capsys, "test", *config, "--ckpt_path", str(run / "checkpoints" / "best.ckpt"))
    assert code == 0, err[-3000:]
    assert json.loads((run / "metrics.json").read_text())["model"] == "Glow16"
    assert f"outputs of this run (test): {run}" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "experiments").glob("*.yaml"))
                         + sorted(f"overrides/{p.name}" for p in (REPO / "experiments/overrides").glob("*.yaml")))
def test_every_config_moves_its_loggers_to_the_command_line_default_root_dir(config, tmp_path):
    """The YAML as the parser reads it (class_path / init_args), without the seconds a
    full parse takes per config; the quickstart test above goes through the parser."""
    import yaml
    from jsonargparse import dict_to_namespace

    from lightning_modules.cli import follow_default_root_dir

    trainer = yaml.safe_load((REPO / "experiments" / config).read_text()).get("trainer", {})
    if not trainer.get("logger"):
        pytest.skip("sets no logger")  # the callback add-ons
    trainer.setdefault("default_root_dir", None)
    trainer["logger"].setdefault("class_path", "pytorch_lightning.loggers.WandbLogger")  # overrides: init_args
    namespace = dict_to_namespace({"trainer": trainer})
    namespace.trainer.default_root_dir = str(tmp_path)
    follow_default_root_dir(namespace, ["--config", config, "--trainer.default_root_dir", str(tmp_path)])
    loggers = namespace.trainer.logger if isinstance(namespace.trainer.logger, list) else [namespace.trainer.logger]
    assert [logger.init_args.save_dir for logger in loggers] == [str(tmp_path)] * len(loggers)
    callbacks = namespace.trainer.get("callbacks") or []
    dirpaths = [c.init_args.get("dirpath") for c in callbacks if getattr(c, "init_args", None)]
    assert all(d is None or d.startswith(str(tmp_path)) for d in dirpaths), dirpaths
    # a save_dir given on the command line stays
    namespace.trainer.logger = loggers[0]
    loggers[0].init_args.save_dir = "mine"
    follow_default_root_dir(namespace, ["--trainer.default_root_dir", str(tmp_path),
                                        "--trainer.logger.init_args.save_dir", "mine"])
    assert namespace.trainer.logger.init_args.save_dir == "mine"


FAMILY_MODULES = ["GlowModule", "CascadeModule", "HierarchicalModule", "DiffusionFlowModule", "PixelDiffusionModule",
                  "LatentFlowModule"]


@pytest.mark.parametrize("family", FAMILY_MODULES)
def test_every_family_module_takes_every_training_argument_from_yaml(family):
    """The base's arguments reach each family through one ``**training`` (no hand-copied
    list to drift: grad_clip_relative and accumulate_grad_batches were missing from some)."""
    import inspect

    from jsonargparse import ArgumentParser

    import lightning_modules
    from lightning_modules.base import FlowModule

    parser = ArgumentParser()
    parser.add_class_arguments(getattr(lightning_modules, family), "module")
    accepted = {action.dest.split(".", 1)[1] for action in parser._actions if action.dest.startswith("module.")}
    base = [name for name in inspect.signature(FlowModule.__init__).parameters if name != "self"]
    assert set(base) <= accepted, sorted(set(base) - accepted)
