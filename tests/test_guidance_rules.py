"""The guidance rules (flows.base.Guidance), each against an independent float64
re-derivation from its paper's equations: classifier-free guidance (TarFlow sec. 2.4),
its schedule annealed along the patches (ml-tarflow's FID script), STARFlow's combination
of the conditional and unconditional Gaussians (Gu et al. 2025), and the self-guidance of
an unconditional TarFlow by its own sharpened attention (ml-tarflow's ``attn_temp``).
w = 0 is the unguided sampler, bit for bit, under every rule."""
from __future__ import annotations

import math

import pytest
import torch

from flows import GUIDANCE, LABELS, GaussianPrior, TarFlow
from flows.base import Guidance
from flows.tarflow import CausalSelfAttention



@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def starflow_by_completing_the_square(mu_c, sigma_c, mu_u, sigma_u, w):
    """The Gaussian whose log-density is (1 + w) log N(x; mu_c, sigma_c^2) - w log N(x; mu_u,
    sigma_u^2) up to a constant, from its first and second derivatives at x = 0 (autograd,
    float64): precision = -f'', mean = -f'/f''. Defined where the precision is positive."""
    x = torch.zeros_like(mu_c, requires_grad=True)

    def log_normal(x, mu, sigma):
        return -0.5 * ((x - mu) / sigma) ** 2 - torch.log(sigma)

    f = ((1 + w) * log_normal(x, mu_c, sigma_c) - w * log_normal(x, mu_u, sigma_u)).sum()
    (first,) = torch.autograd.grad(f, x, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), x)
    return (-first / second).detach(), (-second).rsqrt().detach()


@pytest.mark.parametrize("w", [0.5, 1.0, 3.0])
def test_starflow_rule_is_the_gaussian_of_the_weighted_log_densities(w):
    generator = torch.Generator().manual_seed(0)
    mu_c, mu_u = torch.randn(50, generator=generator), torch.randn(50, generator=generator)
    sigma_u = torch.rand(50, generator=generator) + 0.5
    sigma_c = sigma_u * (0.2 + 0.8 * torch.rand(50, generator=generator))  # sigma_c <= sigma_u: no clip
    mean, log_std = Guidance(w, rule="starflow").combine(mu_c, sigma_c.log(), mu_u, sigma_u.log())
    expected_mean, expected_std = starflow_by_completing_the_square(mu_c, sigma_c, mu_u, sigma_u, w)
    assert torch.allclose(mean, expected_mean, rtol=1e-6, atol=1e-9)
    assert torch.allclose(log_std.exp(), expected_std, rtol=1e-6, atol=1e-9)


def test_starflow_rule_clips_where_the_conditional_is_wider():
    """sigma_c > sigma_u would give a negative precision for large w: s is clipped to 1, so
    the scale stays sigma_c and the mean is (1 + w) mu_c - w mu_u (the paper's clip)."""
    mu_c, mu_u = torch.tensor([0.3]), torch.tensor([-0.2])
    sigma_c, sigma_u = torch.tensor([2.0]), torch.tensor([0.5])
    mean, log_std = Guidance(4.0, rule="starflow").combine(mu_c, sigma_c.log(), mu_u, sigma_u.log())
    assert torch.allclose(log_std.exp(), sigma_c) and torch.allclose(mean, 5 * mu_c - 4 * mu_u)


def test_attention_temperature_divides_the_logits():
    torch.manual_seed(0)
    attention = CausalSelfAttention(8, 4)
    x = torch.randn(2, 5, 8)
    t = 0.5
    q, k, v = attention.qkv(attention.norm(x)).view(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) / (math.sqrt(4) * t)
    logits = logits.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), -math.inf)
    expected = attention.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 8))
    assert torch.allclose(attention(x, temperature=t), expected, atol=1e-12)


def reference_inverse(block, z, labels, guidance: Guidance):
    """The guided inverse of one TarFlow block from the equations, without a cache: at step
    i, full causal passes give the conditional (log-scale, shift) of patch i + 1 and the
    unconditional ones (null class; attention at the guidance's temperature); the weight
    is w, or (i + 1) / (T - 1) w annealed; then cfg (each c + w_i (c - u)) or STARFlow's
    Gaussian, written out here, and x_{i+1} = z_{i+1} sigma + mu."""
    cond = {LABELS: labels} if labels is not None else None
    sequence = block._in_block_order(z)
    x = sequence.clone()
    steps = block.num_patches - 1
    for i in range(steps):
        ls_c, mu_c = (t[:, i + 1] for t in block._patch_transforms(x, cond))
        ls_u, mu_u = (t[:, i + 1] for t in block._patch_transforms(
            x, cond, null=True, attention_temperature=guidance.attention_temperature))
        w = guidance.weight * ((i + 1) / steps if guidance.schedule == "annealed" else 1.0)
        if guidance.rule == "cfg":
            log_sigma, mu = ls_c + w * (ls_c - ls_u), mu_c + w * (mu_c - mu_u)
        else:
            s = torch.minimum(torch.exp(ls_c - ls_u), torch.ones_like(ls_c)) ** 2
            log_sigma = ls_c - 0.5 * torch.log(1 + w - w * s)
            mu = ((1 + w) * mu_c - w * s * mu_u) / (1 + w - w * s)
        x = x.clone()
        x[:, i + 1] = sequence[:, i + 1] * torch.exp(log_sigma) + mu
    return block._in_block_order(x)


