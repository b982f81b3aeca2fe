"""Seed 003's diffusion-augmented flow and its pixel DDPM baseline as LightningModules
(the NSF baseline is a :class:`~lightning_modules.GlowModule` with spline couplings).

Logged (``train/``, ``val/``, ``test/``), every number in stated units:

* ``nll_bpd_R`` (val/test only): the honest number, an **upper bound** on the negative
  log-likelihood in bits per dim, (-log|det df/dx| + the DDPM's full negative ELBO of
  z_0 over all T steps + D log 2^n_bits) / (D log 2) (for the pixel DDPM: its bound on
  the bins' probability). It costs T denoiser passes per batch: evaluation only; limit
  it with ``trainer.limit_val_batches`` where that is too slow.
* ``loss``: what the module minimizes (see ``loss_mode``), not a likelihood.
* ``mse``: L_simple; ``logdet_bpd``: -log|det| / (D log 2) (flow only).
* ``vlb_bpd`` and ``nll_estimate_bpd`` (training only): the unbiased one-step estimates
  of the DDPM's bound of z_0 and of ``nll_bpd``, with fresh time steps every step. At
  evaluation they are not logged: the draws there are fixed by ``evaluation_seed`` (so
  that epochs compare), which would make them one frozen sample of a noisy estimate,
  and ``nll_bpd`` gives the quantity itself.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from flows.diffusion import BoundEstimator, DiffusionPrior, PixelDiffusion, TimestepSampler, hybrid_loss
from flows.glow import Glow
from lightning_modules.base import Batch, FlowModule, LossOutput
from lightning_modules.errors import ConfigurationError
from lightning_modules.parts import OptimizerSettings, Part

LN2 = math.log(2.0)
SAMPLER_KEY = "timestep_sampler"
LossMode = Literal["seed", "bound"]


class _DiffusionModule(FlowModule):
    """What both diffusion modules share: the bound's name and the sampler."""

    bound_metric = "nll_bpd"

    def check_vlb_weight(self, vlb_weight: float) -> None:
        if not vlb_weight >= 0:
            raise ConfigurationError(f"vlb_weight (lambda of the hybrid loss) must be >= 0, got {vlb_weight}")


