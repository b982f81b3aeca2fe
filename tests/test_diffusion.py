"""The DDPM prior of seed 003 (flows/diffusion.py): schedules, the bound against a known
likelihood, the t = 1 densities, DDIM against ancestral sampling, the DDIM ODE's round
trip, gathered latents, and the diffusion modules' honest figures."""
import math

import pytest
import torch
from torch import nn

from flows.base import FlowSequential
from flows.diffusion import DiffusionPrior, PixelDiffusion, hybrid_loss
from flows.diffusion_schedules import cosine_betas, ddim_timesteps, discretized_gaussian_log_likelihood, linear_betas
from flows.timestep_sampling import TimestepSampler
from flows.glow import Glow
from flows.layers import Squeeze
from flows.quantization import bits_per_dim, dequantize
from tests.builders import tiny_unet
from tests.conftest import perturb_parameters

MEAN, STD = 0.3, 0.5  # the Gaussian "data" of the bound test


class OptimalGaussianDenoiser(nn.Module):
    """The exact optimal denoiser when z_0 ~ N(MEAN, STD^2) per dimension. z_t is
    Gaussian with mean sqrt(abar) MEAN and variance abar STD^2 + 1 - abar, and jointly
    Gaussian with eps and z_0, so

        E[eps | z_t] = sqrt(1 - abar) (z_t - sqrt(abar) MEAN) / Var(z_t),
        Var(z_0 | z_t) = STD^2 (1 - abar) / Var(z_t),

    and the true reverse step q(z_{t-1} | z_t) is Gaussian with variance
    beta-tilde_t + c_t^2 Var(z_0 | z_t) (c_t the posterior mean's z_0 coefficient;
    Var(z_0 | z_1) itself at t = 1). With ``learned`` variance it also outputs the v
    that puts the interpolated log-variance exactly there."""

    def __init__(self, in_channels, out_channels, image_size):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))  # the prior reads the dtype from a parameter
        self.learned = out_channels == 2 * in_channels
        self.prior = None

    def forward(self, zt, t):
        def at(name):
            return getattr(self.prior, name).to(zt.device)[t].to(zt.dtype).view(-1, 1, 1, 1)

        abar = at("abar")
        variance = abar * STD ** 2 + 1.0 - abar
        eps = torch.sqrt(1.0 - abar) * (zt - abar.sqrt() * MEAN) / variance + 0 * self.dummy
        if not self.learned:
            return eps
        z0_variance = STD ** 2 * (1.0 - abar) / variance
        small, large = at("posterior_log_variance"), at("log_betas")
        step_variance = torch.exp(small) + at("posterior_mean_z0") ** 2 * z0_variance
        reverse_variance = torch.where((t == 0).view(-1, 1, 1, 1), z0_variance, step_variance)
        fraction = (torch.log(reverse_variance) - small) / (large - small)
        return torch.cat([eps, (2 * fraction - 1).expand_as(zt)], dim=1)


def gaussian_prior(timesteps, schedule="linear", shape=(1, 4, 4), variance="learned", **kwargs):
    prior = DiffusionPrior(shape, OptimalGaussianDenoiser, timesteps=timesteps, schedule=schedule,
                           variance=variance, gaussian_residual=False, **kwargs).double()
    object.__setattr__(prior.denoiser, "prior", prior)  # a reference, not a submodule
    return prior


# --- schedules --------------------------------------------------------------------------
def test_abar_is_the_product_of_the_alphas_not_their_average():
    prior = DiffusionPrior((1, 4, 4), tiny_unet, timesteps=50)
    alphas = 1.0 - prior.betas
    product = torch.tensor([math.prod(alphas[: t + 1].tolist()) for t in range(50)], dtype=torch.float64)
    assert torch.allclose(prior.abar, product, rtol=1e-12)
    average = torch.cumsum(alphas, 0) / torch.arange(1, 51)  # seed 003 eq. 4.3 as printed
    assert (prior.abar[-1] - average[-1]).abs() > 0.5  # the printed form would leave z_T mostly signal


