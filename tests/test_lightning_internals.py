"""Lightning's private state is read in one file (lightning_modules/lightning_internals.py),
on the Lightning releases the project pins and is tested on."""
from __future__ import annotations

import ast
import inspect
import re
from functools import lru_cache
from pathlib import Path

import pytorch_lightning as pl
import pytest
from packaging.specifiers import SpecifierSet

from lightning_modules import lightning_internals

REPO = Path(__file__).resolve().parents[1]
ADAPTER = REPO / "lightning_modules" / "lightning_internals.py"
PROJECT = [path for folder in ("lightning_modules", "datamodules", "flows", "benchmarks")
           for path in sorted((REPO / folder).rglob("*.py")) if path != ADAPTER]


def test_the_installed_lightning_is_in_the_pinned_and_tested_range():
    pinned = re.search(r'"pytorch-lightning([^"]*)"', (REPO / "pyproject.toml").read_text())
    assert pinned, "pyproject.toml must pin pytorch-lightning"
    assert SpecifierSet(pinned[1]) == lightning_internals.TESTED_LIGHTNING, \
        "pyproject.toml and lightning_internals.TESTED_LIGHTNING must name the same range"
    assert lightning_internals.lightning_version_problem() is None, lightning_internals.lightning_version_problem()


def test_a_lightning_outside_the_range_is_named_with_the_fix():
    problem = lightning_internals.lightning_version_problem("2.7.0")
    assert "2.7.0" in problem and "pip install" in problem and str(lightning_internals.TESTED_LIGHTNING) in problem
    assert lightning_internals.lightning_version_problem("2.6.0") is None


@lru_cache(maxsize=1)
def lightning_private_names() -> frozenset[str]:
    """Every private attribute and method name Lightning's own sources define (``self._x``
    assigned, ``def _x``), from pytorch_lightning and lightning_fabric."""
    import lightning_fabric

    names = set()
    for package in (pl, lightning_fabric):
        for path in Path(package.__file__).parent.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    name = node.name
                elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                    name = node.attr
                else:
                    continue
                if name.startswith("_") and not name.startswith("__"):
                    names.add(name)
    # Names PyTorch defines too (Module._load_from_state_dict, Tensor._version) are torch's API.
    import torch

    return frozenset(names - set(dir(torch.nn.Module)) - set(dir(torch.Tensor)) - set(dir(torch.optim.Optimizer)))


