"""How the tests run the `lightning` command (in a subprocess or in this process) and the
small runs several test files share: the tiny quickstart, the two-epoch run a signal
interrupts, and the comparison of two checkpoints' training states."""
import contextlib
import io
import json
import subprocess
import sys

import torch

from lightning_modules.checkpoint_files import load_checkpoint_file
from lightning_modules.cli import main
from tests.conftest import REPO, run_command

CLI = [sys.executable, "-m", "lightning_modules.cli"]


def run_cli(*args, cwd=REPO, timeout=600):
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def print_config(capsys, *args) -> subprocess.CompletedProcess:
    """``lightning fit ... --print_config`` in this process (no interpreter start-up),
    with paths relative to the repository."""
    args = [str(REPO / a) if a.startswith("experiments/") else a for a in args]
    try:
        main(["fit", *args, "--print_config"])
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


TINY_QUICKSTART = ["--model.init_args.flow.init_args.image_size", "16",
                   "--model.init_args.flow.init_args.scales", "2",
                   "--model.init_args.flow.init_args.steps_per_scale", "1",
                   "--model.init_args.flow.init_args.hidden_channels", "8",
                   "--data.init_args.image_size", "16", "--data.init_args.resolutions", "[16]",
                   "--data.init_args.train_size", "128", "--data.init_args.val_size", "32",
                   "--trainer.callbacks.monitor", "val/bpd_16", "--trainer.callbacks.filename", "best",
                   "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1"]
QUICKSTART = ["--config", str(REPO / "experiments/quick_photos.yaml"), *TINY_QUICKSTART,
              "--data.init_args.train_size", "32", "--data.init_args.val_size", "16", "--data.init_args.batch_size", "8",
              "--trainer.max_epochs", "1", "--trainer.logger", "false"]
TINY_CASCADE = ["--config", str(REPO / "experiments/quick_cascade.yaml"),
                "--model.init_args.base.flow.init_args.hidden_channels", "8",
                "--data.init_args.train_size", "32", "--data.init_args.val_size", "16", "--data.init_args.batch_size", "8",
                "--trainer.max_epochs", "1", "--trainer.logger", "false"]


def run_main(capsys, *args) -> tuple[int, str]:
    """The `lightning` command in this process: (exit status, stderr then stdout)."""
    code, err, out = run_command(capsys, *args)
    return code, err + "\n--- stdout ---\n" + out


def main_quiet(*args) -> int:
    try:
        main(["fit", *args])
    except SystemExit as exit_:
        return exit_.code
    return 0


# QUICKSTART has 4 steps per epoch; two epochs validate (and save last.ckpt) at steps 4 and 8.
TWO_EPOCHS = [*QUICKSTART, "--trainer.max_epochs", "2"]


def signal_at(step: int, name: str) -> str:
    """Adds tests.resume_job.SignalAt: ``name`` arrives in the middle of step ``step + 1``."""
    callback = {"class_path": "tests.resume_job.SignalAt", "init_args": {"step": step, "signal": name}}
    return "--trainer.callbacks+=" + json.dumps(callback)


def fit_capturing(root, *args) -> tuple[int, str]:
    """``lightning fit`` of TWO_EPOCHS in this process: (exit status, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main_quiet(*TWO_EPOCHS, "--trainer.default_root_dir", str(root), *args)
    return code, err.getvalue()


def assert_same_training_state(a, b) -> None:
    """Two checkpoints hold the same step, parameters and optimizer states (1e-6)."""
    x, y = load_checkpoint_file(a), load_checkpoint_file(b)
    assert x["global_step"] == y["global_step"]
    for key, value in x["state_dict"].items():
        assert torch.allclose(value.float(), y["state_dict"][key].float(), atol=1e-6, rtol=0), key
    for ox, oy in zip(x["optimizer_states"], y["optimizer_states"], strict=True):
        for index, state in ox["state"].items():
            for name, value in state.items():
                if torch.is_tensor(value):
                    assert torch.allclose(value.float(), oy["state"][index][name].float(), atol=1e-6, rtol=0), name


_UNINTERRUPTED: dict = {}


def uninterrupted_last_checkpoint(tmp_path_factory):
    """last.ckpt (step 8) of TWO_EPOCHS without a signal, trained once per session."""
    if "last" not in _UNINTERRUPTED:
        root = tmp_path_factory.mktemp("uninterrupted")
        code, err = fit_capturing(root)
        assert code == 0, err[-3000:]
        _UNINTERRUPTED["last"] = root / "checkpoints" / "last.ckpt"
    return _UNINTERRUPTED["last"]