def test_cosine_schedule_matches_improved_ddpm_formula():
    T, s = 1000, 0.008
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    expected = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    assert torch.allclose(cosine_betas(T), expected, atol=1e-6, rtol=0)
    assert cosine_betas(T)[-1] == pytest.approx(0.999)  # the clipped last beta


def test_linear_schedule_is_ddpms_at_1000_steps_and_scaled_otherwise():
    assert linear_betas(1000)[0].item() == pytest.approx(1e-4)
    assert linear_betas(1000)[-1].item() == pytest.approx(0.02)
    assert linear_betas(500)[-1].item() == pytest.approx(0.04)
    assert linear_betas(10).max().item() <= 0.999


def test_ddim_timesteps_cover_the_chain():
    assert ddim_timesteps(10, 10) == list(range(9, -1, -1))
    sequence = ddim_timesteps(1000, 50)
    assert sequence[0] == 999 and sequence[-1] == 0 and len(sequence) == 50
    with pytest.raises(ValueError, match="DDIM steps"):
        ddim_timesteps(10, 11)


# --- the bound ------------------------------------------------------------------------------
@pytest.mark.parametrize("timesteps,variance", [(10, "learned"), (1000, "learned"), (1000, "fixed_small")])
def test_negative_elbo_bounds_the_true_nll_and_is_tight_for_large_T(timesteps, variance):
    """z_0 ~ N(MEAN, STD^2) with the exact optimal denoiser (mean and variance): E[-ELBO]
    >= the entropy (the expected true -log p), and within a small gap of it for T = 1000.
    With beta-tilde as the variance the model is worse, and the bound still holds."""
    torch.manual_seed(0)
    prior = gaussian_prior(timesteps, variance=variance)
    z0 = MEAN + STD * torch.randn(2048, 1, 4, 4, dtype=torch.float64)
    dims = 16
    true_nll = -(-0.5 * math.log(2 * math.pi * STD ** 2) - (z0 - MEAN) ** 2 / (2 * STD ** 2)).flatten(1).sum(1)
    with torch.no_grad():
        bound = prior.negative_elbo(z0)
    gap = (bound - true_nll) / dims  # nats per dimension, per sample
    standard_error = gap.std() / math.sqrt(len(gap))
    assert gap.mean() > -3 * standard_error, "the bound fell below the true NLL"
    if variance == "learned" and timesteps == 1000:
        assert gap.mean() < 0.01, f"gap {gap.mean():.4f} nats/dim is not small at T = 1000"
    if variance == "fixed_small":
        assert gap.mean() > 0.1  # beta-tilde is far below the true reverse variance at small t


