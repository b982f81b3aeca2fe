"""The family contract of the LightningModules: what a family implements and every hook
a callback reads (:class:`FamilyInterface`, with the defaults for a model of one image
size; callbacks reach a module through :func:`family_of`, never ``getattr``), what its
``compute_losses`` takes (:class:`Batch`) and returns (:class:`LossOutput`), and the name
a logged bits-per-dim figure gets. ``base.FlowModule`` does the optimization and the
logging around it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from flows.base import LABELS
from flows.model import NoisyReconstruction, Objective
from flows.quantization import likelihood_figure


@dataclass
class Batch:
    """A batch ready for the model. ``images``: {resolution: uniformly dequantized
    images in [-0.5, 0.5]}. ``clean``: {resolution: the same images at the centres of
    their bins} (deterministic: what conditional stages condition on). ``labels``: [B].
    ``noise``: {resolution: the uniform [0, 1) noise of ``images``}, which a model's own
    dequantizer takes (``FlowModel.training_loss``); missing: drawn by the model."""

    images: dict[int, Tensor]
    clean: dict[int, Tensor]
    labels: Tensor
    noise: dict[int, Tensor] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.labels.shape[0]


@dataclass
class LossOutput:
    """``loss``: the scalar to minimize. ``log_prob``: {resolution: log-density of the
    images at that resolution, nats per sample}, logged as bits per dim (Glow's formula
    with ``dims``). ``exact``: {resolution: False} where ``log_prob`` is a lower bound
    (logged as ``bpd_bound_R``); missing resolutions are exact. ``extra``: other
    scalars to log. ``batch_size``: needed when ``log_prob`` is empty. ``estimated``:
    the resolutions whose objective's log-likelihood was a random estimate (left out of
    ``log_prob``): val/test fill them in with ``FamilyInterface.evaluation_log_probs``.
    ``continuous``: the resolutions whose ``log_prob`` is the density of noisy data
    (noise augmentation), logged as ``noisy_data_nll_bits_R`` instead of bits per dim."""

    loss: Tensor
    log_prob: dict[int, Tensor]
    dims: dict[int, int]
    exact: dict[int, bool] = field(default_factory=dict)
    extra: dict[str, Tensor] = field(default_factory=dict)
    batch_size: int | None = None
    estimated: set[int] = field(default_factory=set)
    continuous: set[int] = field(default_factory=set)


# The figure of a model trained on noisy data: -log p(x + sigma eps) / (D log 2), bits per
# dim of a continuous density. Named apart so that no table or monitor takes it for the
# discrete data's bits per dim (it is lower, and can be negative).
NOISY_DATA_METRIC = "noisy_data_nll_bits"


def family_of(pl_module, user: str) -> "FamilyInterface":
    """``pl_module`` as the family contract that ``user`` (a callback) relies on; a clear
    error for a LightningModule that does not implement it. Callbacks read a module
    through this contract only (no probing with getattr), so every hook they use has
    one definition and one default, here."""
    if isinstance(pl_module, FamilyInterface):
        return pl_module
    from lightning_modules.errors import ConfigurationError

    raise ConfigurationError(f"{user} needs one of this project's LightningModules (a FlowModule family, which "
                             f"implements lightning_modules.family.FamilyInterface); {type(pl_module).__name__} is not "
                             f"one: remove {user} from trainer.callbacks, or build the module on FlowModule")


def bpd_name(resolution: int, exact: bool, bound_metric: str = "bpd_bound", continuous: bool = False,
             continuous_metric: str = NOISY_DATA_METRIC) -> str:
    if continuous:
        return f"{continuous_metric}_{resolution}"
    return f"bpd_{resolution}" if exact else f"{bound_metric}_{resolution}"


class FamilyInterface:
    """What a family's LightningModule provides. Every default here is for a model of one
    image size whose objective is its own ``training_loss`` (the Glow family); the
    cascade overrides the resolutions, the condition and the samples, and a family with
    parts overrides ``compute_losses`` to compose its model's objectives."""

    model: nn.Module
    # The weight of each named auxiliary term of the model's Objective in the loss (e.g.
    # GlowCC's class_bits, lambda_c); a term without one counts fully.
    loss_weights: dict[str, float] = {}
    # The name of a bits-per-dim bound in the logs (``<bound_metric>_R``): the cascade's
    # sum of stage likelihoods is ``bpd_bound``, a variational model's ELBO ``elbo_bpd``.
    bound_metric: str = "bpd_bound"
    # The real images FID/KID compare with, unless the callback's settings name a split
    # (seed 001 evaluates against the training set).
    fid_reference_split: str = "test"
    # What a latent-noise ``sigma`` setting is (the noise sweep's legend): a standard
    # deviation, or (the cascade's ``sigma_is: variance``) a variance.
    sigma_is: str = "std"
    n_bits: int = 8  # the data's bits per channel (FlowModule sets it from its argument)
    # The name of a continuous density's figure in the logs (``<continuous_metric>_R``,
    # bits per dim of that density): noisy images' (noise augmentation), or a latent
    # flow's noisy latents' (``latent_nll_bits``). Never ``bpd``: it is not the images'.
    continuous_metric: str = NOISY_DATA_METRIC

    @property
    def micro_batches_pending(self) -> int:
        """Micro-batches whose summed gradients wait for an optimizer step (FlowModule
        counts them; a checkpoint is written only where this is 0)."""
        return 0

    # Defaults for a model of one image size (every family but the cascade, which
    # overrides them): its resolution, its condition, its samples and its data.
    @property
    def resolution(self) -> int:
        return self.model.image_size

    @property
    def resolutions(self) -> list[int]:
        return [self.resolution]

    def condition(self, labels: Tensor) -> dict | None:
        """The model's ``cond`` for a batch's labels: the labels for a class-conditional
        model, else None."""
        return {LABELS: labels} if self.model.num_classes else None

    @property
    def in_channels(self) -> int:
        return self.model.in_channels

    @property
    def num_classes(self) -> int:
        """The classes the model conditions on (0: unconditional); the data module's
        labels must lie in ``[0, num_classes)`` (checked at setup)."""
        return self.model.num_classes

    @property
    def noisy_data_resolutions(self) -> set[int]:
        """The resolutions whose likelihood is the density of noisy data (noise
        augmentation), logged as ``noisy_data_nll_bits_R``, never as ``bpd_R``; a
        checkpoint monitor of ``bpd_R`` there is refused before the first step."""
        return {self.resolution} if self.model.dequantizer.continuous else set()

    def compute_losses(self, batch: Batch) -> LossOutput:
        """Default: the model's own objective (``FlowModel.training_loss``) at its one
        resolution."""
        r = self.resolution
        return self.loss_output(self.model.training_loss(batch.clean[r], self.condition(batch.labels),
                                                         n_bits=self.n_bits, noise=batch.noise.get(r)), r)

    def weighted_loss(self, objective: Objective) -> Tensor:
        """The objective's loss plus its auxiliary terms, each times its ``loss_weights``."""
        return objective.loss + sum((self.loss_weights.get(name, 1.0) * value
                                     for name, value in objective.terms.items()), objective.loss.new_zeros(()))

    def loss_output(self, objective: Objective, resolution: int) -> LossOutput:
        """The objective as the base logs it. A random estimate of the log-likelihood (a
        DDPM's one-step estimate) is not logged as the likelihood: in training it is
        ``nll_estimate_bpd`` (unbiased for the bound's bits per dim), and at val/test the
        full figure replaces it (:meth:`evaluation_log_probs`), since there the draws
        are fixed by the evaluation seed and would be one frozen sample of a noisy
        estimate."""
        extra = {**objective.terms, **objective.extra}
        continuous = {resolution} if objective.continuous else set()
        if not objective.estimated:
            return LossOutput(self.weighted_loss(objective), {resolution: objective.log_prob},
                              {resolution: objective.dims}, {resolution: objective.exact}, extra,
                              continuous=continuous)
        if self.training:
            name = f"{self.continuous_metric}_estimate" if objective.continuous else "nll_estimate_bpd"
            extra[name] = likelihood_figure(objective.log_prob.detach(), objective.dims, self.n_bits,
                                            objective.continuous).mean()
        return LossOutput(self.weighted_loss(objective), {}, {resolution: objective.dims},
                          {resolution: objective.exact}, extra, objective.log_prob.shape[0], {resolution},
                          continuous)

    @torch.no_grad()
    def evaluation_log_probs(self, batch: Batch, resolutions: set[int]) -> dict[int, Tensor]:
        """At val/test, {resolution: log-likelihood} for the ``resolutions`` whose objective
        gave only a random estimate: the model's :meth:`~flows.model.FlowModel.evaluation_log_prob`
        (a DDPM's full T-step bound, T denoiser passes). Evaluation only: it runs outside
        the function that ``compile: true`` wraps."""
        r = self.resolution
        if resolutions - {r}:
            raise NotImplementedError(f"{type(self).__name__} has no evaluation of resolutions {sorted(resolutions)}")
        return {r: self.model.evaluation_log_prob(batch.clean[r], self.condition(batch.labels), n_bits=self.n_bits,
                                                  noise=batch.noise.get(r))}

    def sample_images(self, n: int, temperature: float | list[float]) -> dict[int, Tensor]:
        """Samples in model space ([-0.5, 0.5]) per resolution; a class-conditional
        model's classes cycle along each row of a grid."""
        labels = torch.arange(n, device=self.device) % max(1, self.model.num_classes)
        return {self.resolution: self.model.sample(n, self.condition(labels), temperature)}

    @property
    def model_name(self) -> str:
        """The name the metrics table uses (seed 000 Tables 4.2 / 4.3 style): the model's
        ``display_name``; a family overrides it where the module adds to the name."""
        return getattr(self.model, "display_name", type(self).__name__)

    def check_temperature(self, temperature) -> None:
        """Raise ValueError when ``sample_images`` cannot take ``temperature`` (callbacks
        check theirs before the first step). Default: one number."""
        if not isinstance(temperature, (int, float)):
            raise ValueError(f"{type(self).__name__} samples at one temperature, got {temperature!r}")

    # --- what the analysis callbacks (analyses.py) ask of a module -----------------------

    noise_sweep_sigmas: list[float] = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25]  # seed 000 Fig. 4.1 (Glow)

    def model_input(self, batch) -> tuple[Any, dict | None]:
        """(x, cond) as ``self.model.encode`` takes them for a ``Batch``."""
        return batch.images[self.resolution], self.condition(batch.labels)

    def images_of(self, decoded: Any) -> dict[int, Tensor]:
        """The model's data (an input or a decoding) as {resolution: images}."""
        return {self.resolution: decoded}

    def noise_std(self, sigma: float) -> float:
        """The standard deviation of the latent noise a ``sigma`` setting means (std)."""
        return sigma

    def noisy_reconstructions(self, batch, sigma: float) -> dict[int, NoisyReconstruction]:
        """f^-1(f(x) + sigma eps) through the whole model, the same sigma on every latent
        (``FlowModel.reconstruct_with_latent_noise``; failed where non-finite)."""
        x, cond = self.model_input(batch)
        return {self.resolution: self.model.reconstruct_with_latent_noise(x, cond, self.noise_std(sigma))}
