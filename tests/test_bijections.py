"""Generic properties every Bijection must satisfy, parametrized over all layers.

``CASES`` must hold every public Bijection class under ``flows/``: a discovery test
(:func:`test_every_bijection_in_flows_has_a_case`) fails on a new layer without a case."""
import importlib
import pkgutil
from functools import partial

import pytest
import torch

import flows
from flows.base import Bijection, FlowSequential
from flows.folding import fold_actnorm_conv
from flows.layers import (ActNorm, AdditiveCoupling, AffineCoupling, AffineInjector, ChannelMask, CheckerboardMask,
                          InvertibleConv1x1, InvertibleConv1x1LU, OrthogonalConv1x1, SplineCoupling, Squeeze,
                          flow_step)
from flows.reversible import CheckpointedSequential, ReversibleSequential
from flows.tarflow import TarFlowBlock
from flows.nets import CouplingNet, ResNetCouplingNet
from tests.conftest import perturb_parameters

C, H, W, COND_C = 4, 4, 4, 3


def make_actnorm():
    layer = ActNorm(C)
    layer.train()
    layer(torch.randn(8, C, H, W) * 3 + 1)  # data-dependent init
    return layer


def make_folded_actnorm_conv():
    """What ``fold_for_inference`` puts in place of an ActNorm and its 1x1 convolution."""
    actnorm, conv = make_actnorm(), InvertibleConv1x1LU(C)
    perturb_parameters(conv, 0.2)
    return fold_actnorm_conv(actnorm, conv)


CASES = {
    "actnorm": (make_actnorm, False),
    "folded_actnorm_conv": (make_folded_actnorm_conv, False),
    "invconv_orthogonal": (lambda: OrthogonalConv1x1(C, init_scale=0.5), False),
    "invconv_full": (lambda: InvertibleConv1x1(C), False),
    "invconv_lu": (lambda: InvertibleConv1x1LU(C), False),
    "affine_coupling_glow": (lambda: AffineCoupling(C, 8, scale_fn="glow"), False),
    "affine_coupling_squish": (lambda: AffineCoupling(C, 8, scale_fn="squish", squish_alpha=0.5), False),
    "additive_coupling": (lambda: AdditiveCoupling(C, 8), False),
    "checkerboard_coupling": (lambda: AffineCoupling(C, 8, mask=CheckerboardMask(1)), False),
    "checkerboard_2x2_additive": (lambda: AdditiveCoupling(C, 8, mask=CheckerboardMask(2, parity=1)), False),
    "conditional_checkerboard_coupling": (lambda: AffineCoupling(C, 8, cond_channels=COND_C, scale_fn="squish",
                                                                 mask=CheckerboardMask(2)), True),
    "odd_channels_coupling": (lambda: AffineCoupling(3, 8), False),
    # RealNVP's alternation: the second half of the channels passes, the first changes.
    "channel_coupling_parity_1": (lambda: AffineCoupling(C, 8, mask=ChannelMask(1)), False),
    "odd_channels_coupling_parity_1": (lambda: AdditiveCoupling(3, 8, mask=ChannelMask(1)), False),
    "conditional_coupling": (lambda: AffineCoupling(C, 8, cond_channels=COND_C, scale_fn="squish"), True),
    "affine_injector": (lambda: AffineInjector(C, COND_C, 8, scale_fn="squish"), True),
    # Neural Spline Flow couplings (seed 003 sec. 3.2.2.b); a small tail bound puts
    # inputs both inside the spline and on the identity tails.
    "spline_coupling": (lambda: SplineCoupling(C, 8, num_bins=4, tail_bound=1.5), False),
    "spline_coupling_resnet": (lambda: SplineCoupling(C, 8, num_bins=4, tail_bound=1.5, net=ResNetCouplingNet),
                               False),
    "conditional_spline_coupling": (lambda: SplineCoupling(C, 8, cond_channels=COND_C, num_bins=3,
                                                           tail_bound=1.5), True),
    "flow_step_spline": (lambda: flow_step(C, 8, coupling="spline", num_bins=4, tail_bound=1.5), False),
    "squeeze": (lambda: Squeeze(), False),
    # TarFlow's autoregressive blocks (flows/tarflow.py) on patch sequences: 4 patches of 2x2x4 (INPUT_SHAPE), an affine one
    # in raster order and a shift-only one in reversed order.
    "tarflow_block": (lambda: TarFlowBlock(4 * C, 4, 16, 2, head_channels=8), False),
    "tarflow_block_reversed_shift_only": (lambda: TarFlowBlock(4 * C, 4, 16, 1, head_channels=8, reverse=True,
                                                               affine=False), False),
    # openai/glow's coupling-net options (benchmarks/learning_curves.py measures them).
    "flow_step_edge_padding": (lambda: flow_step(C, 8, net=partial(CouplingNet, edge_padding=True)), False),
    "flow_step_net_actnorm": (lambda: flow_step(C, 8, net=partial(CouplingNet, actnorm=True)), False),
    "conditional_coupling_edge_padding_actnorm": (lambda: AffineCoupling(
        C, 8, cond_channels=COND_C, scale_fn="squish", net=partial(CouplingNet, edge_padding=True, actnorm=True)),
        True),
    "flow_step": (lambda: flow_step(C, 8), False),
    "flow_step_full_additive": (lambda: flow_step(C, 8, invconv="full", coupling="additive"), False),
    "conditional_flow_step": (lambda: flow_step(C, 8, cond_channels=COND_C, affine_injector=True,
                                                scale_fn="squish"), True),
    "sequential": (lambda: FlowSequential(Squeeze(), flow_step(4 * C, 8), flow_step(4 * C, 8)), False),
    # The memory options' compositions (Glow's memory_efficient and activation_checkpointing);
    # the Jacobian test differentiates through their custom backward passes.
    "reversible_sequential": (lambda: ReversibleSequential(Squeeze(), flow_step(4 * C, 8), flow_step(4 * C, 8)),
                              False),
    "checkpointed_sequential": (lambda: CheckpointedSequential(Squeeze(), flow_step(4 * C, 8)), False),
    # An SRFlow stage's step stack: the condition is resized after the squeeze.
    "conditional_sequential": (lambda: FlowSequential(
        Squeeze(), *(flow_step(4 * C, 8, cond_channels=COND_C, affine_injector=True,
                               scale_fn="squish") for _ in range(2))), True),
}


