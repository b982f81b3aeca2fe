"""Options that change speed or memory, never the model: the memory-efficient backward
(reversible recomputation, activation checkpointing), the 1x1 conv cache, the
inference-time ActNorm fold. Each must give the plain computation's numbers."""
from functools import partial

import pytest
import torch

from flows import Glow
from flows.base import FlowSequential
from flows.folding import AffineConv1x1, fold_for_inference
from flows.layers import AffineCoupling, CheckerboardMask, InvertibleConv1x1LU, flow_step
from flows.layers.invconv import InvertibleConv1x1, OrthogonalConv1x1
from flows.nets import CouplingNet, EdgePadding
from flows.reversible import ReversibleSequential
from flows.srflow import SRFlow
from tests.conftest import perturb_parameters

MODES = {"plain": {}, "reversible": {"memory_efficient": True}, "checkpoint": {"activation_checkpointing": True}}


def small_glow(**options):
    torch.manual_seed(0)
    return Glow(in_channels=3, image_size=8, scales=2, steps_per_scale=3, hidden_channels=16, **options)


def small_srflow(**options):
    torch.manual_seed(0)
    return SRFlow(image_size=8, scales=2, steps_per_scale=2, hidden_channels=8, rrdb_features=8, rrdb_blocks=2,
                  rrdb_growth=4, rrdb_feature_blocks=[0, 1], **options)


def gradients(build, options, cond_of):
    """(log_prob, parameter gradients, input gradient) after ActNorm's initialization and
    a perturbation that moves every zero-initialized layer off the identity."""
    model = build(**options).train()
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 8, 8, generator=generator) - 0.5
    cond = cond_of(generator)
    model.log_prob(x, cond)  # data-dependent initialization
    torch.manual_seed(2)
    perturb_parameters(model, 0.05)
    x.requires_grad_(True)
    log_prob = model.log_prob(x, cond)
    log_prob.sum().backward()
    return (log_prob.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, x.grad)


