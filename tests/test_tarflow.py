"""TarFlow (flows/tarflow.py) beyond the shared layer and model properties
(tests/test_bijections.py and tests/model_cases.py list it): the cached inverse is the
uncached one, guidance at w = 0 is plain conditional sampling and extrapolates each
step's transform, bad settings are refused with a message (label dropout and guidance
of every class-conditional family: tests/test_guidance.py)."""
import math

import pytest
import torch

from flows import GUIDANCE, LABELS, NULL_LABEL
from flows.quantization import dequantize
from flows.tarflow import TarFlow, TarFlowBlock
from tests.conftest import perturb_parameters


def tiny_tarflow(num_classes=3, **kwargs):
    torch.manual_seed(0)
    model = TarFlow(in_channels=3, image_size=8, patch_size=2, channels=32, blocks=2, layers_per_block=2,
                    head_channels=16, num_classes=num_classes, **kwargs)
    perturb_parameters(model, 0.05)
    return model.eval()


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_the_cached_inverse_equals_the_uncached_one(reverse, affine):
    """One pass per patch with the key/value cache gives what T full causal passes give."""
    torch.manual_seed(0)
    block = TarFlowBlock(12, 16, 32, 2, head_channels=16, reverse=reverse, affine=affine, num_classes=3)  # 8x8x3 in 2x2
    perturb_parameters(block, 0.05)
    z = torch.randn(4, 16, 12)
    cond = {LABELS: torch.tensor([0, 1, 2, NULL_LABEL])}
    with torch.no_grad():
        cached, cached_logdet = block.inverse(z, cond)
        uncached, uncached_logdet = block.inverse_uncached(z, cond)
        forward_logdet = block(cached, cond)[1]
    assert (cached - uncached).abs().max() < 1e-5
    assert torch.allclose(cached_logdet, uncached_logdet, atol=1e-4)
    assert torch.allclose(cached_logdet, -forward_logdet, atol=1e-4)  # the two directions' log-dets cancel
    if affine:
        assert cached_logdet.abs().min() > 1e-3  # the perturbed block scales: the test is not trivial


def test_the_cached_model_samples_equal_the_uncached_ones():
    model = tiny_tarflow()
    cond = {LABELS: torch.tensor([0, 1, 2])}
    torch.manual_seed(1)
    z = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert (model.decode([z], cond) - model.decode([z], cond, cached=False)).abs().max() < 1e-5


def test_guidance_zero_is_conditional_sampling_and_guidance_moves_the_samples():
    model = tiny_tarflow()
    labels = torch.tensor([0, 1, 2, 0])
    samples = {}
    for name, cond in {"conditional": {LABELS: labels}, "w0": {LABELS: labels, GUIDANCE: 0.0},
                       "w2": {LABELS: labels, GUIDANCE: 2.0}}.items():
        torch.manual_seed(5)
        samples[name] = model.sample(4, cond)
    assert torch.equal(samples["w0"], samples["conditional"])
    assert (samples["w2"] - samples["conditional"]).abs().max() > 1e-3


def test_guidance_is_the_extrapolation_of_the_conditional_and_null_class_transforms():
    """At one step, w moves the log-scale and shift to (1 + w) cond - w null: with a
    single block of 2 patches the second patch is z_1 exp(a) + b with exactly those."""
    torch.manual_seed(0)
    block = TarFlowBlock(1, 4, 16, 1, head_channels=8, num_classes=2)  # 4 patches of one pixel
    perturb_parameters(block, 0.1)
    z = torch.randn(3, 4, 1)
    labels = torch.tensor([0, 1, 1])
    w = 1.5
    with torch.no_grad():
        guided = block.inverse(z, {LABELS: labels, GUIDANCE: w})[0]
        conditional = block.inverse(z, {LABELS: labels})[0]
        null = block.inverse(z, {LABELS: torch.full_like(labels, NULL_LABEL)})[0]
        # The second patch depends on the first alone, which no block changes.
        first = z.flatten(1)[:, :1]
        sequence = torch.cat([first, torch.zeros(3, 3)], dim=1).view(3, 4, 1)
        a_c, b_c = (t[:, 1, 0] for t in block._patch_transforms(sequence, {LABELS: labels}))
        a_u, b_u = (t[:, 1, 0] for t in block._patch_transforms(sequence, {LABELS: torch.full_like(labels, -1)}))
    expected = z.flatten(1)[:, 1] * torch.exp(a_c + w * (a_c - a_u)) + b_c + w * (b_c - b_u)
    assert torch.allclose(guided.flatten(1)[:, 1], expected, atol=1e-6)
    assert not torch.allclose(conditional, null)  # the null class is a class of its own


