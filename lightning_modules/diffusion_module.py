"""Seed 003's diffusion-augmented flow and its pixel DDPM baseline as LightningModules
(the NSF baseline is a :class:`~lightning_modules.GlowModule` with spline couplings).

Both losses are the models' own (``FlowModel.training_loss``): the DDPM prior's training
rule (``loss_mode``, ``vlb_weight``, ``bound_estimator``) is an argument of
:class:`~flows.diffusion.DiffusionPrior`, the pixel DDPM's (``loss``, ``vlb_weight``) of
:class:`~flows.diffusion.PixelDiffusion`. These modules add the optimizer settings, the
bound's name and the time-step sampler's checkpointing.

Logged (``train/``, ``val/``, ``test/``), every number in stated units:

* ``nll_bpd_R`` (val/test only): the honest number, an **upper bound** on the negative
  log-likelihood in bits per dim, (-log|det df/dx| + the DDPM's full negative ELBO of
  z_0 over all T steps + D log 2^n_bits) / (D log 2) (for the pixel DDPM: its bound on
  the bins' probability). It costs T denoiser passes per batch: evaluation only; limit
  it with ``trainer.limit_val_batches`` where that is too slow.
* ``loss``: what the module minimizes (see ``loss_mode``), not a likelihood.
* ``mse``: L_simple; ``logdet_bpd``: -log|det| / (D log 2) (flow only);
  ``denoiser_hybrid`` (``loss_mode: bound``): the denoiser's hybrid loss of the detached
  latent.
* ``vlb_bpd`` and ``nll_estimate_bpd`` (training only): the unbiased one-step estimates
  of the DDPM's bound of z_0 and of ``nll_bpd``, with fresh time steps every step. At
  evaluation they are not logged: the draws there are fixed by ``evaluation_seed`` (so
  that epochs compare), which would make them one frozen sample of a noisy estimate,
  and ``nll_bpd`` gives the quantity itself.
"""
from __future__ import annotations

from flows.diffusion import DiffusionPrior, LossMode, PixelDiffusion, PixelLoss
from flows.timestep_sampling import BoundEstimator, TimestepSampler
from flows.glow import Glow
from lightning_modules.base import FlowModule
from lightning_modules.errors import ConfigurationError
from lightning_modules.parts import OptimizerSettings, Part

SAMPLER_KEY = "timestep_sampler"


def configured(configure, *settings) -> None:
    """Apply a model's training settings given to the module (the place they had before
    the model owned its objective, kept so that those configs and checkpoints load),
    with a ConfigurationError for a bad value."""
    try:
        configure(*settings)
    except ValueError as error:
        raise ConfigurationError(str(error)) from error


class DiffusionFlowModule(FlowModule):
    """A Glow whose whole latent z_0 = f(x) has a DDPM prior (seed 003 ch. 4), trained as
    two parts: the flow and the DDPM, each with its own Adam group.

    Args:
        flow: a :class:`~flows.Glow` with ``joint_prior`` a
            :class:`~flows.diffusion.DiffusionPrior` (seed 003 Table 5.1 in
            ``experiments/diffusion_flow_*.yaml``), whose ``loss_mode``,
            ``vlb_weight`` and ``bound_estimator`` say how it trains.
        loss_mode, vlb_weight, bound_estimator: the same, for configs and checkpoints
            from before they were the prior's: when given they replace the prior's.
        flow_optimizer, diffusion_optimizer: the Glow's and the DDPM's Adam groups.
    The remaining args are :class:`FlowModule`'s.
    """

    bound_metric = "nll_bpd"

    def __init__(self, *, flow: Glow, loss_mode: LossMode | None = None, vlb_weight: float | None = None,
                 bound_estimator: BoundEstimator | None = None,
                 flow_optimizer: OptimizerSettings | None = None,
                 diffusion_optimizer: OptimizerSettings | None = None, grad_clip_norm: float | None = 1.0,
                 **training) -> None:
        super().__init__(grad_clip_norm=grad_clip_norm, **training)
        self.save_config()
        prior = getattr(flow, "joint_prior", None)
        if not isinstance(prior, DiffusionPrior):
            raise ConfigurationError(
                "DiffusionFlowModule needs a Glow whose joint_prior is a DDPM: set flow.init_args.joint_prior: "
                "{class_path: flows.diffusion.DiffusionPrior, init_args: {...}} (see "
                "experiments/quick_diffusion_flow.yaml)")
        if (loss_mode, vlb_weight, bound_estimator) != (None, None, None):
            configured(prior.configure_training, loss_mode or prior.loss_mode,
                       prior.vlb_weight if vlb_weight is None else vlb_weight,
                       bound_estimator or prior.bound_estimator)
        self.model = flow
        # Seed 003 sec. 4.3 names Adam and no rate: 1e-3 for the flow, DDPM's 2e-4.
        self.settings = {"flow": flow_optimizer or OptimizerSettings.adam(1e-3),
                         "diffusion": diffusion_optimizer or OptimizerSettings.adam(2e-4)}
        self.load_parts()

    @property
    def diffusion(self) -> DiffusionPrior:
        return self.model.joint_prior

    @property
    def timestep_sampler(self) -> TimestepSampler:
        return self.diffusion.timestep_sampler

    @property
    def model_name(self) -> str:
        return f"DiffusionFlow{self.resolution}"

    def parts(self) -> list[Part]:
        """The DDPM, and the flow: the Glow's scales and every other sub-module of the
        Glow with parameters (a learned dequantizer), each under the flow's optimizer."""
        flow = [Part("flow" if name == "scales" else f"flow.{name}", child, self.settings["flow"], [f"model.{name}."])
                for name, child in self.model.named_children()
                if name != "joint_prior" and (name == "scales" or any(True for _ in child.parameters()))]
        return flow + [Part("diffusion", self.model.joint_prior, self.settings["diffusion"], ["model.joint_prior."])]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[SAMPLER_KEY] = self.timestep_sampler.state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if SAMPLER_KEY in checkpoint:  # older checkpoints have none: the history starts empty
            self.timestep_sampler.load_state(checkpoint[SAMPLER_KEY])


class PixelDiffusionModule(FlowModule):
    """The pixel DDPM baseline (seed 003 Tables 5.3/5.4; Ho et al. 2020).

    Args:
        model: a :class:`~flows.diffusion.PixelDiffusion` (T = 1000), whose ``loss`` and
            ``vlb_weight`` say what it minimizes.
        loss, vlb_weight: the same, for configs and checkpoints from before they were
            the model's: when given they replace the model's.
        optimizer: Adam (DDPM: 2e-4).
    The remaining args are :class:`FlowModule`'s; ``n_bits`` must equal the model's.
    """

    bound_metric = "nll_bpd"

    def __init__(self, *, model: PixelDiffusion, loss: PixelLoss | None = None, vlb_weight: float | None = None,
                 optimizer: OptimizerSettings | None = None, grad_clip_norm: float | None = 1.0,
                 **training) -> None:
        super().__init__(grad_clip_norm=grad_clip_norm, **training)
        self.save_config()
        if (loss, vlb_weight) != (None, None):
            configured(model.configure_training, loss or model.loss,
                       model.vlb_weight if vlb_weight is None else vlb_weight)
        if model.n_bits != self.n_bits:
            raise ConfigurationError(f"the model's n_bits ({model.n_bits}) differs from the module's ({self.n_bits}); "
                                     "set both to the same value")
        self.model = model
        self.optimizer_settings = optimizer or OptimizerSettings.adam(2e-4)  # DDPM
        self.load_parts()
