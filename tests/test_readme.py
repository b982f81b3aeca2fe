"""The README's first-hour commands, run as written on a fresh clone."""
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

MARK = "<!-- readme-test: {} -->"
# What every `lightning fit` line of the quick start gets appended: one epoch of 8 steps and
# 2 validation batches, enough to write a checkpoint, a sample grid and a val figure.
TINY_BUDGET = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "8",
               "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false"]


def marked_block(readme: str, name: str) -> tuple[str, str]:
    """(language, body) of the fenced block right after ``<!-- readme-test: name -->``."""
    mark = MARK.format(name)
    assert readme.count(mark) == 1, f"README.md must hold {mark} exactly once"
    after = readme.split(mark, 1)[1]
    found = re.match(r"\s*```(\w*)\n(.*?)\n```", after, re.S)
    assert found, f"no fenced block follows {mark}"
    return found.group(1), found.group(2)


def shell_script(block: str, bin_dir: str) -> tuple[str, list[str]]:
    """The block's lines as a bash script (and the lines it replaced): creating the
    virtual environment and installing into it become nothing, activating it becomes
    putting this (already installed) environment's ``bin`` first on PATH, and each
    ``lightning fit`` gets :data:`TINY_BUDGET` appended. Every other line runs verbatim."""
    lines, replaced, venvs = [], [], []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if words[:3] == ["python3", "-m", "venv"]:
            venvs.append(words[3])
            replaced.append(line)
        elif "pip" in Path(words[0]).name and words[1:2] == ["install"]:
            assert venvs and words[0] == f"{venvs[-1]}/bin/pip", f"{line!r} does not install into the new venv"
            replaced.append(line)
        elif words[0] in ("source", ".") and len(words) == 2 and words[1].endswith("/bin/activate"):
            assert venvs and words[1] == f"{venvs[-1]}/bin/activate", f"{line!r} activates another venv"
            lines.append(f"export PATH={shlex.quote(bin_dir)}:\"$PATH\"")
            replaced.append(line)
        elif words[:2] == ["lightning", "fit"]:
            lines.append(f"{line} {shlex.join(TINY_BUDGET)}")
        else:
            lines.append(line)
    return "\n".join(["set -euo pipefail", *lines]), replaced


@pytest.mark.slow
def test_readme_quickstart_and_python_snippet_run_as_written_on_a_fresh_clone(tmp_path):
    """Clones the committed repository (``git clone`` of the repo root: uncommitted
    changes are not in it) and runs, in the clone, the README's quick-start block
    (``<!-- readme-test: quickstart -->``) with bash, then its Python snippet
    (``<!-- readme-test: python -->``) with this interpreter, verbatim, except:

    * ``python3 -m venv``, ``pip install`` and ``source .venv/bin/activate`` are not run:
      instead this test's own environment (``sys.executable``'s folder) is put first on
      PATH, so ``lightning`` is the one installed here; PYTHONPATH is the clone, so the
      clone's code is what runs (the test checks that the install lines install into the
      venv the block creates and activates);
    * every ``lightning fit`` line gets a tiny budget appended
      (``--trainer.max_epochs 1 --trainer.limit_train_batches 8
      --trainer.limit_val_batches 2``), so the quick start takes seconds, not minutes.

    A broken README command (a wrong config path, a misspelt option, a snippet that
    does not run against the quick start's output) fails it."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True, timeout=120)
    readme = (clone / "README.md").read_text()
    env = {**os.environ, "PYTHONPATH": str(clone), "MPLBACKEND": "Agg", "WANDB_MODE": "offline"}
    env.pop("VIRTUAL_ENV", None)

    language, block = marked_block(readme, "quickstart")
    assert language in ("bash", "sh", "")
    script, replaced = shell_script(block, str(Path(sys.executable).parent))
    assert any("pip install" in line for line in replaced) and any("activate" in line for line in replaced)
    assert "lightning fit" in script, "the quick-start block runs no training"
    shell = subprocess.run(["bash", "-c", script], cwd=clone, env=env, capture_output=True, text=True,
                           timeout=300)
    assert shell.returncode == 0, f"{script}\n--- stderr ---\n{shell.stderr[-3000:]}"
    checkpoints = list((clone / "runs").rglob("last.ckpt"))
    assert checkpoints, "the quick start wrote no last.ckpt under runs/"

    language, snippet = marked_block(readme, "python")
    assert language == "python"
    (clone / "readme_snippet.py").write_text(snippet + "\n")
    python = subprocess.run([sys.executable, "readme_snippet.py"], cwd=clone, env=env, capture_output=True,
                            text=True, timeout=300)
    assert python.returncode == 0, f"{snippet}\n--- stderr ---\n{python.stderr[-3000:]}"
    number = r"(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|nan|inf)"
    figures = [float(value) for value in re.findall(number + " bits/dim", python.stdout)]
    assert figures and all(math.isfinite(f) and 0 < f < 8 for f in figures), python.stdout
    pngs = re.findall(r"wrote (\S+\.png)", python.stdout)
    assert pngs, python.stdout
    for png in pngs:
        assert (clone / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