def relative(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


MODELS = {"glow": (small_glow, lambda g: None),
          "srflow_level": (small_srflow, lambda g: {"lowres": torch.rand(4, 3, 4, 4, generator=g) - 0.5})}


@pytest.mark.parametrize("mode", ["reversible", "checkpoint"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_memory_saving_modes_give_the_plain_gradients(model, mode):
    build, cond_of = MODELS[model]
    log_prob, grads, x_grad = gradients(build, MODES["plain"], cond_of)
    log_prob_saving, grads_saving, x_grad_saving = gradients(build, MODES[mode], cond_of)
    torch.testing.assert_close(log_prob_saving, log_prob, rtol=1e-5, atol=0)
    assert grads_saving.keys() == grads.keys()
    if model == "srflow_level":  # the condition's gradient reaches the RRDB encoder
        assert any(name.startswith("encoder.") for name in grads_saving)
    worst = max(relative(grads_saving[name], grads[name]) for name in grads)
    assert worst < 1e-5, worst
    assert relative(x_grad_saving, x_grad) < 1e-5


def test_log_det_gradient_flows_through_the_reversible_backward():
    # The log-det alone depends on ActNorm's and the 1x1 conv's scales only through the
    # log-det term: their gradient must come back from the recomputation too.
    model = small_glow(memory_efficient=True).train()
    x = torch.rand(4, 3, 8, 8) - 0.5
    model.log_prob(x)
    _, _, logdet = model.transform(x)
    logdet.sum().backward()
    step = model.scales[0].layers[1]
    expected = 4 * 4 * 4.0  # batch x pixels of the first scale: d/d log_scale of sum(logdet)
    assert torch.allclose(step.layers[0].log_scale.grad, torch.full_like(step.layers[0].log_scale, expected))
    assert torch.allclose(step.layers[1].log_s.grad, torch.full_like(step.layers[1].log_s, expected))


def saved_bytes(model, x):
    """Bytes autograd keeps for backward during one forward pass."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.log_prob(x).sum()
    return total


def test_reversible_memory_stays_flat_in_depth_and_plain_grows():
    x = torch.rand(2, 3, 8, 8) - 0.5
    saved = {}
    for mode, options in MODES.items():
        for steps in (2, 8):
            model = Glow(image_size=8, scales=2, steps_per_scale=steps, hidden_channels=16, **options).train()
            model.log_prob(x)
            saved[mode, steps] = saved_bytes(model, x)
    assert saved["plain", 8] > 3 * saved["plain", 2]
    assert saved["reversible", 8] < 1.2 * saved["reversible", 2]
    assert saved["reversible", 8] < 0.2 * saved["plain", 8]
    assert saved["plain", 8] > saved["checkpoint", 8] > saved["reversible", 8]


def test_memory_options_are_exclusive_and_plain_without_gradients():
    with pytest.raises(ValueError, match="choose one"):
        small_glow(memory_efficient=True, activation_checkpointing=True)
    plain, reversible = small_glow().eval(), small_glow(memory_efficient=True).eval()
    reversible.load_state_dict(plain.state_dict())
    x = torch.rand(3, 3, 8, 8) - 0.5
    assert isinstance(reversible.scales[0], ReversibleSequential)
    with torch.no_grad():
        torch.testing.assert_close(reversible.log_prob(x), plain.log_prob(x), rtol=0, atol=0)


def trained_glow():
    model = small_glow().train()
    model.log_prob(torch.rand(8, 3, 8, 8) - 0.5)
    torch.manual_seed(3)
    perturb_parameters(model, 0.05)
    return model.eval()


def test_folded_model_has_the_same_log_prob_and_inverse():
    model = trained_glow()
    folded = fold_for_inference(model)
    assert sum(isinstance(m, AffineConv1x1) for m in folded.modules()) == 2 * 3
    x = torch.rand(6, 3, 8, 8) - 0.5
    with torch.no_grad():
        torch.testing.assert_close(folded.log_prob(x), model.log_prob(x), rtol=1e-5, atol=0)
        latents = model.encode(x).latents
        torch.testing.assert_close(folded.decode(latents), model.decode(latents), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(folded.decode(folded.encode(x).latents), x, rtol=1e-4, atol=1e-4)
    assert any(p.requires_grad for p in model.parameters())  # the original still trains


@pytest.mark.parametrize("conv", [InvertibleConv1x1LU, InvertibleConv1x1, OrthogonalConv1x1])
def test_invconv_cache_is_reused_while_frozen_and_dropped_after_an_update(conv, monkeypatch):
    torch.manual_seed(0)
    layer = conv(6)
    perturb_parameters(layer, 0.1)
    calls = []
    original = type(layer).weight_and_logabsdet
    monkeypatch.setattr(type(layer), "weight_and_logabsdet", lambda self: calls.append(1) or original(self))
    z = torch.randn(2, 6, 3, 3)
    with torch.no_grad():
        first, _ = layer.inverse(z)
        again, _ = layer.inverse(z)
        layer(z)
    assert len(calls) == 1 and torch.equal(first, again)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    y, logdet = layer(z)
    (y.square().sum() + logdet.sum()).backward()
    optimizer.step()
    with torch.no_grad():
        updated, _ = layer.inverse(z)
        expected = torch.nn.functional.conv2d(z, torch.linalg.inv(original(layer)[0].double()).float()[:, :, None, None])
    torch.testing.assert_close(updated, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(updated, first)


def test_lu_logdet_in_float32_matches_the_float64_slogdet():
    torch.manual_seed(0)
    layer = InvertibleConv1x1LU(48)
    perturb_parameters(layer, 0.1)
    matrix, logabsdet = layer.weight_and_logabsdet()
    assert matrix.dtype == torch.float32
    torch.testing.assert_close(logabsdet.double(), torch.linalg.slogdet(matrix.double()).logabsdet,
                               rtol=1e-5, atol=1e-5)


def test_edge_padding_tells_the_border_from_dark_pixels():
    padding = EdgePadding(1)
    out = padding(torch.zeros(2, 3, 4, 5))
    assert out.shape == (2, 4, 6, 7)
    assert out[:, 3, 1:-1, 1:-1].eq(0).all() and out[:, 3].sum() == 2 * (6 * 7 - 4 * 5)
    # With zero input and zero biases a zero-padded net sees nothing; the edge-padded one
    # sees where the image ends.
    torch.manual_seed(0)
    net = CouplingNet(3, 4, 8, edge_padding=True)
    perturb_parameters(net, 0.1)
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)
    out = net(torch.zeros(1, 3, 6, 6))
    assert out[..., 0, 0].abs().sum() > 0 and out[..., 3, 3].abs().sum() == 0


@pytest.mark.parametrize("options", [{"actnorm": True}, {"edge_padding": True}])
def test_coupling_net_options_keep_glow_invertible_and_start_at_identity_couplings(options):
    torch.manual_seed(0)
    model = Glow(image_size=8, scales=2, steps_per_scale=2, hidden_channels=8,
                 coupling_net=partial(CouplingNet, **options)).train()
    x = torch.rand(4, 3, 8, 8) - 0.5
    model.log_prob(x)
    perturb_parameters(model, 0.05)
    model.eval()
    with torch.no_grad():
        encoding = model.encode(x)
        torch.testing.assert_close(model.decode(encoding.latents), x, rtol=1e-4, atol=1e-4)


def test_relative_clipping_cuts_spikes_and_keeps_them_out_of_its_average():
    from lightning_modules.parts import RelativeGradientClipping
    clipping = RelativeGradientClipping(2.0, decay=0.9)
    assert clipping.threshold() == float("inf")  # the first step sets the average, unclipped
    clipping.update(10.0)
    assert clipping.threshold() == 20.0
    clipping.update(1000.0)  # a spike: clipped to 20 before it enters the average
    assert clipping.average == pytest.approx(0.9 * 10 + 0.1 * 20)
    with pytest.raises(Exception, match="factor > 1"):
        RelativeGradientClipping(0.5)


def test_glow_module_clips_relative_to_the_running_norm_and_a_checkpoint_keeps_the_average():
    from lightning_modules import GlowModule
    module = GlowModule(flow=small_glow())
    assert module.relative_clipping.factor == 2.0  # the measured default
    module.relative_clipping.update(3.0)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": {}}
    module.on_save_checkpoint(checkpoint)
    restored = GlowModule(flow=small_glow())
    restored.on_load_checkpoint(checkpoint)
    assert restored.relative_clipping.average == 3.0
    # Gradients far above the average are cut to factor x average.
    for p in module.parameters():
        p.grad = torch.full_like(p, 100.0)
    module.log = lambda *args, **kwargs: None
    module.on_before_optimizer_step(None)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.parameters()]))
    assert norm.item() == pytest.approx(6.0, rel=1e-4)


REPLAY_CASES = {
    "affine": lambda: flow_step(8, 8),
    "additive_full_invconv": lambda: flow_step(8, 8, invconv="full", coupling="additive"),
    "spline": lambda: flow_step(8, 8, coupling="spline", num_bins=4, tail_bound=1.5),
    "checkerboard": lambda: AffineCoupling(8, 8, mask=CheckerboardMask(2, parity=1)),
    "injector_conditional": lambda: flow_step(8, 8, cond_channels=3, affine_injector=True, scale_fn="squish"),
    "edge_padding_net": lambda: flow_step(8, 8, net=partial(CouplingNet, edge_padding=True)),
    "actnorm_net": lambda: flow_step(8, 8, net=partial(CouplingNet, actnorm=True)),
}


@pytest.mark.parametrize("name", sorted(REPLAY_CASES))
def test_every_layers_replay_gives_the_plain_gradients(name):
    # Each layer's replay (the couplings' shared-network one, the default elsewhere)
    # inside a reversible composition, against the plain composition.
    torch.manual_seed(0)
    steps = [REPLAY_CASES[name]() for _ in range(2)]
    plain = FlowSequential(*steps)
    x = torch.randn(3, 8, 4, 4)
    features = torch.randn(3, 3, 2, 2) if name.endswith("conditional") else None
    plain.train()(x, features)  # ActNorm initialization
    # Small enough that no affine scale gets near 0 (an ActNorm-normalized net with large
    # random last-layer weights would give scales of 1e-6, which no float32 inverse resolves).
    perturb_parameters(plain, 0.03)
    reversible = ReversibleSequential(*steps)  # the same layers, so the same parameters
    results = []
    for composition in (plain, reversible):
        composition.zero_grad()
        inputs = [x.clone().requires_grad_(True)] + ([features.clone().requires_grad_(True)] if features is not None
                                                     else [])
        y, logdet = composition(inputs[0], inputs[1] if features is not None else None)
        ((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + logdet.sum()).backward()
        results.append([t.grad.clone() for t in inputs] + [p.grad.clone() for p in composition.parameters()])
    for got, expected in zip(results[1], results[0]):
        assert relative(got, expected) < 1e-5