class DiffusionFlowModule(_DiffusionModule):
    """A Glow whose whole latent z_0 = f(x) has a DDPM prior (seed 003 ch. 4).

    Args:
        flow: a :class:`~flows.Glow` with ``joint_prior`` a
            :class:`~flows.diffusion.DiffusionPrior` (seed 003 Table 5.1 in
            ``experiments/diffusion_flow_*.yaml``).
        loss_mode:
            * ``"seed"``: Alg. 1 as printed, corrected: L_simple + lambda L_vlb - log|det|
              (the seed adds +log|det|, which would reward collapsing the latent; the
              likelihood needs -log|det|). Units: L_simple per dimension, L_vlb and the
              log-det in bits per dimension. Not a likelihood: the flow can trade a
              larger latent (log-det down by log s per dim) against lambda-weighted bound
              terms, so watch ``nll_bpd``.
            * ``"bound"`` (default): the flow and the DDPM minimize the bound itself at
              weight 1 (-log|det| + T L_t + L_T, bits per dim: ``nll_estimate_bpd``), and
              the denoiser also minimizes the hybrid loss of the detached latent (INDM's
              FID mode), so sample quality does not rest on the bound's high-variance
              gradient alone.
        vlb_weight: lambda of the hybrid loss (improved DDPM and seed 003: 0.001).
        bound_estimator: how ``loss_mode: bound`` estimates the DDPM's bound each step
            (:class:`~flows.diffusion.TimestepSampler`): ``"importance"`` (default: L_0
            and L_T for every image, one t in 1..T-1 drawn by the second moment of
            L_t; chosen by benchmarks/diffusion_bound_estimators.py, README
            "Diffusion-flow training estimate": per-image standard deviation 0.48
            bits/dim against 13.2 for endpoints and 29.8 for uniform), ``"endpoints"``
            (the same with t uniform) or ``"uniform"`` (T L_t at t in 0..T-1, the
            estimate before; ``loss_mode: seed`` always uses it, as Alg. 1 does).
        flow_optimizer, diffusion_optimizer: the Glow's and the DDPM's Adam groups.
    The remaining args are :class:`FlowModule`'s.
    """

    def __init__(self, *, flow: Glow, loss_mode: LossMode = "bound", vlb_weight: float = 1e-3,
                 bound_estimator: BoundEstimator = "importance",
                 flow_optimizer: OptimizerSettings | None = None,
                 diffusion_optimizer: OptimizerSettings | None = None, grad_clip_norm: float | None = 1.0,
                 **training) -> None:
        super().__init__(grad_clip_norm=grad_clip_norm, **training)
        self.save_config()
        if not isinstance(getattr(flow, "joint_prior", None), DiffusionPrior):
            raise ConfigurationError(
                "DiffusionFlowModule needs a Glow whose joint_prior is a DDPM: set flow.init_args.joint_prior: "
                "{class_path: flows.diffusion.DiffusionPrior, init_args: {...}} (see "
                "experiments/quick_diffusion_flow.yaml)")
        if loss_mode not in ("seed", "bound"):
            raise ConfigurationError(f"loss_mode must be 'seed' or 'bound', got {loss_mode!r}")
        self.check_vlb_weight(vlb_weight)
        self.model = flow
        self.loss_mode = loss_mode
        self.vlb_weight = vlb_weight
        self.timestep_sampler = TimestepSampler(flow.joint_prior.timesteps,
                                                bound_estimator if loss_mode == "bound" else "uniform")
        # Seed 003 sec. 4.3 names Adam and no rate: 1e-3 for the flow, DDPM's 2e-4.
        self.settings = {"flow": flow_optimizer or OptimizerSettings.adam(1e-3),
                         "diffusion": diffusion_optimizer or OptimizerSettings.adam(2e-4)}
        self.load_parts()

    @property
    def diffusion(self) -> DiffusionPrior:
        return self.model.joint_prior

    @property
    def model_name(self) -> str:
        return f"DiffusionFlow{self.resolution}"

    def parts(self) -> list[Part]:
        return [Part("flow", self.model.scales, self.settings["flow"], ["model.scales."]),
                Part("diffusion", self.model.joint_prior, self.settings["diffusion"], ["model.joint_prior."])]

    def compute_losses(self, batch: Batch) -> LossOutput:
        x = batch.images[self.resolution]
        latents, _, logdet = self.model.transform(x)
        z0 = self.model.gather_latents(latents)
        dims, timesteps = self.model.dims, self.diffusion.timesteps
        per_dim_bits = 1.0 / (dims * LN2)
        logdet_bpd = -logdet * per_dim_bits
        extra = {"logdet_bpd": logdet_bpd.mean()}
        if self.loss_mode == "seed":
            terms = self.diffusion.training_terms(z0)
            loss = hybrid_loss(terms, timesteps, dims, self.vlb_weight) + logdet_bpd
            vlb_bpd = (timesteps * terms["vlb_term"] + terms["prior"]) * per_dim_bits
            extra["mse"] = terms["mse"].mean()
        else:
            estimate = self.diffusion.estimate_negative_elbo(z0, self.timestep_sampler)
            vlb_bpd = estimate["negative_elbo"] * per_dim_bits
            detached = self.diffusion.training_terms(z0.detach())
            loss = logdet_bpd + vlb_bpd + self.n_bits + hybrid_loss(detached, timesteps, dims, self.vlb_weight)
            extra["mse"] = detached["mse"].mean()
            if self.training:
                self._update_sampler(estimate["t"], estimate["sampled_term"])
        if self.training:
            extra["vlb_bpd"] = vlb_bpd.mean()
            extra["nll_estimate_bpd"] = (logdet_bpd + vlb_bpd).mean() + self.n_bits  # + D log 2^n / (D log 2)
        return LossOutput(loss.mean(), {}, {self.resolution: dims}, {self.resolution: False}, extra,
                          batch_size=x.shape[0])

    @torch.no_grad()
    def evaluation_log_probs(self, batch: Batch) -> dict[int, Tensor]:
        """The full bound: T denoiser passes (evaluation only)."""
        latents, _, logdet = self.model.transform(batch.images[self.resolution])
        return {self.resolution: logdet - self.diffusion.negative_elbo(self.model.gather_latents(latents))}

    def _update_sampler(self, t: Tensor, terms: Tensor) -> None:
        if self.timestep_sampler.kind != "importance":
            return
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and torch.distributed.get_world_size() > 1:  # every rank keeps the same history
            t, terms = self.all_gather(t).flatten(), self.all_gather(terms.detach()).flatten()
        self.timestep_sampler.update(t, terms)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[SAMPLER_KEY] = self.timestep_sampler.state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if SAMPLER_KEY in checkpoint:  # older checkpoints have none: the history starts empty
            self.timestep_sampler.load_state(checkpoint[SAMPLER_KEY])