def test_training_terms_average_to_the_full_bound():
    """T L_t + L_T at a uniform t is an unbiased estimate of the full bound: the mean of
    the per-step terms of negative_elbo over t, times T, plus L_T, is the bound."""
    torch.manual_seed(0)
    prior = gaussian_prior(20)
    z0 = MEAN + STD * torch.randn(8, 1, 4, 4, dtype=torch.float64)
    noise = torch.randn(20, 8, 1, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        terms = [prior.training_terms(z0, torch.full((8,), t), noise[t]) for t in range(20)]
        estimate = torch.stack([20 * term["vlb_term"] + term["prior"] for term in terms]).mean(0)
        torch.manual_seed(1)
        _, per_step = prior.negative_elbo(z0, per_term=True)
    full = torch.stack([term["vlb_term"] for term in terms], dim=1).sum(1) + terms[0]["prior"]
    assert torch.allclose(estimate, full)
    assert per_step.shape == (8, 20)


def test_the_continuous_t1_term_is_a_density():
    """-L_0 = log p(z_0 | z_1) integrates to 1 over z_0 (1-D, trapezoid)."""
    prior = gaussian_prior(50, shape=(1, 1, 1))
    grid = torch.linspace(-3, 3, 20001, dtype=torch.float64).view(-1, 1, 1, 1)
    t = torch.zeros(len(grid), dtype=torch.long)
    zt = torch.full_like(grid, 0.2)
    eps, v = prior.predict_noise(zt, t)
    mean, log_var = prior.p_mean_variance(zt, t, eps, v)
    density = torch.exp(-prior._term(grid, zt, t, mean, log_var))
    assert torch.trapezoid(density.flatten(), grid.flatten()).item() == pytest.approx(1.0, abs=1e-6)


def test_the_discretized_decoder_sums_to_one_over_the_bins():
    bins = 32
    centres = (torch.arange(bins, dtype=torch.float64) * 2 + 1) / bins - 1
    for mean, log_var in [(0.1, -6.0), (-0.95, -3.0), (0.99, -1.0)]:
        log_p = discretized_gaussian_log_likelihood(centres, torch.tensor(mean, dtype=torch.float64),
                                                    torch.tensor(log_var, dtype=torch.float64), bins)
        assert torch.exp(log_p).sum().item() == pytest.approx(1.0, abs=1e-9)


def test_kl_terms_are_non_negative():
    torch.manual_seed(0)
    prior = gaussian_prior(100)
    z0 = MEAN + STD * torch.randn(64, 1, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        _, terms = prior.negative_elbo(z0, per_term=True)
    assert (terms[:, 1:] >= -1e-9).all()


# --- sampling ----------------------------------------------------------------------------------
def trained_looking_unet_prior(timesteps=12, **kwargs):
    torch.manual_seed(0)
    prior = DiffusionPrior((2, 8, 8), tiny_unet, timesteps=timesteps, schedule="cosine", **kwargs)
    perturb_parameters(prior, 0.2)  # non-zero outputs: zero-init layers would hide mistakes
    return prior.double().eval()


def test_ddim_with_all_steps_and_eta_1_is_ancestral_sampling_with_beta_tilde():
    prior = trained_looking_unet_prior(variance="fixed_small")
    torch.manual_seed(5)
    ancestral = prior.sample_ancestral(4)
    torch.manual_seed(5)
    ddim = prior.sample_ddim(4, steps=prior.timesteps, eta=1.0)
    assert ancestral.abs().mean() > 0.1
    assert torch.allclose(ancestral, ddim, atol=1e-8), (ancestral - ddim).abs().max()


def test_ddim_with_eta_0_is_deterministic_and_inverts_along_the_ode():
    """Encode with the DDIM ODE and decode back: the round trip error shrinks with S
    (the optimal Gaussian denoiser, T = 1000)."""
    torch.manual_seed(0)
    prior = gaussian_prior(1000)
    z0 = MEAN + STD * torch.randn(16, 1, 4, 4, dtype=torch.float64)
    errors = {}
    for steps in (50, 500):
        z_T = prior.ddim_encode(z0, steps)
        assert torch.equal(prior.sample_ddim(16, steps, eta=0.0, z_T=z_T),
                           prior.sample_ddim(16, steps, eta=0.0, z_T=z_T))
        errors[steps] = (prior.sample_ddim(16, steps, eta=0.0, z_T=z_T) - z0).abs().max().item()
    # First order in the step (measured: 0.10 at S = 50, 0.010 at S = 500; z_0 has std 0.5).
    assert errors[500] < 0.02 and errors[500] < errors[50] / 5, errors


def test_temperature_zero_sampling_is_the_reverse_mean_path():
    prior = trained_looking_unet_prior()
    torch.manual_seed(1)
    a = prior.sample(3, temperature=0.0)
    torch.manual_seed(2)
    assert torch.equal(a, prior.sample(3, temperature=0.0))


def test_a_latent_of_the_wrong_shape_is_refused():
    prior = trained_looking_unet_prior()
    with pytest.raises(ValueError, match=r"shape \[B, 2, 8, 8\]"):
        prior.log_prob(torch.zeros(2, 3, 8, 8, dtype=torch.float64))


# --- the diffusion-augmented flow --------------------------------------------------------------
def test_gathered_latents_sit_at_the_pixels_they_came_from():
    """With the flow steps removed, the squeezes and splits alone gathered back are the
    identity: each latent entry returns to its pixel."""
    glow = Glow(image_size=8, scales=3, steps_per_scale=1, hidden_channels=4,
                joint_prior=lambda shape: DiffusionPrior(shape, tiny_unet, timesteps=4))
    glow.scales = nn.ModuleList(FlowSequential(Squeeze()) for _ in glow.scales)
    x = torch.randn(2, 3, 8, 8)
    latents, _, logdet = glow.transform(x)
    assert torch.equal(glow.gather_latents(latents), x)
    assert all(torch.equal(a, b) for a, b in zip(glow.scatter_latents(x), latents))


def test_a_joint_prior_refuses_partial_latents_and_other_priors():
    glow = Glow(image_size=8, scales=2, steps_per_scale=1, hidden_channels=4,
                joint_prior=lambda shape: DiffusionPrior(shape, tiny_unet, timesteps=4))
    latents, _, _ = glow.transform(torch.rand(2, 3, 8, 8) - 0.5)
    with pytest.raises(ValueError, match="every latent, or none"):
        glow.decode([latents[0], None])
    with pytest.raises(ValueError, match="replaces top_prior"):
        Glow(image_size=8, scales=2, steps_per_scale=1, hidden_channels=4, num_classes=3,
             joint_prior=lambda shape: DiffusionPrior(shape, tiny_unet, timesteps=4))


def make_module(loss_mode="bound"):
    from lightning_modules.diffusion_module import DiffusionFlowModule

    torch.manual_seed(0)
    glow = Glow(image_size=8, scales=2, steps_per_scale=1, hidden_channels=8,
                joint_prior=lambda shape: DiffusionPrior(shape, tiny_unet, timesteps=8, schedule="cosine"))
    return DiffusionFlowModule(flow=glow, loss_mode=loss_mode, n_bits=5)


def batch_of(x):
    """A module's batch of the 5-bit images ``x`` (uint8), as ``FlowModule.prepare_batch``
    makes it: the bin centres, the uniform noise, and the images dequantized with it."""
    from lightning_modules.base import Batch
    noise = torch.rand(x.shape)
    return Batch({8: dequantize(x, 5, noise)}, {8: dequantize(x, 5, noise=False)},
                 torch.zeros(len(x), dtype=torch.long), {8: noise})


def test_the_evaluated_nll_is_the_flow_log_det_plus_the_full_ddpm_bound():
    module = make_module().eval()
    batch = batch_of(torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8))
    x = batch.images[8]
    with torch.no_grad():
        torch.manual_seed(3)
        out = module.evaluate_batch(batch)
        torch.manual_seed(3)
        latents, _, logdet = module.model.transform(x)
        z0 = module.model.gather_latents(latents)
        module.diffusion.estimate_negative_elbo(z0, module.timestep_sampler)  # the same draws as the loss's
        module.diffusion.training_terms(z0)
        expected = logdet - module.diffusion.negative_elbo(module.model.gather_latents(latents))
    assert out.exact == {8: False}  # logged as val/nll_bpd_8, a bound
    assert torch.allclose(out.log_prob[8], expected, atol=1e-4)
    assert module.bound_metric == "nll_bpd"


@pytest.mark.parametrize("loss_mode", ["seed", "bound"])
def test_the_losses_put_minus_log_det_in(loss_mode):
    """Doubling the top latent (its last ActNorm's scale) lowers -log|det| by log 2 per
    top entry: the logdet_bpd term of both losses must fall by that much in bits per
    image dimension (the printed +log|det| would raise it)."""
    module = make_module(loss_mode).train()
    batch = batch_of(torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8))
    with torch.no_grad():
        module.model.transform(batch.images[8])  # ActNorm initialization
        torch.manual_seed(0)
        before = module.compute_losses(batch)
        actnorm = module.model.scales[-1].layers[1].layers[0]
        actnorm.log_scale.add_(math.log(2.0))  # the last scale's latents doubled
        torch.manual_seed(0)
        after = module.compute_losses(batch)
    top_dims = module.model.latent_shapes[-1]
    expected_drop = math.prod(top_dims) / module.model.dims  # bits per dim: log2(2) per top entry
    drop = before.extra["logdet_bpd"] - after.extra["logdet_bpd"]
    assert drop.item() == pytest.approx(expected_drop, rel=1e-4)


