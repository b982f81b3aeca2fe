"""CSRFlow as a LightningModule: a base Glow and SRFlow stages trained on the
resolutions of one pyramid batch (seed 000 ch. 3-4).

Every stage is a part (``parts.py``) with its own seed optimizer settings (one Adamax
group each), its own checkpoint, and, for SR stages, an RRDB encoder loaded from its
L1 pre-training and frozen for the first steps. Stages not in ``train_stages`` are
frozen, so a cluster can train the stages as parallel jobs and a variational stage
can train against a frozen, finished previous stage, as the seed does. The model is
named as in Tables 4.2 and 4.3, e.g. ``Glow16-SRF32(0.02)-SRF64(0.50)``.

Logged figures (resolution in every name):
  ``bpd_B``               the base Glow's exact bits/dim at its resolution B;
  ``bpd_bound_R``         the cascade's bits/dim of the images at R > B,
                          -log P(x_R) / (D_R log 2) with log P(x_R) the sum of the
                          stages' log-probabilities up to R: an upper bound
                          (flows/cascade.py says why);
  ``bpd_R_given_R/2``     an SR stage's own conditional bits/dim (exact);
  ``replacement_rate_R``  share of a variational stage's noisy conditions replaced
                          by clean ones (sec. 4.4);
  ``failure_rate_R_sigmaS``  share of images whose reconstruction with latent noise
                          S through the stage at R is non-finite (sec. 4.4.2, Fig. 4.3).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from flows.base import LABELS, LOWRES
from flows.cascade import Cascade
from flows.model import FlowModel
from flows.quantization import bits_per_dim
from flows.srflow import SRFlow
from lightning_modules.base import Batch, FlowModule, LossOutput
from lightning_modules.parts import Freeze, InitialWeights, OptimizerSettings, Part

SRFLOW_MILESTONES = [100_000, 150_000, 180_000, 190_000]


@dataclass
class GlowStage:
    """The cascade's base: ``flow``, any model of one image size (``class_path: flows.Glow``;
    seed 000 sec. 4.3.1: L=3, K=32, 512 hidden, no squishing; or NSF, RealNVP,
    ``flows.tarflow.TarFlow``) and its optimizer (sec. 4.3.2: Adamax 5e-4, betas
    (0.9, 0.999), weight decay 5e-5, linear warm-up over 5 epochs). ``checkpoint``: a
    cascade or Glow checkpoint to load this stage from (overrides ``init_checkpoint``)."""

    flow: FlowModel
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    checkpoint: str | None = None


def srflow_optimizer() -> OptimizerSettings:
    """Seed 000 sec. 4.3.2: Adamax 2.5e-4, betas (0.9, 0.99), no weight decay, no warm-up,
    lr halved at 100k, 150k, 180k and 190k steps."""
    return OptimizerSettings(lr=2.5e-4, betas=(0.9, 0.99), weight_decay=0.0, warmup_epochs=0.0,
                             lr_milestones=list(SRFLOW_MILESTONES))


@dataclass
class SRFlowStage:
    """One 2x super-resolution stage: ``flow`` (``class_path: flows.SRFlow``; None: the
    seed's SRFlow of sec. 4.3.1, L=4, K=16, 64 hidden, affine injectors, squishing
    a=0.5, 23-block RRDB, at twice the previous stage's resolution with the base's
    channels and classes) and its optimizer (:func:`srflow_optimizer`).

    ``sigma``: > 0 trains the stage variationally against the previous one (sec. 3.2).
    ``encoder_checkpoint``: an RRDB L1 pre-training checkpoint (RRDBPretrainModule).
    ``freeze_encoder_steps``: optimizer steps during which the RRDB is frozen (100k of 200k).
    ``checkpoint``: as for :class:`GlowStage`."""

    flow: SRFlow | None = None
    sigma: float = 0.0
    optimizer: OptimizerSettings = field(default_factory=srflow_optimizer)
    encoder_checkpoint: str | None = None
    freeze_encoder_steps: int = 100_000
    checkpoint: str | None = None


class CascadeModule(FlowModule):
    """Glow{r0}-SRF{2 r0}-SRF{4 r0}... trained on one pyramid.

    Args:
        base: the base stage. sr_stages: one SR stage per doubling, in order.
        train_stages: the resolutions to train (default: all). The others are frozen:
            loaded from ``init_checkpoint`` or their own ``checkpoint``, kept in eval
            mode, left out of the optimizer (the seed's staged runs).
        init_checkpoint: a cascade checkpoint; every stage found in it is loaded.
        class_loss_weight: lambda_c of each stage's class-logits cross-entropy (for
            class-conditional stages, ``num_classes`` in their flows).
        max_reconstruction_abs: a variational reconstruction with a value beyond this
            magnitude counts as failed (data lie in [-0.5, 0.5]).
        failure_probe_sigmas: latent noise levels of the sample-failure probe.
        failure_probe_every_n_steps: how often the probe runs (0: never).
        sigma_is: what a stage's ``sigma`` (and the probe's and the noise sweep's) is:
            the standard deviation of the latent noise ("std", the default), or its
            variance ("variance": the noise std is sqrt(sigma)). Seed 000 writes
            q(z|x) = N(z, sigma I) in eq. 3.12-3.14 (a variance), but its experiments
            call sigma "the standard deviation of the approximate posterior" (sec.
            3.2.1) and disturb the condition "with sigma standard-deviation Gaussian
            noise" (sec. 4.4.1); Table 4.2's sigmas come from those experiments, so
            "std" is the reading that reproduces them.
    The remaining args are :class:`FlowModule`'s.
    """

    def __init__(self, *, base: GlowStage, sr_stages: list[SRFlowStage],
                 train_stages: list[int] | None = None, init_checkpoint: str | None = None,
                 class_loss_weight: float = 0.01, max_reconstruction_abs: float = 1.0,
                 failure_probe_sigmas: list[float] | None = None,
                 failure_probe_every_n_steps: int = 100, sigma_is: Literal["std", "variance"] = "std",
                 **training) -> None:
        super().__init__(**training)
        self.save_config()
        self.model = Cascade(base=base.flow, sr_stages=self._sr_flows(base.flow, sr_stages), n_bits=self.n_bits)
        self.stage_settings = {r: s for r, s in zip(self.model.resolutions, [base, *sr_stages])}
        classes = {getattr(self.model.stage(r), "num_classes", 0) for r in self.model.resolutions}
        if len(classes) > 1:
            raise ValueError(f"every stage must have the same num_classes, got {sorted(classes)}")
        self._num_classes = classes.pop()
        self.loss_weights = {"class_bits": class_loss_weight}
        self.max_reconstruction_abs = max_reconstruction_abs
        self.failure_probe_sigmas = list(failure_probe_sigmas if failure_probe_sigmas is not None else [0.5, 1.0])
        self.failure_probe_every_n_steps = failure_probe_every_n_steps
        self.sigma_is = sigma_is
        train_stages = self.model.resolutions if train_stages is None else train_stages
        unknown = [r for r in train_stages if r not in self.model.resolutions]
        if unknown:
            raise ValueError(f"train_stages {unknown} are not stages of this cascade "
                             f"(resolutions {self.model.resolutions})")
        self.train_stages = sorted(set(train_stages))
        self._check_variational_stages()
        self.load_parts(init_checkpoint)

    @staticmethod
    def _sr_flows(base: FlowModel, sr_stages: list[SRFlowStage]) -> list[SRFlow]:
        flows, size = [], base.image_size
        for stage in sr_stages:
            size *= 2
            flows.append(stage.flow if stage.flow is not None else
                         SRFlow(in_channels=base.in_channels, image_size=size, num_classes=base.num_classes))
        return flows

    # --- configuration ----------------------------------------------------------------
    def sigma(self, resolution: int) -> float:
        return getattr(self.stage_settings[resolution], "sigma", 0.0)

    @property
    def trained_resolutions(self) -> list[int]:
        return [r for r in self.model.resolutions if r in self.train_stages]

    def _check_variational_stages(self) -> None:
        for resolution in self.model.resolutions[1:]:
            sigma = self.sigma(resolution)
            if sigma < 0:
                raise ValueError(f"the stage at {resolution}px has sigma {sigma}; sigma must be >= 0")
            if sigma > 0 and {resolution, resolution // 2} <= set(self.train_stages):
                warnings.warn(
                    f"the stage at {resolution}px trains variationally (sigma={sigma}) while the "
                    f"stage at {resolution // 2}px trains too. The seed (sec. 3.2) trains against a "
                    f"finished, frozen previous stage: train the {resolution // 2}px stage first, "
                    f"then set train_stages: [{resolution}] and init_checkpoint. (The noisy "
                    "conditions never pass gradients to the previous stage either way.)", stacklevel=3)

    def parts(self) -> list[Part]:
        parts = []
        for resolution in self.model.resolutions:
            settings, stage = self.stage_settings[resolution], self.model.stage(resolution)
            # A stage's own key; for the base also a GlowModule checkpoint's whole model.
            prefixes = [f"model.stages.{resolution}."]
            initial, freezes = [], []
            if isinstance(settings, SRFlowStage):
                freezes.append(Freeze(stage.encoder, before_step=settings.freeze_encoder_steps))
                if settings.encoder_checkpoint:
                    initial.append(InitialWeights(stage.encoder, settings.encoder_checkpoint, ["encoder."],
                                                  f"RRDB encoder of SRF{resolution}"))
            else:
                prefixes.append("model.")
            parts.append(Part(self.stage_name(resolution), stage, settings.optimizer, prefixes,
                              resolution in self.train_stages, settings.checkpoint, initial, freezes))
        return parts

    def stage_name(self, resolution: int) -> str:
        cc = "CC" if self.num_classes else ""
        if resolution == self.model.base_resolution:  # the base's own name: Glow, NSF, TarFlow, ...
            return self.model.base.display_name
        sigma = self.sigma(resolution)
        return f"SRF{cc}{resolution}" + (f"({sigma:.2f})" if sigma > 0 else "")

    @property
    def model_name(self) -> str:
        """Tables 4.2 / 4.3 naming, e.g. Glow16-SRF32(0.02)-SRF64(0.50)."""
        return "-".join(self.stage_name(r) for r in self.model.resolutions)

    @property
    def num_classes(self) -> int:
        """Every stage's class count (they must agree)."""
        return self._num_classes

    @property
    def resolutions(self) -> list[int]:
        return self.model.resolutions

    def check_temperature(self, temperature) -> None:
        self.model.temperatures(temperature)  # one, or one per stage

    # --- losses ------------------------------------------------------------------------
    def compute_losses(self, batch: Batch) -> LossOutput:
        """The model walks the batch through its stages (``Cascade.stage_objectives``);
        the module chooses the stages and their latent noise, weighs the stages' losses
        and names the figures. While training, frozen stages are skipped (they cost
        compute and have no loss); evaluation computes every stage, so the cascade's
        figures are complete. ``log_densities`` hold log P(x_R) at each resolution whose
        stages all ran (empty while training with a frozen base: then only the stages'
        own figures are logged)."""
        training = self.training
        resolutions = self.trained_resolutions if training else self.model.resolutions
        latent_noise = {r: self.noise_std(self.sigma(r)) for r in resolutions if training and self.sigma(r) > 0}
        result = self.model.stage_objectives(batch.clean, batch.noise, {LABELS: batch.labels}, n_bits=self.n_bits,
                                             resolutions=resolutions, latent_noise=latent_noise,
                                             max_abs=self.max_reconstruction_abs)
        loss = batch.images[self.model.base_resolution].new_zeros(())
        extra: dict[str, Tensor] = {f"replacement_rate_{r}": rate for r, rate in result.replacement_rates.items()}
        for resolution, objective in result.stages.items():
            if resolution in self.train_stages:
                loss = loss + self.weighted_loss(objective)
            extra.update({f"{name}_{resolution}": value for name, value in {**objective.terms, **objective.extra}.items()})
            if resolution != self.model.base_resolution:
                extra[f"bpd_{resolution}_given_{resolution // 2}"] = \
                    bits_per_dim(objective.log_prob.detach(), objective.dims, self.n_bits).mean()
        return LossOutput(loss, result.log_densities, {r: self.model.stage(r).dims for r in result.log_densities},
                          result.exact, extra, batch.size)

    def training_diagnostics(self, batch: Batch) -> dict[str, Tensor]:
        if self.failure_probe_every_n_steps and self.global_step % self.failure_probe_every_n_steps == 0:
            return self._failure_probe(batch, {LABELS: batch.labels, LOWRES: batch.clean})
        return {}

    @torch.no_grad()
    def _failure_probe(self, batch: Batch, cond: dict) -> dict[str, Tensor]:
        """Sample failure rate (seed 000 sec. 4.4.2): the share of training images whose
        reconstruction through the stage, after adding sigma noise to every latent, has
        a non-finite value."""
        out = {}
        for resolution in self.trained_resolutions:
            for sigma in self.failure_probe_sigmas:
                recon = self.model.stage_reconstruction_with_latent_noise(
                    resolution, batch.clean[resolution], self.noise_std(sigma), cond, max_abs=math.inf)
                out[f"failure_rate_{resolution}_sigma{sigma:g}"] = recon.failure_rate
        return out

    # --- for the analyses ------------------------------------------------------------------
    noise_sweep_sigmas = [0.0, 0.25, 0.5, 0.75, 1.0]  # seed 000 Fig. 4.2 (SRFlow)

    def noise_std(self, sigma: float) -> float:
        return sigma if self.sigma_is == "std" else math.sqrt(sigma)

    def model_input(self, batch: Batch) -> tuple[dict, dict]:
        return batch.images, {LABELS: batch.labels, LOWRES: batch.clean}

    def images_of(self, decoded: dict) -> dict[int, Tensor]:
        return dict(decoded)

    @torch.no_grad()
    def noisy_reconstructions(self, batch: Batch, sigma: float) -> dict:
        """Per stage, with its clean condition (seed 000 Fig. 4.2): f^-1(f(x) + sigma eps)
        of the images at each resolution; failed where non-finite."""
        cond = {LABELS: batch.labels, LOWRES: batch.clean}
        return {r: self.model.stage_reconstruction_with_latent_noise(r, batch.clean[r], self.noise_std(sigma), cond,
                                                                     max_abs=math.inf)
                for r in self.model.resolutions}

    def sample_images(self, n: int, temperature: float | list[float]) -> dict[int, Tensor]:
        cond = None
        if self.num_classes:  # a row-major grid: classes cycle along each row
            cond = {LABELS: torch.arange(n, device=self.device) % self.num_classes}
        return self.model.sample(n, cond, temperature)