# Perturbation scales other than the default 0.2 (0.05 for the sequential cases). The
# 3x3 convs of a residual net amplify noise of 0.2 on every weight (~sqrt(72) * 0.2 per
# conv) into raw spline parameters of ~20, i.e. slopes of e^-10 that no float32 inverse
# resolves to 1e-4; 0.1 still gives log-dets of several nats per sample.
# A TarFlow block at 0.2 has per-patch scales up to e^3 that compound along the patch
# order, so float32 round trips drift just past 1e-4; 0.1 keeps scales of e^1-e^2.
# Layers on other inputs than [B, C, H, W] images: a TarFlow block's patch sequence [B, T, D].
INPUT_SHAPE = {"tarflow_block": (4, 4 * C), "tarflow_block_reversed_shift_only": (4, 4 * C)}
PERTURBATION = {"spline_coupling_resnet": 0.1, "tarflow_block": 0.1, "tarflow_block_reversed_shift_only": 0.1}


def build(name):
    factory, conditional = CASES[name]
    layer = factory()
    perturb_parameters(layer, PERTURBATION.get(name, 0.05 if name.endswith("sequential") else 0.2))
    layer.eval()
    channels = 3 if name.startswith("odd_channels") else C
    x = torch.randn(5, *INPUT_SHAPE.get(name, (channels, H, W)))
    # Conditions come at a lower resolution: layers must resize them themselves.
    cond = torch.randn(5, COND_C, H // 2, W // 2) if conditional else None
    return layer, x, cond, conditional


def bijection_classes() -> set[type]:
    """Every public Bijection subclass defined under ``flows/`` (private bases such as
    ``_Coupling`` are abstract helpers and have no instances of their own)."""
    for module in pkgutil.walk_packages(flows.__path__, "flows."):
        importlib.import_module(module.name)
    found, stack = set(), [Bijection]
    while stack:
        for subclass in stack.pop().__subclasses__():
            stack.append(subclass)
            if subclass.__module__.startswith("flows.") and not subclass.__name__.startswith("_"):
                found.add(subclass)
    return found


def test_every_bijection_in_flows_has_a_case():
    """Found by discovery, not by a hand list: a new layer without a case here would skip
    the round trip and the brute-force Jacobian."""
    built = {type(factory()) for factory, _ in CASES.values()}
    missing = sorted(f"{c.__module__}.{c.__name__}" for c in bijection_classes() - built)
    assert not missing, f"add a case to tests/test_bijections.py CASES for {missing}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip(name):
    layer, x, cond, _ = build(name)
    with torch.no_grad():
        z, _ = layer(x, cond)
        x_back, _ = layer.inverse(z, cond)
    assert z.shape[0] == x.shape[0]
    assert (x_back - x).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", sorted(CASES))
def test_logdets_cancel_and_are_per_sample(name):
    layer, x, cond, _ = build(name)
    with torch.no_grad():
        z, logdet_forward = layer(x, cond)
        _, logdet_inverse = layer.inverse(z, cond)
    assert logdet_forward.shape == (x.shape[0],)
    assert logdet_inverse.shape == (x.shape[0],)
    assert torch.allclose(logdet_forward + logdet_inverse, torch.zeros_like(logdet_forward), atol=1e-4)


@pytest.mark.parametrize("name", sorted(CASES))
def test_logdet_matches_brute_force_jacobian(name):
    layer, x, cond, _ = build(name)
    layer = layer.double()
    x = x[:2].double()
    cond = cond[:2].double() if cond is not None else None
    _, logdet = layer(x, cond)
    for i in range(x.shape[0]):
        def single(flat, i=i):
            sample_cond = cond[i:i + 1] if cond is not None else None
            out, _ = layer(flat.reshape(1, *x.shape[1:]), sample_cond)
            return out.flatten()

        jacobian = torch.autograd.functional.jacobian(single, x[i].flatten())
        expected = torch.linalg.slogdet(jacobian).logabsdet
        assert torch.allclose(logdet[i], expected, atol=1e-6), (name, logdet[i].item(), expected.item())


@pytest.mark.parametrize("name", ["conditional_coupling", "affine_injector", "conditional_flow_step",
                                  "conditional_checkerboard_coupling", "conditional_spline_coupling"])
def test_conditional_layers_depend_on_condition_and_require_it(name):
    layer, x, cond, _ = build(name)
    with torch.no_grad():
        z1, _ = layer(x, cond)
        z2, _ = layer(x, cond + 1.0)
    assert not torch.allclose(z1, z2)
    with pytest.raises(ValueError, match="cond"):
        layer(x, None)


def test_squish_bounds_scale_and_glow_scale_matches_code():
    from flows.layers import ScaleMap

    raw = torch.linspace(-50, 50, 101)
    squish_scale, squish_log = ScaleMap("squish", 0.5)(raw)
    assert squish_scale.min() >= 0.5 and squish_scale.max() <= 1.0
    assert torch.allclose(squish_log, torch.log(0.5 * torch.sigmoid(raw) + 0.5))
    glow_scale, _ = ScaleMap("glow")(torch.zeros(1))
    assert torch.allclose(glow_scale, torch.sigmoid(torch.tensor([2.0])))


def test_actnorm_initializes_to_unit_statistics_once():
    layer = ActNorm(3).train()
    x = torch.randn(64, 3, 8, 8) * torch.tensor([1.0, 5.0, 0.1])[None, :, None, None] + 2
    y, _ = layer(x)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-3)
    before = [p.clone() for p in layer.parameters()]
    layer(torch.randn(64, 3, 8, 8) * 100)  # a second batch must not re-initialize
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))


