import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _argv_is_the_program_alone(monkeypatch):
    """The tests run the `lightning` command in this process with its arguments given
    (``run_command``, ``build_cli(args)``), while ``sys.argv`` holds pytest's own. LightningCLI
    warns when it gets both ("not recommended to provide both args and command line
    arguments"); a user's process has only the program name beside the args, so the
    tests' does too."""
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])


def perturb_parameters(module: torch.nn.Module, scale: float = 0.1) -> None:
    """Move every parameter off its (often zero / identity) initialization so that
    property tests exercise non-trivial maps."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn_like(parameter))


def run_command(capsys, *args) -> tuple[int, str, str]:
    """The `lightning` command run in this process: (exit status, stderr, stdout)."""
    from lightning_modules.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.err, captured.out


# A tiny Glow, its embedded data and a quiet CPU Trainer: shared by the training tests.
def tiny_module(resolution=8, **optimizer):
    from flows import Glow
    from lightning_modules import GlowModule, OptimizerSettings

    settings = dict(lr=1e-3, warmup_steps=4)
    settings.update(optimizer)
    return GlowModule(flow=Glow(image_size=resolution, scales=2, steps_per_scale=1, hidden_channels=8),
                      n_bits=5, optimizer=OptimizerSettings(**settings))


def tiny_data(resolutions=(8,)):
    from datamodules import EmbeddedDataModule

    return EmbeddedDataModule(image_size=8, resolutions=list(resolutions), train_size=64,
                              val_size=16, batch_size=8)


def trainer(tmp_path, **kwargs):
    import pytorch_lightning as pl

    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False,
                    default_root_dir=str(tmp_path), limit_val_batches=1, num_sanity_val_steps=0)
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def recording_logger(save_dir):
    """A Lightning logger that keeps every logged metric in ``.logged`` and writes its
    run folder under ``save_dir/recorder/version_0``."""
    from pytorch_lightning.loggers import Logger

    class Recorder(Logger):
        name, version = "recorder", 0

        def __init__(self):
            super().__init__()
            self.logged = {}

        def log_hyperparams(self, params, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            self.logged.update(metrics)

        @property
        def save_dir(self):
            return str(save_dir)

    return Recorder()


def write_idx(path, array):
    """An MNIST idx file (gzip) of a uint8 array."""
    import gzip

    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype("uint8").tobytes())


def fake_mnist(root, per_class=12):
    """A fake MNIST test split in torchvision's layout (root/MNIST/raw): a class-dependent
    bar per image, so a classifier has something to learn."""
    import numpy as np

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), per_class)
    images = np.zeros((len(labels), 28, 28))
    for i, label in enumerate(labels):
        images[i, 4:24, 2 + 2 * label:5 + 2 * label] = 200 + rng.integers(0, 55)
    write_idx(raw / "t10k-images-idx3-ubyte.gz", images)
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", labels)
    return root