def test_hybrid_loss_weights_the_bound_estimate_in_bits_per_dim():
    terms = {"mse": torch.tensor([0.5]), "vlb_term_frozen_mean": torch.tensor([2.0]), "prior": torch.tensor([4.0])}
    loss = hybrid_loss(terms, timesteps=100, dims=8, vlb_weight=0.001)
    assert loss.item() == pytest.approx(0.5 + 0.001 * (100 * 2.0 + 4.0) / (8 * math.log(2)))


def test_the_pixel_ddpm_bound_is_a_bound_on_a_probability():
    """The discretized decoder bounds the probability of the bins: bits per dim >= 0
    for any denoiser, and the same bins give the same bound wherever x lies in them."""
    torch.manual_seed(0)
    model = PixelDiffusion(in_channels=1, image_size=8, n_bits=3, denoiser=tiny_unet, timesteps=10)
    perturb_parameters(model, 0.3)
    uint8 = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    dequantized, centres = dequantize(uint8, 3), dequantize(uint8, 3, noise=False)
    with torch.no_grad():
        torch.manual_seed(1)
        bpd = bits_per_dim(model.log_prob(dequantized), model.dims, 3)
        torch.manual_seed(1)
        bpd_centres = bits_per_dim(model.log_prob(centres), model.dims, 3)
    assert (bpd >= 0).all()
    assert torch.allclose(bpd, bpd_centres)