def test_bad_settings_and_inputs_are_refused_with_a_message():
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        TarFlow(image_size=10, patch_size=4)
    with pytest.raises(ValueError, match="multiple of head_channels"):
        TarFlow(image_size=8, channels=40, head_channels=16)
    with pytest.raises(ValueError, match="needs classes"):
        TarFlow(image_size=8, label_dropout=0.1)
    model = tiny_tarflow()
    with pytest.raises(ValueError, match="class-conditional"):
        model.encode(torch.rand(2, 3, 8, 8) - 0.5)
    with pytest.raises(ValueError, match=r"shape \[B, 3, 8, 8\]"):
        model.encode(torch.rand(2, 1, 8, 8), {LABELS: torch.zeros(2, dtype=torch.long)})


def test_a_tarflow_is_a_cascade_base_stage():
    """Nothing in the cascade is Glow's: a TarFlow base under SRFlow stages trains, and
    its log-likelihood is the stage's exact one."""
    from flows import SRFlow
    from lightning_modules import CascadeModule, GlowStage, SRFlowStage
    from lightning_modules.base import Batch

    torch.manual_seed(0)
    base = TarFlow(in_channels=3, image_size=8, patch_size=2, channels=16, blocks=2, layers_per_block=1,
                   head_channels=8)
    sr = SRFlow(image_size=16, scales=1, steps_per_scale=1, hidden_channels=4, rrdb_features=4, rrdb_blocks=1,
                rrdb_growth=2)
    module = CascadeModule(base=GlowStage(flow=base), sr_stages=[SRFlowStage(flow=sr)], n_bits=5).eval()
    uint8 = {r: torch.randint(0, 256, (2, 3, r, r), dtype=torch.uint8) for r in (8, 16)}
    noise = {r: torch.rand(2, 3, r, r) for r in (8, 16)}
    batch = Batch({r: dequantize(u, 5, noise[r]) for r, u in uint8.items()},
                  {r: dequantize(u, 5, noise=False) for r, u in uint8.items()}, torch.zeros(2, dtype=torch.long), noise)
    with torch.no_grad():
        out = module.compute_losses(batch)
        expected = base.encode(batch.images[8]).log_prob
    assert out.exact[8] and torch.allclose(out.log_prob[8], expected, atol=1e-4)
    assert torch.isfinite(out.loss)
    assert module.model_name == "TarFlow8-SRF16"  # the base named as what it is, not "Glow8"


def deep_shallow(**kwargs):
    torch.manual_seed(0)
    model = TarFlow(in_channels=1, image_size=4, patch_size=2, channels=16, blocks=3, layers_per_block=[1, 1, 3],
                    head_channels=8, **kwargs)
    perturb_parameters(model, 0.05)
    return model.eval()