class PixelDiffusionModule(_DiffusionModule):
    """The pixel DDPM baseline (seed 003 Tables 5.3/5.4; Ho et al. 2020).

    Args:
        model: a :class:`~flows.diffusion.PixelDiffusion` (T = 1000).
        loss: "simple" (DDPM's L_simple, with a fixed variance) or "hybrid" (improved
            DDPM, with ``variance: learned``).
        vlb_weight: lambda of the hybrid loss.
        optimizer: Adam (DDPM: 2e-4).
    The remaining args are :class:`FlowModule`'s; ``n_bits`` must equal the model's.
    """

    def __init__(self, *, model: PixelDiffusion, loss: Literal["simple", "hybrid"] = "simple",
                 vlb_weight: float = 1e-3, optimizer: OptimizerSettings | None = None,
                 grad_clip_norm: float | None = 1.0, **training) -> None:
        super().__init__(grad_clip_norm=grad_clip_norm, **training)
        self.save_config()
        if loss not in ("simple", "hybrid"):
            raise ConfigurationError(f"loss must be 'simple' or 'hybrid', got {loss!r}")
        if loss == "hybrid" and model.diffusion.variance != "learned":
            raise ConfigurationError("the hybrid loss trains a learned variance: set model.init_args.variance: learned")
        if loss == "simple" and model.diffusion.variance == "learned":
            raise ConfigurationError("L_simple does not train the variance: use variance fixed_large or "
                                     "fixed_small, or loss: hybrid")
        if model.n_bits != self.n_bits:
            raise ConfigurationError(f"the model's n_bits ({model.n_bits}) differs from the module's ({self.n_bits}); "
                                     "set both to the same value")
        self.check_vlb_weight(vlb_weight)
        self.model = model
        self.loss = loss
        self.vlb_weight = vlb_weight
        self.optimizer_settings = optimizer or OptimizerSettings.adam(2e-4)  # DDPM
        self.load_parts()

    def compute_losses(self, batch: Batch) -> LossOutput:
        diffusion, dims = self.model.diffusion, self.model.dims
        data = self.model.to_diffusion_space(batch.clean[self.resolution])
        terms = diffusion.training_terms(data)
        vlb_bpd = (diffusion.timesteps * terms["vlb_term"] + terms["prior"]) / (dims * LN2)
        if self.loss == "simple":
            loss = terms["mse"]
        else:
            loss = hybrid_loss(terms, diffusion.timesteps, dims, self.vlb_weight)
        extra = {"mse": terms["mse"].mean()}
        if self.training:
            extra["vlb_bpd"] = vlb_bpd.mean()
        return LossOutput(loss.mean(), {}, {self.resolution: dims}, {self.resolution: False}, extra,
                          batch_size=data.shape[0])

    @torch.no_grad()
    def evaluation_log_probs(self, batch: Batch) -> dict[int, Tensor]:
        """The bound on the bins' probability: T denoiser passes (evaluation only)."""
        return {self.resolution: self.model.encode(batch.images[self.resolution]).log_prob}