class BayesDenoiser(nn.Module):
    """The exact noise prediction E[eps | x_t] for data uniform over ``support`` ([S, D]
    points in [-1, 1]): eps = (x_t - sqrt(abar) E[x_0 | x_t]) / sqrt(1 - abar), with the
    posterior over the support a softmax of the Gaussian log-likelihoods."""

    def __init__(self, in_channels, out_channels, image_size):
        super().__init__()
        self.dtype_anchor = nn.Parameter(torch.zeros((), dtype=torch.float64))  # sets the compute dtype
        self.support: torch.Tensor | None = None
        self.abar: torch.Tensor | None = None

    def forward(self, zt, t):
        abar = self.abar.to(zt)[t].view(-1, 1)
        x, support = zt.flatten(1), self.support.to(zt)
        distance = ((x[:, None] - abar.sqrt()[:, None] * support[None]) ** 2).sum(-1)
        x0 = torch.softmax(-distance / (2 * (1 - abar)), dim=1) @ support
        return ((x - abar.sqrt() * x0) / (1 - abar).sqrt()).view_as(zt)


def test_the_pixel_ddpm_bound_sums_to_at_most_one_over_all_images_and_is_tight_when_optimal():
    """Every image of 2x2 pixels at 1 bit (16 of them): the probabilities the bound gives,
    exp(ELBO), sum to at most 1 (each is below the model's probability of that image, and
    those sum to 1), and with the Bayes-optimal denoiser for uniform data, beta-tilde as
    the variance and T = 1000 they sum to nearly 1. A wrong bin width in the discretized
    decoder, a KL with a wrong sign or scale, or a missing L_T breaks one of the two."""
    import itertools

    torch.manual_seed(0)
    model = PixelDiffusion(in_channels=1, image_size=2, n_bits=1, denoiser=BayesDenoiser, timesteps=1000,
                           variance="fixed_small").double()
    codes = torch.tensor(list(itertools.product(range(2), repeat=4)), dtype=torch.float64)
    images = ((codes + 0.5) / 2 - 0.5).reshape(-1, 1, 2, 2)  # the bins' centres in model space
    diffusion = model.diffusion
    diffusion.denoiser.support = model.to_diffusion_space(images).flatten(1)
    diffusion.denoiser.abar = diffusion.abar
    draws = 64
    with torch.no_grad():
        log_bins = -diffusion.negative_elbo(model.to_diffusion_space(images).repeat(draws, 1, 1, 1))
    log_bins = log_bins.view(draws, len(images))
    elbo, standard_error = log_bins.mean(0), log_bins.std(0) / math.sqrt(draws)
    total = elbo.exp().sum()
    total_error = (elbo.exp() * standard_error).square().sum().sqrt()  # delta method
    assert total <= 1.0 + 4 * total_error, (total.item(), total_error.item())
    assert total >= 0.95, total.item()
    # Through the model contract: the density of a dequantized image is the bins' bound
    # over the bin volume (bits per dim of 1-bit data are >= 0 and near 1 here).
    with torch.no_grad():
        bpd = bits_per_dim(model.log_prob(images.repeat(draws, 1, 1, 1)), model.dims, 1)
    assert 1.0 <= bpd.mean() <= 1.0 + 0.05