def test_deep_shallow_blocks_have_their_own_depths_and_invert_exactly():
    """STARFlow's deep-shallow layout: a layer count per block, the last (deep) block the
    deepest; a single count serves every block as an int does."""
    model = deep_shallow()
    assert [len(block.layers) for block in model.blocks] == [1, 1, 3]
    assert model.display_name == "TarFlow4-deep3"
    x = torch.rand(3, 1, 4, 4) - 0.5
    with torch.no_grad():
        encoding = model.encode(x)
        assert (model.decode(encoding.latents) - x).abs().max() < 1e-5
    torch.manual_seed(0)
    listed = TarFlow(in_channels=1, image_size=4, patch_size=2, channels=16, blocks=3, layers_per_block=[2],
                     head_channels=8)
    torch.manual_seed(0)
    plain = TarFlow(in_channels=1, image_size=4, patch_size=2, channels=16, blocks=3, layers_per_block=2,
                    head_channels=8)
    assert [len(b.layers) for b in listed.blocks] == [2, 2, 2]
    assert all(torch.equal(a, b) for a, b in zip(listed.state_dict().values(), plain.state_dict().values()))
    with pytest.raises(ValueError, match="lists 2 blocks but blocks is 3"):
        TarFlow(image_size=4, blocks=3, layers_per_block=[2, 8])
    with pytest.raises(ValueError, match="positive integers"):
        TarFlow(image_size=4, blocks=2, layers_per_block=[0, 8])


def test_conditioning_the_deep_block_only_leaves_the_shallow_blocks_blind_to_the_class():
    model = deep_shallow(num_classes=2, condition_deep_block_only=True, label_dropout=0.1)
    assert [block.class_embed is not None for block in model.blocks] == [False, False, True]
    x = torch.rand(2, 1, 4, 4) - 0.5
    with torch.no_grad():
        zero, one = ({LABELS: torch.full((2,), label)} for label in (0, 1))
        shallow = {name: model.blocks[1](model.blocks[0](model.to_patches(x), cond)[0], cond)[0] for name, cond in
                   (("zero", zero), ("one", one))}
        assert torch.equal(shallow["zero"], shallow["one"])
        assert not torch.allclose(model.log_prob(x, zero), model.log_prob(x, one))
    with pytest.raises(ValueError, match="needs num_classes > 0"):
        TarFlow(image_size=4, condition_deep_block_only=True)


def test_guidance_acts_in_the_deep_block_alone_when_only_it_is_conditioned():
    """Sampling with guidance w: the deep block inverts guided, the shallow blocks as
    at w = 0 (ml-starflow's reverse drops guidance after the deep block); w = 0 is the
    unguided sampler."""
    model = deep_shallow(num_classes=2, condition_deep_block_only=True, label_dropout=0.1)
    labels = torch.tensor([0, 1, 1])
    z = torch.randn(3, 1, 4, 4)
    with torch.no_grad():
        guided = model.decode([z], {LABELS: labels, GUIDANCE: 2.0})
        by_hand = model.blocks[2].inverse(model.to_patches(z), {LABELS: labels, GUIDANCE: 2.0})[0]
        for block in (model.blocks[1], model.blocks[0]):
            by_hand = block.inverse(by_hand, {LABELS: labels})[0]
        assert torch.allclose(guided, model.to_image(by_hand), atol=1e-6)
        unguided = model.decode([z], {LABELS: labels})
        assert torch.equal(model.decode([z], {LABELS: labels, GUIDANCE: 0.0}), unguided)
        assert (guided - unguided).abs().max() > 1e-4


