"""The contract every whole model follows (Glow, RealNVP and NSF, SRFlow, the cascade,
the hierarchical flow, the diffusion-augmented flow, the pixel DDPM and TarFlow).

    encode(x, cond) -> Encoding          data -> latents, log-det and prior term apart
    decode(latents, cond, temperature)   latents -> data; a latent given as None is drawn
    sample(n, cond, temperature)         n samples
    log_prob(x, cond)                    log p(x | cond) in nats per sample, or a lower bound
    training_loss(clean, cond, n_bits=, noise=) -> Objective
                                         dequantize (the model's ``dequantizer``), encode,
                                         the loss and the log-likelihood it is built on
    evaluation_log_prob(clean, cond, n_bits=, noise=)
                                         what val/test report where the objective's
                                         log-likelihood is a random estimate (a DDPM's)

``encode`` takes continuous images in model space ([-0.5, 0.5], ``flows/quantization.py``);
``training_loss`` takes the bin centres of the discrete images and dequantizes them
itself, so a learned dequantizer (``flows/dequantization.py``) is part of the model.

``cond`` is one mapping of named conditions (``flows/base.py``: ``"labels"``,
``"lowres"``, ``"features"``); a model reads the names it needs and ignores the others,
so a caller never has to know which model takes which argument in which position.

``exact`` says whether ``log_prob`` is the exact log-density (Glow with Gaussian
priors, SRFlow) or a lower bound on it (the cascade, a DDPM prior, a variational
model). Figures computed from a bound are reported as bounds (``bpd_bound_R``).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from flows.base import (GUIDANCE, LABELS, NULL_LABEL, Condition, Guidance, condition_value, drop_labels,
                        with_condition)
from flows.dequantization import Dequantizer, DequantizerFactory, UniformDequantizer
from flows.distributions import LatentPrior, PriorTraining
from flows.quantization import likelihood_figure


@dataclass
class Encoding:
    """What :meth:`FlowModel.encode` returns.

    ``latents``: what :meth:`FlowModel.decode` takes back (a Glow: the split-off latents
    from the finest scale to the coarsest, then the top latent; a cascade: one such
    list per stage, keyed by resolution). ``logdet``: log|det d latents / dx| per
    sample. ``log_prior``: the latents' log-density under the prior (a lower bound
    when ``exact`` is False). ``exact``: whether ``log_prob`` is exact.
    A model with more to say subclasses it (``GlowEncoding``: the class head's logits;
    ``CascadeEncoding``: each stage's encoding; ``HierarchicalEncoding``: the ELBO's
    terms)."""

    latents: Any
    logdet: Tensor
    log_prior: Tensor
    exact: bool = True

    @property
    def log_prob(self) -> Tensor:
        """log p(x | cond) in nats per sample (a lower bound when not ``exact``)."""
        return self.log_prior + self.logdet


@dataclass
class Objective:
    """What :meth:`FlowModel.training_loss` returns.

    ``loss``: the scalar to minimize, before ``terms``. ``log_prob``: per sample, the
    log-likelihood it is built on in nats, as a density on model space (the
    dequantizer's ``-log q`` included), so ``bits_per_dim`` turns it into bits per dim
    of the discrete data. ``exact``: False where ``log_prob`` is a lower bound (a bound
    prior, a learned dequantizer). ``dims``: the data's dimensions D. ``terms``: named
    auxiliary losses (batch means, in bits) that a LightningModule weighs from its
    config (``FlowModule.loss_weights``), e.g. GlowCC's ``class_bits``. ``extra``:
    scalars to log. ``encoding``: the model's encoding of the dequantized images.
    ``estimated``: True where ``log_prob`` is a one-sample random estimate (a DDPM's
    one-step estimate of its bound): it is logged as an estimate in training only, and
    evaluation reports :meth:`FlowModel.evaluation_log_prob` instead. ``continuous``:
    True where the dequantizer added Gaussian noise (noise augmentation): ``log_prob`` is
    the density of the noisy data, logged as ``noisy_data_nll_bits_R``, never as bits
    per dim of the discrete data."""

    loss: Tensor
    log_prob: Tensor
    exact: bool
    dims: int
    encoding: Encoding | None = None
    terms: dict[str, Tensor] = field(default_factory=dict)
    extra: dict[str, Tensor] = field(default_factory=dict)
    estimated: bool = False
    continuous: bool = False


@dataclass
class NoisyReconstruction:
    """f^-1(f(x) + sigma eps). ``images``: the reconstructions (where a caller replaces
    failed ones, by the clean input). ``failed``: per-sample bool, True where the
    reconstruction was non-finite or exceeded an allowed magnitude."""

    images: Tensor
    failed: Tensor

    @property
    def failure_rate(self) -> Tensor:
        return self.failed.float().mean()


def declaring_parts(module: nn.Module):
    """The modules below ``module`` that declare ``exact``, without descending into them
    (a nested model derives its own) nor into dequantizers (see FlowModel.exact)."""
    for child in module.children():
        if isinstance(child, Dequantizer):
            continue
        if hasattr(child, "exact"):
            yield child
        else:
            yield from declaring_parts(child)


def temperature_per_part(temperature: float | list[float], parts: list, what: str) -> list[float]:
    """One sampling temperature per part (a cascade's stages, a hierarchy's levels): one
    number for all, or a list with one entry per part, in ``parts``' order."""
    if isinstance(temperature, (int, float)):
        return [float(temperature)] * len(parts)
    temperatures = list(temperature)
    if len(temperatures) != len(parts):
        raise ValueError(f"give one temperature, or one per {what} ({len(parts)}: {parts}), got {temperatures}")
    return [float(t) for t in temperatures]


def batch_size_of(tree) -> int:
    """The batch size of nested tensors (the first tensor's first dimension)."""
    leaves = []
    map_latents(leaves.append, tree)
    return leaves[0].shape[0]


def map_latents(fn, *trees):
    """``fn`` applied leaf-wise to latents nested in lists and dicts (None stays None)."""
    first = trees[0]
    if isinstance(first, dict):
        return {k: map_latents(fn, *(t[k] for t in trees)) for k in first}
    if isinstance(first, (list, tuple)):
        return [map_latents(fn, *items) for items in zip(*trees)]
    return None if first is None else fn(*trees)


class FlowModel(nn.Module):
    """Base of the whole models. Subclasses set ``in_channels`` and ``image_size`` and
    implement :meth:`encode`, :meth:`decode` and :meth:`sample`; a model whose loss is not
    minus its log-likelihood in bits per dim overrides :meth:`training_loss`.

    ``dequantizer``: how :meth:`training_loss` turns bin centres into continuous data
    (``flows/dequantization.py``; default uniform, which has no parameters)."""

    in_channels: int
    image_size: int
    num_classes: int = 0  # > 0: class-conditional (cond["labels"])
    # Classifier-free guidance (Ho & Salimans 2022; TarFlow sec. 2.4), for a class-conditional
    # model: the share of training labels replaced by the null class, and the guidance
    # (weight, rule, schedule, attention temperature) that sampling uses where a call's
    # cond names none (``set_guidance``).
    label_dropout: float = 0.0
    default_guidance: Guidance = Guidance()
    guides_by_attention = False  # True: guidance by the model's own sharpened attention (TarFlow)
    _null_class_checked = False  # guided_condition's one look at the labels

    def __init__(self, dequantizer: DequantizerFactory | None = None, in_channels: int | None = None) -> None:
        """``dequantizer``: a factory called with ``in_channels`` (None: uniform)."""
        super().__init__()
        self.dequantizer: Dequantizer = UniformDequantizer() if dequantizer is None else dequantizer(in_channels)

    def set_guidance(self, label_dropout: float = 0.0, guidance: float = 0.0, rule: str = "cfg",
                     schedule: str = "constant", attention_temperature: float = 1.0) -> None:
        """Check and set :attr:`label_dropout` (in [0, 1)) and the guidance a sampling call
        uses where its cond names none: the weight :attr:`guidance` (w >= 0), its rule,
        schedule and attention temperature (:class:`~flows.base.Guidance`). Guidance
        needs classes, except a model's guidance by its own sharpened attention
        (``guides_by_attention``: TarFlow). A model calls it once ``num_classes`` is set."""
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
        settings = Guidance(float(guidance), rule, schedule, float(attention_temperature))  # checks each
        by_attention = self.guides_by_attention and attention_temperature != 1.0
        if label_dropout and not self.num_classes:
            raise ValueError("label_dropout trains the null class of classifier-free guidance, which needs classes "
                             "(num_classes > 0)")
        if guidance and not self.num_classes and not by_attention:
            raise ValueError("classifier-free guidance needs classes (num_classes > 0)"
                             + ("; an unconditional TarFlow is guided by its own attention: set "
                                "guidance_attention_temperature != 1 (ml-tarflow: 0.5 to 1.5)"
                                if self.guides_by_attention else ""))
        if guidance and self.num_classes and not label_dropout:
            raise ValueError(f"guidance {guidance} extrapolates away from the null class, which a model trained with "
                             "label_dropout: 0 never learns (its embedding stays at its initial value): train with "
                             "label_dropout > 0 (the paper: 0.1), or set guidance: 0")
        self.label_dropout, self.default_guidance = float(label_dropout), settings

    @property
    def guidance(self) -> float:
        """The weight w of :attr:`default_guidance` (setting it keeps the rule, schedule
        and attention temperature)."""
        return self.default_guidance.weight

    @guidance.setter
    def guidance(self, weight: float) -> None:
        self.default_guidance = dataclasses.replace(self.default_guidance, weight=float(weight))

    def guided_condition(self, cond: Condition) -> Condition:
        """``cond`` with the :class:`~flows.base.Guidance` of this sampling call: the one
        it names, a weight it names with the model's rule, schedule and attention
        temperature, or the model's own. Warns when the samples would use an untrained
        null class (guidance, or labels of -1, on a model with ``label_dropout: 0``)."""
        named = condition_value(cond, GUIDANCE)
        if isinstance(named, Guidance):
            settings = named
        else:
            settings = (self.default_guidance if named is None
                        else dataclasses.replace(self.default_guidance, weight=float(named)))
        if self.num_classes and not self.label_dropout and not self._null_class_checked:
            labels = condition_value(cond, LABELS)
            # Checked at a model's first sampling call only, so that later calls read
            # nothing back to the host (tests/test_host_syncs.py).
            self._null_class_checked = True
            if settings.weight or (labels is not None and bool((labels < 0).any())):
                warnings.warn(f"{self.display_name} samples with classifier-free guidance or the null class (label "
                              f"{NULL_LABEL}), but it trains with label_dropout: 0, so its null class was never "
                              "trained and these samples follow an untrained embedding; train with label_dropout > 0",
                              stacklevel=3)
        if named is None and not settings.weight:
            return cond
        return with_condition(cond, **{GUIDANCE: settings})

    @property
    def exact(self) -> bool:
        """Whether :meth:`log_prob` is the exact log-density (else a lower bound), derived
        from the parts as SurVAE composes it: exact when every part that declares
        ``exact`` is (a prior: a DDPM's is a bound; a nested model: it derives its own).
        Bijections keep exactness and declare nothing. The dequantizer is no part of
        ``log_prob``: it joins at the objective (``Objective.exact``). A model whose
        structure is itself a bound (the hierarchical flow's variational lifting, a
        cascade beyond its base) overrides this with that fact."""
        return all(part.exact for part in declaring_parts(self))

    @property
    def dims(self) -> int:
        return self.in_channels * self.image_size ** 2

    @property
    def display_name(self) -> str:
        """The model's name in logs and metrics tables, e.g. ``Glow32``, ``NSF32``."""
        return f"{type(self).__name__}{self.image_size}"

    def encode(self, x: Any, cond: Condition = None) -> Encoding:
        raise NotImplementedError(f"{type(self).__name__} must implement encode")

    def decode(self, latents: Any, cond: Condition = None, temperature: float = 1.0) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement decode")

    def sample(self, n: int, cond: Condition = None, temperature: float = 1.0) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement sample")

    def log_prob(self, x: Any, cond: Condition = None) -> Tensor:
        return self.encode(x, cond).log_prob

    def training_loss(self, clean: Tensor, cond: Condition = None, *, n_bits: int,
                      noise: Tensor | None = None) -> Objective:
        """Dequantize the bin centres ``clean`` (``noise``: the uniform [0, 1) noise, None
        to draw it), encode, and minimize bits per dim of log p(y) - log q(u | x): for a
        uniform dequantizer Glow's objective, for a learned one Flow++'s bound (with a
        prior that trains on an estimate or a surrogate, that instead: see
        :meth:`dequantized_likelihood`). In training, ``label_dropout`` of the labels
        are the null class."""
        if self.training:  # classifier-free guidance trains the null class on these labels
            cond = drop_labels(cond, self.label_dropout)
        return self.dequantized_likelihood(clean, cond, n_bits, noise)

    def encode_for_training(self, x: Tensor, cond: Condition = None) -> tuple[Encoding, PriorTraining]:
        """:meth:`encode` with what the priors train on (``PriorTraining``: a DDPM prior's
        one-step estimate of its bound, its auxiliary losses), the encoding's
        ``log_prior`` being the ``PriorTraining``'s ``log_prob``. Default: the encoding's
        own log-prior; a model whose priors have training estimates overrides it."""
        encoding = self.encode(x, cond)
        return encoding, PriorTraining(encoding.log_prior)

    def dequantized_likelihood(self, clean: Tensor, cond: Condition, n_bits: int,
                               noise: Tensor | None) -> Objective:
        """What every objective starts from: dequantize with the model's ``dequantizer``,
        encode (:meth:`encode_for_training`), and log p(y) - log q(u | x) with its exact
        flag. ``loss``: bits per dim of that log-likelihood, with the priors' surrogates
        in place of their log-densities where they have one, plus nothing else (a model
        with its own loss replaces it); the priors' auxiliary losses are ``terms``."""
        dequantized = self.dequantizer(clean, 2.0 ** -n_bits, noise)
        encoding, prior = self.encode_for_training(dequantized.images, cond)
        log_prob = encoding.log_prob - dequantized.log_q
        # The encoding's log_prior is the prior's training log_prob (encode_for_training):
        # where the prior trains on a surrogate, that replaces it in the loss.
        minimized = log_prob if prior.surrogate is None else log_prob - encoding.log_prior - prior.surrogate
        extra = dict(prior.extra)
        if not dequantized.exact:  # how far the learned q is from uniform, in bits per dim
            extra["dequantization_log_q_bpd"] = (dequantized.log_q / (self.dims * math.log(2.0))).mean()
        if prior.estimated:  # the flow's share of the estimate, the rest being the prior's
            extra["logdet_bpd"] = (-encoding.logdet / (self.dims * math.log(2.0))).mean()
        # Noisy data have no bins: their loss is the bits per dim of the density itself.
        loss = likelihood_figure(minimized, self.dims, n_bits, dequantized.continuous).mean()
        return Objective(loss, log_prob, encoding.exact and dequantized.exact, self.dims, encoding,
                         dict(prior.terms), extra, prior.estimated, dequantized.continuous)

    @torch.no_grad()
    def evaluation_log_prob(self, clean: Tensor, cond: Condition = None, *, n_bits: int,
                            noise: Tensor | None = None) -> Tensor:
        """The log-likelihood that val/test report where the training objective's is a
        random estimate (``Objective.estimated``): dequantized as in training, the full
        :meth:`log_prob` (a DDPM prior's T-step bound), minus log q(u | x). Nats per
        sample, a density on model space like ``Objective.log_prob``."""
        dequantized = self.dequantizer(clean, 2.0 ** -n_bits, noise)
        return self.log_prob(dequantized.images, cond) - dequantized.log_q

    def denoise(self, x: Tensor, cond: Condition = None) -> Tensor:
        """Score-based denoising of samples of a model trained on noisy data (TarFlow sec.
        2.3): Tweedie's formula E[x | y] = y + sigma^2 grad_y log p(y) for y = x + sigma eps
        with p the model's density of the noisy data, sigma its dequantizer's
        ``noise_std``; one autograd pass through :meth:`log_prob`. Needs the exact density
        (a bound's gradient is not the score) and noise augmentation (else sigma is
        undefined)."""
        sigma = self.dequantizer.noise_std
        if sigma is None:
            raise ValueError(f"{self.display_name} was not trained on noisy data (its dequantizer is "
                             f"{type(self.dequantizer).__name__}): denoising needs the noise std of a "
                             "GaussianNoiseDequantizer (flows/dequantization.py)")
        if not self.exact:
            raise ValueError(f"{self.display_name}'s log-likelihood is a bound, whose gradient is not the score "
                             "that denoising needs")
        # Sampling may run under inference mode (Lightning's validation and test loops):
        # leave it, with copies of the inputs, which inference mode made unusable by autograd.
        with torch.inference_mode(False), torch.enable_grad():
            y = x.detach().clone().requires_grad_(True)
            if isinstance(cond, dict):
                cond = {k: v.clone() if isinstance(v, Tensor) else v for k, v in cond.items()}
            (score,) = torch.autograd.grad(self.log_prob(y, cond).sum(), y)
            return (y + sigma ** 2 * score).detach()

    def compile_sampler(self, **options) -> None:
        """Compile what a sampling call runs (``options``: torch.compile's, e.g. ``mode``).
        Default: :meth:`sample` as a whole, one graph for the single pass of a Glow,
        RealNVP, NSF, SRFlow, cascade or hierarchical flow; where a prior samples by a loop
        of network calls (a diffusion prior) the prior compiles its step instead and the
        flow's one pass stays eager (beside T denoiser calls it is negligible). TarFlow
        compiles its patch step. Parameters and checkpoints keep their names: the compiled
        functions are instance attributes, not wrapper modules."""
        priors_with_loops = [module.compile_sampler(**options) for module in self.modules()
                             if isinstance(module, LatentPrior)]
        if not any(priors_with_loops):
            self.sample = torch.compile(self.sample, **options)

    def finish_samples(self, x: Tensor, cond: Condition = None) -> Tensor:
        """What :meth:`sample` hands out: ``x`` denoised where the dequantizer asks for it
        (noise augmentation with ``denoise_samples``), else ``x``."""
        return self.denoise(x, cond) if self.dequantizer.denoise_samples else x

    def check_dequantizer(self) -> None:
        """Raise ValueError where the dequantizer does not suit the model: built for
        another channel count, or denoising samples of a density that is a bound."""
        if self.dequantizer.in_channels not in (None, self.in_channels):
            raise ValueError(f"the dequantizer was built for {self.dequantizer.in_channels} channels but the "
                             f"model for {self.in_channels}; set the dequantizer's in_channels: {self.in_channels}")
        if self.dequantizer.denoise_samples and not self.exact:
            raise ValueError(f"{self.display_name}'s log-likelihood is a bound, whose gradient is not the score "
                             "that denoising needs: set the dequantizer's denoise_samples: false")

    @torch.no_grad()
    def reconstruct_with_latent_noise(self, x: Any, cond: Condition, sigma: float,
                                      max_abs: float = math.inf) -> NoisyReconstruction:
        """f^{-1}(f(x) + sigma * eps), the same sigma on every latent (seed 000 sec. 3.2
        and 4.4.2), in eval mode (no data-dependent initialization may happen on noisy
        inputs). A sample fails when its reconstruction has a non-finite value or one with
        |value| > ``max_abs`` (data lie in [-0.5, 0.5]); a failed sample is returned as the
        clean ``x``. For one image tensor ``x``."""
        was_training = self.training
        self.eval()
        try:
            latents = self.encode(x, cond).latents
            recon = self.decode(map_latents(lambda z: z + sigma * torch.randn_like(z), latents), cond).float()
        finally:
            self.train(was_training)
        failed = ~torch.isfinite(recon).flatten(1).all(dim=1)
        magnitude = torch.nan_to_num(recon, nan=0.0, posinf=0.0, neginf=0.0).abs().flatten(1).amax(dim=1)
        failed = failed | (magnitude > max_abs)
        images = torch.where(failed.view(-1, *[1] * (recon.dim() - 1)), x.float(), recon).to(x.dtype)
        return NoisyReconstruction(images, failed)

    # --- latent groups: what the analyses zero, resample and label, finest first ------------
    def latent_groups(self, latents: Any) -> list:
        """The keys of ``latents``' groups, finest first. Default: list indices (a Glow's
        split-off latents from the finest scale, then the top latent)."""
        return list(range(len(latents)))

    def latent_group_name(self, key: Any) -> str:
        """A figure label: ``z0`` (a Glow's first split-off) ... ``zL-1`` (its top latent)."""
        return f"z{key}"

    def without_groups(self, latents: Any, keys: Any) -> Any:
        """A copy of ``latents`` with the groups ``keys`` set to None (drawn from their
        priors on decode)."""
        keys = set(keys)
        return [None if i in keys else z for i, z in enumerate(latents)]

    def _device(self) -> torch.device:
        return next(self.parameters(), torch.empty(0)).device