def test_an_untrained_gaussian_residual_prior_is_the_standard_normal():
    """With the zero-init output layer, eps = sqrt(1 - abar) z_t and log Sigma = log beta
    are the exact reverse process of N(0, I) data: samples are standard normal and the
    bound of standard normal z_0 is within a small gap of the true NLL."""
    torch.manual_seed(0)
    prior = DiffusionPrior((1, 4, 4), tiny_unet, timesteps=100).double()
    with torch.no_grad():
        samples = prior.sample_ancestral(512)
        z0 = torch.randn(512, 1, 4, 4, dtype=torch.float64)
        gap = (prior.negative_elbo(z0) + (-0.5 * (z0 ** 2 + math.log(2 * math.pi))).flatten(1).sum(1)) / 16
    assert abs(samples.std().item() - 1.0) < 0.03 and abs(samples.mean().item()) < 0.03
    standard_error = gap.std().item() / math.sqrt(len(gap))  # the bound's own Monte Carlo noise
    assert abs(gap.mean().item()) < 4 * standard_error + 0.005


# --- the training estimate of the bound (issue 21) ----------------------------------------------
def warmed_importance_sampler(timesteps):
    sampler = TimestepSampler(timesteps, "importance", history=4)
    generator = torch.Generator().manual_seed(5)
    for _ in range(3):  # every step's history full, with values of very different sizes
        steps = torch.arange(timesteps).repeat(2)
        sampler.update(steps, torch.rand(len(steps), generator=generator, dtype=torch.float64) * (1 + steps))
    return sampler


@pytest.mark.parametrize("kind", ["uniform", "endpoints", "importance"])
def test_every_bound_estimator_is_unbiased(kind):
    """The mean of many one-call estimates equals the full T-step bound (itself averaged
    over its noise) within four standard errors; a missing L_0, a wrong weight 1/p(t) or
    a t = 0 counted twice would move the mean by far more."""
    torch.manual_seed(0)
    timesteps, draws = 10, 100000
    prior = gaussian_prior(timesteps)  # learned variance, closed-form denoiser: fast
    sampler = warmed_importance_sampler(timesteps) if kind == "importance" else TimestepSampler(timesteps, kind)
    if kind == "importance":
        p = sampler.probabilities()
        assert p[0] == 0 and p[1:].max() / p[1:].min() > 2  # really non-uniform
    z0 = 0.2 * torch.randn(2, 1, 4, 4, dtype=torch.float64) - 0.4  # off the data: large KLs too
    repeated = z0.repeat(draws, 1, 1, 1)
    with torch.no_grad():
        estimate = prior.estimate_negative_elbo(repeated, sampler)["negative_elbo"].view(draws, 2)
        full = prior.negative_elbo(repeated[:2 * 20000]).view(20000, 2)
    difference = estimate.mean(0) - full.mean(0)
    standard_error = (estimate.var(0) / draws + full.var(0) / len(full)).sqrt()
    assert (difference.abs() < 4 * standard_error).all(), (difference, standard_error)