def perturbed_tarflow(num_classes: int, **guidance):
    torch.manual_seed(0)
    model = TarFlow(in_channels=1, image_size=4, patch_size=1, channels=16, blocks=2, layers_per_block=1,
                    head_channels=8, num_classes=num_classes, label_dropout=0.1 if num_classes else 0.0, **guidance)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


@pytest.mark.parametrize("rule", ["cfg", "starflow"])
@pytest.mark.parametrize("schedule", ["constant", "annealed"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_the_guided_tarflow_inverse_follows_the_equations(rule, schedule, temperature):
    model = perturbed_tarflow(3)
    z, labels = torch.randn(4, 16, 1), torch.tensor([0, 1, 2, 1])  # 16 patches of one pixel
    guidance = Guidance(1.7, rule, schedule, temperature)
    with torch.no_grad():
        for block in model.blocks:
            cached = block.inverse(z, {LABELS: labels, GUIDANCE: guidance})[0]
            reference = reference_inverse(block, z, labels, guidance)
            assert torch.allclose(cached, reference, rtol=1e-9, atol=1e-9), (cached - reference).abs().max()
            assert not torch.allclose(cached, block.inverse(z, {LABELS: labels})[0])  # guidance did something


def test_an_unconditional_tarflow_is_guided_by_its_own_attention():
    with pytest.raises(ValueError, match="guidance_attention_temperature"):
        perturbed_tarflow(0, guidance=1.0)  # no classes and no attention temperature: nothing to guide by
    model = perturbed_tarflow(0, guidance=1.5, guidance_attention_temperature=0.5, guidance_schedule="annealed")
    z = torch.randn(3, 1, 4, 4)
    with torch.no_grad():
        guided = model.decode([z])  # the model's own guidance applies to a drawn latent only
        plain = model.decode([z], {GUIDANCE: 0.0})
        by_model = model.decode([None], {GUIDANCE: model.guided_condition(None)[GUIDANCE], LABELS: torch.zeros(3)})
        x = model.to_patches(z)
        for block in reversed(model.blocks):
            x = reference_inverse(block, x, None, Guidance(1.5, "cfg", "annealed", 0.5))
        x = model.to_image(x)
        by_call = model.decode([z], {GUIDANCE: Guidance(1.5, "cfg", "annealed", 0.5)})
    assert torch.allclose(by_call, x, atol=1e-9)
    assert not torch.allclose(by_call, plain)
    assert torch.equal(guided, plain) and by_model.shape == plain.shape


@pytest.mark.parametrize("guidance", [Guidance(0.0, "cfg"), Guidance(0.0, "starflow", "annealed", 0.5), 0.0])
def test_weight_zero_is_the_unguided_sampler_under_every_rule(guidance):
    model = perturbed_tarflow(3)
    labels = torch.tensor([0, 1, 2])
    with torch.no_grad():
        torch.manual_seed(5)
        unguided = model.sample(3, {LABELS: labels})
        torch.manual_seed(5)
        zero = model.sample(3, {LABELS: labels, GUIDANCE: guidance})
    assert torch.equal(unguided, zero)


def test_a_class_conditional_prior_draws_from_the_starflow_gaussian():
    """Glow's class-conditional top prior under STARFlow's rule: at temperature 0 a draw is
    the guided mean; its spread at temperature 1 the guided scale (one Gaussian, no
    sequence: an annealed schedule is at its end, w)."""
    torch.manual_seed(0)
    prior = GaussianPrior((2, 2, 2), learned=True, num_classes=3)
    with torch.no_grad():
        for parameter in prior.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    labels = torch.tensor([0, 2])
    mean_c, log_std_c = prior.params(2, {LABELS: labels})
    mean_u, log_std_u = prior.params(2, {LABELS: torch.full_like(labels, -1)})
    mean_c, log_std_c = mean_c.expand(2, 2, 2, 2), log_std_c.expand(2, 2, 2, 2)
    mean_u, log_std_u = mean_u.expand(2, 2, 2, 2), log_std_u.expand(2, 2, 2, 2)
    narrower = log_std_c <= log_std_u  # where no clip applies, the square completed independently
    w = 2.0
    expected_mean, expected_std = starflow_by_completing_the_square(mean_c, log_std_c.exp(), mean_u,
                                                                    log_std_u.exp(), w)
    for schedule in ("constant", "annealed"):
        drawn = prior.sample(2, {LABELS: labels, GUIDANCE: Guidance(w, "starflow", schedule)}, temperature=0.0)
        assert torch.allclose(drawn[narrower], expected_mean[narrower], atol=1e-9)
    mean, log_std = Guidance(w, "starflow").combine(mean_c, log_std_c, mean_u, log_std_u)
    assert torch.allclose(log_std.exp()[narrower], expected_std[narrower], atol=1e-9)
    assert narrower.any() and (~narrower).any() or narrower.all()
