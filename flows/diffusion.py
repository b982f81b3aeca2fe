"""A DDPM as a latent prior (seed 003 sec. 3.3 and ch. 4; Ho et al. 2020; Nichol &
Dhariwal 2021, "improved DDPM"), in pure PyTorch.

:class:`DiffusionPrior` is a :class:`~flows.distributions.LatentPrior`: a Glow takes it
as ``joint_prior`` (the diffusion-augmented flow of seed 003) and the pixel DDPM
baseline (:class:`PixelDiffusion`) is the same prior on images with the discretized
decoder. Time steps are 0-based in the code: index ``t`` in ``0 .. T-1`` is the paper's
step ``t + 1``.

Forward process (eq. 3.12): q(z_t | z_0) = N(sqrt(abar_t) z_0, (1 - abar_t) I) with
alpha_t = 1 - beta_t and **abar_t = prod_{s<=t} alpha_s**. Seed 003 eq. 4.3 prints abar
as the *average* (1/t) sum alpha_s; that is wrong (the closed form of eq. 3.12 is the
product), and it also drops the square roots of eq. 4.5; we implement the product
with the square roots.

Reverse process (eq. 3.13): the denoiser predicts eps and, with a learned variance,
v in [-1, 1] that interpolates the log-variance between log beta_t and log
beta-tilde_t (improved DDPM eq. 15): log Sigma = v' log beta + (1 - v') log beta-tilde,
v' = (v + 1) / 2 (the network's raw output is used unclipped, as in improved-diffusion).

The bound, per sample in nats (``negative_elbo``):

    -log p(z_0) <= L_T + sum_{t=1}^{T-1} L_t + L_0
    L_T = KL(q(z_T | z_0) || N(0, I))                                  (the prior term)
    L_t = KL(q(z_{t-1} | z_t, z_0) || p(z_{t-1} | z_t))             (Gaussian KLs)
    L_0 = -log p(z_0 | z_1)

L_0 is a **continuous** Gaussian density of z_0 for latents (``decoder="continuous"``: a
flow's latent is not 8-bit pixels) and improved DDPM's discretized Gaussian for pixels
(``decoder="discretized"``: the probability of the pixel's bin). L_T depends on z_0, so
it stays in the loss whenever z_0 comes from a flow that trains.

Sampling: ancestral (all T steps) or DDIM (Song et al. 2021; ermongroup/ddim) with S
evenly spaced steps and ``eta`` (0: deterministic ODE, 1 with S = T: the ancestral
sampler with variance beta-tilde). Predicted z_0 are never clipped: latents do not live
in [-1, 1].
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from torch import Tensor, nn

from flows.base import Condition, zero_logdet
from flows.diffusion_schedules import (Schedule, ddim_timesteps, discretized_gaussian_log_likelihood, make_betas,
                                       normal_kl, sum_per_sample)
from flows.distributions import LatentPrior, PriorTraining, gaussian_log_density
from flows.model import Encoding, FlowModel, Objective
from flows.quantization import bin_log_volume, check_n_bits, snap_to_bins
from flows.timestep_sampling import BoundEstimator, TimestepSampler, all_gathered
VarianceKind = Literal["learned", "fixed_small", "fixed_large"]
DecoderKind = Literal["continuous", "discretized"]
# (in_channels, out_channels, image_size) -> the denoiser eps_theta(z_t, t)
DenoiserFactory = Callable[[int, int, int], nn.Module]


LossMode = Literal["seed", "bound"]
PixelLoss = Literal["simple", "hybrid"]


# --- the diffusion prior -------------------------------------------------------------------
class DiffusionPrior(LatentPrior):
    """p(z) of a DDPM over tensors of ``shape`` (C, H, W); ``log_prob`` is the
    variational bound (``exact = False``).

    Args:
        shape: the modelled tensor's shape (a Glow's whole latent: the image's shape).
        denoiser: factory (in_channels, out_channels, image_size) -> eps_theta(z_t, t);
            default :class:`~flows.denoiser.TimeConditionedUNet`.
        timesteps: T (seed 003 Table 5.1: 500; DDPM: 1000).
        schedule: "linear" (DDPM, scaled by 1000 / T) or "cosine" (improved DDPM).
        variance: "learned" (improved DDPM's interpolation; seed 003 Alg. 1 trains it
            with the hybrid loss), "fixed_small" (beta-tilde_t) or "fixed_large" (beta_t).
        decoder: "continuous" (L_0 a Gaussian density, for latents) or "discretized"
            (L_0 the probability of a pixel's bin, data in [-1, 1] with ``bins`` bins).
        sampling_steps: None: ancestral sampling over all T steps; S: DDIM with S steps.
        eta: DDIM's eta (0: deterministic).
        clip_denoised: clip the predicted z_0 to [-1, 1] when sampling and evaluating the
            bound (pixels, as improved-diffusion; never for latents, which are unbounded).
        gaussian_residual: the network predicts the residual from the optimal denoiser
            of a standard normal z_0: eps = sqrt(1 - abar_t) z_t + net_eps and (learned
            variance) v = 1 + net_v, i.e. log Sigma = log beta_t, the exact reverse
            variance of N(0, I) data. The same model class (any eps is still reachable),
            but with the zero-init output layer an untrained prior *is* N(0, I): a
            diffusion-augmented flow starts as a Glow with a standard normal prior, and
            the DDPM learns what the flow leaves non-Gaussian (seed 003 sec. 4.1's
            motivation). Without it, an untrained DDPM's samples divide noise by
            sqrt(abar_T) ~ 1e-3 and take many thousand steps to become usable. Off for
            pixels (the DDPM baseline as published).

    How it trains as the prior of a flow's latent (:meth:`training_estimate`, the
    diffusion-augmented flow of seed 003):

        loss_mode:
            * ``"bound"`` (default): the flow and the DDPM minimize the bound itself at
              weight 1 (-log|det| + T L_t + L_T, bits per dim: ``nll_estimate_bpd``), and
              the denoiser also minimizes the hybrid loss of the detached latent (the
              term ``denoiser_hybrid``; INDM's FID mode), so sample quality does not rest
              on the bound's high-variance gradient alone.
            * ``"seed"``: Alg. 1 as printed, corrected: L_simple + lambda L_vlb - log|det|
              (the seed adds +log|det|, which would reward collapsing the latent; the
              likelihood needs -log|det|). Units: L_simple per dimension, L_vlb and the
              log-det in bits per dimension; the loss also carries the constant n_bits of
              the bin volume, as the bound mode's does, so that both read on one scale.
              Not a likelihood: the flow can trade a larger latent (log-det down by log s
              per dim) against lambda-weighted bound terms, so watch ``nll_bpd``.
        vlb_weight: lambda of the hybrid loss (improved DDPM and seed 003: 0.001).
        bound_estimator: how ``loss_mode: bound`` estimates the bound each step
            (:class:`TimestepSampler`): ``"importance"`` (default: L_0 and L_T for every
            image, one t in 1..T-1 drawn by the second moment of L_t; chosen by
            benchmarks/diffusion_bound_estimators.py, README "Diffusion-flow training
            estimate": per-image standard deviation 0.48 bits/dim against 13.2 for
            endpoints and 29.8 for uniform), ``"endpoints"`` (the same with t uniform) or
            ``"uniform"`` (T L_t at t in 0..T-1; ``loss_mode: seed`` always uses it, as
            Alg. 1 does). The importance sampler's history is training state, not in the
            state_dict: a LightningModule saves :attr:`timestep_sampler` in its checkpoints.
    """

    exact = False

    def __init__(self, shape: tuple[int, int, int], denoiser: DenoiserFactory | None = None,
                 timesteps: int = 1000, schedule: Schedule = "linear", variance: VarianceKind = "learned",
                 decoder: DecoderKind = "continuous", bins: int = 256, sampling_steps: int | None = None,
                 eta: float = 0.0, clip_denoised: bool = False, gaussian_residual: bool = True,
                 loss_mode: LossMode = "bound", vlb_weight: float = 1e-3,
                 bound_estimator: BoundEstimator = "importance") -> None:
        super().__init__()
        if variance not in ("learned", "fixed_small", "fixed_large"):
            raise ValueError(f"variance must be 'learned', 'fixed_small' or 'fixed_large', got {variance!r}")
        if decoder not in ("continuous", "discretized"):
            raise ValueError(f"decoder must be 'continuous' or 'discretized', got {decoder!r}")
        if sampling_steps is not None:
            ddim_timesteps(timesteps, sampling_steps)  # fails early on a bad S
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.shape = tuple(int(s) for s in shape)
        self.timesteps = timesteps
        self.schedule = schedule
        self.variance = variance
        self.decoder = decoder
        self.bins = bins
        self.sampling_steps = sampling_steps
        self.eta = eta
        self.clip_denoised = clip_denoised
        self.gaussian_residual = gaussian_residual
        channels, size = self.shape[0], self.shape[1]
        out_channels = 2 * channels if variance == "learned" else channels
        if denoiser is None:
            from flows.denoiser import TimeConditionedUNet
            denoiser = TimeConditionedUNet
        self.denoiser = denoiser(channels, out_channels, size)

        betas = make_betas(schedule, timesteps)
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, dim=0)  # a product (seed 003 eq. 4.3 prints an average)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        schedule_buffers = {
            "betas": betas, "abar": abar, "abar_prev": abar_prev,
            "sqrt_abar": abar.sqrt(), "sqrt_one_minus_abar": (1.0 - abar).sqrt(),
            # beta-tilde_0 is 0; improved-diffusion clips its log to beta-tilde_1's.
            "posterior_log_variance": torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
            "posterior_mean_z0": betas * abar_prev.sqrt() / (1.0 - abar),
            "posterior_mean_zt": (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar),
            "log_betas": torch.log(betas),
        }
        for name, value in schedule_buffers.items():
            # float64, not saved: a function of the settings, and immune to .half().
            self.register_buffer(name, value, persistent=False)
        # The same abar as Python floats: DDIM's per-step constants without reading the
        # (possibly GPU) buffer back at every step.
        self.abar_values: list[float] = abar.tolist()
        self.configure_training(loss_mode, vlb_weight, bound_estimator)

    def configure_training(self, loss_mode: LossMode, vlb_weight: float, bound_estimator: BoundEstimator) -> None:
        """Set how :meth:`training_estimate` trains (the class docstring's arguments); a
        new estimator starts with an empty history."""
        if loss_mode not in ("seed", "bound"):
            raise ValueError(f"loss_mode must be 'seed' or 'bound', got {loss_mode!r}")
        if not vlb_weight >= 0:
            raise ValueError(f"vlb_weight (lambda of the hybrid loss) must be >= 0, got {vlb_weight}")
        self.loss_mode = loss_mode
        self.vlb_weight = float(vlb_weight)
        self.bound_estimator = bound_estimator
        device = self.betas.device
        self.timestep_sampler = TimestepSampler(self.timesteps,
                                                bound_estimator if loss_mode == "bound" else "uniform").to(device)

    # --- pieces ---------------------------------------------------------------------------
    def compute_dtype(self) -> torch.dtype:
        """float32, or float64 for a float64 model: the bound's terms never run in half
        precision (the denoiser itself may, under autocast)."""
        return torch.promote_types(next(self.denoiser.parameters()).dtype, torch.float32)

    def _at(self, name: str, t: Tensor) -> Tensor:
        """Schedule entry ``name`` at indices ``t`` [B], shaped [B, 1, 1, 1]."""
        value = getattr(self, name).to(t.device)[t].to(self.compute_dtype())
        return value.view(-1, *([1] * len(self.shape)))

    def _timesteps(self, t: int | Tensor, n: int, device) -> Tensor:
        if isinstance(t, Tensor):
            return t.to(device=device, dtype=torch.long)
        return torch.full((n,), int(t), device=device, dtype=torch.long)

    def q_sample(self, z0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps."""
        return self._at("sqrt_abar", t) * z0 + self._at("sqrt_one_minus_abar", t) * noise

    def q_posterior(self, z0: Tensor, zt: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of q(z_{t-1} | z_t, z_0)."""
        mean = self._at("posterior_mean_z0", t) * z0 + self._at("posterior_mean_zt", t) * zt
        return mean, self._at("posterior_log_variance", t).expand_as(zt)

    def predict_z0(self, zt: Tensor, t: Tensor, eps: Tensor, clip: bool = False) -> Tensor:
        z0 = (zt - self._at("sqrt_one_minus_abar", t) * eps) / self._at("sqrt_abar", t)
        return z0.clamp(-1.0, 1.0) if clip else z0

    def predict_noise(self, zt: Tensor, t: Tensor) -> tuple[Tensor, Tensor | None]:
        """(eps, v): the denoiser's outputs in float32 (v None without a learned variance)."""
        out = self.denoiser(zt, t).to(self.compute_dtype())
        eps, v = out.chunk(2, dim=1) if self.variance == "learned" else (out, None)
        if self.gaussian_residual:
            eps = eps + self._at("sqrt_one_minus_abar", t) * zt.to(eps.dtype)
            v = None if v is None else v + 1.0
        return eps, v

    def reverse_log_variance(self, v: Tensor | None, t: Tensor, like: Tensor) -> Tensor:
        small = self._at("posterior_log_variance", t)
        large = self._at("log_betas", t)
        if self.variance == "fixed_small":
            return small.expand_as(like)
        if self.variance == "fixed_large":
            # DDPM's fixed_large uses beta-tilde_1 at t = 0 (beta_0 would give an L_0 too wide).
            large = torch.where((t == 0).view_as(large), small, large)
            return large.expand_as(like)
        fraction = (v + 1.0) / 2.0
        return fraction * large + (1.0 - fraction) * small

    def p_mean_variance(self, zt: Tensor, t: Tensor, eps: Tensor, v: Tensor | None,
                        clip: bool = False) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of p(z_{t-1} | z_t) from the denoiser's outputs."""
        mean, _ = self.q_posterior(self.predict_z0(zt, t, eps, clip), zt, t)
        return mean, self.reverse_log_variance(v, t, zt)

    def prior_term(self, z0: Tensor) -> Tensor:
        """L_T = KL(q(z_T | z_0) || N(0, I)) per sample, nats."""
        t = self._timesteps(self.timesteps - 1, z0.shape[0], z0.device)
        mean = self._at("sqrt_abar", t) * z0.to(self.compute_dtype())
        log_var = torch.log(1.0 - self._at("abar", t)).expand_as(mean)
        return sum_per_sample(normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(mean)))

    def _term(self, z0: Tensor, zt: Tensor, t: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
        """L_t per sample in nats: the KL for t > 0, -log p(z_0 | z_1) for t = 0."""
        true_mean, true_log_var = self.q_posterior(z0, zt, t)
        kl = sum_per_sample(normal_kl(true_mean, true_log_var, mean, log_var))
        if self.decoder == "continuous":
            nll = -sum_per_sample(gaussian_log_density(z0, mean, log_var))
        else:
            nll = -sum_per_sample(discretized_gaussian_log_likelihood(z0, mean, log_var, self.bins))
        return torch.where(t == 0, nll, kl)

    def training_terms(self, z0: Tensor, t: Tensor | None = None, noise: Tensor | None = None) -> dict[str, Tensor]:
        """One random time step per sample (uniform), one denoiser pass. Per sample:

        * ``mse``: L_simple, ||eps - eps_theta||^2 averaged over dimensions;
        * ``vlb_term``: L_t in nats (gradients to the denoiser's eps and v, and to z_0);
        * ``vlb_term_frozen_mean``: the same with eps_theta detached, so it trains only
          the variance (improved DDPM's hybrid loss, which keeps L_simple in charge of
          the mean);
        * ``prior``: L_T in nats;
        * ``t``: the time indices.
        ``T * vlb_term + prior`` is an unbiased estimate of the negative ELBO."""
        z0 = z0.to(self.compute_dtype())
        n = z0.shape[0]
        if t is None:
            t = torch.randint(0, self.timesteps, (n,), device=z0.device)
        noise = torch.randn_like(z0) if noise is None else noise
        zt = self.q_sample(z0, t, noise)
        eps, v = self.predict_noise(zt, t)
        mean, log_var = self.p_mean_variance(zt, t, eps, v)
        frozen_mean, _ = self.p_mean_variance(zt, t, eps.detach(), v)
        return {"mse": (noise - eps).pow(2).flatten(1).mean(dim=1),
                "vlb_term": self._term(z0, zt, t, mean, log_var),
                "vlb_term_frozen_mean": self._term(z0, zt, t, frozen_mean, log_var),
                "prior": self.prior_term(z0), "t": t}

    def estimate_negative_elbo(self, z0: Tensor, sampler: TimestepSampler) -> dict[str, Tensor]:
        """An unbiased estimate of :meth:`negative_elbo` per sample (nats) from one
        denoiser call: L_T + L_t / p(t) with t ~ ``sampler``, plus L_0 of every image
        where the sampler leaves t = 0 out (the batch doubled, in the same call).
        Returns ``negative_elbo`` (the estimate), ``sampled_term`` (L_t, for the
        sampler's history), ``t``, ``weight`` (1 / p(t)), and ``mse`` (L_simple at t)."""
        z0 = z0.to(self.compute_dtype())
        n = z0.shape[0]
        t, weight = sampler.sample(n, z0.device)
        with_first = sampler.first == 1
        if with_first:
            terms = self.training_terms(torch.cat([z0, z0]), torch.cat([t, torch.zeros_like(t)]))
        else:
            terms = self.training_terms(z0, t)
        sampled = terms["vlb_term"][:n]
        estimate = terms["prior"][:n] + weight.to(sampled.dtype) * sampled
        if with_first:
            estimate = estimate + terms["vlb_term"][n:]
        return {"negative_elbo": estimate, "sampled_term": sampled, "t": t, "weight": weight,
                "mse": terms["mse"][:n]}

    def negative_elbo(self, z0: Tensor, per_term: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The full bound L_T + sum_t L_t per sample in nats, each L_t with its own draw of
        z_t ~ q(z_t | z_0) (T denoiser passes: for evaluation; improved-diffusion's
        ``calc_bpd_loop``). With ``per_term``, also the [B, T] terms."""
        z0 = z0.to(self.compute_dtype())
        terms = []
        for index in reversed(range(self.timesteps)):
            t = self._timesteps(index, z0.shape[0], z0.device)
            zt = self.q_sample(z0, t, torch.randn_like(z0))
            eps, v = self.predict_noise(zt, t)
            mean, log_var = self.p_mean_variance(zt, t, eps, v, self.clip_denoised)
            terms.append(self._term(z0, zt, t, mean, log_var))
        terms = torch.stack(terms[::-1], dim=1)
        total = terms.sum(dim=1) + self.prior_term(z0)
        return (total, terms) if per_term else total

    def training_estimate(self, z: Tensor, cond: Condition = None) -> PriorTraining:
        """One denoiser call's estimate of the bound, per ``loss_mode`` (class docstring).
        ``extra``: ``mse`` (L_simple) and, in training, ``vlb_bpd`` (the estimate of the
        bound of z in bits per dim of z). In training mode the importance sampler's
        history takes the drawn L_t (all-gathered, so every process keeps the same)."""
        self._check_shape(z)
        per_dim_bits = 1.0 / (math.prod(self.shape) * math.log(2.0))
        dims = math.prod(self.shape)
        if self.loss_mode == "seed":
            terms = self.training_terms(z)
            negative_elbo = self.timesteps * terms["vlb_term"] + terms["prior"]
            surrogate = hybrid_loss(terms, self.timesteps, dims, self.vlb_weight) * (dims * math.log(2.0))
            estimate = PriorTraining(-negative_elbo, surrogate, {}, {"mse": terms["mse"].mean()}, estimated=True)
        else:
            drawn = self.estimate_negative_elbo(z, self.timestep_sampler)
            negative_elbo = drawn["negative_elbo"]
            detached = self.training_terms(z.detach())
            denoiser_loss = hybrid_loss(detached, self.timesteps, dims, self.vlb_weight).mean()
            estimate = PriorTraining(-negative_elbo, None, {"denoiser_hybrid": denoiser_loss},
                                     {"mse": detached["mse"].mean()}, estimated=True)
            if self.training and self.timestep_sampler.kind == "importance":
                self.timestep_sampler.update(all_gathered(drawn["t"]), all_gathered(drawn["sampled_term"].detach()))
        if self.training:
            estimate.extra["vlb_bpd"] = (negative_elbo * per_dim_bits).mean()
        return estimate

    # --- the prior protocol ----------------------------------------------------------------
    def log_prob(self, z: Tensor, cond: Condition = None) -> Tensor:
        """The variational lower bound on log p(z), nats per sample (the discretized
        decoder's: a lower bound on the log-probability of the bins)."""
        self._check_shape(z)
        return -self.negative_elbo(z)

    def sample(self, n: int, cond: Condition = None, temperature: float = 1.0) -> Tensor:
        """n draws: DDIM with ``sampling_steps`` (and ``eta``) when set, else ancestral.
        ``temperature`` scales z_T and every step's noise."""
        if self.sampling_steps is not None:
            return self.sample_ddim(n, self.sampling_steps, self.eta, temperature)
        return self.sample_ancestral(n, temperature)

    def compile_sampler(self, **options) -> bool:
        """Compile the denoiser step that ancestral and DDIM sampling repeat (same shapes
        at every step, the timestep a tensor: one graph)."""
        self.predict_noise = torch.compile(self.predict_noise, **options)
        return True

    def _check_shape(self, z: Tensor) -> None:
        if tuple(z.shape[1:]) != self.shape:
            raise ValueError(f"this diffusion prior models tensors of shape [B, {', '.join(map(str, self.shape))}], "
                             f"got {list(z.shape)}")

    def _noise(self, n: int) -> Tensor:
        return torch.randn(n, *self.shape, device=self._device(), dtype=self.compute_dtype())

    @torch.no_grad()
    def sample_ancestral(self, n: int, temperature: float = 1.0, z_T: Tensor | None = None) -> Tensor:
        """Seed 003 Alg. 2: z_T ~ N(0, I), then z_{t-1} ~ p(z_{t-1} | z_t) for t = T..1
        (no noise at the last step, whose mean is the sample)."""
        z = temperature * self._noise(n) if z_T is None else z_T.to(self.compute_dtype())
        for index in reversed(range(self.timesteps)):
            t = self._timesteps(index, n, z.device)
            eps, v = self.predict_noise(z, t)
            mean, log_var = self.p_mean_variance(z, t, eps, v, self.clip_denoised)
            if index > 0:
                z = mean + temperature * torch.exp(0.5 * log_var) * torch.randn_like(z)
            else:
                z = mean
        return z

    def _ddim_step(self, z: Tensor, t: int, t_next: int, eta: float, temperature: float) -> Tensor:
        n = z.shape[0]
        t_tensor = self._timesteps(t, n, z.device)
        eps, _ = self.predict_noise(z, t_tensor)
        abar = self.abar_values[t]
        abar_next = self.abar_values[t_next] if t_next >= 0 else 1.0
        z0 = (z - math.sqrt(1.0 - abar) * eps) / math.sqrt(abar)
        if self.clip_denoised:  # and the eps that the clipped z_0 implies (improved-diffusion)
            z0 = z0.clamp(-1.0, 1.0)
            eps = (z - math.sqrt(abar) * z0) / math.sqrt(1.0 - abar)
        sigma = eta * math.sqrt((1.0 - abar_next) / (1.0 - abar) * (1.0 - abar / abar_next))
        z_next = math.sqrt(abar_next) * z0 + math.sqrt(max(1.0 - abar_next - sigma ** 2, 0.0)) * eps
        if sigma > 0:
            z_next = z_next + temperature * sigma * torch.randn_like(z)
        return z_next

    @torch.no_grad()
    def sample_ddim(self, n: int, steps: int, eta: float = 0.0, temperature: float = 1.0,
                    z_T: Tensor | None = None) -> Tensor:
        """DDIM (Song et al. 2021 eq. 12) over S evenly spaced steps. eta = 0: the
        deterministic ODE sampler; eta = 1 and S = T: ancestral sampling with variance
        beta-tilde (same noise, same samples)."""
        z = temperature * self._noise(n) if z_T is None else z_T.to(self.compute_dtype())
        sequence = ddim_timesteps(self.timesteps, steps)
        for t, t_next in zip(sequence, sequence[1:] + [-1]):
            z = self._ddim_step(z, t, t_next, eta, temperature)
        return z

    @torch.no_grad()
    def ddim_encode(self, z0: Tensor, steps: int) -> Tensor:
        """z_0 -> z_T along the deterministic DDIM ODE (eta = 0), S steps: the inverse of
        ``sample_ddim(eta=0, z_T=...)`` up to the discretization error. Each step uses
        eps_theta at the point it starts from and the time it goes to."""
        z = z0.to(self.compute_dtype())
        sequence = ddim_timesteps(self.timesteps, steps)[::-1]
        previous = -1
        for t in sequence:
            t_tensor = self._timesteps(t, z.shape[0], z.device)
            eps, _ = self.predict_noise(z, t_tensor)
            abar_prev = self.abar_values[previous] if previous >= 0 else 1.0
            abar = self.abar_values[t]
            z0_pred = (z - math.sqrt(1.0 - abar_prev) * eps) / math.sqrt(abar_prev)
            z = math.sqrt(abar) * z0_pred + math.sqrt(1.0 - abar) * eps
            previous = t
        return z

    def extra_repr(self) -> str:
        return (f"shape={self.shape}, timesteps={self.timesteps}, schedule={self.schedule}, "
                f"variance={self.variance}, decoder={self.decoder}, sampling_steps={self.sampling_steps}, "
                f"eta={self.eta}, gaussian_residual={self.gaussian_residual}")


def hybrid_loss(terms: dict[str, Tensor], timesteps: int, dims: int, vlb_weight: float) -> Tensor:
    """Improved DDPM's L_hybrid = L_simple + lambda L_vlb per sample (seed 003 Alg. 1,
    lambda = 0.001), on one scale: L_simple is the squared error per dimension and L_vlb
    the unbiased one-step estimate T L_t + L_T of the whole bound, in bits per dimension
    (improved-diffusion's ``vb`` times T / 1000 at lambda = 0.001 is the same number).
    L_t uses the detached eps, so L_vlb trains the variance and L_simple the mean."""
    vlb_bpd = (timesteps * terms["vlb_term_frozen_mean"] + terms["prior"]) / (dims * math.log(2.0))
    return terms["mse"] + vlb_weight * vlb_bpd


class PixelDiffusion(FlowModel):
    """The pixel-space DDPM baseline of seed 003 Tables 5.3/5.4 under the whole-model
    contract: a DDPM on images scaled to [-1, 1], with improved DDPM's discretized
    Gaussian decoder, so its bound is on the probability of the image's bins.

    ``encode(x)``: x (dequantized, in [-0.5, 0.5]) is its own latent (log-det 0), and
    ``log_prior`` is the bound on log P(bins of x) plus D n_bits log 2: the log-density
    of the model's uniformly dequantized form, so Glow's bits-per-dim formula gives the
    bound on the discrete data's bits per dim. ``exact`` is False.

    Args:
        in_channels, image_size, n_bits: the images (n_bits must match the module's).
        denoiser: factory (in_channels, out_channels, image_size) -> eps_theta.
        timesteps, schedule, variance, sampling_steps, eta: :class:`DiffusionPrior`'s
            (DDPM: T = 1000, linear, fixed_large).
        clip_denoised: clip predicted images to [-1, 1] when sampling and evaluating.
        loss: what :meth:`training_loss` minimizes: ``"simple"`` (DDPM's L_simple, with a
            fixed variance) or ``"hybrid"`` (improved DDPM, with ``variance: learned``);
            None (default): the one that trains ``variance``.
        vlb_weight: lambda of the hybrid loss (improved DDPM: 0.001).
    """

    def __init__(self, *, in_channels: int = 3, image_size: int = 32, n_bits: int = 8,
                 denoiser: DenoiserFactory | None = None, timesteps: int = 1000, schedule: Schedule = "linear",
                 variance: VarianceKind = "fixed_large", sampling_steps: int | None = None, eta: float = 0.0,
                 clip_denoised: bool = True, loss: PixelLoss | None = None, vlb_weight: float = 1e-3) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.image_size = image_size
        self.n_bits = check_n_bits(n_bits)
        self.diffusion = DiffusionPrior((in_channels, image_size, image_size), denoiser, timesteps, schedule,
                                        variance, "discretized", 2 ** n_bits, sampling_steps, eta, clip_denoised,
                                        gaussian_residual=False)
        self.configure_training(loss or ("hybrid" if variance == "learned" else "simple"), vlb_weight)

    def configure_training(self, loss: PixelLoss, vlb_weight: float) -> None:
        """Set what :meth:`training_loss` minimizes (the class docstring's ``loss`` and
        ``vlb_weight``), checked against the variance it must train."""
        if loss not in ("simple", "hybrid"):
            raise ValueError(f"loss must be 'simple' or 'hybrid', got {loss!r}")
        if loss == "hybrid" and self.diffusion.variance != "learned":
            raise ValueError("the hybrid loss trains a learned variance: set the model's variance: learned")
        if loss == "simple" and self.diffusion.variance == "learned":
            raise ValueError("L_simple does not train the variance: use variance fixed_large or fixed_small, "
                             "or loss: hybrid")
        if not vlb_weight >= 0:
            raise ValueError(f"vlb_weight (lambda of the hybrid loss) must be >= 0, got {vlb_weight}")
        self.loss = loss
        self.vlb_weight = float(vlb_weight)

    def training_loss(self, clean: Tensor, cond: Condition = None, *, n_bits: int,
                      noise: Tensor | None = None) -> Objective:
        """L_simple or L_hybrid at one random step per image (``noise`` is unused: the
        bound is on the bins themselves). ``log_prob`` is the one-step estimate of the
        bound (``estimated``); ``extra``: ``mse`` and, in training, ``vlb_bpd``."""
        if n_bits != self.n_bits:
            raise ValueError(f"this pixel DDPM models {self.n_bits}-bit images, the data have {n_bits} bits: "
                             "set the model's n_bits and the module's to the same value")
        diffusion, dims = self.diffusion, self.dims
        terms = diffusion.training_terms(self.to_diffusion_space(clean))
        negative_elbo = diffusion.timesteps * terms["vlb_term"] + terms["prior"]  # of the bins' probability
        if self.loss == "simple":
            loss = terms["mse"]
        else:
            loss = hybrid_loss(terms, diffusion.timesteps, dims, self.vlb_weight)
        extra = {"mse": terms["mse"].mean()}
        if self.training:
            extra["vlb_bpd"] = (negative_elbo / (dims * math.log(2.0))).mean()
        log_density = -negative_elbo - bin_log_volume(dims, n_bits)  # as encode's: Glow's bpd formula applies
        return Objective(loss.mean(), log_density, self.exact, dims, None, {}, extra, estimated=True)

    @property
    def display_name(self) -> str:
        return f"PixelDDPM{self.image_size}"

    def to_diffusion_space(self, x: Tensor) -> Tensor:
        """[-0.5, 0.5] model space -> the centres of the n-bit bins in [-1, 1]."""
        return 2.0 * snap_to_bins(x, self.n_bits)

    def encode(self, x: Tensor, cond: Condition = None) -> Encoding:
        self.diffusion._check_shape(x)
        log_bins = -self.diffusion.negative_elbo(self.to_diffusion_space(x))
        log_density = log_bins - bin_log_volume(self.dims, self.n_bits)
        return Encoding([x], zero_logdet(x), log_density, exact=self.exact)

    def decode(self, latents: list[Tensor | None], cond: Condition = None, temperature: float = 1.0) -> Tensor:
        if latents[0] is None:
            raise ValueError("a pixel DDPM's latent is the image itself; use sample(n) to draw one")
        return latents[0]

    @torch.no_grad()
    def sample(self, n: int, cond: Condition = None, temperature: float = 1.0) -> Tensor:
        return self.diffusion.sample(n, cond, temperature) / 2.0