def test_invconv_logdet_is_float32_under_bf16_input():
    layer = InvertibleConv1x1(C).eval()
    x = torch.randn(2, C, H, W).bfloat16()
    z, logdet = layer(x)
    assert z.dtype == torch.bfloat16 and logdet.dtype == torch.float32


def test_squeeze_rejects_odd_sizes():
    with pytest.raises(ValueError, match="even"):
        Squeeze()(torch.zeros(1, 1, 3, 4))


@pytest.mark.parametrize("block", [1, 2])
def test_checkerboard_coupling_leaves_its_passive_pixels_unchanged(block):
    mask = CheckerboardMask(block)
    layer = AffineCoupling(C, 8, mask=mask)
    perturb_parameters(layer, 0.2)
    x = torch.randn(3, C, H, W)
    with torch.no_grad():
        z, _ = layer(x)
    passive = mask.passive_mask(x).bool().expand_as(x)
    assert torch.equal(z[passive], x[passive])
    assert not torch.allclose(z[~passive], x[~passive])
    # Half the pixels pass, in square blocks of the given size.
    assert passive[0, 0].float().mean() == 0.5
    assert torch.equal(passive[0, 0, :block, :block], torch.ones(block, block, dtype=torch.bool))


@pytest.mark.parametrize("parity", [0, 1])
def test_channel_mask_parity_chooses_the_half_that_passes(parity):
    layer = AffineCoupling(3, 8, mask=ChannelMask(parity))
    perturb_parameters(layer, 0.2)
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        z, _ = layer(x)
    passive = slice(0, 1) if parity == 0 else slice(2, 3)  # C // 2 = 1 channel passes
    active = slice(1, 3) if parity == 0 else slice(0, 2)
    assert torch.equal(z[:, passive], x[:, passive])
    assert not torch.allclose(z[:, active], x[:, active])