def test_the_first_term_for_every_image_and_importance_sampling_lower_the_variance():
    """With a continuous L_0 far from the other terms (a flow's latent), uniform t puts
    T L_0 into the estimate once in T draws; the endpoints estimator never does, and
    drawing t by the second moment of L_t (history filled from other draws) leaves
    little variance at all (benchmarks/diffusion_bound_estimators.py measures the same
    on a trained model)."""
    torch.manual_seed(0)
    timesteps = 100
    prior = gaussian_prior(timesteps)  # the optimal denoiser: L_0 a sharp density
    z0 = (MEAN + STD * torch.randn(1, 1, 4, 4, dtype=torch.float64)).repeat(4000, 1, 1, 1)
    importance = TimestepSampler(timesteps, "importance")
    with torch.no_grad():
        for _ in range(30):
            draws = prior.estimate_negative_elbo(z0[:200], TimestepSampler(timesteps, "endpoints"))
            importance.update(draws["t"], draws["sampled_term"])
        samplers = {"uniform": TimestepSampler(timesteps, "uniform"),
                    "endpoints": TimestepSampler(timesteps, "endpoints"), "importance": importance}
        spread = {kind: prior.estimate_negative_elbo(z0, sampler)["negative_elbo"].std()
                  for kind, sampler in samplers.items()}
    assert spread["endpoints"] < 0.6 * spread["uniform"], spread
    assert spread["importance"] < 0.25 * spread["endpoints"], spread


def test_the_importance_sampler_follows_the_second_moment_and_keeps_its_history():
    sampler = TimestepSampler(4, "importance", history=2)
    assert torch.allclose(sampler.probabilities(), torch.tensor([0, 1 / 3, 1 / 3, 1 / 3], dtype=torch.float64))
    sampler.update(torch.tensor([1, 1, 2, 2, 3, 3, 3]), torch.tensor([3.0, 4.0, 1.0, 1.0, 9.0, 2.0, 2.0]))
    rms = torch.tensor([math.sqrt(12.5), 1.0, 2.0], dtype=torch.float64)  # step 3 kept its last two values
    expected = (1 - 1e-3) * rms / rms.sum() + 1e-3 / 3
    assert torch.allclose(sampler.probabilities()[1:], expected)
    restored = TimestepSampler(4, "importance", history=2)
    restored.load_state(sampler.state())
    assert torch.equal(restored.probabilities(), sampler.probabilities())
    with pytest.raises(ValueError, match="another T"):
        TimestepSampler(5, "importance", history=2).load_state(sampler.state())


def test_the_module_checkpoints_the_sampler_history_and_loads_checkpoints_without_one():
    from lightning_modules.diffusion_module import SAMPLER_KEY, DiffusionFlowModule

    torch.manual_seed(0)
    glow = Glow(image_size=8, scales=2, steps_per_scale=1, hidden_channels=8,
                joint_prior=lambda shape: DiffusionPrior(shape, tiny_unet, timesteps=8, schedule="cosine"))
    module = DiffusionFlowModule(flow=glow, n_bits=5, bound_estimator="importance").train()
    module.compute_losses(batch_of(torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)))
    assert int(module.timestep_sampler.counts.sum()) == 4  # one L_t per image entered the history
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert int(checkpoint[SAMPLER_KEY]["counts"].sum()) == 4
    assert not any("timestep_sampler" in key for key in checkpoint["state_dict"])  # old checkpoints still load
    seed_mode = DiffusionFlowModule(flow=glow, n_bits=5, loss_mode="seed", bound_estimator="importance")
    assert seed_mode.timestep_sampler.kind == "uniform"  # Alg. 1's estimate, as printed


