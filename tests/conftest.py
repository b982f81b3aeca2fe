from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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
