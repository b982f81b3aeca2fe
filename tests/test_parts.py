"""Invariant of every family module: its parts (``FlowModule.parts``) hold each of its
parameters exactly once. A parameter in no part would never be in an optimizer group
and never train, silently; one in two parts would be stepped twice per step.

The modules are built from shipped configs, one per family (and the class-conditional
cascade, whose class heads sit in its stages), as a user's run builds them."""
import pytest
import torch

from tests.conftest import REPO

CONFIGS = ["quickstart.yaml", "quick_realnvp.yaml", "quick_cascade.yaml", "quick_hierarchical.yaml", "quick_diffusion_flow.yaml",
           "pixel_ddpm_mnist.yaml", "nsf_mnist.yaml", "cifar10_cascade.yaml"]


def build_module(config: str, tmp_path):
    from lightning_modules.cli import build_cli

    # Without a subcommand (run=False) the parser has no ckpt_path: drop that line.
    text = (REPO / "experiments" / config).read_text()
    (tmp_path / config).write_text("".join(line for line in text.splitlines(keepends=True)
                                           if not line.startswith("ckpt_path:")))
    return build_cli(["--config", str(tmp_path / config), "--trainer.logger", "false"], run=False).model


def uncovered_and_repeated(module) -> tuple[list[str], list[str]]:
    owners: dict[int, list[str]] = {}
    for part in module.parts():
        for parameter in part.module.parameters():
            owners.setdefault(id(parameter), []).append(part.name)
    names = dict((id(p), name) for name, p in module.named_parameters())
    uncovered = [name for key, name in names.items() if key not in owners]
    repeated = [f"{names.get(key, '?')} in {parts}" for key, parts in owners.items() if len(parts) > 1]
    return uncovered, repeated


@pytest.mark.parametrize("config", CONFIGS)
def test_parts_hold_every_parameter_exactly_once(config, tmp_path):
    module = build_module(config, tmp_path)
    uncovered, repeated = uncovered_and_repeated(module)
    assert not uncovered, f"{config}: parameters in no part (they would never train): {uncovered[:5]}"
    assert not repeated, f"{config}: parameters in more than one part: {repeated[:5]}"
    # The optimizer groups are built from the trainable parts: together with the frozen
    # parts they hold every parameter once.
    grouped = [id(p) for group in module.optimizer_groups() for p in group.params]
    frozen = [id(p) for part in module.parts() if not part.trainable for p in part.module.parameters()]
    assert sorted(grouped + frozen) == sorted(id(p) for p in module.parameters())


def test_a_module_left_out_of_the_parts_is_found(tmp_path):
    """The check above fails on the mistake it guards against."""
    module = build_module("quickstart.yaml", tmp_path)
    module.extra_head = torch.nn.Linear(2, 2)  # a parameter outside every part
    uncovered, _ = uncovered_and_repeated(module)
    assert uncovered == ["extra_head.weight", "extra_head.bias"]


# Every model a module can hold, not only the shipped configs: each model of the model test
# CASES in each module that takes it, as built and with a learned (variational) dequantizer,
# whose parameters a module's parts must include like any other (a DiffusionFlowModule once
# listed only the Glow's scales and the prior, so such a dequantizer never trained).
def _modules_for(case: str) -> list[tuple[str, object]]:
    from lightning_modules import DiffusionFlowModule, GlowModule, HierarchicalModule, PixelDiffusionModule

    holders = {"diffusion_flow": [("DiffusionFlowModule", lambda m: DiffusionFlowModule(flow=m, n_bits=5))],
               "hierarchical": [("HierarchicalModule", lambda m: HierarchicalModule(flow=m, n_bits=5))],
               "pixel_diffusion": [("PixelDiffusionModule", lambda m: PixelDiffusionModule(model=m, n_bits=5))]}
    return [("GlowModule", lambda m: GlowModule(flow=m, n_bits=5))] + holders.get(case, [])


def _single_cases():
    from tests.model_cases import CASES

    return sorted(name for name in CASES if not name.startswith("cascade"))


@pytest.mark.parametrize("learned_dequantizer", [False, True], ids=["as_built", "learned_dequantizer"])
@pytest.mark.parametrize("case", _single_cases())
def test_parts_hold_every_parameter_of_every_model_a_module_can_hold(case, learned_dequantizer):
    from flows.dequantization import VariationalDequantizer
    from lightning_modules.errors import ConfigurationError
    from tests.model_cases import CASES

    built = 0
    for module_name, make in _modules_for(case):
        torch.manual_seed(0)
        model = CASES[case][0](2)[0]
        if learned_dequantizer:
            model.dequantizer = VariationalDequantizer(model.in_channels, hidden_channels=4, steps=1, context_channels=2)
        try:
            module = make(model)
        except ConfigurationError:  # a module that refuses this model says so (e.g. seed 001's uniform noise)
            continue
        built += 1
        uncovered, repeated = uncovered_and_repeated(module)
        assert not uncovered, f"{case} in {module_name}: parameters in no part (never trained): {uncovered[:5]}"
        assert not repeated, f"{case} in {module_name}: parameters in more than one part: {repeated[:5]}"
    assert built, f"no module holds {case}"
