"""What a run prints: Lightning's noise a user cannot act on is silenced (lightning_modules/cli.py
``silence_third_party_noise``), the project's own warnings are not (here and in the tests)."""
import warnings

import pytest

from lightning_modules.run_folder import LOCK_FILE, RunLock
from tests.conftest import REPO
from tests.commands import run_cli

NOISE = ("LeafSpec", "litlogger", "litmodels", "Tip:", "callbacks used to create the checkpoint need to be provided",
         "exists and is not empty")
TINY = ["--config", str(REPO / "experiments/quick_photos.yaml"), "--trainer.enable_progress_bar", "false",
        "--model.init_args.flow.init_args.image_size", "16", "--model.init_args.flow.init_args.scales", "2",
        "--model.init_args.flow.init_args.steps_per_scale", "1",
        "--model.init_args.flow.init_args.hidden_channels", "8",
        "--data.init_args.image_size", "16", "--data.init_args.resolutions", "[16]",
        "--data.init_args.train_size", "64", "--data.init_args.val_size", "32", "--data.init_args.batch_size", "32"]


def tiny_fit(tmp_path):
    result = run_cli("fit", *TINY, "--trainer.default_root_dir", str(tmp_path),
                     "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.max_steps", "1",
                     "--trainer.limit_val_batches", "1", "--trainer.callbacks.monitor", "val/bpd_16", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_quiet(stderr: str) -> None:
    noisy = [line for line in stderr.splitlines() if any(n in line for n in NOISE)]
    assert not noisy, noisy


def test_a_fit_prints_none_of_lightnings_noise(tmp_path):
    assert_quiet(tiny_fit(tmp_path).stderr)


@pytest.mark.slow
def test_lightning_test_with_the_analyses_prints_none_of_lightnings_noise(tmp_path):
    tiny_fit(tmp_path)
    result = run_cli("test", *TINY, "--config", str(REPO / "experiments/analyses.yaml"),
                     "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
                     "--trainer.limit_test_batches", "1",
                     "--ckpt_path", str(next(tmp_path.rglob("last.ckpt"))), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_quiet(result.stderr)


def test_the_test_settings_show_the_projects_own_warnings(tmp_path):
    # pytest.warns would catch it whatever pyproject.toml filters; this sees what a test run's
    # summary would show: the filters in force here are the [tool.pytest] ones.
    (tmp_path / LOCK_FILE).write_text("not a lock")  # an unreadable lock is taken over, with a warning
    with warnings.catch_warnings(record=True) as caught:
        lock = RunLock(tmp_path).acquire()
    lock.release()
    assert any("taking over the lock" in str(w.message) for w in caught), [str(w.message) for w in caught]
