"""Latent priors: the prior protocol and the Gaussian priors of the multi-scale flows.

A prior is any :class:`LatentPrior`: ``log_prob(z, cond) -> [B]`` (nats, summed over
every non-batch dimension) and ``sample(n, cond, temperature) -> z``, with ``exact``
saying whether ``log_prob`` is the exact log-density or a lower bound on it (a DDPM
prior's variational bound). Glow takes its priors as arguments, so a diffusion model
or a flow over the latent plugs in without touching Glow.

A prior also says how it trains: ``training_estimate(z, cond) -> PriorTraining``, by
default its ``log_prob``. A prior whose ``log_prob`` is too costly for every step (a
DDPM's bound needs T denoiser passes) returns a one-sample unbiased estimate of it,
auxiliary losses of its own and, where it trains on something other than its
likelihood, the surrogate it minimizes (seed 003's Alg. 1). The model that holds the
prior adds these to its objective (``FlowModel.training_loss``), so the prior's training
rule lives with the prior and no LightningModule reaches inside the model for it.

* :class:`GaussianPrior`: the prior of the top latent. Learned per-channel mean and
  log-std (Glow's ``learntop``: a zero-init conv on a zero input, seed 004 sec. 2.3),
  optionally plus a class-dependent term: one-hot -> linear -> (mean, log-std)
  (Glow's ``ycond``; seed 000 sec. 4.3.1), and plus a zero-init conv on condition
  features (SRFlow: the top latent's prior also depends on the low-resolution image).
* :class:`GaussianSplitPrior`: the prior of a split-off half, a Gaussian whose mean and
  log-std come from a zero-init 3x3 conv on the kept half (``cond["kept"]``, seed 004
  sec. 2.3), optionally also on condition features (SRFlow).

Log-probabilities are computed in float32 or wider.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from flows.base import (LABELS, NULL_LABEL, Condition, check_labels, at_least_float32, concat_features, condition_features,
                        condition_value, guidance_of, with_condition)
from flows.nets import ZeroConv2d

LOG_2PI = math.log(2.0 * math.pi)
KEPT = "kept"  # the condition a split prior gets: the half of the activations that stays


def gaussian_log_density(x: Tensor, mean: Tensor | float, log_var: Tensor | float) -> Tensor:
    """log N(x; mean, e^log_var), elementwise, in nats (the one Gaussian density of the
    project: priors, DDPM terms, the hierarchical flow's latents)."""
    log_var = torch.as_tensor(log_var, dtype=x.dtype, device=x.device)
    return -0.5 * (LOG_2PI + log_var + (x - mean) ** 2 * torch.exp(-log_var))


def gaussian_log_prob(z: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """log N(z; mean, diag e^(2 log_std)) per sample (summed over all but the batch)."""
    z, mean, log_std = at_least_float32(z), at_least_float32(mean), at_least_float32(log_std)
    return gaussian_log_density(z, mean, 2.0 * log_std).flatten(1).sum(dim=1)


def gaussian_sample(mean: Tensor, log_std: Tensor, temperature: float) -> Tensor:
    """Reduced-temperature sampling: the prior's std is multiplied by ``temperature``
    (seed 000 sec. 4.4)."""
    return mean + temperature * torch.exp(log_std) * torch.randn_like(mean)


@dataclass
class PriorTraining:
    """What a prior contributes to a training objective (:meth:`LatentPrior.training_estimate`).

    ``log_prob``: per sample, log p(z) in nats, or (``estimated``) a one-sample unbiased
    estimate of it (of the bound, for a bound prior), with gradients. ``surrogate``: per
    sample, the nats minimized in place of ``-log_prob`` (None: ``-log_prob`` itself).
    ``terms``: named auxiliary losses (batch means), added to the model's loss with the
    weights of the LightningModule's ``loss_weights`` (1 without one). ``extra``:
    scalars to log. ``estimated``: True where ``log_prob`` is a random estimate, so
    evaluation reports the prior's ``log_prob`` itself instead
    (``FlowModel.evaluation_log_prob``)."""

    log_prob: Tensor
    surrogate: Tensor | None = None
    terms: dict[str, Tensor] = field(default_factory=dict)
    extra: dict[str, Tensor] = field(default_factory=dict)
    estimated: bool = False

    @property
    def minimized(self) -> Tensor:
        """Per sample, the nats this prior's share of the loss minimizes."""
        return -self.log_prob if self.surrogate is None else self.surrogate

    @staticmethod
    def combine(parts: list["PriorTraining"]) -> "PriorTraining":
        """The estimates of independent priors (a Glow's top and split priors) as one:
        log-probabilities and surrogates add, terms of one name add."""
        terms: dict[str, Tensor] = {}
        extra: dict[str, Tensor] = {}
        for part in parts:
            for name, value in part.terms.items():
                terms[name] = terms[name] + value if name in terms else value
            extra.update(part.extra)
        surrogate = None
        if any(part.surrogate is not None for part in parts):
            surrogate = sum(part.minimized for part in parts)
        return PriorTraining(sum(part.log_prob for part in parts), surrogate, terms, extra,
                             any(part.estimated for part in parts))


class LatentPrior(nn.Module):
    """p(z | cond). Subclasses implement :meth:`log_prob` and :meth:`sample`; set
    ``exact = False`` when ``log_prob`` is a lower bound, and override
    :meth:`training_estimate` when training should not call ``log_prob``."""

    exact: bool = True

    def log_prob(self, z: Tensor, cond: Condition = None) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement log_prob")

    def training_estimate(self, z: Tensor, cond: Condition = None) -> PriorTraining:
        """What a training step minimizes for this prior. Default: ``log_prob`` itself."""
        return PriorTraining(self.log_prob(z, cond))

    def sample(self, n: int, cond: Condition = None, temperature: float = 1.0) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement sample")

    def compile_sampler(self, **options) -> bool:
        """Compile the step of a prior that samples by a loop of network calls, and say
        so (True); the model then leaves its own sampling eager
        (:meth:`flows.model.FlowModel.compile_sampler`). Default: False, a draw is a few
        ops that compile with the flow that uses them."""
        return False

    def _device(self) -> torch.device:
        return next(self.parameters(), torch.empty(0)).device


# Glow builds its priors from these (a class, or class_path + init_args in YAML).
TopPriorFactory = Callable[[tuple[int, int, int]], LatentPrior]  # (latent shape) -> prior
SplitPriorFactory = Callable[[int, tuple[int, int, int]], LatentPrior]  # (kept channels, latent shape)


class GaussianPrior(LatentPrior):
    def __init__(self, shape: tuple[int, int, int], learned: bool = True,
                 num_classes: int = 0, cond_channels: int = 0) -> None:
        super().__init__()
        channels = shape[0]
        self.shape = tuple(shape)
        self.num_classes = num_classes
        self.learned = learned
        self.cond_channels = cond_channels
        if cond_channels:
            self.cond_conv = ZeroConv2d(cond_channels, 2 * channels, 3)
        if learned:
            self.mean = nn.Parameter(torch.zeros(1, channels, 1, 1))
            self.log_std = nn.Parameter(torch.zeros(1, channels, 1, 1))
        if num_classes:
            self.class_embedding = nn.Linear(num_classes, 2 * channels)
            nn.init.zeros_(self.class_embedding.weight)
            nn.init.zeros_(self.class_embedding.bias)

    def params(self, n: int, cond: Condition = None, device=None) -> tuple[Tensor, Tensor]:
        device = self._device() if device is None else device
        dtype = torch.promote_types(next(self.parameters(), torch.empty(0)).dtype, torch.float32)
        mean = torch.zeros(n, *self.shape, device=device, dtype=dtype)
        log_std = torch.zeros_like(mean)
        if self.learned:
            mean = mean + self.mean
            log_std = log_std + self.log_std
        if self.num_classes:
            y = condition_value(cond, LABELS)
            if y is None:
                raise ValueError(f"this prior is class-conditional: pass labels as cond['{LABELS}']")
            y = check_labels(y, self.num_classes)
            # The null class is the all-zero one-hot: the embedding's bias alone.
            # (A comparison, not F.one_hot, which reads the labels back to check their range.)
            classes = torch.arange(self.num_classes, device=y.device)
            onehot = (y.long().unsqueeze(1) == classes).to(self.class_embedding.weight.dtype)
            class_mean, class_log_std = self.class_embedding(onehot).chunk(2, dim=1)
            mean = mean + class_mean[:, :, None, None]
            log_std = log_std + class_log_std[:, :, None, None]
        if self.cond_channels:
            features = condition_features(cond, self.shape[1:], "this top prior")
            out = at_least_float32(self.cond_conv(features))
            mean = mean + out[:, 0::2]
            log_std = log_std + out[:, 1::2]
        return mean, log_std

    def log_prob(self, z: Tensor, cond: Condition = None) -> Tensor:
        mean, log_std = self.params(z.shape[0], cond, z.device)
        return gaussian_log_prob(z, mean, log_std)

    def sample(self, n: int, cond: Condition = None, temperature: float = 1.0) -> Tensor:
        """Draws at ``temperature``; with classes and ``cond["guidance"] = w``, from the
        classifier-free guided Gaussian of the class's and the null class's, by the call's
        rule (:class:`flows.base.Guidance`: cfg, each of mean and log-std ``c + w (c - null)``;
        or STARFlow's)."""
        mean, log_std = self.params(n, cond)
        guidance = guidance_of(cond)
        if guidance.weight and self.num_classes:
            labels = condition_value(cond, LABELS)
            null_mean, null_log_std = self.params(n, with_condition(cond, **{LABELS: torch.full_like(labels, NULL_LABEL)}))
            # One Gaussian, no sequence: an annealed schedule is at its end, w itself.
            mean, log_std = guidance.combine(mean, log_std, null_mean, null_log_std)
        return gaussian_sample(mean, log_std, temperature)


class GaussianSplitPrior(LatentPrior):
    def __init__(self, kept_channels: int, latent_channels: int, cond_channels: int = 0) -> None:
        super().__init__()
        self.cond_channels = cond_channels
        self.conv = ZeroConv2d(kept_channels + cond_channels, 2 * latent_channels, 3)

    def params(self, cond: Condition) -> tuple[Tensor, Tensor]:
        kept = condition_value(cond, KEPT)
        if kept is None:
            raise ValueError(f"a split prior conditions on the kept half: pass cond['{KEPT}']")
        net_input = concat_features(kept, cond, "this split prior") if self.cond_channels else kept
        out = at_least_float32(self.conv(net_input))
        return out[:, 0::2], out[:, 1::2]

    def log_prob(self, z: Tensor, cond: Condition = None) -> Tensor:
        mean, log_std = self.params(cond)
        return gaussian_log_prob(z, mean, log_std)

    def sample(self, n: int, cond: Condition = None, temperature: float = 1.0) -> Tensor:
        mean, log_std = self.params(cond)
        return gaussian_sample(mean, log_std, temperature).to(condition_value(cond, KEPT).dtype)