def test_the_authors_shift_only_prior_a_unit_likelihood_and_a_variance_buffer_for_sampling():
    """ml-tarflow's non-affine recipe: the likelihood under N(0, I), the buffer lerped by
    0.1 towards the batch's E[z^2] after each training pass, the draws scaled by it."""
    torch.manual_seed(0)
    model = TarFlow(in_channels=1, image_size=4, patch_size=2, channels=16, blocks=2, layers_per_block=1,
                    head_channels=8, affine=False, prior_variance_buffer=True)
    assert not any(True for _ in model.prior.parameters())  # a unit prior, nothing learned
    perturb_parameters(model, 0.05)
    x = torch.rand(8, 1, 4, 4) - 0.5
    with torch.no_grad():
        z = model.encode(x).latents[0]
        unit = torch.distributions.Normal(0.0, 1.0).log_prob(z).flatten(1).sum(1)
        assert torch.allclose(model.log_prob(x), unit, atol=1e-4)  # shift only: log-det 0
    clean, noise = (torch.floor((x + 0.5) * 256) + 0.5) / 256 - 0.5, torch.rand(8, 1, 4, 4)
    with torch.no_grad():
        y = model.dequantizer(clean, 1 / 256, noise).images
        expected = 0.9 + 0.1 * model.encode(y).latents[0].pow(2).mean(0)
    model.train()
    model.training_loss(clean, n_bits=8, noise=noise)
    assert torch.allclose(model.latent_variance, expected, atol=1e-6)
    model.eval()
    model.training_loss(clean, n_bits=8, noise=noise)
    assert torch.allclose(model.latent_variance, expected, atol=1e-6)  # evaluation leaves it alone
    # sampling: a fresh model's blocks are the identity, so its samples are the draws
    fresh = TarFlow(in_channels=1, image_size=4, patch_size=2, channels=16, blocks=2, layers_per_block=1,
                    head_channels=8, affine=False, prior_variance_buffer=True).eval()
    fresh.latent_variance.fill_(4.0)
    samples = fresh.sample(2000)
    assert samples.std().item() == pytest.approx(2.0, rel=0.05)
    with pytest.raises(ValueError, match="cannot also learn_prior_scale"):
        TarFlow(image_size=4, affine=False, prior_variance_buffer=True, learn_prior_scale=True)


def test_the_input_scale_is_a_fixed_bijection_in_the_likelihood():
    """input_scale s: the blocks see s x; log p(x) = log p_blocks(s x) + D log s (the figure
    stays the images' in model space); decoding divides by s."""
    torch.manual_seed(0)
    scaled = TarFlow(in_channels=1, image_size=4, patch_size=2, channels=16, blocks=2, layers_per_block=1,
                     head_channels=8, input_scale=2.0)
    perturb_parameters(scaled, 0.05)
    plain = TarFlow(in_channels=1, image_size=4, patch_size=2, channels=16, blocks=2, layers_per_block=1,
                    head_channels=8)
    plain.load_state_dict(scaled.state_dict())
    x = torch.rand(5, 1, 4, 4) - 0.5
    with torch.no_grad():
        assert torch.allclose(scaled.log_prob(x), plain.log_prob(2 * x) + 16 * math.log(2.0), atol=1e-4)
        assert (scaled.decode(scaled.encode(x).latents) - x).abs().max() < 1e-5
    with pytest.raises(ValueError, match="input_scale must be > 0"):
        TarFlow(image_size=4, input_scale=0.0)


def test_the_model_cuts_the_image_into_patches_once_per_pass(monkeypatch):
    """ml-tarflow patchifies once per model: the blocks pass the sequence on, so a pass
    with B blocks cuts the image once (and folds it back once), not B times."""
    import flows.tarflow as tarflow
    counts = {"patchify": 0, "unpatchify": 0}
    for name in counts:
        original = getattr(tarflow, name)

        def counted(*args, _name=name, _original=original):
            counts[_name] += 1
            return _original(*args)
        monkeypatch.setattr(tarflow, name, counted)
    model = tiny_tarflow()
    assert len(model.blocks) > 1
    x, cond = torch.rand(2, 3, 8, 8) - 0.5, {LABELS: torch.tensor([0, 1])}
    with torch.no_grad():
        z = model.encode(x, cond).latents[0]
        assert counts == {"patchify": 1, "unpatchify": 1}
        back = model.decode([z], cond)
    assert counts == {"patchify": 2, "unpatchify": 2}
    assert (back - x).abs().max() < 1e-4
    with pytest.raises(ValueError, match="patch sequences"):
        model.blocks[0](x, cond)  # an image handed to a block is named, not misread