def private_lightning_uses(path: Path) -> list[str]:
    """A file's reads of Lightning's private names: ``obj._name`` on anything but the
    file's own ``self``/``cls`` (``super()._name`` included), private names imported from
    Lightning, and string constants naming them (``getattr(x, "_name")``, a checkpoint key)."""
    private = lightning_private_names()
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Attribute) and node.attr in private:
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(f"{where}: .{node.attr} on {ast.unparse(node.value)}")
        elif isinstance(node, ast.ImportFrom) and node.module and "lightning" in node.module:
            names = [alias.name for alias in node.names]
            if any(part.startswith("_") for part in node.module.split(".")) or any(n.startswith("_") for n in names):
                found.append(f"{where}: from {node.module} import {', '.join(names)}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in private:
            found.append(f"{where}: the string {node.value!r}")
    return found


def test_no_private_lightning_name_outside_the_adapter():
    found = [use for path in PROJECT for use in private_lightning_uses(path)]
    assert not found, "private Lightning names belong in lightning_modules/lightning_internals.py:\n" + "\n".join(found)


def test_no_project_class_overrides_a_private_lightning_method():
    """A subclass of a Lightning class that defines ``_name`` where Lightning has one is
    overriding private behaviour: the adapter's public hooks are the way in."""
    import importlib
    import pkgutil

    import lightning_modules

    overrides = []
    modules = [importlib.import_module(f"lightning_modules.{info.name}")
               for info in pkgutil.iter_modules(lightning_modules.__path__)]
    for module in modules:
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == lightning_internals.__name__ or not cls.__module__.startswith("lightning_modules"):
                continue
            lightning_bases = [base for base in cls.__mro__[1:] if base.__module__.startswith(("pytorch_lightning",
                                                                                              "lightning_fabric"))]
            for name, value in vars(cls).items():
                if name.startswith("_") and not name.startswith("__") and callable(value) \
                        and any(hasattr(b, name) for b in lightning_bases):
                    overrides.append(f"{cls.__module__}.{cls.__name__}.{name}")
    assert not overrides, overrides


def test_the_scan_finds_a_private_read_where_there_is_one(tmp_path):
    """The grep above can fail: a file reading the trainer's checkpoint connector is found."""
    sample = tmp_path / "sample.py"
    sample.write_text("def f(trainer):\n    return trainer._checkpoint_connector, getattr(trainer, '_accelerator_connector')\n")
    sample_in_repo = REPO / "benchmarks" / "_scan_probe.py"
    sample_in_repo.write_text(sample.read_text())
    try:
        found = private_lightning_uses(sample_in_repo)
    finally:
        sample_in_repo.unlink()
    assert len(found) == 2, found


def test_checkpoint_naming_routes_lightnings_private_hooks_to_the_public_ones(tmp_path):
    """The project's ModelCheckpoint overrides ``format_name``; Lightning's own call of its
    private hook reaches it (the file names from the monitor, model_checkpoint.py)."""
    from lightning_modules.model_checkpoint import ModelCheckpoint

    callback = ModelCheckpoint(dirpath=tmp_path, monitor="val/bpd_32")
    import torch

    name = callback.format_checkpoint_name({"epoch": torch.tensor(3), "step": torch.tensor(512),
                                            "val/bpd_32": torch.tensor(1.7514)})
    assert Path(name).name == "epoch3-step512-bpd_32=1.751.ckpt"


@pytest.mark.parametrize("name", ["hpc_checkpoint_path", "cluster_environment", "lightning_accumulates",
                                  "attached_trainer"])
def test_the_adapter_reads_a_real_trainer(name, tmp_path):
    """Each accessor works on the installed Lightning (an attribute renamed in a new
    release fails here, not in a preempted job)."""
    trainer = pl.Trainer(default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, accelerator="cpu")
    module = pl.LightningModule()
    if name == "attached_trainer":
        assert lightning_internals.attached_trainer(module) is None
        module.trainer = trainer
        assert lightning_internals.attached_trainer(module) is trainer
    elif name == "hpc_checkpoint_path":
        assert Path(lightning_internals.hpc_checkpoint_path(trainer)).name == "hpc_ckpt_1.ckpt"
    elif name == "cluster_environment":
        assert lightning_internals.cluster_environment(trainer) is not None
    else:
        assert lightning_internals.lightning_accumulates(trainer) is False


CALLBACK_FILES = ["sample_grids.py", "evaluation.py", "exact_resume.py", "analyses.py", "model_checkpoint.py", "signals.py", "averaging.py", "metrics.py"]
MODULE_NAMES = {"pl_module", "module", "lightning_module"}


def test_callbacks_read_a_module_through_the_family_contract_not_getattr():
    """Every hook a callback uses is declared once, with its default, on
    ``family.FamilyInterface`` (reached by ``family_of``): no ``getattr``/``hasattr`` on a
    LightningModule in the callbacks, which would hide a misspelt or missing hook."""
    probes = []
    for name in CALLBACK_FILES:
        path = REPO / "lightning_modules" / name
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr") \
                    and node.args:
                target = ast.unparse(node.args[0])
                if target.split(".")[-1] in MODULE_NAMES:
                    probes.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    assert not probes, probes


def test_a_callback_on_a_module_outside_the_contract_is_a_clear_error():
    from lightning_modules.errors import ConfigurationError
    from lightning_modules.family import family_of

    with pytest.raises(ConfigurationError, match="SampleGrids needs one of this project's LightningModules"):
        family_of(pl.LightningModule(), "SampleGrids")