def test_evaluation_logs_no_frozen_one_step_estimate():
    module = make_module().eval()
    batch = batch_of(torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8))
    with torch.no_grad():
        evaluated = module.compute_losses(batch)
        trained = module.train().compute_losses(batch)
    assert "vlb_bpd" not in evaluated.extra and "nll_estimate_bpd" not in evaluated.extra
    assert {"vlb_bpd", "nll_estimate_bpd"} <= set(trained.extra)


def diffusion_glow(loss_mode="bound", **prior):
    torch.manual_seed(0)
    return Glow(image_size=8, scales=2, steps_per_scale=1, hidden_channels=8,
                joint_prior=lambda shape: DiffusionPrior(shape, tiny_unet, timesteps=8, schedule="cosine",
                                                         loss_mode=loss_mode, **prior))


@pytest.mark.parametrize("loss_mode", ["bound", "seed"])
def test_the_prior_owns_its_training_rule_and_any_density_module_trains_it(loss_mode):
    """The DDPM prior's rule reaches the loss through Glow.training_loss alone, so the
    plain GlowModule (no diffusion code) computes what DiffusionFlowModule does:
    ``bound``: bits per dim of (log|det| - the one-step bound) plus the denoiser's hybrid
    loss of the detached latent; ``seed``: Alg. 1 (-log|det| in bits per dim + L_simple +
    lambda L_vlb), plus the bin volume's constant n_bits."""
    from lightning_modules import GlowModule
    from lightning_modules.diffusion_module import DiffusionFlowModule

    batch = batch_of(torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8))
    outputs = []
    for module_class in (GlowModule, DiffusionFlowModule):
        module = module_class(flow=diffusion_glow(loss_mode), n_bits=5).train()
        torch.manual_seed(3)
        outputs.append(module.compute_losses(batch))
    plain, family = outputs
    assert plain.loss.item() == pytest.approx(family.loss.item(), abs=1e-6)
    assert plain.log_prob == {} and plain.estimated == {8}  # an estimate is not logged as the bound
    extra = family.extra
    if loss_mode == "bound":
        expected = extra["nll_estimate_bpd"] + extra["denoiser_hybrid"]
    else:
        assert "denoiser_hybrid" not in extra
        glow = diffusion_glow(loss_mode)
        torch.manual_seed(3)
        latents, _, logdet = glow.transform(batch.images[8])
        glow.dequantizer(batch.clean[8], 2.0 ** -5, batch.noise[8])
        terms = glow.joint_prior.training_terms(glow.gather_latents(latents))
        expected = (-logdet / (glow.dims * math.log(2.0)) + hybrid_loss(terms, 8, glow.dims, 1e-3)).mean() + 5
    assert family.loss.item() == pytest.approx(expected.item(), abs=1e-5)


def test_a_module_setting_of_the_rule_replaces_the_priors_and_bad_values_are_refused():
    from lightning_modules.diffusion_module import DiffusionFlowModule
    from lightning_modules.errors import ConfigurationError

    module = DiffusionFlowModule(flow=diffusion_glow("bound", bound_estimator="endpoints"), n_bits=5,
                                 loss_mode="seed", vlb_weight=0.5)
    prior = module.diffusion
    assert (prior.loss_mode, prior.vlb_weight, prior.timestep_sampler.kind) == ("seed", 0.5, "uniform")
    with pytest.raises(ConfigurationError, match="loss_mode must be"):
        DiffusionFlowModule(flow=diffusion_glow(), n_bits=5, loss_mode="elbo")
    with pytest.raises(ValueError, match="vlb_weight"):
        diffusion_glow(vlb_weight=-1.0)
